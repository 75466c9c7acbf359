"""Training throughput: the project's trainer against the common tutorial loop, in one process.

For each device and model, the loops train the same networks with the same params and batch
size:

- ``baseline``: :class:`baseline.BaselineTrainer`, the most-copied PyTorch GAN loop
  (torchvision MNIST through a DataLoader, ``.to(device)`` per batch, ``.item()`` per loss per
  step);
- ``trainer``: :class:`mnist_gan.training.GANTrainer` through its public ``fit``, with the
  strategy the train params choose on that device (``choose_strategy``, as the train stage
  does: on the CPU ``auto`` is the eager float32 step);
- ``compile_flipped`` (unless ``--no-compile-check``): the same trainer with ``compile``
  turned the other way (compiled where the params do not compile, as on the CPU; uncompiled
  where they do, as on CUDA), to show what compiling adds on that device. Its figure is printed,
  never asserted; where compiling fails here, the row says so. Not with ``train.r1_gamma``
  above 0 (the default), whose double backward cannot be compiled: ``--set r1_gamma=0``
  measures it.

A trainer's epoch is ``--steps`` steps (it is built on the first ``steps * batch_size``
images), so ``fit`` runs exactly the steps timed. After a warm-up (one epoch for a trainer,
which compiles where its strategy does; ``--warmup`` steps for the baseline), the loops run
``--steps`` steps each in turn, ``--repeats`` times, rotating which goes first so that a change
in the machine's load hits all alike. The table gives each loop's median images per second and
the ratios (the medians of the per-repeat ratios); the JSON file holds the same and more.

Run it as ``make bench`` or ``python benchmarks/train_throughput.py --help``. It needs only
PyTorch, torchvision, numpy and PyYAML (no MLflow, no DVC), so it runs on a bare GPU machine
with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from baseline import BaselineTrainer
from benchkit import (
    BenchError,
    device_name,
    epoch_trainer,
    parse_set,
    resolve_raw_dir,
    rss_peak_mib,
    strategy_for,
    sync,
    timed_epochs,
    train_config,
)

from mnist_gan.data import DataError, normalize, read_raw_split
from mnist_gan.params import TrainParams
from mnist_gan.strategy import Strategy, StrategyError
from mnist_gan.utils import write_json

MODELS = ("mlp", "dcgan")
# Steps per timed run (a trainer's epoch) when not given: on this project's 2-core CPU an mlp
# step takes tens of milliseconds and a dcgan step about a second; on a GPU about a millisecond.
DEFAULT_STEPS = {("cpu", "mlp"): 30, ("cpu", "dcgan"): 8, ("cuda", "mlp"): 300,
                 ("cuda", "dcgan"): 300}  # fmt: skip
# One CPU thread by default. On a shared machine, OpenMP threads that wait for each other at every
# operation turn other users' load into tenfold swings (ratios from 0.2 to 3.9 between runs with
# 2 threads on a 2-core machine). One thread is also the conservative choice for the ratio: the
# baseline's per-image transforms run on one core whatever the setting.
DEFAULT_THREADS = 1


class _Loop:
    """One training loop under measurement: ``run()`` trains one timed run's steps."""

    def __init__(self, name: str, run: Callable[[], None], device: torch.device) -> None:
        self.name, self.run, self.device = name, run, device
        self.seconds: list[float] = []

    def timed(self) -> float:
        """Run once; return the seconds (the device synchronised at both ends)."""
        sync(self.device)
        start = time.perf_counter()
        self.run()
        sync(self.device)
        return time.perf_counter() - start


def flipped(strategy: Strategy) -> Strategy:
    """``strategy`` with ``compile`` turned the other way."""
    return dataclasses.replace(strategy, compile=not strategy.compile)


def _median_ratio(num: list[float], den: list[float]) -> float:
    # Each repeat's runs are adjacent in time: the median of their ratios follows the machine's
    # changing load better than the ratio of the two medians.
    return round(statistics.median(n / d for n, d in zip(num, den, strict=True)), 2)


