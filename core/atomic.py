"""Files that are replaced whole: a reader sees the old content or the new one, never a torn one.

Used for checkpoints (state + offsets in one write), the registry's ``LATEST`` pointer and
generated config files. Write to a temporary file in the same directory, fsync it, ``os.replace``
it over the target, fsync the directory.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from core.errors import ConfigError


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, writers: str = "one") -> None:
    """Replace ``path`` with ``data`` atomically. ``writers="many"`` when several processes may
    write the same file (the temporary file then gets a unique name); one writer uses
    ``.<name>.tmp``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if writers == "many":
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        f_open = lambda: os.fdopen(fd, "wb")  # noqa: E731
    else:
        tmp = str(path.with_name(f".{path.name}.tmp"))
        f_open = lambda: open(tmp, "wb")  # noqa: E731
    try:
        with f_open() as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    """Pickle ``data`` to ``path`` atomically."""
    atomic_write(path, pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))


def load_checkpoint(path: Path, version: int, what: str, remedy: str) -> dict[str, Any] | None:
    """The checkpoint dict written by :func:`save_checkpoint`; None when there is none.

    An unreadable file or another format ``version`` is a :class:`ConfigError` naming ``what`` it
    is and the ``remedy`` (never a silent fresh start)."""
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except Exception as e:
        raise ConfigError(f"{what} {path} cannot be read ({type(e).__name__}: {e}); {remedy}") from e
    if not isinstance(data, dict) or data.get("version") != version:
        raise ConfigError(f"{what} {path} has an unknown format")
    return data
