"""A bounded on-disk spool of Kafka records, for producers that must not lose what they were given
while the broker is away (the online service's impression log, ``streams.event_sink``).

Records are appended to segment files (``<seq>.seg``) in a directory of the spool root that this
process owns (an ``flock`` on ``.lock`` inside it). Each record is framed with its lengths and a
CRC32, so a torn tail (a crash mid-write) is detected and skipped when the segment is read back.
:meth:`DiskSpool.append` refuses records once ``max_bytes`` are spooled (the caller counts a drop);
:meth:`DiskSpool.take` closes the current segment and hands the oldest one over for draining;
:meth:`DiskSpool.done` deletes it once every record in it was delivered (or spooled again).
Directories left by a process that died (their lock is free) are adopted: their segments are
drained like this process's own. Durability: every record is written to the OS at once (it
survives the process); ``sync()`` (called by the owner about once a second) makes it survive the
machine.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_HEAD = struct.Struct(">IIII")  # crc32, len(topic), len(key) (NONE = no key), len(value)
NONE = 0xFFFFFFFF
Record = tuple[str, bytes | None, bytes]


def _frame(topic: str, key: bytes | None, value: bytes) -> bytes:
    t = topic.encode()
    body = t + (key or b"") + value
    crc = zlib.crc32(body)
    return _HEAD.pack(crc, len(t), NONE if key is None else len(key), len(value)) + body


def read_segment(path: Path) -> Iterator[Record]:
    """The records of a segment, stopping at a torn or corrupt tail."""
    data = path.read_bytes()
    pos, n = 0, len(data)
    while pos + _HEAD.size <= n:
        crc, lt, lk, lv = _HEAD.unpack_from(data, pos)
        klen = 0 if lk == NONE else lk
        end = pos + _HEAD.size + lt + klen + lv
        if end > n:
            log.warning("spool segment %s: torn record at byte %d (a crash mid-write); rest skipped", path, pos)
            return
        body = data[pos + _HEAD.size:end]
        if zlib.crc32(body) != crc:
            log.warning("spool segment %s: corrupt record at byte %d; rest skipped", path, pos)
            return
        topic = body[:lt].decode()
        key = None if lk == NONE else body[lt:lt + klen]
        yield topic, key, body[lt + klen:]
        pos = end


class DiskSpool:
    def __init__(self, root: str | Path, max_bytes: int, segment_bytes: int = 8 << 20) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self.dir = self.root / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.dir.mkdir()
        self._lock_fd = os.open(self.dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._mu = threading.Lock()
        self._seq = 0
        self._cur: Path | None = None
        self._f = None
        self._cur_bytes = 0
        self._dirty = False
        self._queue: list[Path] = []  # closed segments waiting to be drained, oldest first
        self.bytes = 0
        self.records = 0  # records spooled and not yet handed out
        self.adopted = self._adopt()

    # ---- segments left by earlier processes ----------------------------------------------------
    def _adopt(self) -> int:
        n = 0
        for d in sorted(p for p in self.root.iterdir() if p.is_dir() and p != self.dir):
            lock = d / ".lock"
            try:
                fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue  # its owner is alive
            try:
                for seg in sorted(d.glob("*.seg")):
                    self._seq += 1
                    target = self.dir / f"{self._seq:012d}.seg"
                    os.replace(seg, target)
                    size = target.stat().st_size
                    self._queue.append(target)
                    self.bytes += size
                    self.records += sum(1 for _ in read_segment(target))
                    n += 1
                lock.unlink(missing_ok=True)
                try:
                    d.rmdir()
                except OSError:
                    pass
            finally:
                os.close(fd)
        if n:
            log.warning("impression spool: adopted %d segments (%d records) left by an earlier process",
                        n, self.records)
        return n

    # ---- writing -------------------------------------------------------------------------------
    def append(self, topic: str, key: bytes | None, value: bytes) -> bool:
        """Spool one record; False when the spool is full (``max_bytes``) or cannot be written."""
        frame = _frame(topic, key, value)
        with self._mu:
            if self.bytes + len(frame) > self.max_bytes:
                return False
            try:
                if self._f is None or self._cur_bytes >= self.segment_bytes:
                    self._rotate()
                self._f.write(frame)
                self._f.flush()  # to the OS: survives the process
            except OSError as e:
                log.error("impression spool %s cannot be written: %s", self.dir, e)
                return False
            self._cur_bytes += len(frame)
            self.bytes += len(frame)
            self.records += 1
            self._dirty = True
            return True

    def _rotate(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._queue.append(self._cur)
            self._f = None
        self._seq += 1
        self._cur = self.dir / f"{self._seq:012d}.seg"
        self._f = open(self._cur, "ab")
        self._cur_bytes = 0

    def sync(self) -> None:
        with self._mu:
            if self._f is not None and self._dirty:
                os.fsync(self._f.fileno())
                self._dirty = False

    # ---- draining ------------------------------------------------------------------------------
    def take(self) -> tuple[Path, list[Record]] | None:
        """The oldest segment and its records (the current one is closed first); None if empty.
        The segment stays on disk until :meth:`done`."""
        with self._mu:
            if not self._queue and self._f is not None and self._cur_bytes:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                self._queue.append(self._cur)
                self._f, self._cur, self._cur_bytes = None, None, 0
            if not self._queue:
                return None
            seg = self._queue[0]
        return seg, list(read_segment(seg))

    def done(self, seg: Path, n_records: int) -> None:
        """Every record of ``seg`` was delivered or spooled again: delete it."""
        with self._mu:
            size = seg.stat().st_size if seg.exists() else 0
            seg.unlink(missing_ok=True)
            if seg in self._queue:
                self._queue.remove(seg)
            self.bytes = max(0, self.bytes - size)
            self.records = max(0, self.records - n_records)

    def close(self) -> None:
        """Sync and release the directory (what is left is adopted by the next process)."""
        with self._mu:
            if self._f is not None:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
                self._f = None
                if self._cur is not None and self._cur_bytes == 0:
                    self._cur.unlink(missing_ok=True)
            empty = not any(self.dir.glob("*.seg"))
            if empty:
                (self.dir / ".lock").unlink(missing_ok=True)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            except OSError:
                pass
            if empty:
                try:
                    self.dir.rmdir()
                except OSError:
                    pass

    def __len__(self) -> int:
        return self.records
