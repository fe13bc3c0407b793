"""One logging setup for every adstream process (the CLI and the ``python -m streams.*`` workers).

:func:`setup_logging` installs one stderr handler on the root logger with two filters:

* :class:`LibraryNoise` drops INFO and DEBUG records of third-party code (TorchRec/fbgemm's ``[TBE=...]``
  lines, Feast, faust/mode/aiokafka, httpx, uvicorn, ...): adstream's own INFO lines stay;
* :class:`RepeatLimiter` collapses a third-party warning or error that repeats (a librdkafka
  "Connection refused" per reconnect, aiokafka's "Unable connect to node" per retry): the first one
  is printed, then one summary line every ``summary_s`` while it lasts, and one line when it has
  stopped (nothing for ``quiet_s``).

``verbosity`` (``-v``/``-vv`` on the command line): 0 = the above; 1 = every record at INFO and up,
nothing filtered; 2 = DEBUG, nothing filtered.

librdkafka (confluent-kafka) logs to stderr by itself unless a client is given a ``logger``;
``streams.kafka_io.client_config`` gives every client one that logs to the ``librdkafka`` logger, so
its lines take the same path (and the same limits).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import IO, Callable

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# top-level packages whose INFO lines are the point of the log
OWN_PACKAGES = frozenset({"adstream", "core", "streams", "features", "models", "online", "bench", "tests",
                          "__main__"})
_MARK = "_adstream_handler"


def _top(name: str) -> str:
    return name.split(".", 1)[0]


_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


def _under_project(pathname: str) -> bool:
    """Source files of this project (the checkout, or the installed packages next to ``core``)."""
    try:
        rel = Path(pathname).resolve().relative_to(_PROJECT_ROOT)
    except (ValueError, OSError):
        return False
    return bool(rel.parts) and rel.parts[0] in OWN_PACKAGES


def is_own(record: logging.LogRecord) -> bool:
    """Whether ``record`` was logged by adstream's code rather than a library."""
    if record.name == "root":
        return _under_project(record.pathname)
    return _top(record.name) in OWN_PACKAGES


