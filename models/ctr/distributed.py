"""The CTR model under TorchRec ``DistributedModelParallel`` (DMP): sharded tables, data-parallel rest.

Run by every process of a ``torch.distributed`` job (the caller initialises the process group;
``adstream train-dist`` launches the job with ``torch.distributed.run``). See docs/distributed.md.

::

    global batch (B rows, identical on every rank)
      ├─ IdMapper per field on all B rows (same mapper, same input => same row ids on every rank)
      ├─ RunningStandardizer updated with all B rows (identical on every rank)
      └─ rank r keeps its slice r of the B rows (data parallel: ~B/N rows per rank)
    KJT (local rows) ─► ShardedEmbeddingBagCollection (table-wise or column-wise over the ranks;
                        fused RowWiseAdagrad applied in backward, all-to-all between ranks)
                     ─► backbone (DDP replica on every rank, gradients averaged) ─► logit

- The network is the single-process :class:`~models.ctr.model.CTRNet` with the same backbone
  (:func:`~models.ctr.backbones.build_backbone`, same seed => same initial dense weights); only
  the embedding collection differs: a plain ``EmbeddingBagCollection`` built on the ``meta``
  device (no rank ever allocates a full copy of the tables), whose optimizer is attached with
  ``apply_optimizer_in_backward`` so the sharded fbgemm kernels update each shard inside
  ``backward()``.
- Losses come from :mod:`models.ctr.losses` and follow ``CTRLearner._main_loss``: plain BCE
  (``finetune``), the Model Prior ``posterior`` / ``kl`` (``ddp-mp``) and distillation
  (``distill``). The prior model is the model as it was at the start of the window: its logits
  for every local batch of the window are computed *before* training on it (one forward pass of
  the same sharded model in eval mode), which is the same prior as the single-process snapshot.
- Loss is a mean over the local rows, weighted by ``k·N/n`` (``k`` local rows, ``n`` global,
  ``N`` ranks). DDP averages the dense gradients over the ranks and TorchRec divides the
  embedding gradients by the world size in its all-to-all backward
  (``comm_ops.GRADIENT_DIVISION``), so a step equals a step on the mean loss of the global batch.
- The embedding collection is wrapped in :class:`FieldOrder`: a sharded collection returns its
  pooled embeddings grouped by rank, and the network reads them in field order.
- Per-example Model Prior strengths (``mp_lambda_mode`` ``count`` / ``evidence``) are computed
  like the single-process learner's: from the mappers as they were at the start of the window
  (sightings before the window; values without a row then get none) and the window's own counts.
- Not supported under DMP (refused with a clear error): the Feature Prior (``fp != "off"``), the
  logit-chain Model Prior (``mp="logit"``), the per-window λ adaptation (``mp_adapt``), the
  first-order table (``first_order``; :func:`dist_config` turns it off for every strategy alike)
  and id expiry (``ttl``), which would need per-row resets of sharded tables.
- Training windows are the same batches as in the single-process protocol
  (:func:`models.evaluation.window_batches`: rows shuffled per window with a seed from
  (seed, period)).

Pure: tensors, frames and plain dicts; no Kafka, Feast, HTTP, clock or environment reads (the
process group is created by the caller).
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torchrec
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor

from models.ctr.backbones import build_backbone
from models.ctr.features import ModelInput, RawBatch, RunningStandardizer, concat, iter_batches, make_kjt, raw_from_frame
from models.ctr.hashing import IdMapper
from models.ctr.losses import bce, distill_loss, mp_kl_loss, mp_posterior_loss
from models.ctr.metrics import auc, logloss
from models.ctr.model import CTRConfig, CTRNet
from models.ctr.prior_strength import strengths, window_counts
from models.eval_report import summarise
from models.evaluation import (Columns, EvalConfig, _check_hygiene, check_sorted, period_bounds, strategy_config,
                               window_batches)

log = logging.getLogger(__name__)

EBC_PATH = "ebc.collection"  # where the EmbeddingBagCollection sits in the network
SHARDINGS = ("table_wise", "column_wise")
PLANNERS = ("manual", "torchrec")
DIST_STRATEGIES = ("finetune", "distill", "ddp-mp")


class DistConfigError(ValueError):
    """A setting the distributed learner cannot run with (the message names it)."""


def check_supported(cfg: CTRConfig) -> None:
    """Raises :class:`DistConfigError` for features the DMP learner does not implement."""
    cfg.validate()
    if cfg.fp != "off":
        raise DistConfigError("the Feature Prior (fp=learned|count) is not supported under DMP; use fp=off")
    if cfg.mp == "logit":
        raise DistConfigError("mp=logit (a chain of frozen networks) is not supported under DMP; use posterior or kl")
    if cfg.mp_adapt != "off":
        raise DistConfigError("mp_adapt (per-window λ scale) is not supported under DMP; use mp_adapt=off")
    if cfg.first_order:
        raise DistConfigError("the first-order table is not supported under DMP; use first_order=False")
    ttl = [f.name for f in cfg.fields if f.ttl is not None]
    if ttl:
        raise DistConfigError(f"id expiry (ttl) is not supported under DMP (fields {ttl}): recycled rows cannot be reset")


def dist_config(cfg: CTRConfig) -> CTRConfig:
    """A strategy's configuration as DMP runs it: no first-order table and no per-window λ
    adaptation (both single-process only; the same for every strategy)."""
    return replace(cfg, first_order=False, mp_adapt="off")


# ---------------------------------------------------------------------------------------- sharding plan


def plan_tables(cfg: CTRConfig, world_size: int, sharding: str) -> dict[str, list[int]]:
    """Which ranks hold each table (``t_<field>``), as plain data.

    - ``table_wise``: each whole table on one rank; tables are placed largest first
      (rows × dim) on the least-loaded rank, ties to the lowest rank. With fewer tables than
      ranks some ranks hold no table (they still run the dense part).
    - ``column_wise``: every table is split into ``world_size`` equal column blocks, block ``r``
      on rank ``r``; every field's dim must be divisible by ``world_size``.
    """
    if sharding not in SHARDINGS:
        raise DistConfigError(f"sharding must be one of {SHARDINGS}, not {sharding!r}")
    if world_size < 1:
        raise DistConfigError("world size must be >= 1")
    names = [f"t_{f.name}" for f in cfg.fields]
    dims = cfg.field_dims()
    if sharding == "column_wise":
        bad = [n for n, d in zip(names, dims) if d % world_size]
        if bad:
            raise DistConfigError(
                f"column_wise sharding needs embedding dims divisible by the world size {world_size}; not: {bad}"
            )
        return {n: list(range(world_size)) for n in names}
    sizes = [f.capacity * d for f, d in zip(cfg.fields, dims)]
    load = [0] * world_size
    out: dict[str, list[int]] = {}
    for i in sorted(range(len(names)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        load[r] += sizes[i]
        out[names[i]] = [r]
    return {n: out[n] for n in names}


def _torchrec_plan(
    ebc: EmbeddingBagCollection, tables: dict[str, list[int]], world_size: int, sharding: str, device_type: str
) -> Any:
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingPlan

    per_param = {
        name: (table_wise(rank=ranks[0]) if sharding == "table_wise" else column_wise(ranks=ranks))
        for name, ranks in tables.items()
    }
    module_plan = construct_module_sharding_plan(
        ebc, per_param, local_size=world_size, world_size=world_size, device_type=device_type
    )
    return ShardingPlan({EBC_PATH: module_plan})


def _planner_plan(net: CTRNet, cfg: CTRConfig, world_size: int, sharding: str, device_type: str, pg: Any) -> Any:
    """TorchRec's ``EmbeddingShardingPlanner`` restricted to one sharding type (a collective call)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation

    constraints = {
        f"t_{f.name}": ParameterConstraints(
            sharding_types=[sharding],
            # let column-wise use every rank: shards of dim / world_size columns
            min_partition=max(1, d // world_size) if sharding == "column_wise" else None,
        )
        for f, d in zip(cfg.fields, cfg.field_dims())
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device_type),
        constraints=constraints,
        # keep 15 % of each rank's memory for the dense part (the heuristic default over-estimates it)
        storage_reservation=FixedPercentageStorageReservation(0.15),
    )
    return planner.collective_plan(net, [EmbeddingBagCollectionSharder()], pg)


