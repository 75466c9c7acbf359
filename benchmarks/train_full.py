"""Train the article's configuration with the library alone, and time it.

What ``benchmarks/gpu_check.sh`` runs on a bare GPU machine (PyTorch, torchvision and PyYAML; no
MLflow, no DVC): the train params of ``params.yaml`` (the article's mlp, batch 128, 100 epochs)
on the full MNIST training set, with the strategy they choose on the device
(``choose_strategy``, as the train stage does: on CUDA the step compiled, in a CUDA graph, in
bf16), through :meth:`mnist_gan.training.GANTrainer.fit`. It writes ``samples.png`` (an 8x8
grid from a fixed noise batch) and ``train_full.json`` (the strategy, training seconds, images
per second, per-epoch stats, a hash of the trained weights) into ``--out``; with
``--save-gan DIR`` also the trained networks, as the train stage writes ``models/gan`` (so the
evaluate stage can score weights trained on another machine).

``--time-limit`` bounds the run: training stops after the epoch that crosses it and the JSON
says how many epochs were done, so a slow machine still reports what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from benchkit import BenchError, add_run_args, device_name, load_mnist, run_settings, strategy_for
from torchvision.utils import save_image

from mnist_gan.strategy import StrategyError
from mnist_gan.training import EpochStats, GANTrainer, fixed_noise
from mnist_gan.utils import atomic_dir, resolve_device, write_json

GRID = 64  # samples in the grid (8 x 8)


def weights_sha256(trainer: GANTrainer) -> str:
    """SHA-256 of the trained networks' state (G's, D's and the EMA G's weights and buffers, by
    name): two runs have the same hash exactly when they trained the same numbers."""
    digest = hashlib.sha256()
    for net in (trainer.generator, trainer.discriminator, trainer.ema_generator):
        for name, tensor in ({} if net is None else net.state_dict()).items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, "folder for samples.png and train_full.json")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=0, help="seconds; 0 = no limit")
    p.add_argument("--train-limit", type=int, default=0, help="first N training images (0: all)")
    p.add_argument("--save-gan", default=None, help="folder for the trained GAN (models/gan form)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, time, write the grid and the JSON. Returns the exit code."""
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        epochs = {} if args.epochs is None else {"epochs": args.epochs}
        cfg = run_settings(args, **epochs)
        strategy = strategy_for(cfg, device)
        images, labels = load_mnist(args.data, "train", args.train_limit)  # (N, 1, 28, 28)
    except (BenchError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    print(f"training {cfg.model} for {cfg.epochs} epochs on {device} ({strategy})",
          file=sys.stderr)  # fmt: skip
    setup = time.perf_counter()
    try:
        trainer = GANTrainer(cfg, images, labels=labels, seed=args.seed, device=device,
                             strategy=strategy, progress=False)  # fmt: skip
    except ValueError as exc:  # a value that does not fit (it names its param)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    setup = time.perf_counter() - setup

    def report_epoch(_: GANTrainer, stats: EpochStats) -> None:
        print(f"epoch {stats.epoch:3d}  loss_d {stats.loss_d:.3f}  loss_g {stats.loss_g:.3f}  "
              f"{stats.images_per_sec:,.0f} img/s", file=sys.stderr)  # fmt: skip

    start = time.perf_counter()
    stopped_early = False
    try:
        while trainer.epoch < cfg.epochs:  # an epoch a call, to stop at the time limit
            trainer.fit(report_epoch, epochs=trainer.epoch + 1)  # ends synchronised
            if args.time_limit and time.perf_counter() - start > args.time_limit:
                stopped_early = trainer.epoch < cfg.epochs
                break
    except StrategyError as exc:  # compiling or capturing failed at the first step
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid = trainer.sample(fixed_noise(GRID, cfg.latent_dim, args.seed))  # (64, 1, 28, 28)
    save_image(grid, out / "samples.png", nrow=8, normalize=True, value_range=(-1, 1))
    epoch_seconds = [h["epoch_seconds"] for h in trainer.history]
    images_seen = trainer.epoch * trainer.steps_per_epoch * cfg.batch_size
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "strategy": str(strategy),
        "epochs_done": trainer.epoch,
        "epochs_asked": cfg.epochs,
        "stopped_at_time_limit": stopped_early,
        "setup_seconds": round(setup, 2),
        "train_seconds": round(seconds, 2),
        "images_per_sec": round(images_seen / seconds, 1),
        "first_epoch_seconds": round(epoch_seconds[0], 3),  # compiles, captures
        "later_epochs_seconds": round(sum(epoch_seconds[1:]), 2),
        "median_epoch_seconds": round(statistics.median(epoch_seconds), 3),
        "final": trainer.history[-1],
        "weights_sha256": weights_sha256(trainer),
        "train_params": json.loads(json.dumps(dataclasses.asdict(cfg))),
    }
    write_json(out / "train_full.json", report)
    if args.save_gan:  # a complete folder replaces any earlier one (no stale EMA file)
        with atomic_dir(args.save_gan) as tmp:
            trainer.save(tmp)
    print(
        f"{trainer.epoch} epochs of {cfg.model} in {seconds:.1f} s "
        f"({report['images_per_sec']:,.0f} img/s; first epoch {epoch_seconds[0]:.1f} s) on "
        f"{report['device']}, {strategy}; "
        f"grid: {out / 'samples.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
