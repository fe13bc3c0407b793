"""Model states as files that cannot run code when loaded: tensors in safetensors, the rest in JSON.

A state (``StreamModel.state()``, ``CTRLearner.state_dict()``) is a tree of dicts, lists, tuples,
strings, numbers, booleans, ``None``, torch tensors and numpy arrays. :func:`encode_state` splits
it into

- ``tensors``: the safetensors bytes of every tensor and numeric numpy array (a flat name -> tensor
  table; safetensors is a header + raw buffers, its loader builds no Python object from the file);
- ``tree``: the JSON of everything else, with a tagged object where a tensor, an array, a tuple, a
  dict with non-string keys, a numpy scalar or bytes stood (``{"__adstream__": "tensor", "k": "t3"}``).

:func:`decode_state` rebuilds the same tree: the same types (tuples stay tuples, int keys stay int
keys, numpy arrays stay numpy arrays), the same values. The decoder only ever builds plain data,
tensors and numpy arrays of plain dtypes; an unknown tag or a reference to a missing tensor is a
:class:`StateFormatError`. Nothing here calls ``pickle`` or ``torch.load``.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

TAG = "__adstream__"
FORMAT = 1


class StateFormatError(ValueError):
    """A state that cannot be encoded (an object that is not plain data), or a file that does not
    decode to one."""


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._storages: set[tuple[int, int]] = set()

    def tensor(self, t: torch.Tensor, path: str) -> str:
        if t.is_sparse or t.layout != torch.strided:
            raise StateFormatError(f"{path}: sparse tensors cannot be stored (densify them first)")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if not t.is_contiguous():
            t = t.contiguous()
        if t.numel():
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key in self._storages:  # a view of a storage already stored: safetensors needs its own copy
                t = t.clone()
            else:
                self._storages.add(key)
        name = f"t{len(self.tensors)}"
        self.tensors[name] = t
        return name

    def enc(self, x: Any, path: str) -> Any:
        if isinstance(x, np.generic):  # before int/float: np.float64 is a float subclass
            return {TAG: "npscalar", "dtype": x.dtype.str, "v": self.enc(x.item(), path)}
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            return float(x)
        if isinstance(x, torch.Tensor):
            return {TAG: "tensor", "k": self.tensor(x, path)}
        if isinstance(x, np.ndarray):
            return self.array(x, path)
        if isinstance(x, torch.Size):
            return {TAG: "size", "items": [int(v) for v in x]}
        if isinstance(x, tuple):
            return {TAG: "tuple", "items": [self.enc(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [self.enc(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(type(k) is str for k in x) and TAG not in x:
                return {k: self.enc(v, f"{path}.{k}") for k, v in x.items()}
            return {TAG: "dict", "items": [[self.enc(k, f"{path}<key>"), self.enc(v, f"{path}[{k!r}]")]
                                           for k, v in x.items()]}
        if isinstance(x, (bytes, bytearray)):
            return {TAG: "bytes", "b64": base64.b64encode(bytes(x)).decode()}
        if isinstance(x, torch.dtype):
            return {TAG: "dtype", "name": str(x).removeprefix("torch.")}
        raise StateFormatError(f"{path or 'state'}: a {type(x).__module__}.{type(x).__qualname__} cannot be "
                               "stored (only tensors, numpy arrays and plain data: dict, list, tuple, str, "
                               "int, float, bool, None)")

    def array(self, a: np.ndarray, path: str) -> dict[str, Any]:
        if a.dtype.kind in "biufc" and a.dtype.kind != "c":
            try:
                t = torch.from_numpy(np.ascontiguousarray(a))
            except TypeError:
                t = None
            if t is not None:
                return {TAG: "ndarray", "k": self.tensor(t, path), "dtype": a.dtype.str}
        if a.dtype.kind in "USO":
            flat = a.reshape(-1).tolist()
            return {TAG: "ndarray_list", "dtype": a.dtype.str, "shape": list(a.shape),
                    "items": [self.enc(v, f"{path}[{i}]") for i, v in enumerate(flat)]}
        raise StateFormatError(f"{path}: numpy arrays of dtype {a.dtype} cannot be stored")


def encode_state(state: Any) -> tuple[bytes, bytes]:
    """``(safetensors bytes, JSON bytes)`` of ``state`` (see the module docstring)."""
    e = _Encoder()
    tree = e.enc(state, "")
    doc = {"format": FORMAT, "tree": tree}
    return st_save(e.tensors, metadata={"adstream_state_format": str(FORMAT)}), json.dumps(doc).encode()


def _decoder(tensors: dict[str, torch.Tensor]):
    def ref(k: Any) -> torch.Tensor:
        if not isinstance(k, str) or k not in tensors:
            raise StateFormatError(f"state refers to a tensor {k!r} that the weights file does not hold")
        return tensors[k]

    def hook(d: dict[str, Any]) -> Any:
        tag = d.get(TAG)
        if tag is None:
            return d
        if tag == "tensor":
            return ref(d.get("k"))
        if tag == "ndarray":
            arr = ref(d.get("k")).numpy()
            return arr.astype(np.dtype(str(d["dtype"])), copy=False)
        if tag == "ndarray_list":
            dt = np.dtype(str(d["dtype"]))
            if dt.kind not in "USO":
                raise StateFormatError(f"list-encoded array of dtype {dt}")
            items, shape = list(d["items"]), tuple(int(s) for s in d["shape"])
            if dt.kind == "O":
                a = np.empty(len(items), dtype=object)
                a[:] = items
            else:
                a = np.array(items, dtype=dt)
            return a.reshape(shape)
        if tag == "npscalar":
            dt = np.dtype(str(d["dtype"]))
            if dt.kind not in "biufUS":
                raise StateFormatError(f"numpy scalar of dtype {dt}")
            return dt.type(d["v"])
        if tag == "tuple":
            return tuple(d["items"])
        if tag == "size":
            return torch.Size(int(v) for v in d["items"])
        if tag == "dict":
            out = {}
            for k, v in d["items"]:
                if isinstance(k, list):  # a key that was a tuple of lists cannot be hashed
                    raise StateFormatError("unhashable dict key in state")
                out[k] = v
            return out
        if tag == "bytes":
            return base64.b64decode(str(d["b64"]), validate=True)
        if tag == "dtype":
            tdt = getattr(torch, str(d["name"]), None)
            if not isinstance(tdt, torch.dtype):
                raise StateFormatError(f"unknown torch dtype {d['name']!r}")
            return tdt
        raise StateFormatError(f"unknown tag {tag!r} in state")

    return hook


def _constant(name: str) -> float:
    if name in ("NaN", "Infinity", "-Infinity"):
        return float(name.replace("Infinity", "inf"))
    raise StateFormatError(f"invalid JSON constant {name}")  # pragma: no cover (json only passes these)


def decode_state(tensor_bytes: bytes, tree_bytes: bytes) -> Any:
    """The state written by :func:`encode_state` (a :class:`StateFormatError` for anything else)."""
    try:
        tensors = st_load(tensor_bytes)
    except Exception as e:  # the safetensors parser rejects anything that is not its format
        raise StateFormatError(f"the weights are not a safetensors file ({type(e).__name__}: {e})") from None
    try:
        doc = json.loads(tree_bytes, object_hook=_decoder(tensors), parse_constant=_constant)
    except StateFormatError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise StateFormatError(f"the state tree is not valid ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "tree" not in doc:
        raise StateFormatError(f"the state tree has an unknown format (expected format {FORMAT})")
    return doc["tree"]


def states_equal(a: Any, b: Any) -> bool:
    """Deep equality for states (tensors and arrays by value and dtype, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and bool(torch.equal(a, b) or (a.is_floating_point() and torch.equal(
                    torch.nan_to_num(a, nan=0.5), torch.nan_to_num(b, nan=0.5)) and torch.equal(a.isnan(), b.isnan()))))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f")))
    if isinstance(a, dict) and isinstance(b, dict):  # an OrderedDict (torch state_dict) decodes as a dict
        return list(a.keys()) == list(b.keys()) and all(states_equal(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)
