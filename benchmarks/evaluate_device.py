"""Scoring on the device: the reference and evaluate stages' computation on each device, timed
and compared.

Trains the evaluator classifier briefly (on the first device), then computes real data's side of
every metric (``mnist_gan.reference.compute_reference``) and scores stand-in samples against it
(``evaluate_samples``, as the evaluate stage does) on each device in ``--devices``. The stand-in
samples are training images with Gaussian noise, so every metric has a value far from trivial.
Prints each device's seconds and, per metric, the largest difference from the first device;
writes ``evaluate_device.json`` into ``--out``. Needs only PyTorch and safetensors (no MLflow).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from benchkit import BenchError, load_mnist

from mnist_gan.classifier import train_classifier
from mnist_gan.metrics import evaluate_samples
from mnist_gan.params import ClassifierParams
from mnist_gan.reference import compute_reference
from mnist_gan.utils import resolve_device, write_json


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="folder of MNIST IDX files (default: data/raw, MNIST_MIRROR)")
    p.add_argument("--devices", default="cpu,cuda", help="comma-separated; the first is the base")
    p.add_argument("--samples", type=int, default=10_000, help="samples (evaluate.num_samples)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--is-splits", type=int, default=10)
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--classifier-epochs", type=int, default=1)
    p.add_argument("--out", default="bench/evaluate_device", help="folder for the JSON report")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    devices = [resolve_device(d.strip()) for d in args.devices.split(",") if d.strip()]
    train, train_labels = load_mnist(args.data, "train")
    test, test_labels = load_mnist(args.data, "test")
    params = ClassifierParams(epochs=args.classifier_epochs)
    classifier, _ = train_classifier(train, train_labels, test, test_labels, params, seed=0,
                                     device=devices[0])  # fmt: skip
    classifier = classifier.cpu()
    noise = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(train), generator=noise)[: args.samples]
    samples = (train[pick] + 0.3 * torch.randn(train[pick].shape, generator=noise)).clamp(-1, 1)
    settings = {"k": args.k, "is_splits": args.is_splits, "seed": 0,
                "kid_subsets": args.kid_subsets}  # fmt: skip
    results = []
    for device in devices:
        t0 = time.perf_counter()
        reference = compute_reference(
            classifier,
            train,
            test,
            test_labels=test_labels,
            k=args.k,
            num_samples=len(samples),
            is_splits=args.is_splits,
            seed=0,
            kid_subsets=args.kid_subsets,
            device=device,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        flat = evaluate_samples(samples, classifier, reference, is_splits=args.is_splits,
                                seed=0).flat()  # fmt: skip
        t2 = time.perf_counter()
        results.append({"device": str(device), "reference_seconds": round(t1 - t0, 2),
                        "evaluate_seconds": round(t2 - t1, 2), "metrics": flat})  # fmt: skip
        print(f"{device}: reference {t1 - t0:.1f} s, samples scored in {t2 - t1:.1f} s")
    base = results[0]["metrics"]
    for r in results[1:]:
        diff = {k: abs(float(v) - float(base[k])) for k, v in r["metrics"].items()}
        r["max_abs_diff_from_first"] = diff
        worst = sorted(diff.items(), key=lambda kv: -kv[1])[:5]
        print(f"{r['device']} vs {results[0]['device']}: largest differences "
              + ", ".join(f"{k} {v:.2e}" for k, v in worst))  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "samples": len(samples),
        "settings": settings,
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (BenchError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "evaluate_device.json", report)
    print(f"wrote {out / 'evaluate_device.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
