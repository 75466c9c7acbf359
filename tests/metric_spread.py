"""How far the values that test_metrics.py and test_classifier.py bound move with the evaluator.

Those tests train a quick evaluator in the test process (``evalkit.quick_classifier``, seed 0).
Another CPU model rounds its float sums differently and so trains other weights; a new seed is
a larger change of the same kind (other initial weights, another order of the data). This script
trains the evaluator with several seeds, measures every bounded value with each, and prints its
range beside the bound the test uses, so a bound can be set with a margin that holds on any CPU.

    python tests/metric_spread.py [--seeds 0-9] [--mirror ../shared/mnist] [--full]

With ``--full`` it trains the default classifier on all of MNIST instead (the slow test's
accuracy and Inception Score bounds; minutes per seed).

It is a tool for whoever changes a bound, not a test (pytest collects only ``test_*.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

import test_metrics as T  # noqa: E402
from evalkit import quick_classifier, real_mnist  # noqa: E402

from mnist_gan.classifier import evaluate_classifier, train_classifier  # noqa: E402
from mnist_gan.metrics import inception_score  # noqa: E402
from mnist_gan.params import ClassifierParams  # noqa: E402

# name: (bound, direction). "<" means the test asserts value < bound, ">" value > bound.
BOUNDS: dict[str, tuple[float, str]] = {
    "quick accuracy (test[5000:])": (0.93, ">"),
    "mirrored fid (torchmetrics test)": (1.0, ">"),
    "halves: noisy / halves fid": (50.0, ">"),
    "one digit: modes": (1, "="),
    "one digit: class_kl": (3.0, ">"),
    "one digit: recall": (0.4, "<"),
    "one digit: coverage": (0.15, "<"),
    "one digit: fid / real fid": (10.0, ">"),
    "real: modes": (10, "="),
    "real: class_kl": (0.05, "<"),
    "real: recall": (0.8, ">"),
    "real: coverage": (0.4, ">"),
    "real: precision": (0.6, ">"),
    "unseen: modes": (10, "="),
    "unseen: precision": (0.6, ">"),
    "unseen: recall": (0.6, ">"),
    "by digit: label_accuracy": (0.9, ">"),
    "noise: fid / real fid": (50.0, ">"),
    "noise: coverage": (0.05, "<"),
    "noise: recall": (0.05, "<"),
    "noise: is_mean": (1.5, "<"),
    # Not bounded by the test: all-or-nothing for a tight cluster of samples (see there).
    "noise: precision": (math.nan, ""),
    "noise: density": (math.nan, ""),
}


def measure(mnist: dict, seed: int) -> dict[str, float]:
    """Every bounded value, with the quick evaluator trained from ``seed``."""
    ev = quick_classifier(MIRROR, seed)
    images, labels = mnist["test"]
    _, accuracy = evaluate_classifier(ev, images[5000:], labels[5000:])
    real_f, _ = T.embed(ev, images[:600])
    fake_f, _ = T.embed(ev, mnist["train"][0][:600].flip(-1))
    halves, noisy = T.halves_and_noise(mnist, ev)
    one = T.one_digit(mnist, ev)
    unseen = T.unseen(mnist, ev).samples.metrics
    noise = T.uniform_noise(mnist, ev)
    got, real = one.samples.metrics, one.reference
    return {
        "quick accuracy (test[5000:])": accuracy,
        "mirrored fid (torchmetrics test)": T.M.frechet_distance(real_f, fake_f),
        "halves: noisy / halves fid": noisy / halves,
        "one digit: modes": got["modes"],
        "one digit: class_kl": got["class_kl"],
        "one digit: recall": got["recall"],
        "one digit: coverage": got["coverage"],
        "one digit: fid / real fid": got["fid"] / real["fid"],
        "real: modes": real["modes"],
        "real: class_kl": real["class_kl"],
        "real: recall": real["recall"],
        "real: coverage": real["coverage"],
        "real: precision": real["precision"],
        "unseen: modes": unseen["modes"],
        "unseen: precision": unseen["precision"],
        "unseen: recall": unseen["recall"],
        "by digit: label_accuracy": by_digit(mnist, ev),
        "noise: fid / real fid": noise.samples.metrics["fid"] / noise.reference["fid"],
        "noise: coverage": noise.samples.metrics["coverage"],
        "noise: recall": noise.samples.metrics["recall"],
        "noise: is_mean": noise.samples.metrics["is_mean"],
        "noise: precision": noise.samples.metrics["precision"],
        "noise: density": noise.samples.metrics["density"],
    }


def measure_full(mnist: dict, seed: int) -> dict[str, float]:
    """The slow test's values: the default classifier trained on all of MNIST from ``seed``."""
    (train_x, train_y), (test_x, test_y) = mnist["train"], mnist["test"]
    model, stats = train_classifier(train_x, train_y, test_x, test_y, ClassifierParams(), seed)
    _, logits = T.embed(model, test_x)
    return {"full accuracy": stats.test_accuracy, "full IS": inception_score(logits, 10)[0]}


FULL_BOUNDS = {"full accuracy": (0.992, ">"), "full IS": (9.5, ">")}


def by_digit(mnist: dict, ev: object) -> float:
    """label_accuracy of the perfect conditional stand-in (test_label_accuracy_...)."""
    images, labels = mnist["test"]
    digits = T.S.balanced_labels(1000)
    gen = T._ByDigit(images[T.OTHERS], labels[T.OTHERS])
    samples = T.S.generate_samples(gen, 1000, latent_dim=8, seed=0, batch_size=256, labels=digits)
    reference = T._reference(ev, mnist, 1000, test_labels=labels[T.REFERENCE])
    result = T._evaluate(samples, ev, mnist, labels=digits, reference=reference)
    return result.samples.metrics["label_accuracy"]


def seed_list(text: str) -> list[int]:
    """``0-9`` or ``0,3,5``."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",")]


def main() -> int:
    global MIRROR
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=seed_list, default=seed_list("0-9"))
    default = os.environ.get("MNIST_MIRROR", "").split(",")[0] or "../shared/mnist"
    parser.add_argument("--mirror", type=Path, default=Path(default))
    parser.add_argument("--full", action="store_true", help="the full classifier's bounds")
    args = parser.parse_args()
    bounds, measure_one = (FULL_BOUNDS, measure_full) if args.full else (BOUNDS, measure)
    MIRROR = args.mirror.resolve()
    torch.set_num_threads(1)  # as in the test suite
    mnist = real_mnist(MIRROR)
    rows: dict[str, list[float]] = {name: [] for name in bounds}
    start = time.perf_counter()
    for seed in args.seeds:
        values = measure_one(mnist, seed)
        for name, value in values.items():
            rows[name].append(value)
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print(f"{'value':34} {'min':>9} {'max':>9}  bound  (seeds {args.seeds[0]}-{args.seeds[-1]})")
    for name, (bound, op) in bounds.items():
        lo, hi = min(rows[name]), max(rows[name])
        print(
            f"{name:34} {lo:9.4g} {hi:9.4g}  {op} {bound:g}"
            if op
            else f"{name:34} {lo:9.4g} {hi:9.4g}"
        )
    return 0


MIRROR = Path()

if __name__ == "__main__":
    sys.exit(main())