# ---------------------------------------------------------------------------------------- the network


class FieldOrder(torch.nn.Module):
    """Wraps an embedding collection so its pooled output keys come in field order.

    A sharded collection returns its ``KeyedTensor`` grouped by rank (rank 0's tables first), but
    ``CTRNet`` reads ``values()`` positionally: per-field dims, the FM's stacked view and the MLP
    input all assume field order. Reordering keeps the network the same function under every plan.
    """

    def __init__(self, collection: torch.nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.collection = collection
        self.keys = list(keys)

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        kt = self.collection(kjt)
        if list(kt.keys()) == self.keys:
            return kt
        d = kt.to_dict()
        return KeyedTensor.from_tensor_list(self.keys, [d[k] for k in self.keys])



def build_dist_net(cfg: CTRConfig) -> CTRNet:
    """The single-process network with a meta-device ``EmbeddingBagCollection`` (sharded later).

    The dense part is built exactly as :func:`models.ctr.model.build_net` builds it (same seed, same
    order), so its initial weights equal the single-process learner's.
    """
    check_supported(cfg)
    torch.manual_seed(cfg.seed)
    dims = cfg.field_dims()
    n_f = len(cfg.fields)
    backbone = build_backbone(
        cfg.backbone, n_f, max(dims), sum(dims), len(cfg.numeric), cfg.hidden, cfg.cross_layers, cfg.cross_low_rank
    )
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(name=f"t_{f.name}", embedding_dim=d, num_embeddings=f.capacity, feature_names=[f.name])
            for f, d in zip(cfg.fields, dims)
        ],
        device=torch.device("meta"),
    )
    opt_cls = {"rowwise_adagrad": torchrec.optim.RowWiseAdagrad, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    apply_optimizer_in_backward(opt_cls[cfg.emb_optimizer], ebc.parameters(), {"lr": cfg.emb_lr})
    names = [f.name for f in cfg.fields]
    return CTRNet(FieldOrder(ebc, names), backbone, names, dims, len(cfg.numeric), "off", cfg.fp_use, None)  # type: ignore[arg-type]


def _split(n: int, world: int, rank: int) -> np.ndarray:
    """Row positions of ``rank``'s slice of an ``n``-row global batch (contiguous, sizes differ by ≤ 1)."""
    edges = np.linspace(0, n, world + 1).round().astype(int)
    return np.arange(edges[rank], edges[rank + 1])


def _padded(idx: np.ndarray, width: int) -> np.ndarray:
    """``idx`` padded to ``width`` by repeating its last element (or row 0 when empty)."""
    if len(idx) == width:
        return idx
    fill = idx[-1] if len(idx) else 0
    return np.concatenate([idx, np.full(width - len(idx), fill, dtype=idx.dtype)])


@dataclass
class _Local:
    inp: ModelInput
    n_valid: int  # rows beyond n_valid are padding (every rank runs the same local batch size)
    n_global: int  # rows of the global batch
    lam: torch.Tensor | None = None  # per-example Model Prior strength of the local rows


class DistCTRLearner:
    """One rank's part of a CTR learner under DMP. Every rank must call the same methods with the
    same global batches, in the same order (they contain collectives).

    Args:
        config: the model configuration (see :func:`check_supported`).
        sharding: ``table_wise`` or ``column_wise``.
        planner: ``manual`` (:func:`plan_tables`: deterministic, balanced by table size) or
            ``torchrec`` (TorchRec's ``EmbeddingShardingPlanner`` with a ``Topology`` of this
            world and device, constrained to ``sharding``).
        process_group: an initialised group (default: the default group).
        device: ``cpu`` (gloo) or this rank's ``cuda:<local rank>`` (nccl).
    """

    def __init__(
        self,
        config: CTRConfig,
        sharding: str = "table_wise",
        process_group: Any = None,
        device: torch.device | None = None,
        planner: str = "manual",
    ) -> None:
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.types import ShardingEnv
        from torchrec.optim.keyed import KeyedOptimizerWrapper
        from torchrec.optim.optimizers import in_backward_optimizer_filter

        if not dist.is_initialized():
            raise RuntimeError("DistCTRLearner needs an initialised torch.distributed process group")
        check_supported(config)
        self.config = config
        self.sharding = sharding
        self.device = device or torch.device("cpu")
        self.pg = process_group or dist.group.WORLD
        self.rank = dist.get_rank(self.pg)
        self.world = dist.get_world_size(self.pg)
        self.fields = [f.name for f in config.fields]
        self.mappers = [IdMapper(f.capacity, f.admission, f.ttl, f.mapper) for f in config.fields]
        self.standardizer = RunningStandardizer(len(config.numeric))
        if planner not in PLANNERS:
            raise DistConfigError(f"planner must be one of {PLANNERS}, not {planner!r}")
        self.planner = planner
        self.tables = plan_tables(config, self.world, sharding)  # also validates the sharding
        net = build_dist_net(config)
        if planner == "torchrec":
            plan = _planner_plan(net, config, self.world, sharding, self.device.type, self.pg)
            self.tables = {t: list(ps.ranks or []) for t, ps in plan.plan[EBC_PATH].items()}
        else:
            plan = _torchrec_plan(net.ebc.collection, self.tables, self.world, sharding, self.device.type)
        self.model = DistributedModelParallel(
            net, env=ShardingEnv.from_process_group(self.pg), device=self.device, plan=plan
        )
        self._init_tables()
        params = dict(in_backward_optimizer_filter(self.model.named_parameters()))
        if config.dense_optimizer == "adam":
            self.dense_opt = KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adam(ps, lr=config.dense_lr))
        else:
            self.dense_opt = KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adagrad(ps, lr=config.dense_lr))
        self.windows_trained = 0
        self.seen_max_index = -1
        self.seen_max_time = float("-inf")
        self.prior_max_index = -1  # no prior statistics under DMP (fp=off)
        self.local_examples = 0

    def _table_weights(self) -> dict[str, Any]:
        """``{table: ShardedTensor}``: this rank's view of every table's weight (local shards are
        views into the fbgemm weights, so writing them writes the tables)."""
        out = {}
        for key, t in self.model.state_dict().items():
            if key.endswith(".weight") and ".embedding_bags." in key and hasattr(t, "local_shards"):
                out[key.split(".embedding_bags.")[1].split(".")[0]] = t
        return out

    def _init_tables(self) -> None:
        """Plan-independent initial values: uniform ±√(1/rows) (TorchRec's default range) drawn
        in blocks of 2^16 rows from generators seeded by (seed, table, block). Every plan and
        world size therefore starts from the same tables; each rank writes only its shards."""
        block = 1 << 16
        dims = dict(zip((f"t_{f.name}" for f in self.config.fields), self.config.field_dims()))
        rows = {f"t_{f.name}": f.capacity for f in self.config.fields}
        with torch.no_grad():
            for table, weight in self._table_weights().items():
                n, d = rows[table], dims[table]
                bound = (1.0 / n) ** 0.5
                for shard in weight.local_shards():
                    (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    for b0 in range((r0 // block) * block, r0 + nr, block):
                        gen = torch.Generator().manual_seed(zlib.crc32(f"{self.config.seed}:{table}:{b0}".encode()))
                        vals = torch.rand(min(block, n - b0), d, generator=gen) * (2 * bound) - bound
                        lo, hi = max(r0, b0), min(r0 + nr, b0 + len(vals))
                        shard.tensor[lo - r0 : hi - r0] = vals[lo - b0 : hi - b0, c0 : c0 + nc].to(shard.tensor.device)

    # ------------------------------------------------------------------ introspection
    def local_shards(self) -> dict[str, list[list[int]]]:
        """The embedding shards this rank really holds: ``{table: [[rows, cols], ...]}``."""
        out: dict[str, list[list[int]]] = {}
        for table, t in self._table_weights().items():
            shards = [list(s.tensor.shape) for s in t.local_shards() if s.tensor.numel() > 0]
            if shards:
                out[table] = shards
        return out

    def dense_param_count(self) -> int:
        return sum(p.numel() for _, p in in_backward_filter(self.model))

    # ------------------------------------------------------------------ encoding
    def _encode_global(self, raw: RawBatch, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """Row ids and standardised dense of the whole batch."""
        rows = np.empty((len(raw), len(self.fields)), dtype=np.int64)
        for fi, (f, m) in enumerate(zip(self.fields, self.mappers)):
            if train:
                r, _fresh = m.observe(raw.cats[f], raw.times)  # fresh rows were never used (no ttl)
            else:
                r = m.lookup(raw.cats[f])
            rows[:, fi] = r
        if train:
            self.standardizer.update(raw.dense)
        return rows, self.standardizer.transform(raw.dense)

    def _strengths(self, batches: Sequence[RawBatch]) -> list[np.ndarray]:
        """Per-example Model Prior strength of every global batch of a window, from the mappers as
        they are *before* the window (the previous model's evidence) and the window's own counts."""
        cfg = self.config
        rows = [np.stack([m.lookup(b.cats[f]) for f, m in zip(self.fields, self.mappers)], 1) for b in batches]
        win = window_counts(rows, [f.capacity for f in cfg.fields])
        out = []
        for r in rows:
            before = np.stack([np.where(r[:, f] > 0, self.mappers[f].counts[r[:, f]], 0) for f in range(r.shape[1])], 1)
            m = np.stack([win[f][r[:, f]] for f in range(r.shape[1])], 1)
            lam = strengths(cfg.mp_lambda_mode, cfg.mp_lambda, before.astype(np.float64), m, cfg.mp_count_n0, cfg.mp_count_agg)
            out.append(lam.numpy())
        return out

    def _local(self, raw: RawBatch, train: bool, lam: np.ndarray | None = None) -> _Local:
        rows, dense = self._encode_global(raw, train)
        n = len(raw)
        mine = _split(n, self.world, self.rank)
        width = max(1, -(-n // self.world))
        idx = _padded(mine, width)
        dev = self.device
        inp = ModelInput(
            kjt=make_kjt(self.fields, rows[idx]).to(dev),
            rows=torch.from_numpy(rows[idx]).to(dev),
            dense=torch.from_numpy(np.ascontiguousarray(dense[idx])).to(dev),
            labels=torch.from_numpy(np.ascontiguousarray(raw.labels[idx], dtype=np.float32)).to(dev),
        )
        lam_t = torch.from_numpy(np.ascontiguousarray(lam[idx], dtype=np.float32)).to(dev) if lam is not None else None
        return _Local(inp, len(mine), n, lam_t)

    # ------------------------------------------------------------------ forward / loss
    def _logits(self, inp: ModelInput) -> torch.Tensor:
        self.model.eval()
        with torch.no_grad():
            z = self.model(inp)[0]
        self.model.train()
        return z

    def _needs_prev(self) -> bool:
        return self.config.mp in ("posterior", "kl") or self.config.distill_weight > 0

    def _main_loss(
        self, z: torch.Tensor, inp: ModelInput, z_prev: torch.Tensor | None, lam: torch.Tensor | None
    ) -> torch.Tensor:
        """Same rules as ``CTRLearner._main_loss`` (without the logit chain)."""
        cfg, y = self.config, inp.labels
        if z_prev is None:
            return bce(z, y)
        if cfg.mp in ("posterior", "kl"):
            assert lam is not None
            loss = mp_posterior_loss if cfg.mp == "posterior" else mp_kl_loss
            return loss(z, y, z_prev, lam, cfg.mp_weighted)
        if cfg.distill_weight > 0:
            return distill_loss(z, y, z_prev, cfg.distill_weight, cfg.distill_temperature)
        return bce(z, y)

    def _step(self, loc: _Local, z_prev: torch.Tensor | None) -> float:
        z = self.model(loc.inp)[0]
        k = loc.n_valid
        inp, lam = loc.inp, loc.lam
        if k < len(z):  # drop the padding rows from the loss (they get no gradient)
            inp = replace(inp, labels=inp.labels[:k])
            z = z[:k]
            z_prev = z_prev[:k] if z_prev is not None else None
            lam = lam[:k] if lam is not None else None
        if k == 0:  # a global batch smaller than the world: this rank still joins the collectives
            loss = z.sum() * 0.0
            weight = 1.0
        else:
            loss = self._main_loss(z, inp, z_prev, lam)
            # DDP and TorchRec average gradients over the ranks; weighting the local mean by
            # k·N/n makes that average the gradient of the global-batch mean even when the
            # slices differ in size (n not divisible by N)
            weight = k * self.world / loc.n_global
        self.dense_opt.zero_grad(set_to_none=True)
        (loss * weight).backward()  # all-to-all + fused embedding update; DDP all-reduce of dense gradients
        self.dense_opt.step()
        return float(loss.detach())

    # ------------------------------------------------------------------ public API
    def train_window(
        self, batches: Sequence[RawBatch], epochs: int | None = None, shuffle_seed: int | None = None
    ) -> dict[str, Any]:
        """Trains on one window of *global* batches (the same list on every rank).

        With the Model Prior or distillation (after the first window) the prior logits of every
        local batch are computed first, by the model as it is at the start of the window.
        """
        t0 = time.perf_counter()
        epochs = epochs or self.config.epochs
        batches = [b for b in batches if len(b)]
        use_prev = self._needs_prev() and self.windows_trained > 0
        lams: list[np.ndarray | None] = [None] * len(batches)
        if use_prev and self.config.mp in ("posterior", "kl"):
            lams = list(self._strengths(batches))  # before any id of this window is admitted
        encoded = [self._local(b, train=True, lam=lam) for b, lam in zip(batches, lams)]
        for b in batches:
            self.seen_max_index = max(self.seen_max_index, int(b.index.max()))
            self.seen_max_time = max(self.seen_max_time, float(b.times.max()))
        prev = [self._logits(loc.inp) for loc in encoded] if use_prev else [None] * len(encoded)
        losses: list[float] = []
        rng = np.random.default_rng(shuffle_seed)
        for e in range(epochs):
            order = rng.permutation(len(encoded)) if (e > 0 and shuffle_seed is not None) else range(len(encoded))
            for i in order:
                losses.append(self._step(encoded[i], prev[i]))
                self.local_examples += encoded[i].n_valid
        self.windows_trained += 1
        return {
            "batches": len(losses),
            "local_examples": sum(loc.n_valid for loc in encoded),
            "loss_mean": float(np.mean(losses)) if losses else float("nan"),
            "used_prior_model": use_prev,
            "seconds": time.perf_counter() - t0,
        }

    def predict(self, raw: RawBatch, batch_size: int = 4096) -> np.ndarray:
        """Click probabilities for all rows of ``raw`` (the same on every rank). Read-only lookups."""
        out = []
        for b in iter_batches(raw, batch_size):
            loc = self._local(b, train=False)
            z = self._logits(loc.inp)
            gathered = [torch.empty_like(z) for _ in range(self.world)]
            dist.all_gather(gathered, z.contiguous(), group=self.pg)
            n = len(b)
            parts = [g[: len(_split(n, self.world, r))] for r, g in enumerate(gathered)]
            out.append(torch.cat(parts).cpu().numpy())
        z_all = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        return 1.0 / (1.0 + np.exp(-z_all.astype(np.float64)))


def in_backward_filter(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """Parameters not updated inside backward (the dense, data-parallel ones)."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return in_backward_optimizer_filter(model.named_parameters())


# ---------------------------------------------------------------------------------------- protocol


def check_strategies(strategies: Sequence[str]) -> None:
    bad = [s for s in strategies if s not in DIST_STRATEGIES]
    if bad or not strategies:
        raise DistConfigError(
            f"strategies {bad or list(strategies)} are not supported under DMP; choose from {', '.join(DIST_STRATEGIES)}"
        )


def run_dist_protocol(
    df: pd.DataFrame,
    cols: Columns,
    ec: EvalConfig,
    sharding: str = "table_wise",
    progress: Callable[[str], None] | None = None,
    device: torch.device | None = None,
    planner: str = "manual",
    emb_optimizer: str = "rowwise_adagrad",
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """The protocol of :func:`models.evaluation.run_protocol` (strategies ``finetune``,
    ``distill``, ``ddp-mp``) on every rank of the job.

    Every rank gets the whole (time-sorted, :func:`models.evaluation.prepare_frame`) frame; each
    global batch is mapped identically on every rank and split between the ranks. Returns
    ``(report, audit, dist_info)``: the report has the same shape as ``run_protocol``'s;
    ``emb_optimizer`` overrides the strategies' embedding optimizer. ``dist_info`` holds the world size, the plan and per-rank facts (shards really held,
    examples trained, dense parameter count) gathered from all ranks. Identical on every rank.
    """
    ec = replace(ec, search_trials=0)  # DMP runs the given settings (the search is single-process)
    ec.validate()
    check_strategies(ec.strategies)
    check_sorted(df, cols.time)
    raw = raw_from_frame(df, cols.categorical, cols.numeric, cols.label, cols.time)
    bounds = period_bounds(len(raw), ec.periods)
    parts = [raw.slice(lo, hi) for lo, hi in bounds]
    k = ec.warm_start
    eval_periods = list(range(k + 1, ec.periods))
    audit: list[dict[str, Any]] = []
    per: dict[str, dict[str, list[list[float]]]] = {s: {"auc": [], "logloss": [], "secs": []} for s in ec.strategies}
    ranks_info: dict[str, Any] = {}
    world = dist.get_world_size()
    tables: dict[str, list[int]] = {}
    for s_i in range(ec.seeds):
        seed = ec.base_seed + s_i
        for name in ec.strategies:
            cfg = replace(dist_config(strategy_config(name, ec, cols, seed)), emb_optimizer=emb_optimizer)
            t_build = time.perf_counter()
            learner = DistCTRLearner(cfg, sharding, device=device, planner=planner)
            tables = learner.tables
            build_s = time.perf_counter() - t_build
            aucs, lls, secs = [], [], 0.0
            t0 = time.perf_counter()
            learner.train_window(list(window_batches(concat(parts[:k]), ec.batch_size, seed, -1, ec.shuffle)), shuffle_seed=seed)
            secs += time.perf_counter() - t0
            for t in range(k, ec.periods - 1):
                t0 = time.perf_counter()
                learner.train_window(list(window_batches(parts[t], ec.batch_size, seed, t, ec.shuffle)), shuffle_seed=seed)
                secs += time.perf_counter() - t0
                rec = _check_hygiene(learner, bounds[t + 1][0], f"{name}/seed {seed}/period {t + 1}")  # type: ignore[arg-type]
                probs = learner.predict(parts[t + 1], max(ec.batch_size, 4096))
                a, ll = auc(parts[t + 1].labels, probs), logloss(parts[t + 1].labels, probs)
                aucs.append(a)
                lls.append(ll)
                audit.append({"strategy": name, "seed": seed, "period": t + 1, **rec, "auc": a, "logloss": ll})
                if progress:
                    progress(f"{name} seed {seed} period {t + 1}: auc {a:.4f} logloss {ll:.4f}")
            per[name]["auc"].append(aucs)
            per[name]["logloss"].append(lls)
            per[name]["secs"].append([secs])
            mine = {
                "rank": learner.rank,
                "shards": learner.local_shards(),
                "local_examples": learner.local_examples,
                "dense_params": learner.dense_param_count(),
                "build_seconds": build_s,
                "train_seconds": secs,
            }
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            ranks_info[f"{name}/seed{seed}"] = gathered
            del learner
    info = {
        "world_size": world,
        "sharding": sharding,
        "planner": planner,
        "emb_optimizer": emb_optimizer,
        "tables": tables,
        "ranks": ranks_info,
    }
    return {"periods": eval_periods, "strategies": summarise(per)}, audit, info
