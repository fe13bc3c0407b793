"""How adstream starts its own worker processes (the demo's workers, train-dist's ranks).

A child runs in the caller's working directory with this installation's packages first on
``PYTHONPATH`` (a checkout or an installed wheel alike), and every path it is told about is
absolute: paths in the caller's ``ADSTREAM_*`` environment (the config file, ``..._DIR`` settings,
the cache) are resolved against the caller's working directory before the child sees them, and
callers pass absolute paths on the command line. So parent and children always mean the same
files, from whatever directory ``adstream`` was started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

# the directory holding the adstream, core, streams, ... packages of this installation
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _is_path_variable(name: str) -> bool:
    return name.startswith("ADSTREAM_") and (
        name in ("ADSTREAM_CONFIG", "ADSTREAM_CACHE", "ADSTREAM_STATE_DIR") or name.endswith("_DIR"))


def child_env(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process (see the module docstring)."""
    env = dict(os.environ if base is None else base)
    env.update(extra or {})
    for k, v in list(env.items()):
        if _is_path_variable(k) and v and not os.path.isabs(v):
            env[k] = os.path.abspath(v)
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
