"""The import arrows of docs/architecture.md, checked on the source (no imports executed).

adstream/ → streams/, online/ → features/, models/ → core/. streams/ and online/ never import each
other, features/ and models/ never import each other, nothing imports adstream/; Feast only in
features/, Kafka clients only in streams/, no clock/env/Kafka/Feast/HTTP in models/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "features", "models", "streams", "online", "adstream")
ALLOWED = {
    "core": {"core"},
    "features": {"core", "features"},
    "models": {"core", "models"},
    "streams": {"core", "features", "models", "streams"},
    "online": {"core", "features", "models", "online"},
    "adstream": set(PACKAGES),
}
KAFKA = {"kafka", "confluent_kafka", "aiokafka", "faust"}
FORBIDDEN_THIRD_PARTY = {
    "core": KAFKA | {"feast", "torch", "fastapi"},
    "features": KAFKA | {"torch", "fastapi"},
    "models": KAFKA | {"feast", "fastapi", "httpx", "requests", "redis"},
    "online": KAFKA | {"feast"},
}


def _imports(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.module, node.lineno))
    return out


def _files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("pkg", PACKAGES)
def test_import_arrows(pkg):
    bad = []
    for f in _files(pkg):
        for mod, line in _imports(f):
            top = mod.split(".")[0]
            if top in PACKAGES and top not in ALLOWED[pkg]:
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
            if top in FORBIDDEN_THIRD_PARTY.get(pkg, ()):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod} (not allowed in {pkg}/)")
    assert not bad, "\n".join(bad)


def test_models_read_no_clock_or_environment():
    bad = []
    for f in _files("models"):
        src = f.read_text()
        for needle in ("time.time(", "datetime.now(", "os.environ"):
            if needle in src:
                bad.append(f"{f.relative_to(ROOT)} uses {needle}")
    assert not bad, "\n".join(bad)
