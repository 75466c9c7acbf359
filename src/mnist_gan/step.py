"""The training step: D's update, G's update through the updated D, then G's EMA and the step's
metrics, as one function (:func:`gan_step`) of everything it reads and updates
(:class:`StepParts`).

This is the step for every configuration, through autograd; :class:`mnist_gan.mlp_step.MLPStep`
is the same step with the mlp's backward passes written out, and ends the same way
(:func:`end_step`). Neither knows how it is run: :mod:`mnist_gan.runners` runs a step op by op
or as a replayed CUDA graph, and :class:`mnist_gan.training.GANTrainer` builds the parts and
chooses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mnist_gan.losses import discriminator_loss, generator_loss
from mnist_gan.optim import adam_step
from mnist_gan.params import TrainParams

__all__ = ["StepParts", "clear_grads", "end_step", "gan_step", "grad_norm"]


def clear_grads(params: list[nn.Parameter]) -> None:
    """What ``opt.zero_grad(set_to_none=True)`` does, without its profiling wrapper (7 us)."""
    for param in params:
        param.grad = None


def grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients, as a device scalar (no synchronisation)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


@dataclass
class StepParts:
    """Everything one training step reads and updates; :func:`gan_step` is the step."""

    cfg: TrainParams
    g_fwd: Callable[..., torch.Tensor]  # G's forward (DDP-wrapped or compiled where so)
    d_fwd: Callable[..., torch.Tensor]  # D's forward in D's update (likewise)
    d_for_g: Callable[..., torch.Tensor]  # D's forward in G's update: D's plain module
    g_params: list[nn.Parameter]
    d_params: list[nn.Parameter]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    # (EMA's float tensors, G's matching ones, EMA's integer buffers, G's), or None without EMA.
    ema: tuple[list[torch.Tensor], list[torch.Tensor], list, list] | None
    fuse_d: bool  # D judges the real and the fake batch in one pass
    autocast: Callable[[], contextlib.AbstractContextManager]


def gan_step(p: StepParts, batch: Mapping[str, torch.Tensor], record: torch.Tensor) -> None:
    """One training step: D's update, G's update through the updated D, then G's EMA.

    Args:
        p: The networks, optimizers and settings.
        batch: ``real`` images (B, 1, 28, 28) and ``z`` (B, latent_dim); when conditional,
            ``y_real`` (B,), the real images' digits, and ``y_fake`` (B,), the digits asked of G.
        record: (6,) tensor that receives the step's METRICS.

    Runs eagerly or under CUDA graph capture alike: it never synchronises with the host and
    never branches on a tensor's value.
    """
    cfg = p.cfg
    real, z = batch["real"], batch["z"]
    y_real, y_fake = batch.get("y_real"), batch.get("y_fake")  # None unless conditional

    # D's update. One generator pass serves both updates (as in pytorch/examples' DCGAN).
    with p.autocast():
        fake = p.g_fwd(z, y_fake)  # (B, 1, 28, 28)
        if p.fuse_d:
            both = torch.cat([real, fake.detach()])
            y = None if y_real is None else torch.cat([y_real, y_fake])
            logits = p.d_fwd(both, y)  # (2B,): the real batch's, then the fake batch's
        else:
            logits = torch.cat([p.d_fwd(real, y_real), p.d_fwd(fake.detach(), y_fake)])
    real_logits, fake_logits = logits.chunk(2)  # (B,) each
    loss_d = discriminator_loss(cfg.loss, real_logits, fake_logits, cfg.label_smoothing)
    clear_grads(p.d_params)
    loss_d.backward(inputs=p.d_params)
    grad_norm_d = grad_norm(p.d_params)
    adam_step(p.opt_d)

    # G's update, through the updated D. inputs= limits backward to G's weights: D's weight
    # gradients are never computed.
    with p.autocast():
        fake_logits_g = p.d_for_g(fake, y_fake)  # (B,)
    loss_g = generator_loss(cfg.loss, fake_logits_g)
    clear_grads(p.g_params)
    loss_g.backward(inputs=p.g_params)
    grad_norm_g = grad_norm(p.g_params)
    adam_step(p.opt_g)

    with torch.no_grad():
        probs = torch.sigmoid(logits.detach().float())
        end_step(p, probs, (loss_d.detach(), loss_g.detach(), grad_norm_g, grad_norm_d), record)


def end_step(
    p: StepParts,
    probs: torch.Tensor,
    values: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    record: torch.Tensor,
) -> None:
    """How every step ends: G's exponential moving average, then the step's METRICS.

    Args:
        p: The step's parts.
        probs: D's probabilities (2B,) in D's update: the real batch's, then the fake batch's.
        values: loss_d, loss_g, grad_norm_g, grad_norm_d (float32 scalars).
        record: (6,) tensor that receives the METRICS.
    """
    if p.ema is not None:
        ema_f, g_f, ema_i, g_i = p.ema
        torch._foreach_lerp_(ema_f, g_f, 1.0 - p.cfg.ema)  # ema += (1 - decay)(g - ema)
        for e, g in zip(ema_i, g_i, strict=True):
            e.copy_(g)
    # Mean D probabilities on the real and on the fake batch; every value is float32.
    d_real, d_fake = probs.view(2, -1).mean(dim=1).unbind()
    loss_d, loss_g, grad_norm_g, grad_norm_d = values
    record.copy_(torch.stack([loss_d, loss_g, d_real, d_fake, grad_norm_g, grad_norm_d]))
