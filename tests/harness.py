"""Reusable helpers for tests that run real servers on 127.0.0.1 (Kafka, Redis).

Every server binds to 127.0.0.1 on a free port and lives in a temporary directory; each is stopped by
its own pid.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from streams.broker import free_port, port_open

__all__ = ["free_port", "port_open", "wait_for", "ExternalBroker", "RedisServer", "RedisUnavailable",
           "SERVICE_MISSING", "fail_service_missing"]

# the start of every message that means "a service this test needs is not installed"
SERVICE_MISSING = "service missing: "


def fail_service_missing(what: str) -> None:
    """A service this test needs is not installed: the test fails (under `make test`, CI and a
    developer's partial run alike), saying what is missing; `tools/ensure-services` installs it."""
    import pytest

    pytest.fail(SERVICE_MISSING + what + " (`tools/ensure-services` installs it)", pytrace=False)


def wait_for(predicate, timeout_s: float = 30.0, interval_s: float = 0.1, what: str = "condition"):
    """Poll ``predicate()`` until it returns something truthy; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = predicate()
        if v:
            return v
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached within {timeout_s:.0f}s")


@dataclass
class ExternalBroker:
    """A cluster the tests did not start (``ADSTREAM_TEST_BOOTSTRAP``); it is never stopped."""

    bootstrap: str
    kind: str = "external"
    data_dir: Path | None = None


class RedisUnavailable(RuntimeError):
    """The ``redis-server`` binary is not installed."""


class RedisServer:
    """Debian's ``redis-server`` on 127.0.0.1, a free port, no persistence, in ``work_dir``."""

    def __init__(self, work_dir: str | Path, port: int | None = None, binary: str | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.extra_args = list(extra_args or [])
        found = binary or shutil.which("redis-server")
        if not found:
            raise RedisUnavailable(
                "redis-server is not installed; `make test` installs it (as root), or run "
                "`sudo apt-get install -y --no-install-recommends redis-server`")
        self.binary: str = found
        self.work_dir = Path(work_dir)
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def address(self) -> str:
        """``host:port``, the form ``FeatureSettings.redis_url`` uses."""
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> RedisServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.work_dir / "redis.log", "ab")
        self._proc = subprocess.Popen(
            [self.binary, "--bind", self.host, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.work_dir), "--protected-mode", "yes", "--daemonize", "no", *self.extra_args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.work_dir)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self._proc.returncode}): "
                                   + (self.work_dir / "redis.log").read_text(errors="replace")[-2000:])
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on {self.address} did not answer PING within {timeout_s:.0f}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        self._proc = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_cluster_port(host: str = "127.0.0.1", low: int = 20000, high: int = 55535) -> int:
    """A port for a Redis Cluster node: at most 55535 (a node also listens on its port + 10000, its
    cluster bus) with both the port and its bus port free right now. An ephemeral port from the kernel
    is often above 55535, which redis-server refuses in cluster mode."""
    import random

    rng = random.Random()
    for _ in range(500):
        port = rng.randint(low, high)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as a, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as b:
                a.bind((host, port))
                b.bind((host, port + 10000))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no free port pair (p, p+10000) with p in [{low}, {high}] on {host}")


class RedisClusterServer:
    """A local Redis Cluster: ``n`` redis-server nodes with ``--cluster-enabled yes`` on free ports of
    127.0.0.1 (at most 55535, see ``free_cluster_port``), joined with ``redis-cli --cluster create``
    (masters only, slots split evenly)."""

    def __init__(self, work_dir: str | Path, n: int = 3) -> None:
        self.work_dir = Path(work_dir)
        self.nodes = [RedisServer(self.work_dir / f"node{i}", port=free_cluster_port(), extra_args=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"])
            for i in range(n)]

    @property
    def address(self) -> str:
        """``host:port,host:port,...``: Feast's connection string for ``redis_type: redis_cluster``."""
        return ",".join(n.address for n in self.nodes)

    def start(self, timeout_s: float = 60.0) -> "RedisClusterServer":
        cli = shutil.which("redis-cli")
        if not cli:
            raise RedisUnavailable("redis-cli is not installed (Debian package redis-tools)")
        for n in self.nodes:
            n.start()
        out = subprocess.run([cli, "--cluster", "create", *(n.address for n in self.nodes),
                              "--cluster-replicas", "0", "--cluster-yes"],
                             capture_output=True, text=True, timeout=timeout_s)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-1500:]} {out.stderr[-500:]}")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ok = all("cluster_state:ok" in subprocess.run(
                [cli, "-h", n.host, "-p", str(n.port), "cluster", "info"], capture_output=True, text=True,
                timeout=10).stdout for n in self.nodes)
            if ok:
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the Redis Cluster on {self.address} did not reach cluster_state:ok")

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()
