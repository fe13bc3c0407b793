"""The fault drill: the whole loop under faults, then an audit of the topics and the stores.

``run_drill`` starts its own broker and Redis in ``root``, replays a little history, and runs the
joiner (kafka runtime), the feature updater (Redis online store), the stream trainer and the online
service as processes while simulated users send requests and click. Meanwhile it

* kill -9s the joiner, the feature updater and the trainer once each (and starts them again),
* restarts the broker with its data kept (the service spools impressions meanwhile),
* stops Redis for a while and starts it again *empty* (the service degrades, the updater refills),
* sends malformed and poisoned events (bad JSON, wrong types, a far-future event time, an
  oversized record, clicks without impressions) and a poisoned training window (examples that
  all say "clicked").

Then it drains the loop and checks, from the topics and the stores (``adstream.drill_audit``):

* every ad the service served is on the impressions topic (none dropped, spool included);
* every impression became exactly one example (no key missing, none with two contents), and its
  label agrees with a recount of the clicks topic;
* the feature counts in Redis equal a recount of the impressions and clicks topics (each event
  once), for every entity;
* no version the gate rejected was ever served; the poisoned window was rejected;
* the service answered every request (degraded allowed, no error, no 5xx);
* every malformed record has its dead letter, and no click was dead-lettered as an orphan except
  the orphans sent.

:func:`adstream.drill_audit.print_table` shows the result; ``adstream drill`` exits non-zero on any failed check.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("adstream.drill")

ENTITY_FIELDS = {"user": "user_id", "ad": "ad_id", "creative": "creative_id", "query": "query",
                 "bidword": "bidword", "category": "category"}
POISON_PREFIX = "drill-poison-"
POISONED_CTR = 0.4  # a training window at least this clicked is dominated by the poisoned burst
ORPHAN_PREFIX = "drill-orphan-"


@dataclass
class DrillConfig:
    seed: int = 11
    history_s: float = 90.0  # event-time seconds of history replayed first
    history_rps: float = 6.0
    traffic_s: float = 150.0
    rate: float = 6.0
    slots: int = 3
    window_s: float = 30.0  # attribution window
    lateness_s: float = 15.0  # > the impression log's message timeout (5 s): spooled records stay on time
    window_examples: int = 250
    emit_at_click: bool = True  # the joiner emits positives at their click (join.emit_positives_at_click)
    redis_down_s: float = 8.0
    drain_timeout_s: float = 150.0
    # when each fault happens, as a fraction of the traffic time
    schedule: dict[str, float] = field(default_factory=lambda: {
        "malformed": 0.05, "kill:joiner": 0.15, "kill:feature_updater": 0.25, "kill:trainer": 0.35,
        "restart:broker": 0.45, "poison_window": 0.55, "stop:redis": 0.7})

    @classmethod
    def short(cls) -> "DrillConfig":
        """A few minutes on a 2-core machine (the version ``make test`` runs)."""
        return cls(history_s=60.0, traffic_s=75.0, rate=5.0, window_examples=150, redis_down_s=5.0,
                   drain_timeout_s=120.0)


@dataclass
class Check:
    name: str
    expected: str
    got: str
    ok: bool


@dataclass
class DrillReport:
    checks: list[Check] = field(default_factory=list)
    faults: list[tuple[float, str, str]] = field(default_factory=list)  # (t, fault, what happened)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def check(self, name: str, expected: str, got: Any, ok: bool) -> None:
        self.checks.append(Check(name, expected, str(got), bool(ok)))


# ------------------------------------------------------------------------------------- Redis


class RedisProcess:
    """Debian's redis-server on 127.0.0.1, no persistence (a restart comes back empty)."""

    def __init__(self, work_dir: Path, port: int | None = None) -> None:
        from streams.broker import free_port

        self.binary = shutil.which("redis-server")
        if not self.binary:
            from core.errors import ConfigError

            raise ConfigError("the drill needs redis-server: `sudo apt-get install -y --no-install-recommends "
                              "redis-server` (make drill installs it as root)")
        self.work_dir = work_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20.0) -> "RedisProcess":
        from streams.broker import port_open

        self.work_dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.work_dir / "redis.log", "ab")
        self.proc = subprocess.Popen([self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.work_dir)],
                                     stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        deadline = time.monotonic() + timeout_s
        while not port_open("127.0.0.1", self.port, 0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start on {self.address}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


# ------------------------------------------------------------------------------------- faults


def malformed_records(now: float) -> list[tuple[str, bytes, str]]:
    """(kind, value, dead-letter reason) of records no worker may accept, and orphan clicks."""
    good_click = {"v": 1, "type": "click", "request_id": "x", "event_time": now, "ad_id": "a0001", "user_id": "u1"}
    good_imp = {"v": 1, "type": "impression", "request_id": "drill-bad", "event_time": now, "user_id": "u1",
                "query": "q", "ad_id": "a0001", "creative_id": "a0001-c0", "bidword": "b", "category": "c",
                "position": 0, "bid": 1.0}
    out = [
        ("impression", b"{not json", "malformed_json"),
        ("impression", json.dumps({**good_imp, "position": "top"}).encode(), "wrong_type"),
        ("impression", json.dumps({k: v for k, v in good_imp.items() if k != "ad_id"}).encode(), "missing_field"),
        ("impression", json.dumps({**good_imp, "event_time": now + 86400}).encode(), "clock_skew"),
        ("click", json.dumps({**good_click, "query": "x" * 100_000}).encode(), "oversized"),
        ("click", json.dumps({**good_click, "v": 99}).encode(), "unknown_schema_version"),
        ("click", b"[1, 2, 3]", "not_an_object"),
    ]
    for i in range(3):
        out.append(("click", json.dumps({**good_click, "request_id": f"{ORPHAN_PREFIX}{i}"}).encode(), "orphan_click"))
    return out


def poisoned_window(world, n: int, seed: int) -> list[Any]:
    """``n`` well-formed examples that all say "clicked": a window no gate may publish."""
    from core.events import Example

    rng = random.Random(seed)
    now = time.time()
    out = []
    for i in range(n):
        req = world.sample_request(rng, now)
        ad = rng.choice(world.ads)
        bidword, bid = ad.bidwords[0] if ad.bidwords else ("b", 1.0)
        out.append(Example(request_id=f"{POISON_PREFIX}{i}", event_time=now - rng.uniform(0, 5), user_id=req.user_id,
                           query=req.query, ad_id=ad.id, creative_id=ad.creatives[0].id if ad.creatives else "",
                           bidword=bidword, category=ad.category, position=rng.randrange(3), bid=float(bid),
                           slot="top", domain=req.domain, clicked=1, converted=0, click_time=now))
    return out


# ------------------------------------------------------------------------------------- the run


def run_drill(root: Path, cfg: DrillConfig | None = None, say: Callable[[str], None] = print) -> DrillReport:
    """Run the drill in ``root`` (wiped first) and audit it. Everything started is stopped."""
    from adstream.drill_audit import AuditContext, audit
    from adstream.loop import Loop, _spawn, _wait_http, scrape
    from core.events import encode
    from core.settings import BrokerSettings, FeatureSettings, KafkaSettings, Settings
    from core.world import World, WorldConfig
    from streams.broker import EmbeddedBroker, free_port
    from streams.kafka_io import ensure_project_topics, make_producer, produce_json
    from streams.replay import replay
    from streams.traffic import simulate_traffic

    cfg = cfg or DrillConfig()
    root = Path(root).resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    report = DrillReport()
    broker = EmbeddedBroker(BrokerSettings(data_dir=root / "broker"), port=0, controller_port=0)
    redis = RedisProcess(root / "redis")
    loop = Loop(root)
    t0 = time.monotonic()
    try:
        broker.start()
        redis.start()
        say(f"drill: broker on {broker.bootstrap}, redis on {redis.address}, state in {root}")
        settings = Settings(kafka=KafkaSettings(bootstrap=broker.bootstrap, partitions=3),
                            features=FeatureSettings(online_store="redis", redis_url=redis.address,
                                                     repo_dir=root / "feature_repo",
                                                     checkpoint_dir=root / "feature_updater"))
        topics = settings.kafka.topics
        ensure_project_topics(broker.bootstrap, settings.kafka)
        loop.env = {"ADSTREAM_KAFKA__PARTITIONS": "3", "ADSTREAM_FEATURES__ONLINE_STORE": "redis",
                    "ADSTREAM_FEATURES__REDIS_URL": redis.address, "ADSTREAM_STATE_DIR": str(root / "state"),
                    "ADSTREAM_SERVE__IMPRESSION_SPOOL_DIR": str(root / "impression-spool")}
        world = World(WorldConfig(seed=cfg.seed))
        now = time.time()
        history = [e for e in world.generate(start_time=now - cfg.history_s - 2 * cfg.window_s,
                                             duration_s=cfg.history_s, requests_per_s=cfg.history_rps,
                                             slots=cfg.slots, seed=cfg.seed, initial_inventory=True)
                   if e.event_time < now]
        res = replay(history, broker.bootstrap, topics, progress=False)
        say(f"history replayed: {res['counts']}")

        py = sys.executable
        ports = {n: free_port() for n in ("joiner", "features", "trainer", "serve")}
        registry_dir, repo_dir = root / "registry", root / "feature_repo"
        commands = {
            "joiner": [py, "-m", "streams.joiner", "--bootstrap", broker.bootstrap, "--window", str(cfg.window_s),
                       "--lateness", str(cfg.lateness_s), "--runtime", "kafka",
                       *(["--emit-at-click"] if cfg.emit_at_click else []), "--metrics-port", str(ports["joiner"])],
            "feature_updater": [py, "-m", "streams.feature_updater", "--bootstrap", broker.bootstrap,
                                "--online-store", "redis", "--redis-url", redis.address, "--repo-dir", str(repo_dir),
                                "--checkpoint-dir", str(root / "feature_updater"), "--checkpoint-every", "1",
                                "--metrics-port", str(ports["features"])],
            "trainer": [py, "-m", "streams.trainer", "--bootstrap", broker.bootstrap, "--window-examples",
                        str(cfg.window_examples), "--registry", str(registry_dir), "--checkpoint-dir",
                        str(root / "trainer"), "--metrics-port", str(ports["trainer"])],
            "serve": [py, "-m", "adstream", "--bootstrap", broker.bootstrap, "serve", "--port", str(ports["serve"]),
                      "--world-seed", str(cfg.seed), "--registry-dir", str(registry_dir), "--repo-dir", str(repo_dir),
                      "--online-store", "redis", "--redis-url", redis.address],
        }
        starts = Counter()

        def start(name: str) -> None:
            starts[name] += 1
            _spawn(loop, name if starts[name] == 1 else f"{name}.{starts[name]}", commands[name])
            loop.procs[name] = loop.procs.pop(name if starts[name] == 1 else f"{name}.{starts[name]}")

        for name in commands:
            start(name)
        url = f"http://127.0.0.1:{ports['serve']}"
        _wait_http(url + "/readyz", 180, loop, "the online service")
        say(f"workers up ({time.monotonic() - t0:.0f}s); traffic for {cfg.traffic_s:.0f}s at {cfg.rate:g}/s with faults")

        # ---- traffic in a thread, faults in this one ------------------------------------------
        result: dict[str, Any] = {}

        def traffic() -> None:
            try:
                result["report"] = simulate_traffic(url, world, broker.bootstrap, topics, duration_s=cfg.traffic_s,
                                                    rate=cfg.rate, slots=cfg.slots, concurrency=2,
                                                    click_delay_mean_s=2.0, seed=cfg.seed, keep_served=True,
                                                    bucket_s=15.0, timeout_s=10.0, max_wait_s=180.0)
            except Exception as e:  # noqa: BLE001 - reported as a failed check
                result["error"] = e

        th = threading.Thread(target=traffic, name="drill-traffic", daemon=True)
        t_traffic = time.monotonic()
        th.start()
        bad = malformed_records(time.time())
        pending = sorted(cfg.schedule.items(), key=lambda kv: kv[1])
        restarting: set[str] = set()
        while th.is_alive() or pending:
            el = time.monotonic() - t_traffic
            while pending and el >= pending[0][1] * cfg.traffic_s:
                fault, _ = pending.pop(0)
                what = _fault(fault, loop, start, broker, redis, cfg, world, topics, bad, restarting, say)
                report.faults.append((round(time.monotonic() - t_traffic, 1), fault, what))
            for name, p in loop.procs.items():
                if name not in restarting and p.poll() not in (None, 0):
                    from adstream.loop import WorkerFailed

                    raise WorkerFailed(name, p.returncode, loop.log_of(name))
            if not th.is_alive() and not pending:
                break
            time.sleep(0.2)
        th.join()
        if "error" in result:
            raise result["error"]
        rep = result["report"]
        say(f"traffic done: {rep.requests} requests, {rep.errors} errors, {rep.impressions} ads served")
        report.facts["traffic"] = rep.summary()
        report.facts["served"] = rep.served
        report.facts["error_samples"] = rep.error_samples

        # ---- drain -------------------------------------------------------------------------------
        wait_until(lambda: scrape(ports["serve"]).get("adstream_serve_impression_log_pending", 1) == 0, 120,
                   "the service's impression log (spool included) drained")
        report.facts["serve_metrics"] = scrape(ports["serve"])
        loop.stop(["serve"])
        loop.stop(["joiner"])
        assert commands["joiner"][-2] == "--metrics-port"
        commands["joiner"] = commands["joiner"][:-2] + ["--metrics-port", "0", "--idle-flush", "3"]
        start("joiner")
        audit_ctx = AuditContext(broker.bootstrap, topics, settings, cfg, registry_dir,
                                 root / "trainer" / "windows.jsonl")
        wait_until(lambda: audit_ctx.examples_complete(), cfg.drain_timeout_s, "every impression's example")
        wait_until(lambda: audit_ctx.features_match(), 60, "the feature store caught up with the topics")
        loop.stop(["trainer", "feature_updater", "joiner"])
        audit(audit_ctx, report)
        report.facts["wall_s"] = round(time.monotonic() - t0, 1)
        return report
    finally:
        loop.stop()
        redis.stop()
        broker.stop()


def wait_until(cond: Callable[[], Any], timeout_s: float, what: str) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except Exception as e:  # noqa: BLE001 - e.g. a topic read while the broker settles
            log.debug("waiting for %s: %s", what, e)
        time.sleep(2.0)
    log.warning("gave up waiting for %s after %.0fs", what, timeout_s)
    return False


def _fault(fault: str, loop, start, broker, redis, cfg: DrillConfig, world, topics, bad, restarting, say) -> str:
    from streams.kafka_io import make_producer, produce_json

    kind, _, target = fault.partition(":")
    if kind == "kill":
        restarting.add(target)
        p = loop.procs[target]
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        start(target)
        restarting.discard(target)
        say(f"  fault: kill -9 {target} (pid {p.pid}), started again")
        return f"kill -9 pid {p.pid}, restarted"
    if kind == "restart" and target == "broker":
        t = time.monotonic()
        broker.stop()
        broker.start()
        say(f"  fault: broker restarted with its data ({time.monotonic() - t:.1f}s down)")
        return f"down {time.monotonic() - t:.1f}s, data kept"
    if kind == "stop" and target == "redis":
        redis.stop()
        time.sleep(cfg.redis_down_s)
        redis.start()
        say(f"  fault: redis stopped for {cfg.redis_down_s:.0f}s, started again empty")
        return f"down {cfg.redis_down_s:.0f}s, came back empty"
    if kind == "malformed":
        p = make_producer(broker.bootstrap)
        for i, (k, raw, _reason) in enumerate(bad):
            produce_json(p, topics.impressions if k == "impression" else topics.clicks, f"drill-bad-{i}", raw)
        p.flush(30)
        say(f"  fault: {len(bad)} malformed records and orphan clicks sent")
        return f"{len(bad)} records"
    if kind == "poison_window":
        p = make_producer(broker.bootstrap)
        exs = poisoned_window(world, cfg.window_examples, cfg.seed)
        for ex in exs:
            produce_json(p, topics.examples, ex.key, ex.to_json())
        p.flush(30)
        say(f"  fault: a poisoned training window ({len(exs)} examples, all clicked) sent")
        return f"{len(exs)} examples, all clicked"
    raise ValueError(f"unknown fault {fault!r}")
