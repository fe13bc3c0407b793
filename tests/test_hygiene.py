"""The suite's own rules (tests/conftest.py): a missing service fails the test (never a skip); files a run leaves in the repository fail the session; relative paths land in a temporary
working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def probe(what: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k != "CI"}
    e.update(PYTHONPATH=str(ROOT), ADSTREAM_PROBE=what, ADSTREAM_PROBE_REPO=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "probe_hygiene.py")], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=300)


def test_a_missing_service_fails_the_test_in_every_run():
    for env in ({}, {"CI": "true"}):
        r = probe("missing", **env)
        assert r.returncode == 1 and "1 failed" in r.stdout and "skipped" not in r.stdout, r.stdout
        assert "service missing: redis-server is not installed" in r.stdout


def test_files_left_in_the_repository_fail_the_session():
    litter = ROOT / ".adstream" / "probe-litter.txt"
    try:
        r = probe("litter")
        assert r.returncode == 1 and "left 1 files in the repository" in r.stdout, r.stdout
        assert ".adstream/probe-litter.txt" in r.stdout
    finally:
        litter.unlink(missing_ok=True)


def test_relative_paths_land_in_a_temporary_directory():
    r = probe("cwd")
    assert r.returncode == 0, r.stdout
    assert not (ROOT / ".adstream" / "relative.txt").exists()
