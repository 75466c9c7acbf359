"""Does the fast path train as well as the plain eager one? FID of both, a few seeds each.

Trains the project's evaluator (``mnist_gan.classifier``) briefly, then trains the GAN several
times for a few epochs through the trainer's ``fit``: the ``fast`` variant with the strategy the
train params choose on the device (``choose_strategy``: on CUDA bf16 autocast, the compiled step
and the CUDA graph), and the ``eager`` variant with the switches of ``--eager-off`` turned off
(default: all three, the plain float32 step ``EAGER``; ``--eager-off compile``: the uncompiled
step with the fast variant's bf16 and CUDA graph). Each run's generator makes ``--samples``
images whose classifier features are compared with the test set's by
``mnist_gan.metrics.frechet_distance`` (FID in the evaluator's feature space, as the evaluate
stage measures it).

The verdict: the fast path's quality is "the same" when the gap between the two variants' mean
FIDs is no larger than the run-to-run spread (max - min over seeds) of either variant. Writes
``fid_check.json`` into ``--out``. Needs only PyTorch, torchvision, safetensors and PyYAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from benchkit import BenchError, add_run_args, device_name, load_mnist, run_settings, strategy_for

from mnist_gan.classifier import embed, train_classifier
from mnist_gan.metrics import frechet_distance
from mnist_gan.params import ClassifierParams
from mnist_gan.sampling import balanced_labels, generate_samples
from mnist_gan.strategy import Strategy
from mnist_gan.training import GANTrainer
from mnist_gan.utils import resolve_device, write_json

# The strategy's switches, all turned off for the eager variant by default.
EAGER_OFF = ("amp", "compile", "cuda_graph")


def variant_strategy(fast: Strategy, variant: str, off: Sequence[str] = EAGER_OFF) -> Strategy:
    """``fast``: the strategy the params chose; ``eager``: the same with the switches ``off``
    (default: every one, which is ``EAGER``) turned off."""
    if variant == "fast":
        return fast
    return dataclasses.replace(fast, **dict.fromkeys(off, False))


def summarise(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Per variant: mean FID, spread (max - min over seeds) and count; and the verdict.

    The verdict (with at least two seeds of each variant) is "the same" when the gap between
    the variants' mean FIDs is no larger than the larger of their spreads; None otherwise.
    """
    summary: dict[str, Any] = {}
    for variant in ("eager", "fast"):
        fids = [r["fid"] for r in runs if r["variant"] == variant]
        if fids:
            summary[variant] = {
                "mean": round(statistics.fmean(fids), 4),
                "spread": round(max(fids) - min(fids), 4),
                "n": len(fids),
            }
    if not all(v in summary and summary[v]["n"] >= 2 for v in ("eager", "fast")):
        return summary, None
    gap = abs(summary["fast"]["mean"] - summary["eager"]["mean"])
    spread = max(summary["eager"]["spread"], summary["fast"]["spread"])
    return summary, {"gap": round(gap, 4), "spread": round(spread, 4), "same": gap <= spread}


def generate(trainer: GANTrainer, n: int, seed: int) -> torch.Tensor:
    """``n`` images (n, 1, 28, 28) from the trainer's EMA generator (else its generator), from
    seeded noise, as the evaluate stage draws them (every digit alike when conditional)."""
    net = trainer.ema_generator if trainer.ema_generator is not None else trainer.generator
    labels = balanced_labels(n) if trainer.cfg.conditional else None
    return generate_samples(net, n, latent_dim=trainer.cfg.latent_dim, seed=seed,
                            device=trainer.device, labels=labels)  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_args(p, "folder for fid_check.json")
    p.add_argument("--epochs", type=int, default=15, help="GAN epochs per run")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds per variant")
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=10_000, help="generated images per FID")
    p.add_argument("--train-limit", type=int, default=0, help="first N training images (0: all)")
    p.add_argument("--time-limit", type=float, default=0, help="seconds; 0 = no limit")
    p.add_argument("--eager-off", default=",".join(EAGER_OFF),
                   help="the strategy's switches the eager variant turns off (comma-separated; "
                   "compile alone: the step uncompiled, in the graph, bf16)")  # fmt: skip
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train the classifier and the GAN runs, compare FIDs, write the JSON."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        device = resolve_device(args.device)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        cfg = run_settings(args, epochs=args.epochs)
        fast = strategy_for(cfg, device)
        eager_off = [name for name in args.eager_off.split(",") if name]
        if not eager_off or set(eager_off) - set(EAGER_OFF):
            raise BenchError(f"--eager-off: {args.eager_off!r}; choose from {', '.join(EAGER_OFF)}")
        train_images, train_labels = load_mnist(args.data, "train", args.train_limit)
        test_images, test_labels = load_mnist(args.data, "test")
    except (BenchError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    classifier, cstats = train_classifier(train_images, train_labels, test_images, test_labels,
                                          ClassifierParams(epochs=args.classifier_epochs),
                                          seed=0, device=device)  # fmt: skip
    reference, _ = embed(classifier, test_images, device=device)  # (10000, features)
    print(f"classifier: test accuracy {cstats.test_accuracy:.4f}", file=sys.stderr)

    strategies = {v: variant_strategy(fast, v, eager_off) for v in ("eager", "fast")}
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for variant, strategy in strategies.items():  # interleaved: a time limit cuts both alike
            if args.time_limit and time.perf_counter() - start > args.time_limit:
                print("time limit reached; stopping", file=sys.stderr)
                break
            t0 = time.perf_counter()
            trainer = GANTrainer(cfg, train_images, labels=train_labels, seed=seed,
                                 device=device, strategy=strategy, progress=False)  # fmt: skip
            trainer.fit()
            seconds = time.perf_counter() - t0
            features, _ = embed(classifier, generate(trainer, args.samples, seed), device=device)
            fid = frechet_distance(features, reference)
            runs.append({"variant": variant, "seed": seed, "fid": round(fid, 4),
                         "train_seconds": round(seconds, 2)})  # fmt: skip
            print(f"{variant:5s} seed {seed}: FID {fid:.3f} ({seconds:.1f} s)", file=sys.stderr)
            del trainer

    summary, verdict = summarise(runs)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "epochs": args.epochs,
        "samples": args.samples,
        "classifier_test_accuracy": round(cstats.test_accuracy, 4),
        "strategies": {v: str(s) for v, s in strategies.items()},
        "runs": runs,
        "summary": summary,
        "verdict": verdict,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(Path(args.out) / "fid_check.json", report)
    print(f"FID summary: {summary}; verdict: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
