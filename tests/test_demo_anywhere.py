"""``adstream demo`` from a built wheel, started from a directory that is not the source checkout.

Before, the demo started its workers in the source directory with relative state paths: from any
other directory the parent read one ``.adstream/`` and the workers wrote another, and from an
installed package they wrote under site-packages. Here the project is built into a wheel
(``pip wheel --no-deps``, no build isolation: nothing is downloaded), installed with ``pip install
--no-deps --target`` into a temporary directory that reuses the shared environment's dependencies,
and the demo (shortened) runs from a third directory with only that installation on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_sources(dest: Path) -> None:
    """The tracked files of the checkout (what a fresh clone has), without build leftovers."""
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True,
                               timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".venv", ".git", ".adstream", "build",
                                                                  "*.egg-info", "__pycache__"))
        return
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)


def _install_wheel(tmp_path: Path) -> Path:
    src, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    _copy_sources(src)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
                   check=True, timeout=600, cwd=tmp_path)
    (wheel,) = wheels.glob("adstream-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)],
                   check=True, timeout=600, cwd=tmp_path)
    return site


@pytest.mark.slow
def test_demo_runs_from_a_wheel_in_any_directory(tmp_path: Path) -> None:
    site = _install_wheel(tmp_path)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADSTREAM_") or k == "ADSTREAM_CACHE"}
    env["PYTHONPATH"] = str(site)  # the installed wheel only, never the checkout
    where = subprocess.run([sys.executable, "-c", "import adstream, streams, online; "
                            "print(adstream.__file__, streams.__file__, online.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0 and where.stdout.count(str(site)) == 3, where.stdout + where.stderr
    r = subprocess.run([sys.executable, "-m", "adstream", "demo", "--history", "90", "--traffic", "40",
                        "--rate", "8", "--window", "10", "--window-examples", "200"],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    summary = json.loads((elsewhere / ".adstream" / "demo-report" / "summary.json").read_text())
    published = set(summary["registry"]["published"])
    served = {v for v in summary["traffic"]["model_versions"] if v != "prior"}
    assert published and served and served <= published, (served, published)  # this run's registry, no other
    assert summary["examples"]["from_traffic"] > 0
    assert summary["traffic"]["delivery_failures"] == 0
    # state only under the directory it was started from: nothing in the installation or the sources
    assert not list(site.rglob(".adstream")) and not (tmp_path / "src" / ".adstream").exists()
    assert (elsewhere / ".adstream" / "demo-report" / "demo.png").is_file()
