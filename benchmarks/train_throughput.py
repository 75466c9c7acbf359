"""Training throughput: the project's trainer against the common tutorial loop, in one process.

For each device and model, both loops train the same networks with the same params and batch
size: :class:`baseline.BaselineTrainer` (torchvision MNIST through a DataLoader, ``.to(device)``
per batch, ``.item()`` per loss per step) and :class:`mnist_gan.training.GANTrainer` (the data
on the device, no host synchronisation inside a step). After a warm-up, the two run ``--steps``
steps each in turn, ``--repeats`` times, alternating which goes first so that a change in the
machine's load hits both alike. The table gives the median images per second of each, the
ratio (trainer / baseline: the median of the per-repeat ratios), and peak memory; the same goes
to a JSON file.

Run it as ``make bench`` or ``python benchmarks/train_throughput.py --help``. It needs only
PyTorch, torchvision, numpy and PyYAML (no MLflow, no DVC), so it runs on a bare GPU machine
with ``PYTHONPATH=src``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import gzip
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from baseline import BaselineTrainer

from mnist_gan.data import RAW_FILES, DataError, normalize, read_raw_split
from mnist_gan.params import ParamsError, TrainParams, load_params
from mnist_gan.training import GANTrainer
from mnist_gan.utils import write_json

MODELS = ("mlp", "dcgan")
# Steps per timed run and warm-up steps when not given on the command line, per device and
# model: on this project's 2-core CPU an mlp step takes tens of milliseconds and a dcgan step
# about a second; on a GPU a step takes about a millisecond or less.
DEFAULT_STEPS = {
    ("cpu", "mlp"): 30,
    ("cpu", "dcgan"): 8,
    ("cuda", "mlp"): 300,
    ("cuda", "dcgan"): 300,
}
DEFAULT_WARMUP = {
    ("cpu", "mlp"): 5,
    ("cpu", "dcgan"): 2,
    ("cuda", "mlp"): 50,
    ("cuda", "dcgan"): 50,
}
# One CPU thread by default. On a shared machine, OpenMP threads that wait for each other at every
# operation turn other users' load into tenfold swings (measured on the 2-core machine: ratios
# from 0.2 to 3.9 between runs with 2 threads). One thread is also the conservative choice for
# the ratio: the baseline's per-image transforms run on one core whatever the setting.
DEFAULT_THREADS = 1


class BenchError(Exception):
    """A bad option or input; the message names it."""


# --- data ------------------------------------------------------------------------------------

RAW_NAMES = [name for pair in RAW_FILES.values() for name in pair]


def _mirror_folders() -> list[Path]:
    """Local folders named by ``MNIST_MIRROR`` (plain paths or ``file://`` URLs)."""
    folders = []
    for entry in filter(None, (e.strip() for e in os.environ.get("MNIST_MIRROR", "").split(","))):
        url = urlparse(entry)
        if url.scheme == "file":
            folders.append(Path(url.path))
        elif "://" not in entry:
            folders.append(Path(entry))
    return folders


def _raw_kind(folder: Path) -> str | None:
    """``plain`` when ``folder`` holds the four decompressed files, ``gz`` for the .gz ones."""
    if all((folder / n).is_file() for n in RAW_NAMES):
        return "plain"
    if all((folder / f"{n}.gz").is_file() for n in RAW_NAMES):
        return "gz"
    return None


def resolve_raw_dir(data: str | Path | None, scratch: Path) -> Path:
    """A folder of the four decompressed MNIST IDX files.

    Args:
        data: The folder asked for (decompressed or ``.gz`` files); None tries ``data/raw``,
            then each local folder in ``MNIST_MIRROR``.
        scratch: A temporary folder to decompress ``.gz`` files into.

    Raises:
        BenchError: No candidate folder holds the files; the message lists what was tried.
    """
    candidates = [Path(data)] if data is not None else [Path("data/raw"), *_mirror_folders()]
    for folder in candidates:
        kind = _raw_kind(folder)
        if kind == "plain":
            return folder
        if kind == "gz":
            out = scratch / "raw"
            out.mkdir(parents=True, exist_ok=True)
            for name in RAW_NAMES:
                with gzip.open(folder / f"{name}.gz") as src, open(out / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            return out
    tried = ", ".join(str(c) for c in candidates)
    raise BenchError(
        f"no MNIST files found in {tried}: each needs {', '.join(RAW_NAMES)} (or their .gz); "
        "run `dvc repro fetch`, pass --data FOLDER or set MNIST_MIRROR"
    )


# --- configuration -----------------------------------------------------------------------------


def run_parser(doc: str | None, out_help: str) -> argparse.ArgumentParser:
    """A command line with the arguments every script that trains on MNIST takes: ``--data``,
    ``--out`` (described by ``out_help``), ``--params``, ``--set`` and ``--device``; ``doc``'s
    first paragraph describes the script."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    p.add_argument("--data", default=None, help="MNIST IDX folder (decompressed or .gz)")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--params", default="params.yaml", help="train params ('' for defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    add_trainer_option(p)
    return p


def add_trainer_option(p: argparse.ArgumentParser) -> None:
    """``--trainer-option KEY=VALUE``: keyword arguments for GANTrainer
    (:func:`parse_trainer_options` reads them), e.g. ``steps_per_replay=auto``."""
    p.add_argument(
        "--trainer-option",
        dest="trainer_options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a keyword argument for GANTrainer only (repeatable)",
    )


def parse_trainer_options(items: Sequence[str]) -> dict[str, Any]:
    """``--trainer-option`` values as GANTrainer keyword arguments; a name GANTrainer does not
    take (or one a script sets itself: the images, the config, the seed, the device) is a
    BenchError, before any work starts."""
    options = parse_set(items, "--trainer-option")
    own = {"self", "cfg", "images", "labels", "seed", "device", "progress"}
    takes = set(inspect.signature(GANTrainer.__init__).parameters) - own
    unknown = sorted(set(options) - takes)
    if unknown:
        raise BenchError(f"--trainer-option: GANTrainer takes none of {unknown}; it takes "
                         f"{sorted(takes)}")  # fmt: skip
    return options


def parse_set(items: Sequence[str], option: str = "--set") -> dict[str, Any]:
    """``KEY=VALUE`` strings to train-param overrides (values read as YAML: 1e-3, true, [1, 2]).

    Args:
        items: The strings.
        option: The option they came from; ``--set`` keys must be train params.

    Raises:
        BenchError: An item is not ``KEY=VALUE``, or a ``--set`` key names no train param.
    """
    import yaml

    fields = {f.name for f in dataclasses.fields(TrainParams)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or (option == "--set" and key not in fields):
            what = "a train param" if option == "--set" else "a GANTrainer argument"
            raise BenchError(f"{option} {item!r}: expected KEY=VALUE with KEY {what}")
        parsed = yaml.safe_load(value)
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def run_settings(args: argparse.Namespace, **fixed: Any) -> tuple[TrainParams, dict[str, Any]]:
    """What a :func:`run_parser` command line asks for: the train params (``--params``, a file
    that must exist, or '' for the defaults; then ``--set``; then ``fixed``) and the GANTrainer
    options (``--trainer-option``).

    Raises:
        BenchError: A missing params file, or an invalid param, override or option.
    """
    params_file = args.params or None
    if params_file and not Path(params_file).is_file():
        raise BenchError(f"{params_file}: params file not found")
    cfg = train_config(params_file, {**parse_set(args.overrides), **fixed})
    return cfg, parse_trainer_options(args.trainer_options)


def train_config(params_file: str | Path | None, overrides: dict[str, Any]) -> TrainParams:
    """The train params of ``params_file`` (or the built-in defaults), with ``overrides``.

    Raises:
        BenchError: The params file or an override is invalid.
    """
    try:
        base = load_params(params_file).train if params_file else TrainParams()
        return dataclasses.replace(base, **overrides)
    except (ParamsError, ValueError, TypeError) as exc:
        raise BenchError(f"train params: {exc}") from None


# --- measurement -------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(n: int) -> float:
    return round(n / 2**20, 1)


def rss_peak_mib() -> float:
    """The process's peak resident set size so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _mib(peak if sys.platform == "darwin" else peak * 1024)


class _Side:
    """One training loop under measurement: a step function and its GPU memory bookkeeping."""

    def __init__(self, name: str, run: Callable[[int], None], device: torch.device) -> None:
        self.name, self.run, self.device = name, run, device
        self.resident = 0  # bytes it keeps allocated between steps (after warm-up)
        self.peak = 0  # bytes above what the other side keeps, at the worst moment
        self.seconds: list[float] = []

    def timed(self, steps: int, others: int) -> float:
        """Run ``steps`` steps; return the seconds; track the GPU peak above ``others``."""
        cuda = self.device.type == "cuda"
        _sync(self.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        self.run(steps)
        _sync(self.device)
        seconds = time.perf_counter() - start
        if cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - others)
        return seconds


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def bench_pair(
    cfg: TrainParams,
    raw_dir: Path,
    images: torch.Tensor,
    device: torch.device,
    steps: int,
    warmup: int,
    repeats: int,
    seed: int,
    baseline_workers: int,
    trainer_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the baseline and the trainer on one device for one configuration.

    GPU peaks count only each side's own memory: what the other side keeps allocated (measured
    after its warm-up, when its optimizer state exists) is subtracted.

    Returns:
        The row for the JSON file: images per second (median and per repeat), the ratio,
        GPU peaks, the process's RSS peak, and counters that show the baseline's work.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    floor = _allocated(device)

    baseline = BaselineTrainer(cfg, raw_dir, device, seed=seed, num_workers=baseline_workers)
    base = _Side("baseline", baseline.run, device)
    base.timed(warmup, floor)
    base.resident = _allocated(device) - floor

    try:
        trainer = GANTrainer(
            cfg, images, seed=seed, device=device, progress=False, **(trainer_options or {})
        )
    except TypeError as exc:  # an option this GANTrainer does not take
        baseline.close()
        raise BenchError(f"--trainer-option: {exc}") from None

    def trainer_run(n: int) -> None:
        trainer.run_steps(n)  # the steps step() takes, the RNG state swapped once

    fast = _Side("trainer", trainer_run, device)
    fast.timed(warmup, floor + base.resident)
    fast.resident = _allocated(device) - floor - base.resident

    others = {"baseline": floor + fast.resident, "trainer": floor + base.resident}
    for r in range(repeats):
        order = (base, fast) if r % 2 == 0 else (fast, base)  # alternate who goes first
        for side in order:
            side.seconds.append(side.timed(steps, others[side.name]))

    images_per_step = cfg.batch_size
    result: dict[str, Any] = {"device": device.type, "model": cfg.model}
    for side in (base, fast):
        ips = [steps * images_per_step / s for s in side.seconds]
        result[side.name] = {
            "images_per_sec": round(statistics.median(ips), 1),
            "images_per_sec_runs": [round(x, 1) for x in ips],
            "gpu_peak_mib": _mib(side.peak) if device.type == "cuda" else None,
        }
    # Each repeat's two runs are adjacent in time: the median of their ratios follows the
    # machine's changing load better than the ratio of the two medians.
    ratios = [b / t for b, t in zip(base.seconds, fast.seconds, strict=True)]
    result["ratio"] = round(statistics.median(ratios), 2)
    result["ratio_runs"] = [round(r, 2) for r in ratios]
    result["rss_peak_mib"] = rss_peak_mib()
    result["baseline"]["steps"] = baseline.steps_done
    result["baseline"]["item_calls"] = baseline.item_calls
    result["baseline"]["batches_loaded"] = baseline.batches_loaded
    result["trainer"]["compiled"] = trainer.compiled
    result["trainer"]["amp"] = trainer.amp
    baseline.close()
    return result


# --- report ------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The accelerator's or the CPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name or 'CPU'} ({os.cpu_count()} cores)"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table of the rows."""
    head = (
        f"{'device':<6} {'model':<6} {'baseline img/s':>15} {'trainer img/s':>14} {'ratio':>6} "
        f"{'GPU MiB base':>12} {'GPU MiB trainer':>15} {'RSS peak MiB':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        gpu_b = r["baseline"]["gpu_peak_mib"]
        gpu_t = r["trainer"]["gpu_peak_mib"]
        lines.append(
            f"{r['device']:<6} {r['model']:<6} {r['baseline']['images_per_sec']:>15,.0f} "
            f"{r['trainer']['images_per_sec']:>14,.0f} {r['ratio']:>6.2f} "
            f"{'-' if gpu_b is None else f'{gpu_b:,.0f}':>12} "
            f"{'-' if gpu_t is None else f'{gpu_t:,.0f}':>15} {r['rss_peak_mib']:>12,.0f}"
        )
    return "\n".join(lines)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(
        description="Images per second of the project's GAN trainer against the common "
        "tutorial loop (torchvision DataLoader, .to(device) and .item() every step), "
        "same networks, same batch size, same process.",
    )
    p.add_argument(
        "--steps", type=int, help="timed steps per run (default: cpu mlp 30, cpu dcgan 8, cuda 300)"
    )
    p.add_argument(
        "--warmup", type=int, help="untimed steps first (default: cpu mlp 5, cpu dcgan 2, cuda 50)"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each loop (median)")
    p.add_argument("--models", type=_csv, default=list(MODELS), help="comma-separated")
    p.add_argument(
        "--devices",
        type=_csv,
        default=None,
        help="comma-separated (default: cpu, and cuda when available)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument(
        "--data",
        default=None,
        help="folder of MNIST IDX files, decompressed or .gz (default: "
        "data/raw, then the local folders in MNIST_MIRROR)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="CPU threads (torch intra-op) "
        "for both loops (default 1: stable on a shared machine, and conservative)",
    )
    p.add_argument(
        "--params",
        default="params.yaml",
        help="train params to start from ('' for the "
        "built-in defaults; a missing default file falls back to them)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train param for both loops, e.g. --set compile=true (repeatable)",
    )
    add_trainer_option(p)
    p.add_argument(
        "--baseline-workers",
        type=int,
        default=0,
        help="the baseline DataLoader's num_workers (default 0, as the tutorials)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/throughput.json", help="JSON results file")
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be positive, got {value}")
    if args.repeats < 1 or args.batch_size < 2 or args.baseline_workers < 0:
        p.error("--repeats must be >= 1, --batch-size >= 2, --baseline-workers >= 0")
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
        trainer_options = parse_trainer_options(args.trainer_options)
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
                    warmup = args.warmup
                    if warmup is None:
                        warmup = DEFAULT_WARMUP[device.type, model]
                    print(
                        f"measuring {model} on {name} ({steps} steps x {args.repeats})...",
                        file=sys.stderr,
                        flush=True,
                    )
                    rows.append(
                        bench_pair(
                            cfg,
                            raw_dir,
                            images,
                            device,
                            steps,
                            warmup,
                            args.repeats,
                            args.seed,
                            args.baseline_workers,
                            trainer_options,
                        )
                    )
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    report = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "baseline_workers": args.baseline_workers,
        "trainer_options": trainer_options,
        "machines": {d: device_name(torch.device(d)) for d in devices},
        "train_params": {m: dataclasses.asdict(c) for m, c in configs.items()},
        "results": rows,
    }
    print(format_table(rows))
    print(
        f"ratio = trainer / baseline images per second (median over {args.repeats} "
        "interleaved pairs of runs); "
        f"{report['threads']} CPU threads; "
        + "; ".join(f"{d}: {n}" for d, n in report["machines"].items())
    )
    write_json(args.out, json.loads(json.dumps(report)))  # tuples -> lists
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
