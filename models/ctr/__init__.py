"""TorchRec CTR model with the Data-Driven Prior (DDP) for incremental updates.

API used by the stream trainer (all pure; see docs/ctr.md for the method and every switch)::

    from models.ctr import CTRConfig, FieldConfig, CTRLearner, raw_from_examples

    cfg = CTRConfig(
        fields=[FieldConfig("ad_id", capacity=1 << 16, admission=2, ttl=7 * 86400), FieldConfig("query"), ...],
        numeric=["price"],          # looked up at the top level of an example dict, then in "features"
        backbone="dcn",             # or "deepfm"
        first_order=True,           # per-value bias (on in every evaluate-ctr / trainer preset)
        fp="count", mp="posterior", mp_lambda=1.0, mp_lambda_mode="evidence", mp_adapt="pv",
    )
    learner = CTRLearner(cfg)

    # a window = an iterable of batches; a batch is a list of Example.to_dict() dicts or a RawBatch
    stats = learner.train_window(batches, prev_model=None)   # -> WindowStats (plain numbers)
    probs = learner.predict(examples)                        # -> np.ndarray [B] click probabilities
    learner.mapper_stats()                                   # table fill, admitted/evicted counts per field

    state = learner.state_dict()      # weights + fused/dense/FP optimizer states + id mappers
    learner.load_state_dict(state)    #   + standardiser + count priors + logit chain: a full checkpoint
    assert learner.validate_state() == []   # no NaN/Inf, shapes consistent

- ``train_window(batches, prev_model=None)``: with the Model Prior (or distillation) the prior is
  the model as it was at the start of the window (a teacher pass scores the whole window before
  training on it) unless ``prev_model`` (an earlier ``learner.snapshot()``, frozen) is given.
  Event times come from the examples (``event_time``); nothing reads a clock.
- ``raw_from_examples(dicts, categorical, numeric)`` turns example dicts into a :class:`RawBatch`;
  ``batched(iterable, n)`` groups a stream into lists of ``n``.
- Building blocks: :class:`IdMapper` (admission + TTL expiry), :class:`RowCountPrior`,
  :class:`BetaPriorTable` and :class:`LearnedFeaturePrior` (Feature Prior),
  :mod:`models.ctr.losses` (Model Prior forms), :mod:`models.ctr.prior_strength` (per-example
  strength, per-window scale), :func:`auc` / :func:`logloss`.
"""

from models.ctr.ddp import BetaPriorTable, LearnedFeaturePrior, RowCountPrior
from models.ctr.features import RawBatch, batched, concat, iter_batches, raw_from_examples, raw_from_frame
from models.ctr.hashing import IdMapper, MapperStats
from models.ctr.metrics import auc, logloss
from models.ctr.model import CTRConfig, CTRNet, FieldConfig, build_net
from models.ctr.train_loop import CTRLearner, WindowStats

__all__ = [
    "BetaPriorTable",
    "CTRConfig",
    "CTRLearner",
    "CTRNet",
    "FieldConfig",
    "IdMapper",
    "LearnedFeaturePrior",
    "MapperStats",
    "RawBatch",
    "RowCountPrior",
    "WindowStats",
    "auc",
    "batched",
    "build_net",
    "concat",
    "iter_batches",
    "logloss",
    "raw_from_examples",
    "raw_from_frame",
]
