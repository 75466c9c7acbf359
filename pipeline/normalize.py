"""Stage `normalize`: validate the raw IDX files and write float32 [-1, 1] tensors.

Writes OUT/train.safetensors and OUT/test.safetensors (`images` (N, 1, 28, 28) float32,
`labels` (N,) int64) and flat statistics (counts per class, mean, std, min, max) to METRICS.
A malformed input is an error naming the file and the defect; nothing is written then.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from common import PARAMS_OPTION, file_option, folder_option, load_or_exit

from mnist_gan.data import DataError, dataset_stats, prepare, save_normalized
from mnist_gan.utils import atomic_dir, write_json


@click.command(help=__doc__)
@folder_option(
    "--raw",
    "Folder holding the four decompressed MNIST IDX files (the fetch stage's output).",
)
@folder_option(
    "--out",
    "Folder for train.safetensors and test.safetensors (replaced only on success).",
)
@file_option(
    "--metrics",
    "JSON file for the dataset statistics (e.g. metrics/normalize.json).",
)
@PARAMS_OPTION
def main(raw: Path, out: Path, metrics: Path, params_file: Path) -> None:
    """Normalize the MNIST files in RAW into OUT."""
    params = load_or_exit(params_file).normalize
    try:
        splits = prepare(raw, train_limit=params.train_limit)
    except DataError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        sys.exit(1)
    with atomic_dir(out) as tmp:
        for split, (images, labels) in splits.items():
            save_normalized(tmp / f"{split}.safetensors", images, labels)
    stats = dataset_stats(splits)
    write_json(metrics, stats)
    counts = ", ".join(f"{split} {len(labels)}" for split, (_, labels) in splits.items())
    click.echo(f"normalized {counts} images into {out}", err=True)


if __name__ == "__main__":
    main()