class LibraryNoise(logging.Filter):
    """Drops third-party records below WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or is_own(record) or getattr(record, "_adstream_summary", False)


_NUMBER = re.compile(r"\d+")
_RDKAFKA_NOISE = re.compile(r"\[thrd:[^\]]*\]:\s*"
                            r"|\s*\(after \d+ms in state [A-Z_]+(?:, \d+ identical error\(s\) suppressed)?\)"
                            r"|rdkafka#\w+-\d+")


def message_key(name: str, message: str) -> str:
    """What makes two lines "the same condition": the logger and the message with the parts that
    change on every retry (thread names, elapsed times, counters, numbers) taken out."""
    return f"{name}|{_NUMBER.sub('#', _RDKAFKA_NOISE.sub('', message))}"


class _Episode:
    __slots__ = ("first", "last", "count", "since_summary", "last_summary", "record")

    def __init__(self, now: float, record: logging.LogRecord) -> None:
        self.first = self.last = self.last_summary = now
        self.count = 1
        self.since_summary = 0
        self.record = record


class RepeatLimiter(logging.Filter):
    """Rate-limits repeating third-party warnings and errors (see the module docstring).

    Each distinct condition (:func:`message_key`) is an episode: its first record passes; repeats are
    counted and suppressed; every ``summary_s`` while it repeats one line says how often it
    happened; ``quiet_s`` after its last repeat, one line says it stopped. adstream's own records,
    and records below WARNING, always pass (the level filter is :class:`LibraryNoise`'s job)."""

    def __init__(self, summary_s: float = 30.0, quiet_s: float = 20.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.summary_s = summary_s
        self.quiet_s = quiet_s
        self.clock = clock
        self._episodes: dict[str, _Episode] = {}
        self._lock = threading.Lock()
        self._emit: Callable[[logging.LogRecord], None] | None = None

    def attach(self, emit: Callable[[logging.LogRecord], None]) -> None:
        """Where summary lines go (the handler's ``handle``); set by :func:`setup_logging`."""
        self._emit = emit

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_adstream_summary", False):
            return True
        if record.levelno < logging.WARNING or is_own(record):
            return True
        key = message_key(record.name, record.getMessage())
        now = self.clock()
        with self._lock:
            ep = self._episodes.get(key)
            if ep is None:
                self._episodes[key] = _Episode(now, record)
                return True
            ep.count += 1
            ep.since_summary += 1
            ep.last = now
            ep.record = record
            due = now - ep.last_summary >= self.summary_s
        if due:
            self._summary(key, now)
        return False

    def tick(self) -> None:
        """Summaries that are due and episodes that ended (called by a background thread)."""
        now = self.clock()
        with self._lock:
            items = list(self._episodes.items())
        for key, ep in items:
            if now - ep.last >= self.quiet_s:
                with self._lock:
                    self._episodes.pop(key, None)
                if ep.count > 1:
                    self._say(ep.record, f"no more for {self.quiet_s:.0f}s, after {ep.count} times in "
                                         f"{ep.last - ep.first:.0f}s: {ep.record.getMessage()}", logging.INFO)
            elif ep.since_summary and now - ep.last_summary >= self.summary_s:
                self._summary(key, now)

    def _summary(self, key: str, now: float) -> None:
        with self._lock:
            ep = self._episodes.get(key)
            if ep is None or not ep.since_summary:
                return
            n, ep.since_summary = ep.since_summary, 0
            span, ep.last_summary = now - ep.last_summary, now
            total, rec = ep.count, ep.record
        self._say(rec, f"repeated {n} times in the last {span:.0f}s ({total} since it started "
                       f"{now - ep.first:.0f}s ago): {rec.getMessage()}")

    def _say(self, like: logging.LogRecord, msg: str, level: int | None = None) -> None:
        if self._emit is None:
            return
        rec = logging.LogRecord(like.name, like.levelno if level is None else level, like.pathname, like.lineno,
                                msg, None, None)
        rec._adstream_summary = True  # type: ignore[attr-defined]
        self._emit(rec)

    def active(self) -> int:
        with self._lock:
            return len(self._episodes)


_limiters: "weakref.WeakSet[RepeatLimiter]" = weakref.WeakSet()
_ticker: threading.Thread | None = None
_ticker_lock = threading.Lock()


def _start_ticker(period_s: float = 1.0) -> None:
    global _ticker
    with _ticker_lock:
        if _ticker is not None and _ticker.is_alive():
            return

        def run() -> None:
            while True:
                time.sleep(period_s)
                for lim in list(_limiters):
                    try:
                        lim.tick()
                    except Exception:  # noqa: BLE001 - logging must never take a process down
                        pass

        _ticker = threading.Thread(target=run, name="log-repeat-limiter", daemon=True)
        _ticker.start()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (not the one at setup: tests and
    tools swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


# Third-party loggers set to WARNING at verbosity 0 (on top of the handler filter, which does not see
# records a library handles with handlers of its own).
QUIET_LOGGERS = ("feast", "faust", "mode", "aiokafka", "kafka", "httpx", "httpcore", "uvicorn", "urllib3",
                 "torchrec", "fbgemm_gpu", "torch.distributed", "matplotlib", "asyncio", "filelock", "numexpr")
# libraries that log through handlers of their own (torch's "W1127 ..." lines): only errors at verbosity 0
DEPRECATION_LOGGERS = ("torch.fx._symbolic_trace", "torchrec.distributed.planner")
# deprecation notes of libraries (fbgemm's DeprecationWarnings at import, ...): shown with -v
_OWN_MODULES = r"(adstream|core|streams|features|models|online|bench|tests)(\.|$)"


def setup_logging(verbosity: int = 0, stream: IO[str] | None = None, *, fmt: str = FORMAT,
                  summary_s: float = 30.0, quiet_s: float = 20.0) -> logging.Handler:
    """Configure the root logger for an adstream process (idempotent: a second call replaces the
    handler the first installed). Returns the handler."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _MARK, False):
            root.removeHandler(h)
    handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    setattr(handler, _MARK, True)
    handler.setFormatter(logging.Formatter(fmt))
    if verbosity <= 0:
        handler.addFilter(LibraryNoise())
        limiter = RepeatLimiter(summary_s=summary_s, quiet_s=quiet_s)
        limiter.attach(handler.handle)
        handler.addFilter(limiter)
        _limiters.add(limiter)
        _start_ticker()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if verbosity <= 0 else logging.NOTSET)
    for name in DEPRECATION_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if verbosity <= 0 else logging.NOTSET)
    global _verbosity
    _verbosity = verbosity
    quiet_library_warnings()
    return handler


_verbosity: int | None = None


def quiet_library_warnings() -> None:
    """At verbosity 0, hide libraries' deprecation notes (``DeprecationWarning``, ``FutureWarning``;
    adstream's own stay visible). Call it again after importing a library that installs warning
    filters of its own at import (Feast puts ``simplefilter("once", DeprecationWarning)`` first)."""
    import warnings

    for f in _our_filters:  # at most one set of ours, at the front
        if f in warnings.filters:
            warnings.filters.remove(f)
    _our_filters.clear()
    if _verbosity is None or _verbosity > 0:
        warnings._filters_mutated()  # type: ignore[attr-defined]
        return
    for cat in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=cat)
        _our_filters.append(warnings.filters[0])
        warnings.filterwarnings("default", category=cat, module=_OWN_MODULES)  # ours stay visible
        _our_filters.append(warnings.filters[0])


_our_filters: list = []


def verbosity_from_env(default: int = 0) -> int:
    """``ADSTREAM_LOG_VERBOSITY`` (0, 1, 2): how worker processes started by another one (the demo)
    inherit its ``-v``."""
    import os

    try:
        return int(os.environ.get("ADSTREAM_LOG_VERBOSITY", default))
    except ValueError:
        return default
