"""The suite's own rules (tests/conftest.py): a skip for a missing service fails under `make test`
and CI; files a run leaves in the repository fail the session; relative paths land in a temporary
working directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def probe(what: str, **env: str) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k not in ("CI", "ADSTREAM_REQUIRE_SERVICES")}
    e.update(PYTHONPATH=str(ROOT), ADSTREAM_PROBE=what, ADSTREAM_PROBE_REPO=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "probe_hygiene.py")], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=300)


def test_a_skip_for_a_missing_service_fails_under_make_test_and_ci():
    plain = probe("skip")
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout
    for env in ({"ADSTREAM_REQUIRE_SERVICES": "1"}, {"CI": "true"}):
        r = probe("skip", **env)
        assert r.returncode == 1 and "1 failed" in r.stdout, r.stdout
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
