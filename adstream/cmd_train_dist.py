"""``adstream train-dist``: the incremental CTR protocol under TorchRec DistributedModelParallel.

Launches ``N`` processes with ``torch.distributed.run`` (torchrun) on this machine; each process
runs this module as a worker (``python -m adstream.cmd_train_dist --worker SPEC.json``), reads the
file, and trains its data-parallel slice of every batch while the embedding tables are sharded
over the processes. Rank 0 writes ``DIR/report.json``; this command prints the per-period
next-period AUC/LogLoss. See docs/distributed.md.

Example::

    adstream train-dist --nproc 2 --data clicks.parquet --time-col event_time --label-col clicked \\
        --categorical user_id,ad_id,query --numeric bid --periods 8 \\
        --strategies finetune,ddp-mp --sharding table_wise --backend gloo --out out/dist
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core.errors import ConfigError

log = logging.getLogger(__name__)



def _csv(s: str | None) -> list[str]:
    return [x.strip() for x in (s or "").split(",") if x.strip()]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (bind to port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train-dist",
        help="incremental CTR training/evaluation under TorchRec DistributedModelParallel (N processes)",
        description=(
            "Runs the evaluate-ctr protocol (time-ordered periods, warm start, train on t, evaluate "
            "AUC/LogLoss on t+1) with N processes launched by torchrun: embedding tables sharded "
            "table-wise or column-wise, dense part data-parallel. Strategies: finetune, distill, "
            "ddp-mp. Writes DIR/report.json (the evaluate-ctr report plus a 'dist' section)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine")
    p.add_argument("--sharding", choices=["table_wise", "column_wise"], default="table_wise",
                   help="how embedding tables are spread over the ranks")
    p.add_argument("--planner", choices=["manual", "torchrec"], default="manual",
                   help="manual: largest tables first onto the least-loaded rank (column_wise: every table over "
                   "all ranks); torchrec: TorchRec's EmbeddingShardingPlanner limited to --sharding")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo", help="gloo = CPU, nccl = one GPU per rank")
    p.add_argument("--data", required=True, metavar="FILE", help="CSV or Parquet file, one example per row")
    p.add_argument("--time-col", required=True, metavar="COL", help="event time (number or date/time)")
    p.add_argument("--label-col", required=True, metavar="COL", help="click label (> 0 = click)")
    p.add_argument("--categorical", default="", metavar="A,B", help="categorical id columns (one table each)")
    p.add_argument("--numeric", default="", metavar="X,Y", help="numeric columns (standardised on training data)")
    p.add_argument("--periods", type=int, default=10, help="number of equal-count time periods")
    p.add_argument("--strategies", default="finetune,ddp-mp", help="comma list of: finetune, distill, ddp-mp")
    p.add_argument("--seeds", type=int, default=1, help="repetitions with different seeds (means are reported)")
    p.add_argument("--backbone", choices=["deepfm", "dcn"], default="deepfm")
    p.add_argument("--warm-start", type=int, default=2, metavar="K", help="periods used for the warm start")
    p.add_argument("--epochs", type=int, default=1, help="passes over each period")
    p.add_argument("--batch-size", type=int, default=1024, help="global batch (split over the ranks)")
    p.add_argument("--embedding-dim", type=int, default=8)
    p.add_argument("--capacity", type=int, default=1 << 15, help="embedding rows per categorical column")
    p.add_argument("--admission", type=int, default=1, help="sightings before a value gets its own row")
    p.add_argument("--emb-optimizer", choices=["rowwise_adagrad", "adagrad", "sgd"], default="rowwise_adagrad",
                   help="fused embedding optimizer (applied in backward by each shard)")
    p.add_argument("--emb-lr", type=float, default=0.05, help="fused embedding optimizer learning rate")
    p.add_argument("--dense-lr", type=float, default=0.01, help="dense Adagrad learning rate")
    p.add_argument("--mp", choices=["posterior", "kl"], default="posterior", help="Model Prior form (ddp-mp)")
    p.add_argument("--mp-lambda", type=float, default=1.0, help="Model Prior strength λ")
    p.add_argument("--lambda-mode", choices=["const", "count", "evidence"], default="const",
                   help="per-example λ from the values' sightings before the window (see evaluate-ctr --help)")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--distill-temperature", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the job is stopped")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for report.json")
    p.set_defaults(func=run)


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    strategies = _csv(args.strategies)
    return {
        "data": str(Path(args.data).resolve()),
        "out": str(Path(args.out).resolve()),
        "backend": args.backend,
        "sharding": args.sharding,
        "planner": args.planner,
        "emb_optimizer": args.emb_optimizer,
        "threads": max(1, args.threads),
        "columns": {
            "time": args.time_col,
            "label": args.label_col,
            "categorical": _csv(args.categorical),
            "numeric": _csv(args.numeric),
        },
        "eval": {
            "periods": args.periods,
            "strategies": strategies,
            "seeds": args.seeds,
            "warm_start": args.warm_start,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "backbone": args.backbone,
            "embedding_dim": args.embedding_dim,
            "capacity": args.capacity,
            "admission": args.admission,
            "emb_lr": args.emb_lr,
            "dense_lr": args.dense_lr,
            "mp": args.mp,
            "mp_lambda": args.mp_lambda,
            "mp_lambda_mode": args.lambda_mode,
            "distill_weight": args.distill_weight,
            "distill_temperature": args.distill_temperature,
        },
    }


def _configs(spec: dict[str, Any]) -> tuple[Any, Any]:
    from models.evaluation import Columns, EvalConfig

    c = spec["columns"]
    e = dict(spec["eval"])
    e["strategies"] = tuple(e["strategies"])
    return Columns(c["time"], c["label"], list(c["categorical"]), list(c["numeric"])), EvalConfig(**e)


def check_spec(spec: dict[str, Any]) -> None:
    """Every mistake the parent can see before launching: a clear ConfigError."""
    from models.ctr.distributed import DistConfigError, check_strategies, check_supported, dist_config, plan_tables
    from models.evaluation import load_frame, strategy_config

    if spec.get("nproc", 1) < 1:
        raise ConfigError("--nproc must be >= 1")
    if spec["backend"] == "nccl":
        import torch

        if torch.cuda.device_count() < spec["nproc"]:
            raise ConfigError(
                f"--backend nccl needs one GPU per process: {spec['nproc']} requested, "
                f"{torch.cuda.device_count()} visible; use --backend gloo on CPU"
            )
    if spec["eval"]["capacity"] < 2:
        raise ConfigError("--capacity must be >= 2")
    cols, ec = _configs(spec)
    ec.validate()
    try:
        check_strategies(ec.strategies)
        for s in ec.strategies:
            cfg = dist_config(strategy_config(s, ec, cols, ec.base_seed))
            check_supported(cfg)
            plan_tables(cfg, spec["nproc"], spec["sharding"])
    except (DistConfigError, ValueError) as e:
        raise ConfigError(str(e)) from e
    df = load_frame(spec["data"], cols)  # missing file / columns -> ConfigError
    if len(df) < ec.periods:
        raise ConfigError(f"{len(df)} usable rows cannot be split into {ec.periods} periods")


def launch(spec: dict[str, Any], nproc: int, timeout: float = 3600.0, echo: bool = True) -> dict[str, Any]:
    """Runs the job with torchrun on 127.0.0.1 and a free port; returns the report rank 0 wrote."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "nproc": nproc}
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2))
    report_path = out / "report.json"
    report_path.unlink(missing_ok=True)
    port = free_port()
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "adstream.cmd_train_dist", "--worker", str(spec_path),
    ]  # fmt: skip
    from adstream.procs import child_env

    env = child_env({"OMP_NUM_THREADS": str(spec["threads"])})
    log.info("launching %d process(es), backend %s, sharding %s, master 127.0.0.1:%d", nproc, spec["backend"], spec["sharding"], port)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, env=env, timeout=timeout,
            stdout=None if echo else subprocess.PIPE, stderr=subprocess.STDOUT if not echo else None, text=True,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise ConfigError(f"the distributed job did not finish within {timeout:.0f} s") from e
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not report_path.is_file():
        tail = (proc.stdout or "")[-3000:] if not echo else ""
        raise ConfigError(f"the distributed job failed (exit code {proc.returncode}){': ' + tail if tail else ''}")
    report = json.loads(report_path.read_text())
    report["dist"]["wall_seconds"] = wall
    report_path.write_text(json.dumps(report, indent=2))
    return report


