"""Stage `classifier`: train the evaluator CNN whose features and logits judge the GAN.

Reads DATA/train.safetensors and DATA/test.safetensors; writes OUT (classifier.safetensors and
config.json: params, seed, architecture) and METRICS (test accuracy and loss, last train loss).
Deterministic on the CPU for a given params.yaml. Nothing is written when the data is bad.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
from common import PARAMS_OPTION, file_option, folder_option, load_or_exit

from mnist_gan.classifier import EpochStats, save_classifier, train_classifier
from mnist_gan.data import DataError, load_normalized
from mnist_gan.utils import atomic_dir, resolve_device, set_threads, write_json


@click.command(help=__doc__)
@folder_option(
    "--data",
    "Folder holding train.safetensors and test.safetensors (the normalize stage's output).",
)
@folder_option(
    "--out",
    "Classifier folder (replaced only on success), e.g. models/classifier.",
)
@file_option(
    "--metrics",
    "JSON file for the test accuracy and loss, e.g. metrics/classifier.json.",
)
@PARAMS_OPTION
def main(data: Path, out: Path, metrics: Path, params_file: Path) -> None:
    """Train the evaluator classifier on DATA and save it to OUT."""
    params = load_or_exit(params_file)
    cfg, seed = params.classifier, params.base.seed
    try:
        set_threads(params.base.threads)
        device = resolve_device(params.base.device)
        train_images, train_labels = load_normalized(data / "train.safetensors")
        test_images, test_labels = load_normalized(data / "test.safetensors")
    except (DataError, RuntimeError) as exc:
        sys.exit(f"error: {exc}")

    def report(stats: EpochStats) -> None:
        click.echo(
            f"epoch {stats.epoch}/{cfg.epochs}: train loss {stats.train_loss:.4f}, "
            f"test loss {stats.test_loss:.4f}, test accuracy {stats.test_accuracy:.4%}",
            err=True,
        )

    start = time.perf_counter()
    model, final = train_classifier(
        train_images, train_labels, test_images, test_labels, cfg, seed, device, on_epoch=report
    )
    with atomic_dir(out) as tmp:
        save_classifier(model, tmp, cfg, seed)
    write_json(
        metrics,
        {
            "test_accuracy": round(final.test_accuracy, 6),
            "test_loss": round(final.test_loss, 6),
            "train_loss": round(final.train_loss, 6),
        },
    )
    click.echo(
        f"classifier: test accuracy {final.test_accuracy:.4%} after {cfg.epochs} epochs "
        f"in {time.perf_counter() - start:.0f} s; saved to {out}",
        err=True,
    )


if __name__ == "__main__":
    main()
