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
_PLAIN = {str, int, float, bool, type(None)}
FORMAT = 1


class StateFormatError(ValueError):
    """A state that cannot be encoded (an object that is not plain data), or a file that does not
    decode to one."""


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[dict[str, Any], torch.Tensor, str]] = []  # (JSON node, tensor, path)

    def tensor(self, t: torch.Tensor, path: str) -> dict[str, Any]:
        if t.is_sparse or t.layout != torch.strided:
            raise StateFormatError(f"{path}: sparse tensors cannot be stored (densify them first)")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        node: dict[str, Any] = {TAG: "tensor"}
        self._pending.append((node, t, path))
        return node

    def finish(self) -> None:
        """Name every tensor. Tensors that share one storage (the fused embedding tables are views of
        one buffer) are stored once, as that buffer, and rebuilt as views: no copy per table."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_node, t, _path) in enumerate(self._pending):
            if t.numel():
                st = t.untyped_storage()
                groups.setdefault((st.data_ptr(), st.nbytes()), []).append(i)
        in_group = {i: key for key, ids in groups.items() for i in ids}
        bases: dict[tuple[int, int], str | None] = {}
        for i, (node, t, _path) in enumerate(self._pending):
            key = in_group.get(i)
            ids = groups.get(key, []) if key is not None else []
            whole = t.is_contiguous() and t.storage_offset() == 0 and t.numel() * t.element_size() == (key or (0, 0))[1]
            if key is None or (len(ids) == 1 and whole):
                name = f"t{len(self.tensors)}"
                self.tensors[name] = t if t.is_contiguous() else t.contiguous()
                node["k"] = name
                continue
            if key not in bases:
                bases[key] = self._base(t, [self._pending[j][1] for j in ids])
            base = bases[key]
            if base is None:  # mixed dtypes over one storage: each its own copy
                name = f"t{len(self.tensors)}"
                self.tensors[name] = t.contiguous().clone()
                node["k"] = name
            else:
                node.update({TAG: "view", "s": base, "offset": int(t.storage_offset()), "shape": list(t.shape),
                             "stride": list(t.stride())})

    def _base(self, t: torch.Tensor, members: list[torch.Tensor]) -> str | None:
        st = t.untyped_storage()
        if any(m.dtype != t.dtype for m in members) or st.nbytes() % t.element_size():
            return None
        flat = torch.empty(0, dtype=t.dtype).set_(st, 0, (st.nbytes() // t.element_size(),))
        name = f"s{len(self.tensors)}"
        self.tensors[name] = flat
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
            return self.tensor(x, path)
        if isinstance(x, np.ndarray):
            return self.array(x, path)
        if isinstance(x, torch.Size):
            return {TAG: "size", "items": [int(v) for v in x]}
        if isinstance(x, tuple):
            return {TAG: "tuple", "items": [self.enc(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            if all(type(v) in _PLAIN for v in x):  # id lists, free-row lists: no walk per element
                return list(x)
            if all(type(v) is tuple and all(type(e) in _PLAIN for e in v) for v in x):  # (key, row) pairs
                return {TAG: "tuples", "items": [list(v) for v in x]}
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
                node = self.tensor(t, path)
                node.update({"numpy": a.dtype.str})
                return node
        if a.dtype.kind in "USO":
            flat = a.reshape(-1).tolist()
            return {TAG: "ndarray_list", "dtype": a.dtype.str, "shape": list(a.shape),
                    "items": [self.enc(v, f"{path}[{i}]") for i, v in enumerate(flat)]}
        raise StateFormatError(f"{path}: numpy arrays of dtype {a.dtype} cannot be stored")


def encode_state(state: Any) -> tuple[bytes, bytes]:
    """``(safetensors bytes, JSON bytes)`` of ``state`` (see the module docstring)."""
    e = _Encoder()
    tree = e.enc(state, "")
    e.finish()
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
        if tag in ("tensor", "view"):
            if tag == "tensor":
                t = ref(d.get("k"))
            else:
                base = ref(d.get("s"))
                if base.dim() != 1:
                    raise StateFormatError("a view's base must be one-dimensional")
                try:  # as_strided checks the view lies inside the base
                    t = torch.as_strided(base, [int(x) for x in d["shape"]], [int(x) for x in d["stride"]],
                                         int(d["offset"]))
                except RuntimeError as e:
                    raise StateFormatError(f"invalid view: {e}") from None
            if "numpy" in d:
                return t.numpy().astype(np.dtype(str(d["numpy"])), copy=False)
            return t
        if tag == "ndarray":  # written before views existed
            return ref(d.get("k")).numpy().astype(np.dtype(str(d["dtype"])), copy=False)
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
        if tag == "tuples":
            return [tuple(v) for v in d["items"]]
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
