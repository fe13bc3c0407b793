"""The stream trainer's gate: how often it rejects a clean window, and how often it catches a
poisoned one, for several window sizes, world seeds and strategies (pure: no broker).

The worker's loop is replayed offline on synthetic-world streams (``core.world``, one world per
seed, drift on): at window k the candidate (the learner trained through k-1) and the serving model
(trained through k-2: every earlier candidate published) score window k with
``CTRStreamModel.score``, then the learner trains on k. Each gate below decides on the very same
scores (``models.stream_model.gate_decision``), so they are compared on identical candidates:

- ``old``: AUC margin 0.01, LogLoss margin 0.01 (the gate before the calibration criteria);
- ``default``: the CTR model's gate (``models.ctr.stream.CTR_GATE``: AUC margin 0.01 widened to
  one standard error of the difference, LogLoss 0.01, over-/under-prediction 0.4 on a log scale);
- ``default-no-calibration``: the same without the calibration criteria.

Streams: ``clean`` (every window's candidate is judged; the first two gates are skipped, they
compare with a model trained on one window or none), ``flip`` (window p has its labels flipped, as
in ``tests/test_trainer.py``) and ``ones`` (window p is all clicks, as in ``adstream drill``); for
the poisoned streams only the candidate that learned window p, judged on window p+1, counts.

    PYTHONPATH=. .venv/bin/python bench/bench_gate.py --windows 150,250,500,1500,5000 --seeds 3,4,5,6
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from models.stream_model import Criterion, Gate, gate_decision

OLD_GATE = Gate.of(Criterion("auc", True, 0.01, label="AUC"), Criterion("logloss", False, 0.01, required=True))


def gates() -> dict[str, Gate]:
    from models.ctr.stream import CTR_GATE

    no_cal = Gate(tuple(c for c in CTR_GATE.criteria if c.key in ("auc", "logloss")))
    return {"old": OLD_GATE, "default": CTR_GATE, "default-no-calibration": no_cal}


def poison(records: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    out = [dict(r) for r in records]
    for r in out:
        r["clicked"] = 1 - int(r["clicked"]) if kind == "flip" else 1
    return out


def replay(windows: list[list[dict[str, Any]]], strategy: str, small: bool) -> list[tuple[dict, dict]]:
    """(candidate scores, serving scores) for windows 2.. of an always-publish replay."""
    from core.settings import TrainerSettings
    from models.ctr.stream import CTRStreamModel
    from streams.trainer import ctr_model

    ts = TrainerSettings(**(dict(capacity=4096, embedding_dim=4, batch_size=256) if small else {}))
    model = ctr_model(ts, strategy)
    serving = None
    out = []
    for k, win in enumerate(windows):
        if k >= 2 and serving is not None:
            out.append((model.score(win), serving.score(win)))
        serving = CTRStreamModel.from_state(model.state())
        model.learn(win)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", default="150,250,500,1500,5000", help="window sizes (examples)")
    ap.add_argument("--clean-windows", type=int, default=20, help="windows per clean stream")
    ap.add_argument("--max-examples", type=int, default=60000, help="fewer (>= 8) windows when they exceed this")
    ap.add_argument("--seeds", default="3,4,5,6", help="world seeds (one world and stream per seed)")
    ap.add_argument("--strategies", default="ddp,finetune")
    ap.add_argument("--poison-at", type=float, default=0.5, help="poisoned window, as a share of the stream")
    ap.add_argument("--small", action="store_true", help="the tests' small model (dim 4, 4096 rows, batch 256)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/gate.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bench.bench_trainer import world_examples

    G = gates()
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for w in [int(x) for x in args.windows.split(",")]:
        n_win = max(8, min(args.clean_windows, args.max_examples // w))
        p = int(n_win * args.poison_at)
        for seed in [int(s) for s in args.seeds.split(",")]:
            recs = [e.to_dict() for e in world_examples(n_win * w, seed)]
            clean = [recs[i * w:(i + 1) * w] for i in range(n_win)]
            for strategy in args.strategies.split(","):
                for stream in ("clean", "flip", "ones"):
                    if stream == "clean":
                        wins, judged = clean, None
                    else:  # the stream up to the gate of window p+1
                        wins, judged = clean[:p] + [poison(clean[p], stream)] + [clean[p + 1]], p + 1
                    scores = replay(wins, strategy, args.small)
                    if judged is not None:
                        scores = scores[judged - 2:]
                    for cand, serving in scores:
                        row = {"window": w, "seed": seed, "strategy": strategy, "stream": stream,
                               "cand": cand, "serving": serving}
                        for name, g in G.items():
                            ok, why = gate_decision(cand, serving, g)
                            row[name] = "publish" if ok else "reject"
                            row[f"{name}_reason"] = why
                        rows.append(row)
            print(f"window {w} seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    summary = []
    for w in sorted({r["window"] for r in rows}):
        for stream in ("clean", "flip", "ones"):
            for strategy in args.strategies.split(","):
                sel = [r for r in rows if r["window"] == w and r["stream"] == stream and r["strategy"] == strategy]
                if not sel:
                    continue
                ent = {"window": w, "stream": stream, "strategy": strategy, "judged": len(sel)}
                for name in G:
                    ent[name] = sum(r[name] == "reject" for r in sel) / len(sel)
                summary.append(ent)
    names = list(G)
    lines = ["| window | stream | strategy | gates judged | " + " | ".join(f"rejected: {n}" for n in names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for e in summary:
        lines.append(f"| {e['window']} | {e['stream']} | {e['strategy']} | {e['judged']} | "
                     + " | ".join(f"{e[n]:.0%}" for n in names) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "summary": summary, "table_markdown": table, "rows": rows,
                               "seconds": time.perf_counter() - t0}, indent=1, default=str))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
