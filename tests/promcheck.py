"""Checks of Prometheus endpoints shared by tests (no tests here): ``promtool check metrics`` (Debian's
``prometheus`` package; ``.ci/run`` installs it) and the label sets of an exposition."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

PROMTOOL_MISSING = ("promtool is not installed: `apt-get install -y --no-install-recommends prometheus` "
                    "(Debian; .ci/run installs it)")


def scrape_text(url: str, timeout_s: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read().decode()


def promtool_problems(text: str) -> str:
    """What ``promtool check metrics`` says about an exposition ("" when it is clean). Fails the
    calling test when promtool is missing (a skipped check would hide a regression)."""
    promtool = shutil.which("promtool")
    assert promtool, PROMTOOL_MISSING
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    return "" if r.returncode == 0 else (r.stdout + r.stderr).strip() or f"promtool exit {r.returncode}"


def series(text: str, prefix: str = "adstream_") -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    """Every (sample name, sorted labels) of an exposition whose name starts with ``prefix``."""
    out = set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(prefix):
                out.add((s.name, tuple(sorted(s.labels.items()))))
    return out


def values(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Labels -> value of the samples called ``name``."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out