def format_periods(report: dict[str, Any]) -> str:
    """Per-period next-period AUC/LogLoss per strategy, then the means."""
    lines = []
    for name, r in report["strategies"].items():
        lines.append(f"{name}:")
        for p, a, ll in zip(report["periods"], r["auc"], r["logloss"]):
            fa = f"{a:.4f}" if a is not None else "n/a"
            fl = f"{ll:.4f}" if ll is not None else "n/a"
            lines.append(f"  period {p:>3}: auc {fa}  logloss {fl}")
        ma = r.get("mean_auc")
        ml = r.get("mean_logloss")
        lines.append(
            f"  mean      : auc {ma if ma is None else f'{ma:.4f}'}  logloss {ml if ml is None else f'{ml:.4f}'}"
            f"  train {r['train_seconds']:.1f} s"
        )
    d = report["dist"]
    lines.append(
        f"world size {d['world_size']}, {d['sharding']} ({d.get('planner', 'manual')} plan), tables {d['tables']}, wall {d.get('wall_seconds', 0):.1f} s"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    spec["nproc"] = args.nproc
    check_spec(spec)
    report = launch(spec, args.nproc, timeout=args.timeout)
    print(format_periods(report))
    print(f"wrote {Path(spec['out']) / 'report.json'}")
    return 0


# ---------------------------------------------------------------------------------------- worker


def worker(spec_path: str) -> int:
    """One rank of the job (started by torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR/PORT)."""
    import warnings

    import torch
    import torch.distributed as dist

    # torchrec's DDP wrapper passes a deprecated argument; say it once per job, not per model
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    from models.ctr.distributed import run_dist_protocol
    from models.evaluation import load_frame

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    if spec["backend"] == "nccl" and not torch.cuda.is_available():
        print("adstream train-dist: error: --backend nccl needs a GPU per process; use --backend gloo", file=sys.stderr)
        return 1
    dist.init_process_group(backend=spec["backend"])
    rank = dist.get_rank()
    from core.logs import setup_logging, verbosity_from_env

    setup_logging(verbosity_from_env(), fmt=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)  # an fx deprecation note per rank
    logging.getLogger("torchrec.distributed.planner").setLevel(logging.ERROR)  # Topology/estimate notes
    device = torch.device("cpu")
    if spec["backend"] == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        cols, ec = _configs(spec)
        df = load_frame(spec["data"], cols)
        t0 = time.perf_counter()
        report, audit, info = run_dist_protocol(
            df,
            cols,
            ec,
            spec["sharding"],
            progress=(lambda msg: log.info("%s", msg)) if rank == 0 else None,
            device=device,
            planner=spec.get("planner", "manual"),
            emb_optimizer=spec.get("emb_optimizer", "rowwise_adagrad"),
        )
        info["protocol_seconds"] = time.perf_counter() - t0
        info["backend"] = spec["backend"]
        if rank == 0:
            report["dist"] = info
            report["audit"] = audit
            out = Path(spec["out"])
            tmp = out / "report.json.tmp"
            tmp.write_text(json.dumps(report, indent=2))
            tmp.replace(out / "report.json")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="worker process of 'adstream train-dist' (started by torchrun)")
    ap.add_argument("--worker", required=True, metavar="SPEC.json")
    sys.exit(worker(ap.parse_args().worker))
