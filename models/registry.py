"""A versioned model registry in a directory, with an atomically swapped ``latest`` pointer.

Layout (one model name per sub-directory)::

    ROOT/NAME/versions/v000001/{weights.safetensors, state.json, meta.json}   published (passed the gate)
    ROOT/NAME/rejected/v000002/{...}                    kept for inspection, never served
    ROOT/NAME/LATEST                                    {"version": "v000001", "previous": [...]}
    ROOT/NAME/history.jsonl                             one line per pointer change

- A version cannot run code when it is loaded: tensors and numeric arrays are in safetensors, every
  other part of the state is JSON (``models.state_codec``); nothing is unpickled. A version in the
  old pickle format (``state.pt``) is refused with a message, never loaded.

- A version directory is written under a temporary name and renamed into place, so a reader never
  sees a half-written version; ``LATEST`` is replaced with ``os.replace`` (atomic on POSIX).
- Version numbers are shared by published and rejected versions and never reused.
- ``rollback()`` moves ``LATEST`` back to the version served before the current one;
  ``promote(v)`` points it at any published version.
- Pure filesystem code: the caller passes times in (``meta["created_at"]``); nothing reads a clock.
- A registry the process cannot write (a read-only mount) answers ``publish``/``promote``/``rollback``
  with :class:`RegistryReadOnly`, naming the directory, instead of an unexplained ``OSError``.

Readers (the online loader) poll :meth:`ModelRegistry.latest` and load with :meth:`load`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import atomic_write, fsync_dir

_VERSION = re.compile(r"^v(\d{6,})$")
WEIGHTS_FILE = "weights.safetensors"
TREE_FILE = "state.json"
LEGACY_STATE_FILE = "state.pt"  # pickle (torch.save): refused, it could run code when loaded
META_FILE = "meta.json"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown version, nothing to roll back to, ...)."""


class RegistryReadOnly(RegistryError):
    """The registry directory cannot be written by this process (for example a read-only mount)."""


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    path: Path
    meta: dict[str, Any]


