"""A failed `adstream demo` keeps its state and logs and prints the failing process's last lines
(issue 8: the first failed run said "see .adstream/demo/logs/serve.log" and had deleted that log).

The loop itself is replaced by one that fails the way a worker does, so this runs in a second; the
real loop runs in tests/test_loop.py and tests/test_demo_anywhere.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import adstream.loop
from adstream.cli import main


@pytest.fixture
def demo_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ADSTREAM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("ADSTREAM_KAFKA__BOOTSTRAP", "127.0.0.1:9")  # no embedded broker is started
    return tmp_path / "state" / "demo"


def write_log(root: Path, name: str, n: int = 100) -> Path:
    log = root / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"{name} line {i}\n" for i in range(n)))
    return log


def test_a_worker_that_fails_keeps_the_logs_and_shows_its_last_lines(demo_env, monkeypatch, capsys):
    def failing_loop(settings, bootstrap, root, cfg, say=print):
        write_log(root, "joiner")
        raise adstream.loop.WorkerFailed("serve", 1, write_log(root, "serve"))

    monkeypatch.setattr(adstream.loop, "run_loop", failing_loop)
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "demo failed: serve exited with 1" in err
    tail = err.split(f"--- last 40 lines of {demo_env / 'logs' / 'serve.log'} ---", 1)[1]
    assert "serve line 99" in tail and "serve line 60" in tail and "serve line 59\n" not in tail
    assert "joiner line" not in err, "only the failing process's log"
    assert (demo_env / "logs" / "serve.log").read_text().count("\n") == 100, "the log is kept"
    assert f"demo state and logs kept in {demo_env}" in err


def test_an_unexpected_error_keeps_the_logs_and_shows_every_worker(demo_env, monkeypatch, capsys):
    def broken_loop(settings, bootstrap, root, cfg, say=print):
        write_log(root, "joiner")
        write_log(root, "trainer")
        raise RuntimeError("the service never became ready")

    monkeypatch.setattr(adstream.loop, "run_loop", broken_loop)
    with pytest.raises(RuntimeError):
        main(["demo"])
    err = capsys.readouterr().err
    assert "demo failed: RuntimeError: the service never became ready" in err
    assert "joiner line 99" in err and "trainer line 99" in err
    assert (demo_env / "logs" / "joiner.log").exists() and (demo_env / "logs" / "trainer.log").exists()