def bench_model(
    cfg: TrainParams,
    raw_dir: Path,
    images: torch.Tensor,
    device: torch.device,
    *,
    steps: int,
    warmup: int,
    repeats: int,
    seed: int,
    compile_check: bool,
) -> dict[str, Any]:
    """Measure the baseline, the trainer and (with ``compile_check``) the trainer with compile
    flipped, on one device for one configuration.

    Returns:
        The row for the JSON file: images per second of each loop (median and per repeat), the
        ratios, each trainer's strategy, the process's RSS peak, and counters that show the
        baseline's work.

    Raises:
        BenchError: The params ask for a strategy this device cannot run.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    strategy = strategy_for(cfg, device)
    baseline = BaselineTrainer(cfg, raw_dir, device, seed=seed)
    loops: list[_Loop] = []
    strategies: dict[str, Strategy] = {}
    problems: dict[str, str] = {}
    try:
        baseline.run(warmup)
        loops.append(_Loop("baseline", lambda: baseline.run(steps), device))
        candidates = {"trainer": strategy}
        if compile_check and cfg.r1_gamma:
            problems["compile_flipped"] = (
                "train.r1_gamma's double backward cannot be compiled; --set r1_gamma=0 measures "
                "what compiling adds to the step without it"
            )
        elif compile_check:
            candidates["compile_flipped"] = flipped(strategy)
        for name, s in candidates.items():
            trainer = epoch_trainer(cfg, images, steps, strategy=s, device=device, seed=seed)
            try:
                timed_epochs(trainer)  # the warm-up epoch: compiles (and captures) where asked
            except StrategyError as exc:
                if name == "trainer":
                    raise BenchError(str(exc)) from None
                problems[name] = str(exc)  # what compiling adds cannot be measured here
                continue
            strategies[name] = s
            loops.append(_Loop(name, lambda t=trainer: timed_epochs(t), device))
        for r in range(repeats):
            k = r % len(loops)  # rotate who goes first
            for loop in loops[k:] + loops[:k]:
                loop.seconds.append(loop.timed())
    finally:
        baseline.close()

    result: dict[str, Any] = {"device": device.type, "model": cfg.model}
    for loop in loops:
        ips = [steps * cfg.batch_size / s for s in loop.seconds]
        result[loop.name] = {
            "images_per_sec": round(statistics.median(ips), 1),
            "images_per_sec_runs": [round(x, 1) for x in ips],
        }
        if loop.name in strategies:
            result[loop.name]["strategy"] = str(strategies[loop.name])
    by_name = {loop.name: loop.seconds for loop in loops}
    result["ratio"] = _median_ratio(by_name["baseline"], by_name["trainer"])
    pairs = zip(by_name["baseline"], by_name["trainer"], strict=True)
    result["ratio_runs"] = [round(b / t, 2) for b, t in pairs]
    if compile_check:
        # compiled / eager images per second, whichever of the two the params chose.
        if "compile_flipped" in by_name:
            eager, compiled = by_name["trainer"], by_name["compile_flipped"]
            if strategy.compile:
                eager, compiled = compiled, eager
            result["compiled_vs_eager"] = _median_ratio(eager, compiled)
        else:
            result["compiled_vs_eager"] = None
            result["compile_flipped"] = {"error": problems.get("compile_flipped", "")}
    result["rss_peak_mib"] = rss_peak_mib()
    result["baseline"]["steps"] = baseline.steps_done
    result["baseline"]["item_calls"] = baseline.item_calls
    result["baseline"]["batches_loaded"] = baseline.batches_loaded
    return result


# --- report ------------------------------------------------------------------------------------


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the rows."""
    head = (f"{'device':<6} {'model':<6} {'baseline img/s':>15} {'trainer img/s':>14} "
            f"{'ratio':>6}  {'trainer strategy':<27} {'compiled/eager':>14}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        ce = r.get("compiled_vs_eager")
        ce_text = "-" if "compiled_vs_eager" not in r else f"{ce:.2f}" if ce else "not measured"
        lines.append(
            f"{r['device']:<6} {r['model']:<6} {r['baseline']['images_per_sec']:>15,.0f} "
            f"{r['trainer']['images_per_sec']:>14,.0f} {r['ratio']:>6.2f}  "
            f"{r['trainer']['strategy']:<27} {ce_text:>14}"
        )
    return "\n".join(lines)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--steps", type=int, help="timed steps per run (default: cpu mlp 30, cpu dcgan 8, cuda 300)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="the baseline's untimed steps first (a trainer warms up one epoch)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each loop (median)")
    p.add_argument("--models", type=_csv, default=list(MODELS), help="comma-separated")
    p.add_argument("--devices", type=_csv, default=None,
                   help="comma-separated (default: cpu, and cuda when available)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", default=None, help="folder of MNIST IDX files, decompressed or .gz "
                   "(default: data/raw, then the local folders in MNIST_MIRROR)")  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="CPU threads for all loops (default 1: stable on a shared machine)",
    )
    p.add_argument("--params", default="params.yaml", help="train params to start from ('' for "
                   "the built-in defaults; a missing params.yaml falls back to them)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train param for all loops, e.g. --set amp=false")  # fmt: skip
    p.add_argument("--no-compile-check", dest="compile_check", action="store_false",
                   help="skip the trainer with compile flipped")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/throughput.json", help="JSON results file")
    args = p.parse_args(argv)
    for name in ("steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be positive, got {value}")
    if args.repeats < 1 or args.batch_size < 2 or args.warmup < 0:
        p.error("--repeats must be >= 1, --batch-size >= 2, --warmup >= 0")
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models: unknown {', '.join(bad) or '(none)'}; choose from {MODELS}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; print the table; write the JSON. Returns the exit code."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    params_file = args.params or None
    if params_file == "params.yaml" and not Path(params_file).is_file():
        params_file = None  # run from anywhere with the built-in defaults
    try:
        overrides = parse_set(args.overrides)
        for name in devices:
            if name not in ("cpu", "cuda"):
                raise BenchError(f"--devices: unknown device {name!r} (cpu or cuda)")
            if name == "cuda" and not torch.cuda.is_available():
                raise BenchError("--devices: cuda asked for, but no CUDA device is available")
        configs = {
            m: train_config(params_file, {**overrides, "model": m, "batch_size": args.batch_size})
            for m in args.models
        }
        with tempfile.TemporaryDirectory(prefix="mnist-bench-") as scratch:
            raw_dir = resolve_raw_dir(args.data, Path(scratch))
            try:
                images = normalize(read_raw_split(raw_dir, "train")[0])  # (N, 1, 28, 28)
            except DataError as exc:
                raise BenchError(str(exc)) from None
            rows = []
            for name in devices:
                device = torch.device(name)
                for model, cfg in configs.items():
                    steps = args.steps or DEFAULT_STEPS[device.type, model]
                    print(f"measuring {model} on {name} ({steps} steps x {args.repeats})...",
                          file=sys.stderr, flush=True)  # fmt: skip
                    rows.append(bench_model(cfg, raw_dir, images, device, steps=steps,
                                            warmup=args.warmup, repeats=args.repeats,
                                            seed=args.seed,
                                            compile_check=args.compile_check))  # fmt: skip
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    report = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "machines": {d: device_name(torch.device(d)) for d in devices},
        "train_params": {m: dataclasses.asdict(c) for m, c in configs.items()},
        "results": rows,
    }
    print(format_table(rows))
    print(f"ratio = trainer / baseline images per second; compiled/eager = the trainer compiled "
          f"/ uncompiled (medians over {args.repeats} interleaved runs); "
          f"{report['threads']} CPU threads; "
          + "; ".join(f"{d}: {n}" for d, n in report["machines"].items()))  # fmt: skip
    for r in rows:
        if r.get("compiled_vs_eager", 0) is None:
            print(f"{r['device']} {r['model']}: compiled/eager not measured: "
                  f"{r['compile_flipped']['error']}")  # fmt: skip
    write_json(args.out, json.loads(json.dumps(report)))  # tuples -> lists
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
