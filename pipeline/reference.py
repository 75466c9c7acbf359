"""Stage `reference`: the real-data side of every metric, computed once and cached.

Embeds the test set with the classifier in CLASSIFIER (features and logits), finds each test
image's k-th nearest neighbour (k = evaluate.k, the radii of precision, recall, density and
coverage), sets the memorisation threshold from the training set, and scores real data on every
metric the way evaluate scores samples: a fixed subset of evaluate.num_samples training images
(embedded, and kept) against the test set, and held-out test images for memorisation. Writes
OUT: reference.safetensors (the tensors) and reference.json (the settings, the files it was
computed from, and real data's value of every metric, with the classifier's test accuracy as
label_accuracy).

It depends on the data, the classifier, base and evaluate's params only: training a new
generator, or a teammate's evaluation of the same data, reuses it from DVC's cache, and the
evaluate stage scores only the samples.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import click
from common import PARAMS_OPTION, folder_option, load_or_exit

from mnist_gan.classifier import WEIGHTS_FILE, load_classifier
from mnist_gan.data import DataError, load_normalized
from mnist_gan.reference import compute_reference, reference_sources, save_reference
from mnist_gan.utils import atomic_dir, resolve_device, set_threads


@click.command(help=__doc__)
@folder_option("--data", "Folder holding train/test.safetensors.")
@folder_option("--classifier", "Classifier folder (classifier stage).")
@folder_option("--out", "Reference folder (replaced only on success).")
@PARAMS_OPTION
def main(data: Path, classifier: Path, out: Path, params_file: Path) -> None:
    """Compute the real-data reference of every metric."""
    params = load_or_exit(params_file)
    cfg, seed = params.evaluate, params.base.seed
    start = time.perf_counter()
    try:
        set_threads(params.base.threads)
        device = resolve_device(params.base.device)
        train_images, _ = load_normalized(data / "train.safetensors")
        test_images, test_labels = load_normalized(data / "test.safetensors")
        evaluator = load_classifier(classifier)
        reference = compute_reference(
            evaluator, train_images, test_images, test_labels=test_labels, k=cfg.k,
            num_samples=cfg.num_samples, is_splits=cfg.is_splits, seed=seed,
            batch_size=cfg.batch_size, device=device,
        )  # fmt: skip
    except (DataError, OSError, RuntimeError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    # What it was computed from: evaluate refuses it for another classifier or other data.
    found = reference_sources(classifier / WEIGHTS_FILE, data / "train.safetensors",
                              data / "test.safetensors")  # fmt: skip
    with atomic_dir(out) as tmp:
        save_reference(tmp, replace(reference, sources=found))
    seconds = time.perf_counter() - start
    shown = ("fid", "is_mean", "precision", "recall", "coverage", "memorized_fraction")
    click.echo("real data: " + ", ".join(f"{k} {reference.metrics[k]:.4g}" for k in shown),
               err=True)  # fmt: skip
    click.echo(f"computed the reference of {cfg.num_samples} real images in {seconds:.1f} s "
               f"into {out}", err=True)  # fmt: skip


if __name__ == "__main__":
    main()
