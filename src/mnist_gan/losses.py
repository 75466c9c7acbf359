"""GAN losses, all computed on the discriminator's logits in float32.

The article applied a sigmoid in the discriminator and then ``from_logits=True`` in the loss,
squashing twice. Here the discriminator returns raw logits and every loss is written with
``softplus``, which is exact and finite for any finite logit:
``-log(sigmoid(x)) = softplus(-x)`` and ``-log(1 - sigmoid(x)) = softplus(x)``.

- ``bce``: the discriminator's binary cross-entropy; the generator's non-saturating loss
  ``-log D(G(z))`` (the article's code).
- ``minimax``: the same discriminator loss; the generator minimises ``log(1 - D(G(z)))``, the
  original saturating objective (the article's formula). Its value is <= 0.
- ``hinge``: ``relu(1 - real) + relu(1 + fake)`` for the discriminator, ``-fake`` for the
  generator.

One-sided label smoothing replaces the discriminator's real targets 1 with ``1 - s``; it is
defined for the cross-entropy losses only (``TrainParams`` rejects it with ``hinge``).

:func:`r1_penalty` is the regulariser that ``train.r1_gamma`` adds to any of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "discriminator_loss", "generator_loss", "r1_penalty"]

LOSSES = ("bce", "minimax", "hinge")


def _check(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"train.loss: unknown loss {kind!r} (expected one of {', '.join(LOSSES)})")


def discriminator_loss(
    kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """The discriminator's loss: the mean over real plus the mean over fake samples.

    Args:
        kind: ``bce``, ``minimax`` or ``hinge``.
        real_logits: Logits (B,) on real images.
        fake_logits: Logits (B,) on generated images.
        label_smoothing: Real targets become ``1 - label_smoothing`` (cross-entropy losses).

    Returns:
        A scalar float32 tensor.
    """
    _check(kind)
    real, fake = real_logits.float(), fake_logits.float()
    if kind == "hinge":
        return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
    target = 1.0 - label_smoothing
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x)
    real_loss = target * F.softplus(-real) + (1.0 - target) * F.softplus(real)
    return real_loss.mean() + F.softplus(fake).mean()


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's loss on the discriminator's logits (B,) for generated images.

    Args:
        kind: ``bce`` (non-saturating), ``minimax`` (saturating) or ``hinge``.
        fake_logits: Logits (B,) on generated images.

    Returns:
        A scalar float32 tensor.
    """
    _check(kind)
    fake = fake_logits.float()
    if kind == "bce":
        return F.softplus(-fake).mean()  # -log(sigmoid(x))
    if kind == "minimax":
        return -F.softplus(fake).mean()  # log(1 - sigmoid(x))
    return -fake.mean()


def r1_penalty(real_logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al. 2018): the mean over the real images of ``||grad_x D(x)||^2``.

    Args:
        real_logits: D's logits (B,) on ``real``.
        real: The real images (B, 1, 28, 28) D judged, with ``requires_grad``.

    Returns:
        A scalar float32 tensor with a graph back to D's weights (``create_graph``: a
        backward through it is a double backward, so D's update follows the penalty too).
    """
    (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    return grad.float().square().sum(dim=(1, 2, 3)).mean()
