"""The evaluate stage's figures: sample grids, a grid per predicted digit, nearest neighbours.

Plain PyTorch and Pillow (no plotting library): images (N, 1, 28, 28) in [-1, 1] become 8-bit
grey pictures with a few text labels. The PNG bytes depend only on the pixels, so the figures
are as deterministic as the samples.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from mnist_gan.utils import atomic_path

__all__ = ["class_grid", "image_grid", "neighbour_figure", "sample_grid", "save_png"]

PAD = 2
PAD_VALUE = 96  # grey between the tiles, distinct from black background and white strokes
LABEL_W = 110  # width of the text column on the left
SIDE = 28


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def image_grid(images: Tensor, nrow: int, pad: int = PAD) -> Image.Image:
    """Tile images (N, 1, 28, 28) in [-1, 1] into rows of ``nrow``, as a greyscale picture."""
    n = len(images)
    rows = max(1, -(-n // nrow))
    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    canvas = torch.full(
        (rows * (SIDE + pad) + pad, nrow * (SIDE + pad) + pad), PAD_VALUE, dtype=torch.uint8
    )
    for i in range(n):  # at most a few hundred tiles: a figure, not the metric computation
        r, c = divmod(i, nrow)
        y, x = pad + r * (SIDE + pad), pad + c * (SIDE + pad)
        canvas[y : y + SIDE, x : x + SIDE] = pixels[i, 0]
    return Image.fromarray(canvas.numpy(), mode="L")


def sample_grid(images: Tensor, nrow: int = 10, count: int = 100) -> Image.Image:
    """The first ``count`` samples, ``nrow`` per row."""
    return image_grid(images[:count], nrow)


def class_grid(images: Tensor, predictions: Tensor, per_class: int = 12) -> Image.Image:
    """One row per digit: the first ``per_class`` samples the classifier calls that digit.

    The label gives the digit's share of all samples; a missing digit leaves an empty row.
    """
    counts = torch.bincount(predictions, minlength=10)
    total = max(int(counts.sum()), 1)
    row_h = SIDE + PAD
    width = LABEL_W + per_class * (SIDE + PAD) + PAD
    canvas = Image.new("L", (width, 10 * row_h + PAD), color=0)
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for digit in range(10):
        chosen = images[predictions == digit][:per_class]
        y = PAD + digit * row_h
        label = f"{digit}: {int(counts[digit])} ({100 * int(counts[digit]) / total:.1f}%)"
        draw.text((4, y + 8), label, fill=255, font=font)
        if len(chosen):
            canvas.paste(image_grid(chosen, per_class), (LABEL_W, y - PAD))
    return canvas


def neighbour_figure(
    samples: Tensor,
    neighbours: Tensor,
    distances: Tensor,
    threshold: float,
    count: int = 12,
) -> Image.Image:
    """Generated samples above their nearest training images.

    Two panels: the ``count`` samples closest to the training set (the likeliest copies), and
    the first ``count`` samples (a random draw). Each panel is a row of samples over a row of
    their nearest training images, with the distances and the near-copy threshold.

    Args:
        samples: (N, 1, 28, 28) generated images.
        neighbours: (N, 1, 28, 28) each sample's nearest training image.
        distances: (N,) the distances between them (memorisation space).
        threshold: The near-copy distance.
        count: Pairs per panel.
    """
    count = min(count, len(samples))
    closest = torch.argsort(distances, stable=True)[:count]
    first = torch.arange(count)
    font = _font()
    tile = SIDE + PAD
    width = LABEL_W + count * tile + PAD
    panel_h = 16 + 2 * tile + 14
    canvas = Image.new("L", (width, 2 * panel_h + PAD), color=0)
    draw = ImageDraw.Draw(canvas)
    titles = (
        f"closest to the training set (near-copy: distance < {threshold:.2f})",
        "random samples",
    )
    for p, (idx, title) in enumerate(zip((closest, first), titles, strict=True)):
        y0 = p * panel_h
        draw.text((4, y0 + 2), title, fill=255, font=font)
        canvas.paste(image_grid(samples[idx], count), (LABEL_W, y0 + 14))
        canvas.paste(image_grid(neighbours[idx], count), (LABEL_W, y0 + 14 + tile))
        draw.text((4, y0 + 14 + 10), "sample", fill=255, font=font)
        draw.text((4, y0 + 14 + tile + 10), "nearest train", fill=255, font=font)
        mean = float(distances[idx].mean()) if count else float("nan")
        draw.text(
            (LABEL_W, y0 + 14 + 2 * tile + 1),
            f"distance: mean {mean:.2f}, min {float(distances[idx].min()):.2f}",
            fill=200,
            font=font,
        )
    return canvas


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write ``image`` as PNG atomically (no timestamps or other metadata)."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", optimize=False)
