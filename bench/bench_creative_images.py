"""Creative images: the availability gate, the reward model and the generate -> inspect loop, each
beside a baseline in one run (CPU, one torch thread).

- gate: trained on the review labels of one synthetic world, scored on the creatives of other worlds
  (unseen products): broken-creative precision / recall / F1 and the false-reject rate, for the
  classical encoder with the product image (RFNet's idea), the same without it (RFNet's ablation) and
  the small CNN; throughput in images/s (encode + classify, batches of 256);
- reward: trained on the clicks of 3/4 of a world's ads, pairwise accuracy on the creatives of the
  other ads against the true creative effect (image + text features; image only; text only; chance
  = 0.5), and against the clicks of a later window (the CAIG metric, noisier);
- loop: pass rate of the generator's attempts, products served within K attempts, broken creatives
  that passed.

usage: python bench/bench_creative_images.py [--seeds 1,2,3] [--out bench/results/creative_images.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from core.creatives import CreativeContentConfig
from core.images import ImageConfig
from core.world import DriftConfig, World, WorldConfig
from models.creative_image.gate import AvailabilityGate, GateConfig
from models.creative_image.loop import ProductBrief, SyntheticGenerator, produce
from models.creative_image.reward import CreativeRewardModel, RewardConfig


def world(seed: int, n_ads: int = 200) -> World:
    return World(WorldConfig(seed=seed, n_ads=n_ads, drift=DriftConfig.none(), images=ImageConfig(enabled=True),
                             creative_content=CreativeContentConfig(enabled=True)))


def catalogue(w: World, reviewed: bool = True) -> list[dict]:
    return [w.creative_event(a, c, w.config.epoch, reviewed).to_dict() for a in w.ads for c in a.creatives]


def agg(xs: list[float]) -> dict:
    v = np.array([x for x in xs if x is not None and np.isfinite(x)], dtype=float)
    return {"mean": float(v.mean()) if len(v) else None, "std": float(v.std(ddof=1)) if len(v) > 1 else None,
            "values": [round(float(x), 4) for x in v]}


def bench_gate(train_seed: int, seeds: list[int]) -> dict:
    train = catalogue(world(train_seed, n_ads=400))
    tests = {s: catalogue(world(s)) for s in seeds}
    out = {}
    for label, cfg in (("classical+product", GateConfig()), ("classical, no product", GateConfig(use_product=False)),
                       ("cnn+product", GateConfig(encoder="cnn"))):
        t0 = time.perf_counter()
        g = AvailabilityGate(cfg)
        g.learn(train)
        train_s = time.perf_counter() - t0
        scores = [g.score(tests[s]) for s in seeds]
        recs = [r for s in seeds for r in tests[s]][:1024]
        g.predict(recs[:256])  # warm
        t0 = time.perf_counter()
        for lo in range(0, len(recs), 256):
            g.predict(recs[lo:lo + 256])
        ips = len(recs) / (time.perf_counter() - t0)
        out[label] = {k: agg([sc[k] for sc in scores]) for k in ("broken_precision", "broken_recall", "broken_f1",
                                                                  "false_reject_rate", "accuracy")}
        out[label]["recall_by_kind"] = {k: agg([sc["recall_by_kind"].get(k) for sc in scores])
                                        for k in scores[0]["recall_by_kind"]}
        out[label]["images_per_s"] = round(ips, 1)
        out[label]["train_s"] = round(train_s, 1)
        print(f"gate {label}: F1 {out[label]['broken_f1']['mean']:.3f} ± {out[label]['broken_f1']['std']:.3f}, "
              f"P {out[label]['broken_precision']['mean']:.3f}, R {out[label]['broken_recall']['mean']:.3f}, "
              f"{ips:.0f} images/s", flush=True)
    return {"train_world_seed": train_seed, "test_world_seeds": seeds, "train_creatives": len(train),
            "test_creatives": [len(t) for t in tests.values()], "models": out}


def bench_reward(seeds: list[int], duration: float) -> dict:
    rows: dict[str, list[float]] = {}
    clicks: dict[str, list[float]] = {}
    for s in seeds:
        w = world(s)
        df = w.to_examples_frame(duration_s=duration, requests_per_s=10)
        later = w.to_examples_frame(duration_s=duration / 2, requests_per_s=10, seed=s + 1000)
        rng = np.random.default_rng(s)
        held = set(rng.choice([a.id for a in w.ads], size=len(w.ads) // 4, replace=False))
        ex = [dict(r, type="example") for r in df[~df["ad_id"].isin(held)][["creative_id", "clicked"]].to_dict("records")]
        lat = [dict(r, type="example") for r in later[later["ad_id"].isin(held)][["creative_id", "clicked"]].to_dict("records")]
        users = w.users[:100]
        truth = {c.id: float(np.mean([w.creative_logit(u, a, c) for u in users])) for a in w.ads if a.id in held
                 for c in a.creatives}
        pairs = [(x.id, y.id) for a in w.ads if a.id in held for i, x in enumerate(a.creatives) for y in a.creatives[i + 1:]]
        for label, cfg in (("image+text", RewardConfig()), ("image only", RewardConfig(use_text=False)),
                           ("text only", RewardConfig(use_image=False))):
            m = CreativeRewardModel(cfg)
            m.learn(catalogue(w, reviewed=False))
            for lo in range(0, len(ex), 20000):
                m.learn(ex[lo:lo + 20000])
            sc = dict(zip(truth, m.predict([{"creative_id": c} for c in truth])))
            acc = float(np.mean([(sc[x] > sc[y]) == (truth[x] > truth[y]) for x, y in pairs]))
            rows.setdefault(label, []).append(acc)
            clicks.setdefault(label, []).append(m.score(lat)["pair_accuracy"])
        print(f"reward world {s}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rows.items()), flush=True)
    return {"world_seeds": seeds, "duration_s": duration, "chance": 0.5,
            "pair_accuracy_vs_truth": {k: agg(v) for k, v in rows.items()},
            "pair_accuracy_vs_later_clicks": {k: agg(v) for k, v in clicks.items()}}


def bench_loop(gate_seed: int, seeds: list[int], attempts: int, want: int) -> dict:
    g = AvailabilityGate(GateConfig())
    g.learn(catalogue(world(gate_seed, n_ads=400)))
    out = {}
    for fr in (0.3, 0.5):
        runs = []
        for s in seeds:
            w = world(s, n_ads=100)
            briefs = [ProductBrief(a.id, a.category, w.product(a), w.tops.index(w.top_of(a.category))) for a in w.ads]
            rep = produce(briefs, SyntheticGenerator(failure_rate=fr, tops=w.tops), g, attempts=attempts, want=want,
                          seed=s)
            runs.append(rep.summary())
        out[f"failure_rate_{fr}"] = {
            "pass_rate": agg([r["pass_rate"] for r in runs]),
            "products_served_share": agg([r["products_served"] / r["products"] for r in runs]),
            "broken_among_passed": agg([r["passed_broken"] / max(r["passed"], 1) for r in runs]),
            "attempts_per_product": agg([r["attempts"] / r["products"] for r in runs]),
            "expected_success_within_k": agg([1 - (1 - r["pass_rate"]) ** attempts for r in runs])}
        print(f"loop failure rate {fr}: pass rate {out[f'failure_rate_{fr}']['pass_rate']['mean']:.3f}", flush=True)
    return {"attempts": attempts, "want": want, "world_seeds": seeds, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--train-seed", type=int, default=21)
    p.add_argument("--duration", type=float, default=3000.0)
    p.add_argument("--out", default="bench/results/creative_images.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(x) for x in a.seeds.split(",")]
    out = {"command": f"python bench/bench_creative_images.py --seeds {a.seeds} --train-seed {a.train_seed} "
                      f"--duration {a.duration:g}", "torch_threads": 1}
    out["gate"] = bench_gate(a.train_seed, seeds)
    out["reward"] = bench_reward(seeds, a.duration)
    out["loop"] = bench_loop(a.train_seed, seeds, attempts=4, want=2)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
