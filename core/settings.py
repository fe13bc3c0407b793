"""Typed configuration, validated once at the edge and passed down.

Sources, later ones winning: defaults < YAML file (``--config FILE`` or ``ADSTREAM_CONFIG``) <
environment (``ADSTREAM_<SECTION>__<FIELD>``, e.g. ``ADSTREAM_KAFKA__BOOTSTRAP=host:9092``) <
explicit overrides from the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.errors import ConfigError


class TopicNames(BaseModel):
    impressions: str = "impressions"
    clicks: str = "clicks"
    conversions: str = "conversions"
    bidword_inventory: str = "bidword-inventory"
    examples: str = "examples"
    creatives: str = "creatives"  # the creative catalogue: CreativeChange events (images, reviews, verdicts)
    dead_letter: str = "dead-letter"
    query_labels: str = "query-labels"  # query snapshots of the query-refresh agent (docs/query.md)

    def all(self) -> list[str]:
        return list(self.model_dump().values())


class KafkaSettings(BaseModel):
    # None: start (or find) the embedded broker; "host:port": use an existing cluster
    bootstrap: str | None = None
    partitions: int = Field(6, ge=1, le=1024)
    replication_factor: int = Field(1, ge=1)
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 2000
    topics: TopicNames = TopicNames()


class BrokerSettings(BaseModel):
    """The embedded broker: Apache Kafka (KRaft) from released jars, or the Tansu fallback."""

    kind: str = Field("auto", pattern="^(auto|kafka|tansu)$")
    kafka_version: str = "4.1.1"
    host: str = "127.0.0.1"
    port: int = 19092
    controller_port: int = 19093
    data_dir: Path = Path(".adstream/broker")
    cache_dir: Path = Path(os.environ.get("ADSTREAM_CACHE", Path.home() / ".cache" / "adstream"))
    heap: str = "512m"


class JoinSettings(BaseModel):
    attribution_window_s: float = Field(600.0, gt=0)  # a click counts if within this of its impression
    allowed_lateness_s: float = Field(60.0, ge=0)  # how far behind the watermark a record may arrive
    # bound on open impressions + clicks waiting for their impression, per worker; what would exceed
    # it is dead-lettered with reason state_full
    max_pending: int = Field(2_000_000, ge=1)
    # an event time more than this ahead of its record's Kafka timestamp is dead-lettered as
    # clock_skew: a future event time would move the partition's watermark and make others late
    max_future_s: float = Field(10.0, ge=0)
    # emit each positive at its first click (an Example with stage="click") instead of only when the
    # attribution window closes; the close record is then stage="close" (docs/speed.md "Fresher models")
    emit_positives_at_click: bool = False

    def delay_note(self) -> str:
        """What the window means for when examples appear (the joiner and the trainer log it at start)."""
        w, late = self.attribution_window_s, self.allowed_lateness_s
        return (f"attribution window {w:g}s + allowed lateness {late:g}s: an impression becomes an example "
                f"once event time has moved {w + late:g}s past it, so live traffic gives its first examples "
                f"after about {_duration(w + late)} (set join.attribution_window_s / join.allowed_lateness_s, "
                f"or --window / --lateness)" + ("; positives are emitted at their first click"
                                                 if self.emit_positives_at_click else ""))


def _duration(s: float) -> str:
    return f"{s / 60:.0f} min" if s >= 120 else f"{s:.0f} s"


class FeatureSettings(BaseModel):
    repo_dir: Path = Path(".adstream/feature_repo")
    online_store: str = Field("sqlite", pattern="^(sqlite|redis)$")
    redis_url: str = "127.0.0.1:6379"
    half_lives_s: list[float] = [3600.0, 86400.0, 7 * 86400.0]
    ctr_prior_strength: float = 20.0  # pseudo-impressions for the smoothed CTR
    flush_interval_s: float = 0.5
    checkpoint_dir: Path = Path(".adstream/feature_updater")
    # Redis online store: read and write Feast's Redis layout directly (features/redis_online.py);
    # False = every online read/write goes through Feast's provider
    fast_path: bool = True
    redis_timeout_s: float = Field(2.0, gt=0)  # socket timeout of the fast path's Redis client
    # Feast's redis_type: "redis" (redis_url = host:port) or "redis_cluster" (host:port,host:port,...)
    redis_type: str = Field("redis", pattern="^(redis|redis_cluster)$")
    redis_key_ttl_s: int | None = Field(None, gt=0)  # Feast's key_ttl_seconds: rows expire unless rewritten
    # the feature updater counts an event once: event ids seen within this much event time of the
    # newest are remembered (checkpointed), at most dedup_max_keys of them
    dedup_horizon_s: float = Field(3600.0, gt=0)
    dedup_max_keys: int = Field(2_000_000, ge=1000)
    # how often the updater checks that the online store still holds its rows (a marker key);
    # a store that came back empty is refilled from the updater's state
    store_check_s: float = Field(1.0, gt=0)
    # scale-out: n feature updaters, each folding and writing the entity rows it owns
    # (features.aggregates.owner); every one reads all input partitions
    shards: int = Field(1, ge=1)
    shard: int = Field(0, ge=0)

    @field_validator("half_lives_s")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not v or any(h <= 0 for h in v):
            raise ValueError("half_lives_s must be a non-empty list of positive seconds")
        return v

    @model_validator(mode="after")
    def _shard_in_range(self) -> "FeatureSettings":
        if self.shard >= self.shards:
            raise ValueError(f"features.shard {self.shard} must be < features.shards {self.shards}")
        return self


class LabelGuardSettings(BaseModel):
    """The label-rate guard of a stream model worker on the click label (streams/label_guard.py,
    docs/trainer.md "Label-rate guard"): a window whose click rate is at least ``ratio`` x the pooled
    rate of the last ``history`` windows (from ``warmup`` of them on) and ``min_z`` standard errors
    above it is held as suspect, and the candidate that learned it rejected; a rise that lasts
    ``accept_after`` windows in a row is taken as the new rate. ``ratio: null`` turns it off."""

    ratio: float | None = Field(4.0, gt=1)
    min_z: float = Field(4.0, ge=0)
    history: int = Field(8, ge=1)
    warmup: int = Field(3, ge=1)
    accept_after: int = Field(3, ge=1)


class TrainerSettings(BaseModel):
    """The stream trainer (``adstream train``); owned by streams/trainer.py (docs/trainer.md)."""

    registry_dir: Path = Path(".adstream/registry")
    checkpoint_dir: Path = Path(".adstream/trainer")
    model_name: str = "ctr"
    # windows: by count of unique examples, or (when window_seconds is set) by event time
    window_examples: int = Field(5000, ge=1)
    window_seconds: float | None = Field(None, gt=0)
    min_window: int = Field(200, ge=1)  # a final partial window (idle exit) trains only from this size
    batch_size: int = Field(512, ge=1)
    # model: strategy presets are those of `adstream evaluate-ctr` (models/evaluation.py)
    strategy: str = Field("ddp", pattern="^(retrain|finetune|distill|ddp-fp|ddp-mp|ddp)$")
    compare: str | None = Field(None, pattern="^(retrain|finetune|distill|ddp-fp|ddp-mp|ddp)$")
    backbone: str = Field("dcn", pattern="^(dcn|deepfm)$")
    embedding_dim: int = Field(8, ge=1)
    capacity: int = Field(1 << 16, ge=16)  # rows of the largest (user) table; others are derived
    # only what both the joiner's examples and the online service's requests carry (docs/trainer.md)
    categorical: list[str] = ["user_id", "ad_id", "creative_id", "query", "bidword", "category", "position",
                              "slot", "domain", "advertiser"]
    numeric: list[str] = ["bid", "query_len"]
    emb_lr: float = Field(0.05, gt=0)
    dense_lr: float = Field(0.01, gt=0)
    mp_lambda: float = Field(1.0, ge=0)
    epochs: int = Field(1, ge=1)
    seed: int = 0
    # gate (progressive validation on the next window; docs/trainer.md "Gate")
    gate_auc_margin: float = Field(0.01, ge=0)  # widened to one standard error of the AUC difference
    gate_logloss_margin: float = Field(0.01, ge=0)
    gate_calibration_margin: float = Field(0.4, ge=0)  # log scale: e^0.4 ≈ 1.5x more over/under-prediction
    on_reject: str = Field("reset", pattern="^(reset|continue)$")
    label_guard: LabelGuardSettings = LabelGuardSettings()
    # stream hygiene and stop conditions
    # de-duplication by key over an event-time horizon (None = the joiner's re-emission horizon:
    # join.attribution_window_s + join.allowed_lateness_s + 120 s); dedup_max_keys bounds memory
    dedup_horizon_s: float | None = Field(None, gt=0)
    dedup_max_keys: int = Field(2_000_000, ge=0)
    # train positives from the joiner's stage="click" examples (emitted at the click when
    # join.emit_positives_at_click is on) instead of waiting for the window-close record
    train_at_click: bool = True
    max_windows: int | None = Field(None, ge=1)
    idle_exit_s: float | None = Field(None, gt=0)
    threads: int = Field(1, ge=1)


class CreativeSettings(BaseModel):
    """The JAC job (``adstream train-creative``: AR+ and CR+ trained jointly from the examples topic,
    published as two registry names per window); owned by streams/creative_trainer.py
    (docs/creative.md)."""

    registry_dir: Path = Path(".adstream/registry")
    checkpoint_dir: Path = Path(".adstream/creative_trainer")
    ar_name: str = "jac-ar"  # AR+: serve it with serve.model_name
    cr_name: str = "jac-cr"  # CR+: serve it with serve.creative_model
    mode: str = Field("jac", pattern="^(jac|cr)$")  # cr = the creative ranker alone (no AR+, no pCTR input)
    window_examples: int = Field(5000, ge=1)
    window_seconds: float | None = Field(None, gt=0)
    min_window: int = Field(200, ge=1)
    batch_size: int = Field(512, ge=1)
    ste: str = Field("copy", pattern="^(copy|interp|none)$")  # straight-through gradient from CR to AR
    quant_r: float = Field(1000.0, gt=0)  # r of the pCTR quantiser (Eq. 5)
    buckets: int = Field(64, ge=1)  # K
    pctr_source: str = Field("cached", pattern="^(cached|ar|fixed)$")  # the ad pCTR CR+ sees when serving
    cr_lr: float = Field(0.05, gt=0)
    seed: int = 0
    gate_nsctr_margin: float = Field(0.01, ge=0)
    gate_auc_margin: float = Field(0.01, ge=0)
    gate_logloss_margin: float = Field(0.01, ge=0)
    gate_calibration_margin: float = Field(0.4, ge=0)  # AR+ is a CTR model: its gate has the calibration criteria
    joint: str = Field("all", pattern="^(all|each)$")  # publish AR+ and CR+ together, or each on its own
    on_reject: str = Field("reset", pattern="^(reset|continue)$")
    label_guard: LabelGuardSettings = LabelGuardSettings()  # the same click label as the CTR trainer's
    max_windows: int | None = Field(None, ge=1)
    idle_exit_s: float | None = Field(None, gt=0)
    threads: int = Field(1, ge=1)


class QuerySettings(BaseModel):
    """Query classification kept fresh from the stream (``adstream query-refresh`` and
    ``adstream query-train``); owned by streams/query_refresh.py (docs/query.md)."""

    model_name: str = "query-classifier"
    variant: str = "ssuf"  # a variant of `adstream evaluate-query` (models/query/ssuf.py)
    encoder: str = Field("adapter", pattern="^(adapter|minilm-ft|tiny-bert)$")
    features: str = Field("minilm", pattern="^(minilm|hash)$")
    # the refresh agent (faust): decayed click statistics per query -> query snapshots
    half_life_s: float = Field(3600.0, gt=0)  # of the decayed (query, category) click counts
    label_share: float = Field(0.2, gt=0, le=1)  # a category is a click label from this share of the query's clicks
    min_clicks: float = Field(0.5, ge=0)
    knowledge_top_k: int = Field(3, ge=0)  # posterior knowledge: top clicked categories and bidwords
    emit_interval_s: float = Field(60.0, gt=0)  # event time between snapshots of an unchanged, active query
    checkpoint_interval_s: float = Field(2.0, gt=0)
    refresh_checkpoint_dir: Path = Path(".adstream/query-refresh")
    # the model worker (streams.model_worker) on the snapshots
    checkpoint_dir: Path = Path(".adstream/query-trainer")
    window_snapshots: int = Field(200, ge=1)
    window_seconds: float | None = Field(None, gt=0)
    min_window: int = Field(20, ge=1)
    finetune_every: int = Field(1, ge=0)  # windows between encoder fine-tunes (0: never; graphs still refresh)
    finetune_steps: int = Field(20, ge=1)
    replay_size: int = Field(50_000, ge=1)
    fresh_share: float = Field(0.5, ge=0, le=1)
    lr: float = Field(1e-3, gt=0)
    soft_labels: bool = True  # targets = click share / the query's largest share (the dominant category first)
    threshold: float = Field(0.5, gt=0, lt=1)
    max_labels: int = Field(3, ge=1)
    gate_f1_margin: float = Field(0.02, ge=0)
    on_reject: str = Field("reset", pattern="^(reset|continue)$")
    max_windows: int | None = Field(None, ge=1)
    idle_exit_s: float | None = Field(None, gt=0)
    seed: int = 0
    threads: int = Field(1, ge=1)
    # serving
    cache_size: int = Field(10_000, ge=0)  # head queries whose categories the service keeps per version


class RewriteTrainSettings(BaseModel):
    """The rewrite job (``adstream train-rewrite``: MoBGM ``rewriter`` and GRAM ``gram`` refreshed from
    the examples topic, each published under its own registry name); owned by
    streams/rewrite_trainer.py (docs/rewrite.md)."""

    registry_dir: Path = Path(".adstream/registry")
    checkpoint_dir: Path = Path(".adstream/rewrite_trainer")
    rewriter_name: str = "rewriter"  # serve it with serve.rewrite_model
    gram_name: str = "gram"  # serve it with serve.gram_model; "" = no GRAM part
    # ad titles and categories (post-pre-training pairs, GRAM's item codes): "world:SEED" (the
    # synthetic world with the lexicon on), a CSV/TSV/Parquet file with ad_id, title[, category], or ""
    catalog: str = ""
    window_examples: int = Field(20000, ge=1)
    window_seconds: float | None = Field(None, gt=0)
    min_window: int = Field(200, ge=1)
    min_bootstrap_clicks: int = Field(200, ge=1)  # clicks the first model is trained from
    sft_epochs: int = Field(2, ge=1)  # per window (new click pairs + replay)
    dpo_every: int = Field(3, ge=0)  # windows between DPO rounds (0 = only the bootstrap round)
    epochs_scale: float = Field(1.0, gt=0)  # scales the bootstrap's epochs (quick demos and tests)
    gate_click_hit_margin: float = Field(0.02, ge=0)
    gate_click_recall_margin: float = Field(0.02, ge=0)
    joint: str = Field("each", pattern="^(all|each)$")
    on_reject: str = Field("reset", pattern="^(reset|continue)$")
    max_windows: int | None = Field(None, ge=1)
    idle_exit_s: float | None = Field(None, gt=0)
    threads: int = Field(1, ge=1)
    seed: int = 0


class ServeSettings(BaseModel):
    """The online service (``adstream serve``); owned by online/."""

    host: str = "127.0.0.1"
    port: int = 8080
    admin_token: str | None = None  # admin endpoints are refused while this is unset
    registry_dir: Path = Path(".adstream/registry")
    model_name: str = "ctr"
    model_poll_s: float = Field(1.0, gt=0)  # how often the loader looks at the registry's LATEST
    domains: list[str] = ["search"]  # a request naming another domain is refused (422)
    max_slots: int = Field(10, ge=1, le=100)
    max_candidates: int = Field(200, ge=1)
    # query understanding: the served query classifier (auto: once one was published; model: always,
    # degraded `query_understanding` while none is served; counts: the inventory-fed baseline only)
    query_classifier: str = Field("auto", pattern="^(auto|model|counts)$")
    query_model_name: str = "query-classifier"
    query_cache_size: int = Field(10_000, ge=0)  # head queries cached per served version
    # a cache miss the query classifier cannot answer within this budget is served by counts (degraded,
    # `query_understanding`) and cached when the model's answer arrives; None = wait for the model
    query_budget_ms: float | None = Field(3.0, gt=0)  # docs/query.md §6: p99 of the stage ≤ 5 ms needs ~2 ms of headroom
    query_categories: int = Field(2, ge=1)  # predicted categories that feed the index's category match
    max_body_bytes: int = Field(16 * 1024, ge=256)
    # Peri-CR: the creative ranker runs beside the ad ranker in a thread. Off by default: measured on
    # 2 cores it costs more than the overlap gains (docs/speed.md "Serving"; bench/bench_serve_paced.py)
    parallel_ranking: bool = False
    # torch intra-op threads of every request thread that runs a model (online.models.pin_torch_threads):
    # one request's batch is small, and unpinned threads spin on every core (docs/speed.md "Serving")
    torch_threads: int = Field(1, ge=1)
    # threads that run the ad pipeline at once (POST /v1/ads); more requests wait in the event loop
    request_threads: int = Field(4, ge=1)
    # gc.freeze() the started service's heap before serving (online.hotpath.freeze_startup_heap): a full
    # collection of it stalls every request for ~0.25 s
    gc_freeze: bool = True
    ad_ranker_creative: str = Field("first", pattern="^(first|none)$")  # creative id the ad ranker sees
    ranking_position: int = Field(0, ge=0)  # position the ad ranker predicts at (position-normalised)
    default_ctr: float = Field(0.02, gt=0, lt=1)  # CTR used when neither model nor store knows better
    creative_prior_strength: float = Field(20.0, ge=0)  # Beta pseudo-impressions toward the ad's CTR
    # the parallel creative ranker: a registry name (CR+, "jac-cr") or "" for the Beta ranker alone;
    # the Beta ranker stays the fallback (``creative_model`` in ``degraded``) while the model is missing
    creative_model: str = ""
    # exploration of creatives: off | thompson (a draw from each creative's Beta posterior whose prior
    # mean is the ranker's score) | ucb (posterior mean + creative_ucb_z posterior standard deviations)
    creative_exploration: str = Field("off", pattern="^(off|thompson|ucb)$")
    creative_ucb_z: float = Field(1.0, ge=0)
    # query rewriting (docs/rewrite.md): registry names of the MoBGM rewriter and of GRAM ("" = off);
    # each runs within rewrite_budget_ms, else the index rewriter alone serves (named in ``degraded``)
    rewrite_model: str = ""
    gram_model: str = ""
    rewrite_budget_ms: float = Field(15.0, gt=0)
    rewrite_cache_size: int = Field(10_000, ge=0)  # head queries -> generated bidwords / GRAM ads
    rewrite_cache_ttl_s: float = Field(300.0, gt=0)
    rewrite_k: int = Field(3, ge=1)  # generated bidwords per query
    rewrite_rerank: bool = True  # the final re-rank by the discriminator's combined score
    gram_k: int = Field(30, ge=1)  # GRAM candidates per query
    rewrite_catalog: str = ""  # ad titles for GRAM to index new ads by (as rewrite.catalog)
    # creative statistics: "request" = read with every request (one batched read with the ads);
    # "cache" = kept in memory, refreshed every creative_cache_refresh_s (the request reads only ads)
    creative_features: str = Field("cache", pattern="^(request|cache)$")
    creative_cache_refresh_s: float = Field(5.0, gt=0)
    feature_timeout_s: float = Field(0.1, gt=0)  # a feature read slower than this is given up (degraded)
    feature_retry_s: float = Field(1.0, ge=0)  # after a failed feature read, skip the store this long
    # a client's context.event_time must lie within [now - behind, now + ahead] of the service's
    # clock (else 422): an event time in the future would move the joiner's watermark for everyone
    event_time_max_ahead_s: float = Field(5.0, ge=0)
    event_time_max_behind_s: float = Field(600.0, ge=0)
    # a client-chosen request_id seen again within this long (at most request_id_memory of them) is
    # refused with 409: every page's impressions need their own id
    request_id_memory_s: float = Field(3600.0, gt=0)
    request_id_memory: int = Field(1_000_000, ge=1)
    impression_buffer: int = Field(100_000, ge=1)  # impression records held in memory while the broker is slow
    # undelivered after this: written to the on-disk spool, sent again once the broker answers
    impression_timeout_ms: int = Field(5_000, ge=100)
    # the impression spool (streams/spool.py): survives a broker outage and a restart of the service;
    # records are dropped (loudly, adstream_serve_impression_log_dropped_total) only when it is full
    impression_spool_dir: Path | None = Path(".adstream/impression-spool")
    impression_spool_max_bytes: int = Field(1 << 30, ge=4096)
    # cross-domain (docs/crossdomain.md): requests whose user is cold in the requested domain (fewer
    # than crossdomain_cold_views views there in the history store) are ranked by this model (None: off)
    crossdomain_model: str | None = None
    crossdomain_cold_views: int = Field(1, ge=1)
    history_store: str = Field("none", pattern="^(none|redis)$")  # redis: features.redis_url
    history_timeout_s: float = Field(0.05, gt=0)
    # creative images (docs/images.md): a creative whose gate verdict is "fail" is never served;
    # require-pass serves only creatives with a "pass" verdict; off ignores verdicts
    creative_gate: str = Field("block-failed", pattern="^(off|block-failed|require-pass)$")
    creative_gate_model: str | None = None  # judge catalogue creatives without a verdict on arrival
    creative_reward: str = Field("off", pattern="^(off|replace|blend)$")  # the reward model vs the ranker
    creative_reward_model: str = "creative-reward"
    creative_reward_weight: float = Field(1.0, ge=0)  # blend: logit(ranker) + weight · centred reward score


class CrossDomainSettings(BaseModel):
    """The cross-domain job (``adstream train-crossdomain``, docs/crossdomain.md)."""

    model_name: str = "crossdomain"
    registry_dir: Path = Path(".adstream/registry")
    checkpoint_dir: Path = Path(".adstream/crossdomain")
    variant: str = Field("dacdr", pattern="^(dacdr|dacdr-target|single|pooled)$")
    domains: list[str] = ["search"]  # known domains, in row order; a new one is added with add_domain
    target_domains: list[str] = []  # the target for dacdr-target / single (empty: the second domain)
    item_fields: list[str] = ["ad_id", "category"]
    context_fields: list[str] = ["user_id", "position", "query"]
    dim: int = Field(16, ge=2)
    max_len: int = Field(20, ge=1)
    emb_lr: float = Field(0.2, gt=0)
    dense_lr: float = Field(0.003, gt=0)
    epochs: int = Field(1, ge=1)
    cold_threshold: int = Field(1, ge=1)
    window_examples: int = Field(5000, ge=1)
    min_window: int = Field(200, ge=1)
    gate_cold_auc_margin: float = Field(0.02, ge=0)
    gate_logloss_margin: float = Field(0.01, ge=0)
    on_reject: str = Field("reset", pattern="^(reset|continue)$")
    history_store: str = Field("none", pattern="^(none|redis)$")  # push histories after each window
    max_windows: int | None = Field(None, ge=1)
    idle_exit_s: float | None = Field(None, gt=0)
    threads: int = Field(1, ge=1)
    seed: int = 0


class CreativeImageSettings(BaseModel):
    """The creative-image jobs (``adstream train-creatives``, ``adstream creatives``; docs/images.md)."""

    registry_dir: Path = Path(".adstream/registry")
    checkpoint_dir: Path = Path(".adstream/creatives")
    gate_model: str = "creative-gate"
    reward_model: str = "creative-reward"
    encoder: str = Field("classical", pattern="^(classical|cnn)$")
    size: int = Field(32, ge=16, le=256)
    tau: float = Field(0.5, gt=0, lt=1)  # the gate passes a creative when P(available) >= tau
    gate_window: int = Field(300, ge=1)  # catalogue records per gate window
    reward_window: int = Field(20000, ge=1)  # examples per reward window
    min_window: int = Field(50, ge=1)
    on_reject: str = Field("reset", pattern="^(reset|continue)$")
    max_windows: int | None = Field(None, ge=1)
    idle_exit_s: float | None = Field(None, gt=0)
    threads: int = Field(1, ge=1)


class MetricsSettings(BaseModel):
    host: str = "127.0.0.1"
    joiner_port: int = 9101
    feature_updater_port: int = 9102
    trainer_port: int = 9103
    creative_trainer_port: int = 9106
    rewrite_trainer_port: int = 9107
    serve_port: int = 8080
    query_refresh_port: int = 9104
    query_trainer_port: int = 9105


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ADSTREAM_", env_nested_delimiter="__", extra="forbid"
    )

    kafka: KafkaSettings = KafkaSettings()
    broker: BrokerSettings = BrokerSettings()
    join: JoinSettings = JoinSettings()
    features: FeatureSettings = FeatureSettings()
    trainer: TrainerSettings = TrainerSettings()
    creative: CreativeSettings = CreativeSettings()
    query: QuerySettings = QuerySettings()
    rewrite: RewriteTrainSettings = RewriteTrainSettings()
    serve: ServeSettings = ServeSettings()
    crossdomain: CrossDomainSettings = CrossDomainSettings()
    creatives: CreativeImageSettings = CreativeImageSettings()
    metrics: MetricsSettings = MetricsSettings()
    state_dir: Path = Path(".adstream")


def _deep_update(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = v
    return out


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from an optional YAML file, the environment and explicit overrides.

    ``overrides`` use nested dicts, e.g. ``load_settings(kafka={"bootstrap": "h:9092"})``.
    """
    import yaml

    path = config_file or os.environ.get("ADSTREAM_CONFIG")
    file_data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            file_data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(file_data, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    try:
        env_only = Settings()  # environment over defaults
        merged = _deep_update(file_data, _explicit_env(env_only))
        merged = _deep_update(merged, {k: v for k, v in overrides.items() if v is not None})
        return Settings(**merged)
    except Exception as e:  # pydantic.ValidationError and friends
        raise ConfigError(f"invalid configuration: {e}") from None


def _explicit_env(s: Settings) -> dict[str, Any]:
    """The part of ``s`` that came from the environment (fields that differ from the defaults)."""
    defaults = Settings.model_construct().model_dump()
    # model_construct skips env; compare the dumped trees and keep what differs
    return _diff(s.model_dump(), defaults)


def _diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in a.items():
        if isinstance(v, dict) and isinstance(b.get(k), dict):
            d = _diff(v, b[k])
            if d:
                out[k] = d
        elif v != b.get(k):
            out[k] = v
    return out
