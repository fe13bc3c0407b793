"""The full loop on one machine: history → workers → trainer → service → simulated users → back.

Used by ``adstream demo`` and by the loop test. Every part is the real one, in its own process
where it would be in production:

1. the topics; a stretch of synthetic history (the world's own serving policy, ending just
   before now) is replayed with the initial bidword inventory, so features, examples and a first
   model exist before traffic starts;
2. worker processes: joiner (``python -m streams.joiner``), feature updater, stream trainer
   (publishes gated versions to the registry, with a fine-tuning shadow for comparison) and the
   online service (``adstream serve``: index from the inventory topic, features from the store,
   hot-swapped models, impressions logged to Kafka);
3. ``streams.traffic.simulate_traffic`` sends requests for ``traffic_s`` seconds and produces the
   clicks its users make; the joiner turns served impressions + clicks into examples, the trainer
   learns from them and the service picks up the new versions;
4. at the end the workers drain (idle flush) and stop; :func:`run_loop` returns a summary.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("adstream.loop")


@dataclass
class LoopConfig:
    world_seed: int = 7
    history_s: float = 240.0  # event-time seconds of replayed history before traffic starts
    history_rps: float = 10.0
    traffic_s: float = 120.0  # wall seconds of simulated traffic
    rate: float = 15.0  # requests per second
    slots: int = 4
    concurrency: int = 2
    click_delay_s: float = 3.0  # mean click delay of the simulated users
    join_window_s: float = 30.0
    lateness_s: float = 5.0
    positives_at_click: bool = True  # the joiner emits each positive at its click (docs/speed.md "Fresher models")
    window_examples: int = 1500
    compare: str | None = "finetune"
    joiner_runtime: str = "kafka"
    bucket_s: float = 15.0
    keep_served: bool = False
    drain_timeout_s: float = 120.0
    query: bool = False  # the query classifier's refresh agent and model worker, a watch, a shift (query_demo)
    rewrite: bool = False  # the MoBGM rewriter and GRAM (world with tail queries; `adstream demo` turns it on)
    rewrite_window_examples: int = 3000
    rewrite_wait_s: float = 300.0  # after the traffic, wait this long at most for their first versions


class WorkerFailed(RuntimeError):
    """A worker process of the loop exited with an error (``name``, its ``log`` and return code)."""

    def __init__(self, name: str, returncode: int, log: Path) -> None:
        super().__init__(f"{name} exited with {returncode}; see {log}")
        self.name, self.returncode, self.log = name, returncode, log


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ("" when there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Loop:
    """The running parts (for the caller's ``finally``)."""

    root: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # for every process: the topic names

    def log_of(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() not in (None, 0):
                raise WorkerFailed(name, p.returncode, self.log_of(name))

    def failed(self) -> list[tuple[str, int]]:
        """Workers that exited with an error (SIGTERM/SIGKILL sent by ``stop`` do not count)."""
        return [(n, p.returncode) for n, p in self.procs.items()
                if p.returncode not in (None, 0, -signal.SIGTERM, -signal.SIGKILL)]

    def stop(self, names: list[str] | None = None, timeout_s: float = 30.0) -> None:
        names = list(self.procs) if names is None else names
        for n in names:
            p = self.procs.get(n)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for n in names:
            p = self.procs.get(n)
            if p is None:
                continue
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def _spawn(loop: Loop, name: str, cmd: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    from adstream.procs import child_env

    logs = loop.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    # the caller's working directory and absolute paths: the same files as this process, from anywhere
    p = subprocess.Popen(cmd, env=child_env(env_extra or loop.env), stdout=open(logs / f"{name}.log", "wb"),
                         stderr=subprocess.STDOUT)
    loop.procs[name] = p
    return p


def _wait_http(url: str, timeout_s: float, loop: Loop, what: str) -> dict[str, Any]:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        loop.check()
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return r.json()
            last = r.text[:200]
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.5)
    raise RuntimeError(f"{what} not ready after {timeout_s:.0f}s: {last}")


def scrape(port: int, path: str = "/metrics") -> dict[str, float]:
    """Prometheus text from 127.0.0.1:port → {name{labels}: value} (enough for a summary)."""
    import urllib.request

    out: dict[str, float] = {}
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3).read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, val = line.rpartition(" ")
            try:
                out[name] = float(val)
            except ValueError:
                pass
    return out


def quantile_from_buckets(metrics: dict[str, float], name: str, q: float) -> float | None:
    """Upper bucket bound of the q-quantile of a Prometheus histogram (all label sets together)."""
    acc: dict[float, float] = {}
    for k, v in metrics.items():
        if k.startswith(name + "_bucket") and 'le="' in k:
            le = k.split('le="')[1].split('"')[0]
            le_f = math.inf if le == "+Inf" else float(le)
            acc[le_f] = acc.get(le_f, 0.0) + v
    total = acc.get(math.inf, 0.0)
    if not total:
        return None
    for le in sorted(acc):
        if acc[le] >= q * total:
            return le
    return math.inf


def read_windows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_loop(settings, bootstrap: str, root: Path, cfg: LoopConfig | None = None,
             say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole loop (see the module docstring) and return its summary. ``settings``: the
    project settings (topics, partitions); ``root``: a directory for state and logs."""
    from core.world import World, WorldConfig
    from models.registry import ModelRegistry
    from streams.broker import free_port
    from streams.kafka_io import ensure_project_topics, read_topic
    from streams.replay import replay
    from streams.traffic import simulate_traffic

    cfg = cfg or LoopConfig()
    root = Path(root).resolve()  # every path given to a worker is absolute
    root.mkdir(parents=True, exist_ok=True)
    topics = settings.kafka.topics
    loop = Loop(root, env={f"ADSTREAM_KAFKA__TOPICS__{k.upper()}": v for k, v in topics.model_dump().items()})
    ensure_project_topics(bootstrap, settings.kafka)
    py = sys.executable
    registry_dir, repo_dir = root / "registry", root / "feature_repo"

    from core.lexicon import LexiconConfig

    world = World(WorldConfig(seed=cfg.world_seed, lexicon=LexiconConfig(enabled=cfg.rewrite)))
    start = time.time() - cfg.history_s - 2 * cfg.join_window_s
    # clicks and conversions of the last history requests would lie in the future: such events push
    # the watermark past the traffic that follows (and beyond the clock-skew limit they are refused)
    now = time.time()
    history = [e for e in world.generate(start_time=start, duration_s=cfg.history_s, requests_per_s=cfg.history_rps,
                                         slots=cfg.slots, seed=cfg.world_seed, initial_inventory=True)
               if e.event_time < now]
    res = replay(history, bootstrap, topics, progress=False)
    say(f"history: {cfg.history_s:.0f}s of the world's own serving replayed ({res['counts']})")

    summary: dict[str, Any] = {"history": res["counts"]}
    try:
        ports = {n: free_port() for n in ("joiner", "features", "trainer", "serve", "query_refresh", "query_trainer",
                                          "rewrite")}
        _spawn(loop, "joiner", [py, "-m", "streams.joiner", "--bootstrap", bootstrap,
                                "--window", str(cfg.join_window_s), "--lateness", str(cfg.lateness_s),
                                "--runtime", cfg.joiner_runtime, "--metrics-port", str(ports["joiner"]),
                                *(["--emit-at-click"] if cfg.positives_at_click else [])])
        _spawn(loop, "feature_updater", [py, "-m", "streams.feature_updater", "--bootstrap", bootstrap,
                                         "--repo-dir", str(repo_dir), "--checkpoint-dir", str(root / "feature_updater"),
                                         "--metrics-port", str(ports["features"])])
        trainer_cmd = [py, "-m", "streams.trainer", "--bootstrap", bootstrap,
                       "--window-examples", str(cfg.window_examples), "--registry", str(registry_dir),
                       "--checkpoint-dir", str(root / "trainer"), "--metrics-port", str(ports["trainer"])]
        if cfg.compare:
            trainer_cmd += ["--compare", cfg.compare]
        _spawn(loop, "trainer", trainer_cmd)
        serve_cmd = [py, "-m", "adstream", "--bootstrap", bootstrap,
                     "serve", "--port", str(ports["serve"]), "--world-seed", str(cfg.world_seed),
                     "--registry-dir", str(registry_dir), "--repo-dir", str(repo_dir)]
        if cfg.rewrite:
            serve_cmd += ["--lexicon", "--rewrite-model", "rewriter", "--gram-model", "gram"]
        # the impression spool of this run only: a spool left by another run holds impressions of
        # other topics (a service adopts what it finds in its spool directory)
        _spawn(loop, "serve", serve_cmd,
               {**loop.env, "ADSTREAM_SERVE__IMPRESSION_SPOOL_DIR": str(root / "impression-spool")})
        url = f"http://127.0.0.1:{ports['serve']}"
        say(f"workers: joiner ({cfg.joiner_runtime} runtime), feature updater, trainer, service on {url}; "
            f"logs in {root / 'logs'}")
        ready = _wait_http(url + "/readyz", 300, loop, "the online service")  # Feast alone can take a minute on a busy machine
        say(f"service ready (model {ready.get('model_version', ready.get('model', '?'))})")
        if cfg.rewrite:  # after the service, like the query workers: their start competes with it otherwise
            _spawn(loop, "rewrite_trainer", [
                py, "-m", "streams.rewrite_trainer", "--bootstrap", bootstrap, "--registry", str(registry_dir),
                "--checkpoint-dir", str(root / "rewrite_trainer"), "--catalog", f"world:{cfg.world_seed}",
                "--window-examples", str(cfg.rewrite_window_examples), "--min-bootstrap-clicks", "100",
                "--epochs-scale", "0.3", "--metrics-port", str(ports["rewrite"])])
            say("rewriter and GRAM: their stream job started (they bootstrap from the history)")
        if cfg.query:  # started after the service: their start (torch, MiniLM) competes with it otherwise
            from adstream import query_demo

            query_demo.start_query_workers(loop, _spawn, py, bootstrap, root, registry_dir, ports)
            watch = query_demo.QueryWatch(registry_dir, query_demo.watch_queries(world) + [query_demo.SIMILAR_QUERY])
            shift = {"query": watch.queries[0], "done": False}
            say("query classifier: refresh agent and model worker started")
        # give the trainer a moment to publish its first version from the history
        reg = ModelRegistry(registry_dir, settings.trainer.model_name)
        t_wait = time.monotonic()
        while reg.latest() is None and time.monotonic() - t_wait < 90:
            loop.check()
            time.sleep(1)
        say(f"first model version: {reg.latest() or 'none yet (serving the prior)'}; "
            f"simulating {cfg.traffic_s:.0f}s of traffic at {cfg.rate:g} requests/s")

        def show(b) -> None:
            d = b.summary()
            if d["requests"]:
                say(f"  t={d['start_s']:5.0f}s requests={d['requests']:4d} errors={d['errors']} "
                    f"ctr={(d['ctr'] or 0):6.2%} expected={(d['expected_ctr'] or 0):6.2%} "
                    f"p50={d['latency_p50_ms'] or 0:6.1f}ms p99={d['latency_p99_ms'] or 0:6.1f}ms "
                    f"versions={d['model_versions']}")
            if cfg.query:  # a few live queries and their served categories; a quarter in, a new category
                line = watch.line(d["start_s"])
                if line:
                    say(line)
                if not shift["done"] and d["start_s"] >= cfg.traffic_s / 4:
                    n = query_demo.inject_shift(bootstrap, topics, shift["query"])
                    shift["done"] = True
                    say(f"  shift: {n} clicks of {shift['query']!r} now go to {query_demo.NEW_CATEGORY} (a new category)")
            loop.check()

        features_before = scrape(ports["features"])  # to tell live freshness from the history backlog
        traffic_t0 = time.time()
        report = simulate_traffic(url, world, bootstrap, topics, duration_s=cfg.traffic_s, rate=cfg.rate,
                                  slots=cfg.slots, concurrency=cfg.concurrency, click_delay_mean_s=cfg.click_delay_s,
                                  seed=cfg.world_seed, bucket_s=cfg.bucket_s, keep_served=cfg.keep_served,
                                  on_bucket=show)
        summary["traffic"] = report.summary()
        summary["traffic_started_at"] = traffic_t0
        if cfg.keep_served:
            summary["served"] = report.served
        if cfg.rewrite:
            summary["rewrite"] = probe_rewrites(url, world, registry_dir, cfg.rewrite_wait_s, loop, say)
        summary["metrics"] = {"serve": scrape(ports["serve"], "/metrics"), "joiner": scrape(ports["joiner"])}
        # drain: impressions of the last requests close their windows once event time moves on;
        # a joiner with idle flush closes what is left
        loop.stop(["serve"])
        loop.stop(["joiner"])
        _spawn(loop, "joiner_drain", [py, "-m", "streams.joiner", "--bootstrap", bootstrap,
                                      "--window", str(cfg.join_window_s), "--lateness", str(cfg.lateness_s),
                                      "--runtime", cfg.joiner_runtime, "--idle-flush", "3", "--metrics-port", "0",
                                      *(["--emit-at-click"] if cfg.positives_at_click else [])])
        want = {(s["request_id"], s["ad_id"]) for s in report.served} if cfg.keep_served else set()
        served_keys = {f"{r}:{a}" for r, a in want}
        # wait for every served impression's example; without that list, give the drain 20 s
        deadline = time.monotonic() + (cfg.drain_timeout_s if want else 20.0)
        examples: dict[str, dict[str, Any]] = {}
        while True:
            # the final record of each impression (a positive's click-stage record is not final)
            examples = {k.decode() if isinstance(k, bytes) else k: d
                        for k, v, *_ in read_topic(bootstrap, topics.examples, timeout_s=20, idle_s=0.3)
                        if (d := json.loads(v)).get("stage") != "click"}
            if (want and served_keys <= examples.keys()) or time.monotonic() >= deadline:
                break
            time.sleep(2)
        summary["examples"] = {"total": len(examples),
                               "from_traffic": sum(1 for k in examples if k.startswith("sim-")),
                               "served_found": len(served_keys & set(examples)),
                               "served": len(served_keys)}
        if cfg.keep_served:
            summary["example_labels"] = {k: examples[k]["clicked"] for k in served_keys & set(examples)}
            summary["example_versions"] = {k: examples[k].get("model_versions", {}) for k in served_keys & set(examples)}
        time.sleep(3)  # let the trainer see the drained examples' windows
        summary["metrics"]["features"] = scrape(ports["features"])
        summary["metrics"]["features_at_traffic_start"] = features_before
        summary["metrics"]["trainer"] = scrape(ports["trainer"])
        summary["dead_letters"] = dict(Counter(json.loads(v).get("reason", "?") for _k, v, *_ in
                                               read_topic(bootstrap, topics.dead_letter, timeout_s=10, idle_s=0.3)))
        if cfg.query:
            line = watch.line(time.time() - traffic_t0)
            if line:
                say(line)
            watch.stop()
            qreg = ModelRegistry(registry_dir, settings.query.model_name)
            summary["query"] = {"watch": watch.history, "shifted_query": shift["query"],
                                "new_category": query_demo.NEW_CATEGORY,
                                "registry": {"published": qreg.versions(), "rejected": qreg.versions(rejected=True)},
                                "windows": read_windows(root / "query_trainer" / "windows.jsonl"),
                                "metrics": {"refresh": scrape(ports["query_refresh"]),
                                            "trainer": scrape(ports["query_trainer"])}}
            loop.stop(["query_refresh", "query_trainer"])
        loop.stop(["trainer", "feature_updater", "joiner_drain", *(["rewrite_trainer"] if cfg.rewrite else [])])
        summary["windows"] = read_windows(root / "trainer" / "windows.jsonl")
        if cfg.rewrite:
            summary.setdefault("rewrite", {})["windows"] = read_windows(root / "rewrite_trainer" / "windows.jsonl")
        summary["registry"] = {"latest": reg.latest(), "published": reg.versions(),
                               "rejected": reg.versions(rejected=True),
                               "published_meta": {v: reg.info(v).meta for v in reg.versions()}}
        return summary
    finally:
        loop.stop()


def probe_rewrites(url: str, world, registry_dir: Path, wait_s: float, loop: Loop,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """Wait (at most ``wait_s``) for the rewriter's and GRAM's first versions to be served, then ask
    the service for ads for one tail query of each kind and report where each ad came from."""
    import urllib.request

    from models.registry import ModelRegistry

    regs = {n: ModelRegistry(registry_dir, n) for n in ("rewriter", "gram")}
    t0 = time.monotonic()
    say(f"waiting up to {wait_s:.0f}s for the rewriter and GRAM to publish (they learn from the history)")
    while time.monotonic() - t0 < wait_s and not all(r.latest() for r in regs.values()):
        loop.check()
        time.sleep(2)
    out: dict[str, Any] = {"versions": {n: r.latest() for n, r in regs.items()},
                           "waited_s": round(time.monotonic() - t0, 1), "queries": []}
    if not any(out["versions"].values()):
        say("rewriter and GRAM: no version yet (the index rewriter served alone)")
        return out
    time.sleep(3)  # the service polls the registry every second
    lex = world.lexicon
    picks, kinds = [], set()
    for t in lex.tail:
        if t.kind not in kinds:
            kinds.add(t.kind)
            picks.append(t)
    for t in picks:
        body = json.dumps({"user_id": "u00001", "query": t.text, "slots": 4}).encode()
        req = urllib.request.Request(url + "/v1/ads", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                resp = json.loads(r.read())
        except Exception as e:  # noqa: BLE001
            out["queries"].append({"query": t.text, "error": str(e)})
            continue
        out["queries"].append({"query": t.text, "kind": t.kind, "gold": t.leaf, "degraded": resp.get("degraded"),
                               "ads": [{k: a.get(k) for k in ("ad_id", "bidword", "category", "source", "code")}
                                       for a in resp.get("ads", [])]})
    return out


def plot_loop(summary: dict[str, Any], path: Path) -> Path | None:
    """CTR (observed and expected) and latency per time bucket, with the served model versions."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    buckets = [b for b in summary.get("traffic", {}).get("buckets", []) if b["requests"]]
    if not buckets:
        return None
    t = [b["start_s"] for b in buckets]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax1.plot(t, [100 * (b["ctr"] or 0) for b in buckets], "o-", label="observed CTR")
    ax1.plot(t, [100 * (b["expected_ctr"] or 0) for b in buckets], "s--", label="expected CTR (ground truth)")
    ax1.set_ylabel("CTR (%)")
    ax1.legend(loc="best")
    prev = None
    for b in buckets:
        top = max(b["model_versions"], key=b["model_versions"].get) if b["model_versions"] else None
        if top != prev and top is not None:
            ax1.axvline(b["start_s"], color="grey", alpha=0.3)
            ax1.annotate(top, (b["start_s"], ax1.get_ylim()[1]), fontsize=7, rotation=90, va="top")
            prev = top
    ax2.plot(t, [b["latency_p50_ms"] for b in buckets], "o-", label="p50")
    ax2.plot(t, [b["latency_p99_ms"] for b in buckets], "s--", label="p99")
    ax2.set_ylabel("latency (ms)")
    ax2.set_xlabel("seconds of traffic")
    ax2.legend(loc="best")
    fig.suptitle("adstream: CTR and latency while the models learn from their own traffic")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
