"""Not collected by the suite (no ``test_`` prefix): run on its own by tests/test_hygiene.py to check
the session rules of tests/conftest.py. ``ADSTREAM_PROBE`` picks what it does."""

import os
from pathlib import Path

from tests.harness import fail_service_missing


def test_probe():
    what = os.environ.get("ADSTREAM_PROBE")
    if what == "missing":
        fail_service_missing("redis-server is not installed (probe)")
    if what == "litter":
        (Path(os.environ["ADSTREAM_PROBE_REPO"]) / ".adstream" / "probe-litter.txt").parent.mkdir(exist_ok=True)
        (Path(os.environ["ADSTREAM_PROBE_REPO"]) / ".adstream" / "probe-litter.txt").write_text("x")
    if what == "cwd":
        Path(".adstream").mkdir(exist_ok=True)
        (Path(".adstream") / "relative.txt").write_text("x")  # a relative default path