class ModelRegistry:
    """Versions of one model (``name``) under ``root``."""

    def __init__(self, root: str | Path, name: str = "ctr") -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise RegistryError(f"invalid model name {name!r}")
        self.root = Path(root)
        self.name = name
        self.dir = self.root / name
        self.versions_dir = self.dir / "versions"
        self.rejected_dir = self.dir / "rejected"
        self.pointer = self.dir / "LATEST"
        self.history_file = self.dir / "history.jsonl"

    # ------------------------------------------------------------------ writing
    def _next_version(self) -> str:
        nums = [0]
        for d in (self.versions_dir, self.rejected_dir):
            if d.is_dir():
                for p in d.iterdir():
                    m = _VERSION.match(p.name)
                    if m:
                        nums.append(int(m.group(1)))
        return f"v{max(nums) + 1:06d}"

    def _read_only(self, e: OSError, what: str) -> RegistryError:
        if e.errno in _READ_ONLY:
            return RegistryReadOnly(f"model registry {self.dir} is not writable by this process ({e.strerror}); "
                                    f"cannot {what}. Mount it read-write, or {what} where it is writable "
                                    "(`adstream models ...`)")
        return RegistryError(f"cannot {what} in {self.dir}: {e}")

    def _write_version(self, parent: Path, state: Any, meta: dict[str, Any]) -> VersionInfo:
        from models.state_codec import encode_state

        weights, tree = encode_state(state)  # before touching the directory: a bad state writes nothing
        try:
            parent.mkdir(parents=True, exist_ok=True)
            version = self._next_version()
            tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{version}."))
        except OSError as e:
            raise self._read_only(e, "store a version") from None
        try:
            _write_file(tmp / WEIGHTS_FILE, weights)
            _write_file(tmp / TREE_FILE, tree)
            meta = {**meta, "name": self.name, "version": version}
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
            final = parent / version
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(parent)
        return VersionInfo(self.name, version, final, meta)

    def publish(self, state: Any, meta: dict[str, Any] | None = None, make_latest: bool = True) -> VersionInfo:
        """Stores a version that passed the gate and (by default) points ``LATEST`` at it."""
        info = self._write_version(self.versions_dir, state, dict(meta or {}))
        if make_latest:
            self._set_latest(info.version, reason="publish")
        return info

    def reject(self, state: Any, meta: dict[str, Any] | None = None) -> VersionInfo:
        """Stores a version that failed the gate under ``rejected/`` (kept, never served)."""
        return self._write_version(self.rejected_dir, state, dict(meta or {}))

    def _read_pointer(self) -> dict[str, Any]:
        try:
            return json.loads(self.pointer.read_text())
        except FileNotFoundError:
            return {"version": None, "previous": []}
        except (OSError, ValueError) as e:
            raise RegistryError(f"registry pointer {self.pointer} is unreadable: {e}") from None

    def _set_latest(self, version: str, reason: str, previous: list[str] | None = None) -> None:
        cur = self._read_pointer()
        if previous is None:
            previous = list(cur.get("previous", []))
            if cur.get("version") and cur["version"] != version:
                previous.append(cur["version"])
        data = {"version": version, "previous": previous[-100:]}
        try:
            atomic_write(self.pointer, json.dumps(data).encode(), writers="many")  # trainer and admin calls
            with open(self.history_file, "a") as f:
                f.write(json.dumps({"version": version, "from": cur.get("version"), "reason": reason}) + "\n")
        except OSError as e:
            raise self._read_only(e, f"{reason} {self.name} to {version}") from None

    def promote(self, version: str) -> VersionInfo:
        """Points ``LATEST`` at a published version (raises RegistryError if there is none)."""
        info = self.info(version)
        self._set_latest(version, reason="promote")
        return info

    def rollback(self) -> VersionInfo:
        """Points ``LATEST`` back at the version served before the current one."""
        cur = self._read_pointer()
        previous = [v for v in cur.get("previous", []) if (self.versions_dir / v).is_dir()]
        if not previous:
            raise RegistryError(f"model {self.name!r} has no earlier version to roll back to")
        target = previous.pop()
        self._set_latest(target, reason="rollback", previous=previous)
        return self.info(target)

    # ------------------------------------------------------------------ reading
    def latest(self) -> str | None:
        """The version ``LATEST`` points at, or None when nothing was published yet."""
        return self._read_pointer().get("version")

    def versions(self, rejected: bool = False) -> list[str]:
        d = self.rejected_dir if rejected else self.versions_dir
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if _VERSION.match(p.name))

    def info(self, version: str | None = None) -> VersionInfo:
        version = version or self.latest()
        if version is None:
            raise RegistryError(f"model {self.name!r} has no published version")
        if not _VERSION.match(version):
            raise RegistryError(f"invalid version {version!r} (expected like v000001)")
        path = self.versions_dir / version
        if not path.is_dir():
            raise RegistryError(f"model {self.name!r} has no published version {version}")
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError) as e:
            raise RegistryError(f"{path / META_FILE} is unreadable: {e}") from None
        return VersionInfo(self.name, version, path, meta)

    def load(self, version: str | None = None) -> tuple[Any, VersionInfo]:
        """``(state, info)`` of a published version (the latest by default)."""
        info = self.info(version)
        return self.load_state(info.path), info

    def load_state(self, path: Path) -> Any:
        """The state stored in a version directory (published or rejected). Reads safetensors and
        JSON only: a file crafted to run code is refused, never executed."""
        from models.state_codec import StateFormatError, decode_state

        wpath, tpath = path / WEIGHTS_FILE, path / TREE_FILE
        if not wpath.exists() and (path / LEGACY_STATE_FILE).exists():
            raise RegistryError(f"cannot load {path}: it is in the old pickle format ({LEGACY_STATE_FILE}), which "
                                "can run code when loaded and is refused; publish the model again")
        try:
            return decode_state(wpath.read_bytes(), tpath.read_bytes())
        except (OSError, StateFormatError) as e:  # a corrupt file must not look like a valid model
            raise RegistryError(f"cannot load {path}: {e}") from None

    def history(self) -> list[dict[str, Any]]:
        if not self.history_file.is_file():
            return []
        return [json.loads(line) for line in self.history_file.read_text().splitlines() if line.strip()]
