"""``mnist-gan``: the project's command, installed with it.

    mnist-gan generate --model MODEL -n 64 [--digit 7] [--seed 0] --out grid.png

MODEL is a GAN folder (``models/gan``), a run's logged model (``runs:/RUN_ID/generator``) or a
registered one (``models:/mnist-gan-generator@champion``, ``models:/mnist-gan-generator/3``).
URIs are resolved in the tracking store the pipeline's stages use (``mnist_gan.project``, one
resolver for both): ``MLFLOW_TRACKING_URI``, else ``mlflow.db`` at the project root (the nearest
folder up from here holding ``dvc.yaml``, or the project a DVC experiment's temporary copy
belongs to).

This package is glue, like ``pipeline/``: it uses click and MLflow, which the ``mnist_gan``
library never imports.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import click
import numpy as np
import torch

from mnist_gan.models import load_generator
from mnist_gan.project import tracking_uri
from mnist_gan.sampling import balanced_labels, generate_samples
from mnist_gan.utils import atomic_dir, atomic_path

__all__ = ["generate", "main", "tracking_uri"]

URI_SCHEMES = ("runs:/", "models:/")


def _load(model: str, workdir: Path) -> tuple[torch.nn.Module, object]:
    """The generator and its train params from a folder or an MLflow model URI."""
    if not model.startswith(URI_SCHEMES):
        return load_generator(Path(model))
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ValueError(f"--model {model}: there is no tracking store at {uri} (run the "
                         "pipeline first, or set MLFLOW_TRACKING_URI)")  # fmt: skip
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # models:/ URIs resolve in the same store
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(workdir)))
    except (MlflowException, OSError) as exc:
        why = " ".join(str(exc).split())[:200]
        raise ValueError(
            f"--model {model}: not found in the tracking store {uri} ({why})"
        ) from None
    folder = local / "artifacts" / "gan"  # the pyfunc model's copy of models/gan
    if not folder.is_dir():
        raise ValueError(f"--model {model}: not a mnist-gan generator model (no artifacts/gan)")
    return load_generator(folder)


def _out_kind(out: Path) -> str:
    """What ``--out`` names: "npy", "png" or "folder"; a clear error for anything else.

    A folder is replaced as a whole, so an existing one must be empty or hold only what this
    command writes there (``00000.png``, ...): ``--out .`` never deletes a project.
    """
    suffix = out.suffix.lower()
    if suffix in (".npy", ".png") and not out.is_dir():
        return suffix[1:]
    if suffix and not out.is_dir():
        raise click.BadParameter(
            f"{out}: give a .png file (a grid), a .npy file (an array) or a folder",
            param_hint="--out",
        )
    if out.exists() and not out.is_dir():
        raise click.BadParameter(
            f"{out} is a file, not a folder: name a .png, a .npy or a folder", param_hint="--out"
        )
    if out.name in ("", ".", "..") or out.resolve() == Path.cwd().resolve():
        raise click.BadParameter(
            f"{out}: name a folder for the images (it is replaced as a whole), not the current one",
            param_hint="--out",
        )
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if not _OURS.fullmatch(p.name)]
        if foreign:
            raise click.BadParameter(
                f"{out} is a folder holding other files ({', '.join(sorted(foreign)[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); it would be replaced: name a new or an "
                "empty folder",
                param_hint="--out",
            )
    return "folder"


_OURS = re.compile(r"\d{5,}\.png")  # the files of an earlier --out FOLDER


def _write(images: torch.Tensor, out: Path, kind: str) -> None:
    """Images (N, 1, 28, 28) in [-1, 1] as a PNG grid, a .npy array or a folder of PNGs."""
    from torchvision.utils import save_image

    if kind == "npy":
        with atomic_path(out) as tmp, tmp.open("wb") as f:
            np.save(f, images.numpy())  # float32 (N, 1, 28, 28) in [-1, 1]
    elif kind == "png":
        nrow = max(1, round(len(images) ** 0.5))
        with atomic_path(out) as tmp:
            save_image(images, tmp, nrow=nrow, normalize=True, value_range=(-1, 1), format="png")
    else:  # a folder, replaced as a whole
        with atomic_dir(out) as tmp:
            for i, image in enumerate(images):
                save_image(image, tmp / f"{i:05d}.png", normalize=True, value_range=(-1, 1))


@click.group(help=__doc__.split("\n\n")[0])
def main() -> None:
    """The project's command."""


@main.command()
@click.option(
    "--model",
    required=True,
    help="models/gan, runs:/RUN_ID/generator or models:/mnist-gan-generator@champion.",
)
@click.option(
    "-n",
    "num",
    type=click.IntRange(1, 100_000),
    default=64,
    show_default=True,
    help="How many images.",
)
@click.option(
    "--digit",
    type=click.IntRange(0, 9),
    help="The digit to draw (a conditional model only); default: any.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the noise: the same seed gives the same images.",
)
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="grid.png (a square grid), samples.npy (float32 N x 1 x 28 x 28 in [-1, 1]) "
                   "or a folder (one PNG per image).")  # fmt: skip
def generate(model: str, num: int, digit: int | None, seed: int, out: Path) -> None:
    """Draw images from a trained generator."""
    kind = _out_kind(out)
    with tempfile.TemporaryDirectory() as workdir:
        try:
            generator, cfg = _load(model, Path(workdir))
        except (OSError, ValueError) as exc:
            sys.exit(f"error: {exc}")
    if digit is not None and not cfg.conditional:
        sys.exit(f"error: --digit {digit}: {model} is an unconditional generator (it was not "
                 "trained with train.conditional: true); leave --digit out")  # fmt: skip
    labels = None
    if cfg.conditional:  # the digit asked for, or every digit in turn
        labels = torch.full((num,), digit) if digit is not None else balanced_labels(num)
    # The evaluate stage's sampler: noise seeded on the CPU, drawn in batches.
    try:
        images = generate_samples(
            generator, num, latent_dim=cfg.latent_dim, seed=seed, labels=labels
        )
    except ValueError as exc:  # e.g. weights that make NaN
        sys.exit(f"error: {model}: {exc}")
    _write(images, out, kind)
    what = f"digit {digit}" if digit is not None else "images"
    click.echo(f"wrote {num} {what} from {model} to {out}", err=True)
