"""One logging setup for every process (core/logs.py): library noise filtered, repeated library
errors collapsed (librdkafka through Python logging), ``-v``/``-vv`` bring everything back."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from core.logs import LibraryNoise, RepeatLimiter, message_key, setup_logging

ROOT = Path(__file__).resolve().parent.parent


def _record(name: str, level: int, msg: str, pathname: str = "x.py") -> logging.LogRecord:
    return logging.LogRecord(name, level, pathname, 1, msg, None, None)


def test_library_info_is_dropped_own_info_and_library_warnings_kept() -> None:
    f = LibraryNoise()
    fbgemm = str(ROOT / ".venv/lib/python3.11/site-packages/fbgemm_gpu/split_table_batched_embeddings_ops.py")
    assert not f.filter(_record("root", logging.INFO, "[TBE=abc] Contents: ...", fbgemm))
    assert not f.filter(_record("feast.feature_store", logging.INFO, "applying"))
    assert not f.filter(_record("aiokafka.consumer.group_coordinator", logging.INFO, "joined group"))
    assert f.filter(_record("streams.joiner", logging.INFO, "joiner started"))
    assert f.filter(_record("root", logging.INFO, "ours", str(ROOT / "streams" / "trainer.py")))
    assert f.filter(_record("aiokafka", logging.WARNING, "Unable connect to node"))


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_repeat_limiter_one_line_per_state_change_and_a_summary_while_it_lasts() -> None:
    clock = _Clock()
    lim = RepeatLimiter(summary_s=30.0, quiet_s=20.0, clock=clock)
    said: list[logging.LogRecord] = []
    lim.attach(said.append)
    refused = "FAIL rdkafka#producer-1: 127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: " \
              "Connection refused (after {n}ms in state CONNECT)"
    passed = 0
    for i in range(600):  # one a second for ten minutes, as librdkafka reconnects
        passed += lim.filter(_record("librdkafka", logging.ERROR, refused.format(n=i % 7)))
        clock.t += 1.0
        lim.tick()
    assert passed == 1  # the first line only
    summaries = [r.getMessage() for r in said]
    assert 15 <= len(summaries) <= 21  # ~one per 30 s
    assert all("Connection refused" in s and "repeated" in s for s in summaries)
    # another condition is another line, even while the first repeats
    assert lim.filter(_record("librdkafka", logging.WARNING, "_ALL_BROKERS_DOWN: 1/1 brokers are down"))
    clock.t += 25.0
    lim.tick()
    assert "no more for 20s, after 600 times" in said[-1].getMessage() and said[-1].levelno == logging.INFO
    assert lim.active() == 0
    # it starts again: the first line is shown again
    assert lim.filter(_record("librdkafka", logging.ERROR, refused.format(n=0)))
    # adstream's own lines are never limited
    assert all(lim.filter(_record("streams.trainer", logging.WARNING, "same")) for _ in range(5))


def test_message_key_ignores_what_changes_between_retries() -> None:
    a = message_key("librdkafka", "FAIL rdkafka#consumer-2: [thrd:x]: b: Connect failed (after 3ms in state CONNECT)")
    b = message_key("librdkafka", "FAIL rdkafka#consumer-7: b: Connect failed (after 10ms in state CONNECT, "
                                  "4 identical error(s) suppressed)")
    assert a == b
    assert a != message_key("librdkafka", "FAIL rdkafka#consumer-2: b: Connection timed out")


def _dead_port() -> int:
    from streams.broker import free_port

    return free_port()


def _produce_to_nowhere(verbosity: int, seconds: float) -> str:
    from streams.kafka_io import make_producer

    buf = io.StringIO()
    setup_logging(verbosity, stream=buf, summary_s=1.0, quiet_s=1.5)
    try:
        p = make_producer(f"127.0.0.1:{_dead_port()}", reconnect_backoff_ms=20, reconnect_backoff_max_ms=50,
                          message_timeout_ms=int(seconds * 1000) + 5000)
        p.produce("nowhere", b"x")
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            p.poll(0.1)
        p.purge() if hasattr(p, "purge") else p.raw.purge()
        del p
        time.sleep(3.0)  # the limiter says the episode ended
    finally:
        setup_logging(0)
    return buf.getvalue()


def test_librdkafka_errors_go_through_python_logging_rate_limited() -> None:
    out = _produce_to_nowhere(0, 4.0)
    lines = [ln for ln in out.splitlines() if "librdkafka" in ln]
    refused = [ln for ln in lines if "Connection refused" in ln]
    first = [ln for ln in refused if "repeated" not in ln and "no more" not in ln]
    assert len(first) == 1, out  # one line when it starts...
    assert any("repeated" in ln for ln in refused), out  # ...a summary while it lasts...
    assert any("no more for" in ln for ln in refused), out  # ...and one when it stops
    assert len(lines) <= 16, out
    loud = _produce_to_nowhere(1, 4.0)  # -v: every line comes back
    assert sum("Connection refused" in ln for ln in loud.splitlines()) > 2 * len(refused), loud


def test_raw_librdkafka_lines_never_reach_stderr(tmp_path: Path) -> None:
    """Without the shared client config librdkafka prints '%3|...|FAIL|' lines itself; with it, the
    process's stderr holds only formatted, limited lines."""
    code = ("import time\n"
            "from core.logs import setup_logging\n"
            "from streams.kafka_io import make_producer\n"
            "setup_logging(0)\n"
            f"p = make_producer('127.0.0.1:{_dead_port()}', reconnect_backoff_ms=20, reconnect_backoff_max_ms=50)\n"
            "p.produce('nowhere', b'x')\n"
            "t = time.monotonic()\n"
            "while time.monotonic() - t < 3: p.poll(0.1)\n"
            "p.raw.purge()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "|FAIL|" not in r.stderr, r.stderr
    assert 1 <= r.stderr.count("Connection refused") <= 6, r.stderr


def test_torchrec_tbe_lines_hidden_by_default_shown_with_v(tmp_path: Path) -> None:
    """A real TorchRec/fbgemm embedding table logs ``[TBE=...]`` INFO lines on the root logger."""
    code = ("import io, logging, sys, torch\n"
            "from core.logs import setup_logging\n"
            "torch.set_num_threads(1)\n"
            "v = int(sys.argv[1])\n"
            "setup_logging(v)\n"
            "logging.getLogger('streams.trainer').info('own line')\n"
            "from torchrec.modules.embedding_configs import EmbeddingBagConfig\n"
            "from torchrec.modules.embedding_modules import EmbeddingBagCollection\n"
            "from torchrec.modules.fused_embedding_modules import fuse_embedding_optimizer\n"
            "from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen, "
            "ComputeDevice, EmbeddingLocation\n"
            "SplitTableBatchedEmbeddingBagsCodegen([(100, 8, EmbeddingLocation.HOST, ComputeDevice.CPU)])\n")
    outs = {}
    for v in (0, 1):
        r = subprocess.run([sys.executable, "-c", code, str(v)], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        outs[v] = r.stderr
    assert "own line" in outs[0] and "own line" in outs[1]
    assert "TBE=" in outs[1], outs[1][-2000:]  # the library does log them...
    assert "TBE=" not in outs[0], outs[0][-2000:]  # ...and by default nobody sees them


def test_cli_verbosity_flags(tmp_path: Path) -> None:
    from adstream.cli import main

    for flags, level, filtered in (([], logging.INFO, True), (["-v"], logging.INFO, False),
                                   (["-vv"], logging.DEBUG, False)):
        rc = main([*flags, "broker", "status", "--data-dir", str(tmp_path / "none")])
        assert rc == 3
        root = logging.getLogger()
        ours = [h for h in root.handlers if getattr(h, "_adstream_handler", False)]
        assert len(ours) == 1 and root.level == level
        assert any(isinstance(f, LibraryNoise) for f in ours[0].filters) == filtered
    os.environ.pop("ADSTREAM_LOG_VERBOSITY", None)
    setup_logging(0)


def test_library_deprecation_warnings_hidden_by_default_shown_with_v() -> None:
    import warnings

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            setup_logging(0)
            warnings.simplefilter("once", DeprecationWarning)  # what Feast does at import ...
            from core.logs import quiet_library_warnings

            quiet_library_warnings()  # ... and what features.feast_ready() does after it
            warnings.warn_explicit("library note", DeprecationWarning, "lib.py", 1, module="fbgemm_gpu.ops")
            warnings.warn_explicit("library future", FutureWarning, "lib.py", 2, module="torchrec.x")
            warnings.warn_explicit("our own note", DeprecationWarning, "t.py", 1, module="streams.trainer")
            setup_logging(1)
            warnings.warn_explicit("library note, -v", DeprecationWarning, "lib.py", 3, module="fbgemm_gpu.ops")
    finally:
        setup_logging(0)
    assert [str(w.message) for w in caught] == ["our own note", "library note, -v"]
