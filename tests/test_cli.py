"""The command line answers at once: commands that do not need torch never import it.

Each command runs in a fresh interpreter (the real entry point, ``adstream.cli.main``) that reports,
at exit, which heavy libraries ended up in ``sys.modules``. The import set is checked, not the time
(the machine is shared and noisy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adstream.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent
PROBE = r"""
import atexit, json, sys
def _report():
    heavy = sorted(m for m in ("torch", "torchrec", "fbgemm_gpu", "feast", "faust", "fastapi", "uvicorn")
                   if m in sys.modules)
    with open(sys.argv[1], "w") as f:
        json.dump(heavy, f)
atexit.register(_report)
from adstream.cli import main
sys.exit(main(sys.argv[2:]))
"""


def run_cli(args: list[str], tmp_path: Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> tuple[int, str, list[str]]:
    """``adstream ARGS`` in a fresh interpreter: (exit code, output, heavy modules it imported)."""
    report = tmp_path / f"imports-{abs(hash(tuple(args)))}.json"
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    p = subprocess.run([sys.executable, "-c", PROBE, str(report), *args], cwd=tmp_path, env=full_env,
                       capture_output=True, text=True, timeout=timeout)
    heavy = json.loads(report.read_text()) if report.exists() else ["<no report>"]
    return p.returncode, p.stdout + p.stderr, heavy


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_never_imports_torch(command: str | None, tmp_path: Path) -> None:
    args = ["--help"] if command is None else [command, "--help"]
    rc, out, heavy = run_cli(args, tmp_path)
    assert rc == 0, out
    assert "usage: adstream" in out
    assert "torch" not in heavy and "feast" not in heavy, f"`adstream {' '.join(args)}` imported {heavy}"


def test_every_command_is_registered_by_its_module() -> None:
    """The one-line registry and the modules agree (a command named in COMMANDS parses for real)."""
    for name, (module, _help) in COMMANDS.items():
        parser = build_parser([name, "--help"])
        sub = next(a for a in parser._actions if a.dest == "command")
        assert sub.choices[name].description is not None or sub.choices[name]._actions, (name, module)
    full = build_parser()
    sub = next(a for a in full._actions if a.dest == "command")
    assert list(sub.choices) == list(COMMANDS)


def test_unknown_command_lists_the_commands(tmp_path: Path) -> None:
    rc, out, heavy = run_cli(["brokr"], tmp_path)
    assert rc == 2 and "invalid choice: 'brokr'" in out and "broker" in out
    assert heavy == []


def test_broker_commands_import_no_torch(tmp_path: Path, kafka_broker) -> None:
    rc, out, heavy = run_cli(["broker", "status", "--data-dir", str(tmp_path / "none")], tmp_path)
    assert rc == 3 and "not running" in out.lower(), out
    assert heavy == []
    rc, out, heavy = run_cli(["broker", "stop", "--data-dir", str(tmp_path / "none")], tmp_path)
    assert rc == 0 and "no broker running" in out, out
    assert heavy == []
    if kafka_broker.data_dir is not None:  # the session broker, found from its data dir
        rc, out, heavy = run_cli(["broker", "status", "--data-dir", str(kafka_broker.data_dir)], tmp_path)
        assert rc == 0 and kafka_broker.bootstrap in out, out
        assert heavy == []


def test_topics_commands_import_no_torch(tmp_path: Path, bootstrap: str, topic_names) -> None:
    env = {f"ADSTREAM_KAFKA__TOPICS__{k.upper()}": v for k, v in topic_names.model_dump().items()}
    rc, out, heavy = run_cli(["--bootstrap", bootstrap, "topics", "create", "--partitions", "2"], tmp_path, env)
    assert rc == 0 and f"{topic_names.examples}\t2 partitions\tcreated" in out, out
    assert heavy == []
    rc, out, heavy = run_cli(["--bootstrap", bootstrap, "topics", "list"], tmp_path, env)
    assert rc == 0 and f"{topic_names.clicks}\t2" in out, out
    assert heavy == []


def test_models_list_imports_no_torch(tmp_path: Path) -> None:
    from models.registry import ModelRegistry

    reg = ModelRegistry(tmp_path / "registry", "ctr")
    reg.publish({"weights": [1.0, 2.0]}, {"window": 3, "auc": 0.71, "strategy": "ddp"})
    rc, out, heavy = run_cli(["models", "--registry", str(tmp_path / "registry"), "list"], tmp_path)
    assert rc == 0 and "v000001" in out and "0.7100" in out, out
    assert "torch" not in heavy, heavy


def test_features_commands_import_no_torch(tmp_path: Path) -> None:
    repo = str(tmp_path / "repo")
    rc, out, heavy = run_cli(["features", "apply", "--repo-dir", repo], tmp_path, timeout=300)
    assert rc == 0 and "feature repository ready" in out, out
    assert "torch" not in heavy, heavy
    rc, out, heavy = run_cli(["features", "get", "ad", "a0001", "--repo-dir", repo], tmp_path, timeout=300)
    assert rc == 0 and '"a0001"' in out, out
    assert "torch" not in heavy and "feast" in heavy, heavy
