"""Fresh features: streaming aggregates (pure) and the Feast repository + client around them.

Feast is imported only inside this package (``features.store`` and ``features.repo``), and only
after :func:`feast_ready`, which every Feast import here goes through:

* Feast 0.67 imports torch when it is imported (``feast.torch_wrapper``, for an optional tensor
  output of its read APIs that adstream never asks for). torch takes seconds to load and the
  commands that read features do not need it, so a lazy stand-in for that one module is put in
  place first: torch is imported when (if ever) a Feast call asks for tensors.
* ``feast.metrics`` switches the whole process's Prometheus metrics to multiprocess mode when it is
  imported; :func:`feast_ready` imports it first and undoes that (see ``features.store``).
"""

from __future__ import annotations

import sys as _sys
import types as _types

_TORCH_WRAPPER = "feast.torch_wrapper"


def _lazy_torch_wrapper() -> _types.ModuleType:
    """``feast.torch_wrapper`` with the same names, importing torch on first use instead of at import."""
    mod = _types.ModuleType(_TORCH_WRAPPER, "Lazy stand-in for feast.torch_wrapper (adstream: features/__init__.py)")
    state: dict = {}

    def _load() -> None:
        if "ok" not in state:
            import importlib

            try:
                state["torch"], state["ok"], state["error"] = importlib.import_module("torch"), True, None
            except Exception as e:  # noqa: BLE001 - same contract as Feast's: remember, raise on use
                state["torch"], state["ok"], state["error"] = None, False, e

    def get_torch():
        _load()
        if state["ok"]:
            return state["torch"]
        raise ImportError(f"Torch is not available or failed to import: {state['error']}") from state["error"]

    def __getattr__(name: str):
        if name in ("TORCH_AVAILABLE", "_torch", "_torch_import_error"):
            _load()
            return {"TORCH_AVAILABLE": state["ok"], "_torch": state["torch"],
                    "_torch_import_error": state["error"]}[name]
        raise AttributeError(name)

    mod.get_torch = get_torch  # type: ignore[attr-defined]
    mod.__getattr__ = __getattr__  # type: ignore[attr-defined]
    return mod


_ready = False


def feast_ready() -> None:
    """Call before importing Feast (idempotent)."""
    global _ready
    if _ready:
        return
    if "feast" not in _sys.modules:  # once Feast is loaded its own wrapper is in place: leave it
        _sys.modules.setdefault(_TORCH_WRAPPER, _lazy_torch_wrapper())
    from core.logs import quiet_library_warnings
    from features.store import keep_prometheus_in_process

    keep_prometheus_in_process()  # imports Feast
    quiet_library_warnings()  # Feast's own warning filters, installed at its import, come first otherwise
    _ready = True
