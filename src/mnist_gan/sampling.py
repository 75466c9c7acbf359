"""Drawing images from a generator: seeded noise in batches, and the digits a conditional one is
asked for. The evaluate stage and the ``mnist-gan generate`` command sample the same way."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mnist_gan.data import NUM_CLASSES
from mnist_gan.metrics import check_images

__all__ = ["balanced_labels", "generate_samples"]


def balanced_labels(n: int) -> Tensor:
    """``n`` digits, each as often as the others (0, 1, ..., 9, 0, 1, ...): what a conditional
    generator is asked for when it is judged."""
    return torch.arange(n) % NUM_CLASSES


@torch.no_grad()
def generate_samples(
    generator: nn.Module,
    num_samples: int,
    *,
    latent_dim: int,
    seed: int,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    labels: Tensor | None = None,
) -> Tensor:
    """Draw ``num_samples`` images (N, 1, 28, 28) from ``generator`` with z ~ N(0, I), seeded.

    The noise is drawn on the CPU from its own generator, so the samples do not depend on the
    device or on what else used the global RNG.

    Args:
        generator: The generator (put in eval mode here); called as ``generator(z)``, or
            ``generator(z, y)`` with ``labels``.
        num_samples: How many images.
        latent_dim: Width of z.
        seed: Seed of the noise: the same seed gives the same images.
        batch_size: Images per forward pass.
        device: Where the forward passes run; the images are returned on the CPU.
        labels: (N,) the digits to ask a conditional generator for (e.g.
            :func:`balanced_labels`).

    Raises:
        ValueError: The generator made something other than finite (N, 1, 28, 28) images.
    """
    rng = torch.Generator().manual_seed(seed)
    generator.eval()
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        z = torch.randn(n, latent_dim, generator=rng).to(device)  # (n, latent_dim)
        y = None if labels is None else labels[start : start + n].to(device)  # (n,)
        images = generator(z) if y is None else generator(z, y)  # (n, 1, 28, 28)
        out.append(images.float().cpu())
    images = torch.cat(out)
    check_images(images, "generator output")
    return images
