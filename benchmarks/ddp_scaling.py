"""Images per second of the trainer with 1 and with N training processes (DDP, gloo, CPU).

Each world trains the same params on MNIST with the same global batch, the machine's threads
split evenly between its processes (``--threads`` in all, 2 by default: ``base.threads``). A
world is a set of spawned processes joined through a file store. Each rank's trainer has an
epoch of ``--steps`` steps (it is built on the first ``steps * batch_size`` images, which DDP
shards across the ranks); after a warm-up epoch every rank waits at a barrier, trains one epoch
through ``fit``, and waits again, and rank 0 times the span.
The worlds take turns ``--repeats`` times, so that a change in the machine's load hits each
alike; the table gives the median images per second and the ratio to one process (the median
of the per-repeat ratios). The same goes to a JSON file.

Run it as ``make bench-ddp`` or ``python benchmarks/ddp_scaling.py --help``. It needs PyTorch
and numpy only (no MLflow, no DVC).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from benchkit import (
    BenchError,
    device_name,
    epoch_trainer,
    load_mnist,
    parse_set,
    strategy_for,
    timed_epochs,
    train_config,
)


def _rank(rank: int, size: int, store: str, images: torch.Tensor, overrides: dict,
          threads: int, steps: int, out: str) -> None:  # fmt: skip
    torch.set_num_threads(threads)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    cfg = train_config(None, overrides)
    strategy = strategy_for(cfg, torch.device("cpu"), size)
    trainer = epoch_trainer(cfg, images, steps, strategy=strategy)
    timed_epochs(trainer)  # the warm-up epoch
    if size > 1:
        dist.barrier()
    start = time.perf_counter()
    timed_epochs(trainer)
    if size > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds}))
    if size > 1:
        dist.destroy_process_group()


def images_per_second(size: int, images: torch.Tensor, overrides: dict, threads: int,
                      steps: int, scratch: Path) -> float:  # fmt: skip
    """One world of ``size`` processes: global images per second over ``steps`` steps."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    out = folder / "result.json"
    args = (size, str(folder / "store"), images, overrides, threads, steps, str(out))
    mp.start_processes(_rank, args=args, nprocs=size, start_method="spawn")
    batch = train_config(None, overrides).batch_size
    return steps * batch / json.loads(out.read_text())["seconds"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes of the larger world (2)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads in all, split (2)")
    p.add_argument("--steps", type=int, default=200,
                   help="timed steps per run, and warm-up steps (200)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="turns of each world (3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a train param, e.g. --set model=dcgan (repeatable)")  # fmt: skip
    p.add_argument("--data", help="folder of the MNIST IDX files (default: data/raw, mirror)")
    p.add_argument("--out", default="benchmarks/results/ddp_scaling.json", help="JSON output")
    args = p.parse_args(argv)
    if args.nproc < 2 or args.threads < 1 or args.steps < 1 or args.repeats < 1:
        p.error("need --nproc >= 2, --threads >= 1, --steps >= 1 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides = parse_set(args.set)
        cfg = train_config(None, overrides)
        if cfg.batch_size % args.nproc:
            raise BenchError(f"batch_size {cfg.batch_size} does not split across {args.nproc}")
        images = load_mnist(args.data)[0][: args.steps * cfg.batch_size]
        if len(images) < args.steps * cfg.batch_size:
            raise BenchError(
                f"--steps {args.steps} of batch {cfg.batch_size} need "
                f"{args.steps * cfg.batch_size} images; there are {len(images)}"
            )
        with tempfile.TemporaryDirectory() as scratch:
            sizes = (1, args.nproc)
            speed: dict[int, list[float]] = {n: [] for n in sizes}
            for turn in range(args.repeats):
                for n in sizes if turn % 2 == 0 else sizes[::-1]:
                    threads = max(1, args.threads // n)
                    speed[n].append(
                        images_per_second(
                            n, images, overrides, threads, args.steps, Path(scratch)
                        )  # fmt: skip
                    )
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ratios = [b / a for a, b in zip(speed[1], speed[args.nproc], strict=True)]
    rows = [
        {
            "processes": n,
            "threads_each": max(1, args.threads // n),
            "images_per_sec": statistics.median(speed[n]),
            "runs": [round(v, 1) for v in speed[n]],
        }
        for n in sizes
    ]
    cpu = device_name(torch.device("cpu"))
    print(f"{cfg.model}, global batch {cfg.batch_size}, {args.threads} threads in all, "
          f"{args.steps} steps x {args.repeats} turns ({cpu})")  # fmt: skip
    print(f"{'processes':>9} {'threads each':>12} {'images/s':>10}  runs")
    for r in rows:
        print(
            f"{r['processes']:>9} {r['threads_each']:>12} {r['images_per_sec']:>10.0f}  {r['runs']}"
        )
    print(f"ratio {args.nproc} processes / 1: {statistics.median(ratios):.2f} (per turn: "
          f"{', '.join(f'{x:.2f}' for x in ratios)})")  # fmt: skip
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu,
        "torch": torch.__version__,
        "model": cfg.model,
        "batch_size": cfg.batch_size,
        "threads": args.threads,
        "steps": args.steps,
        "rows": rows,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
