"""A map from hashable Python values to int64 with whole-array operations, for the id mappers.

``KeyTable`` keeps a plain ``dict`` and touches it only through C-level iteration (``map`` over
``dict.get`` / ``dict.pop``, ``dict.update(zip(...))``, ``numpy.fromiter``): a lookup, insert or
delete of a whole array of keys runs no Python bytecode per key. This measured faster than
pandas' hash tables for the id mappers' shapes (a request's 200 candidates up to training
windows; ``bench/bench_idmap.py``), because it needs no per-call index or hash-table set-up.
"""

from __future__ import annotations

from collections import deque
from itertools import repeat
from typing import Any, Iterator

import numpy as np

ABSENT = -1


class KeyTable:
    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[Any, int] = {}

    def __len__(self) -> int:
        return len(self._d)

    def get(self, keys: np.ndarray) -> np.ndarray:
        """Value per key (``ABSENT`` where it has none)."""
        n = len(keys)
        if not n or not self._d:
            return np.full(n, ABSENT, dtype=np.int64)
        return np.fromiter(map(self._d.get, keys, repeat(ABSENT)), dtype=np.int64, count=n)

    def set(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Insert (or overwrite) keys."""
        self._d.update(zip(keys, np.asarray(values, dtype=np.int64).tolist()))

    update = set

    def delete(self, keys: np.ndarray) -> None:
        """Remove keys (absent ones are ignored)."""
        deque(map(self._d.pop, keys, repeat(None)), maxlen=0)

    def items_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values in insertion order."""
        n = len(self._d)
        keys = np.empty(n, dtype=object)
        keys[:] = list(self._d)
        return keys, np.fromiter(self._d.values(), dtype=np.int64, count=n)

    def items(self) -> Iterator[tuple[Any, int]]:
        return iter(self._d.items())
