"""What the benchmark scripts share: MNIST from ``data/raw`` or a mirror, the train params of
``params.yaml`` with overrides, the strategy those params choose, and timing through the
trainer's public :meth:`~mnist_gan.training.GANTrainer.fit`.

It needs only PyTorch, numpy and PyYAML (no MLflow, no DVC), like the scripts that import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import os
import platform
import resource
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from mnist_gan.data import RAW_FILES, DataError, normalize, read_raw_split
from mnist_gan.params import ParamsError, TrainParams, load_params
from mnist_gan.strategy import Strategy, StrategyError, choose_strategy
from mnist_gan.training import GANTrainer

__all__ = [
    "BenchError",
    "add_run_args",
    "device_name",
    "epoch_trainer",
    "load_mnist",
    "parse_set",
    "resolve_raw_dir",
    "rss_peak_mib",
    "run_settings",
    "strategy_for",
    "sync",
    "timed_epochs",
    "train_config",
]

RAW_NAMES = [name for pair in RAW_FILES.values() for name in pair]


class BenchError(Exception):
    """A bad option or input; the message names it."""


# --- data ------------------------------------------------------------------------------------


def mirror_folders() -> list[Path]:
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
    candidates = [Path(data)] if data is not None else [Path("data/raw"), *mirror_folders()]
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


def load_mnist(
    data: str | Path | None, split: str = "train", limit: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalized images (N, 1, 28, 28) in [-1, 1] and int64 labels (N,) of ``split``
    (``train`` or ``test``), the first ``limit`` of them (0: all); ``data`` as for
    :func:`resolve_raw_dir`.

    Raises:
        BenchError: No MNIST files found, or files that are not MNIST.
    """
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as scratch:
        try:
            pixels, labels = read_raw_split(resolve_raw_dir(data, Path(scratch)), split)
        except DataError as exc:
            raise BenchError(str(exc)) from None
    pixels, labels = pixels[: limit or None], labels[: limit or None]
    return normalize(pixels), torch.from_numpy(labels.astype("int64"))


# --- params ------------------------------------------------------------------------------------


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` strings to train-param overrides (values read as YAML: 1e-3, true,
    [1, 2]).

    Raises:
        BenchError: An item is not ``KEY=VALUE``, or its key names no train param.
    """
    import yaml

    fields = {f.name for f in dataclasses.fields(TrainParams)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise BenchError(f"--set {item!r}: expected KEY=VALUE with KEY a train param")
        parsed = yaml.safe_load(value)
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def train_config(params_file: str | Path | None, overrides: dict[str, Any]) -> TrainParams:
    """The train params of ``params_file`` (None: the built-in defaults), with ``overrides``.

    Raises:
        BenchError: A missing params file, or an invalid param or override.
    """
    if params_file and not Path(params_file).is_file():
        raise BenchError(f"{params_file}: params file not found")
    try:
        base = load_params(params_file).train if params_file else TrainParams()
        return dataclasses.replace(base, **overrides)
    except (ParamsError, ValueError, TypeError) as exc:
        raise BenchError(f"train params: {exc}") from None


def add_run_args(p: argparse.ArgumentParser, out_help: str, out_default: str | None = None) -> None:
    """The arguments of every script that trains on MNIST: ``--data``, ``--out`` (described by
    ``out_help``; required without ``out_default``), ``--params``, ``--set`` and ``--device``."""
    p.add_argument("--data", default=None, help="folder of MNIST IDX files, decompressed or "
                   ".gz (default: data/raw, then the local folders in MNIST_MIRROR)")  # fmt: skip
    p.add_argument("--out", default=out_default, required=out_default is None, help=out_help)
    p.add_argument("--params", default="params.yaml", help="train params to start from ('' for "
                   "the built-in defaults)")  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a train param, e.g. --set model=dcgan (repeatable)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def run_settings(args: argparse.Namespace, **fixed: Any) -> TrainParams:
    """The train params an :func:`add_run_args` command line asks for: ``--params``, then
    ``--set``, then ``fixed``.

    Raises:
        BenchError: A missing params file, or an invalid param or override.
    """
    return train_config(args.params or None, {**parse_set(args.overrides), **fixed})


def strategy_for(cfg: TrainParams, device: torch.device, world_size: int = 1) -> Strategy:
    """The strategy ``cfg`` chooses on ``device``, as the train stage chooses it.

    Raises:
        BenchError: A ``true`` that this device cannot meet (the message names the param).
    """
    try:
        return choose_strategy(cfg, device, world_size)
    except StrategyError as exc:
        raise BenchError(str(exc)) from None


# --- measurement -------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_trainer(
    cfg: TrainParams,
    images: torch.Tensor,
    steps: int,
    *,
    strategy: Strategy,
    device: torch.device | str = "cpu",
    seed: int = 0,
    labels: torch.Tensor | None = None,
) -> GANTrainer:
    """A trainer whose epoch is ``steps`` steps: built on the first ``steps * batch_size``
    images, so that ``fit`` runs exactly the steps a benchmark times.

    Raises:
        BenchError: Fewer images than that.
    """
    n = steps * cfg.batch_size
    if len(images) < n:
        raise BenchError(f"{steps} steps of batch {cfg.batch_size} need {n} images; "
                         f"there are {len(images)}")  # fmt: skip
    return GANTrainer(cfg, images[:n], labels=None if labels is None else labels[:n], seed=seed,
                      device=device, strategy=strategy, progress=False)  # fmt: skip


def timed_epochs(trainer: GANTrainer, epochs: int = 1) -> list[float]:
    """Train ``epochs`` more epochs through :meth:`~mnist_gan.training.GANTrainer.fit`; the
    seconds of each, as its history records them (an epoch ends with a device sync)."""
    done = len(trainer.history)
    history = trainer.fit(epochs=trainer.epoch + epochs)
    return [h["epoch_seconds"] for h in history[done:]]


def rss_peak_mib() -> float:
    """The process's peak resident set size so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((peak if sys.platform == "darwin" else peak * 1024) / 2**20, 1)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and core count."""
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
    return f"{name or platform.machine() or 'CPU'} ({os.cpu_count()} cores)"
