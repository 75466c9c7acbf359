"""The optimizer side of a training step: learning-rate scaling and Adam, as fast as it runs.

:func:`make_adam` builds the fused Adam (one kernel for all of a network's weights, also on the
CPU); :func:`adam_step` runs its step, on the CPU as the bare kernel (without the wrapping that
costs more than the update itself for the mlp's small weights). The trainer builds the
optimizers; both training steps, :func:`mnist_gan.step.gan_step` and
:class:`mnist_gan.mlp_step.MLPStep`, step them through :func:`adam_step`.
"""

from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["REFERENCE_BATCH", "adam_step", "make_adam", "scaled_lr"]

# The batch size lr_g and lr_d are tuned for (the article's); train.lr_scaling scales from it.
REFERENCE_BATCH = 128


def scaled_lr(lr: float, batch_size: int, rule: str) -> float:
    """The learning rate for ``batch_size`` under ``train.lr_scaling``.

    ``lr_g`` and ``lr_d`` are tuned for batch 128. A larger batch gives fewer, less noisy
    steps; ``sqrt`` multiplies the rate by ``sqrt(batch_size / 128)``, the square-root rule that
    keeps Adam's update noise the same (Malladi et al., "On the SDEs and Scaling Rules for
    Adaptive Gradient Algorithms", NeurIPS 2022); ``linear`` by ``batch_size / 128`` (Goyal et
    al. 2017, for SGD; usually too aggressive for Adam); ``none`` keeps it.
    """
    ratio = batch_size / REFERENCE_BATCH
    if rule == "sqrt":
        return lr * ratio**0.5
    if rule == "linear":
        return lr * ratio
    return lr


def make_adam(
    params: list[nn.Parameter],
    lr: float | torch.Tensor,
    betas: tuple[float, float],
    capturable: bool,
):
    """Fused Adam (one kernel per step, also on the CPU) where this PyTorch has it."""
    try:
        return torch.optim.Adam(params, lr, betas, fused=True, capturable=capturable)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr, betas, capturable=capturable)


# Per optimizer: the tensor holding its step counters, and the views of it that its state holds.
_STEP_COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_counters(
    opt: torch.optim.Optimizer, states: list[dict[str, Any]]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One tensor whose elements are the ``step`` counters of ``states`` (``opt``'s state), and
    the counters themselves: the views of it that the states hold, in order.

    Adam keeps a 0-d float32 ``step`` per weight, all equal, which its fused path increments
    one tensor at a time (measured: 13 us for G's 14 on the CPU, against 2 us for one add). The
    first call stacks them into one tensor and puts a view of it in each state, so that one
    in-place add increments them all; later calls reuse it while the state still holds exactly
    those views (``opt.load_state_dict`` replaces them: the next call stacks again). The views
    are ordinary 0-d tensors to ``opt.step()``, ``state_dict()`` and ``torch.save``.
    """
    steps = [s["step"] for s in states]
    cached = _STEP_COUNTERS.get(opt)
    if (
        cached is not None
        and len(cached[1]) == len(steps)
        and all(map(operator.is_, cached[1], steps))
    ):
        return cached
    counters = torch.stack(steps)
    views = counters.unbind()
    for state, view in zip(states, views, strict=True):
        state["step"] = view
    _STEP_COUNTERS[opt] = (counters, views)
    return counters, views


def adam_step(opt: torch.optim.Optimizer) -> None:
    """``opt.step()``; for a fused Adam on the CPU, its kernel called without the wrapping.

    ``torch.optim.Adam(fused=True).step()`` wraps its one kernel (``torch._fused_adam_``) in
    hooks, profiling and the grouping of its tensors by device and dtype: measured on one
    thread of this project's Xeon for D's 333k weights, 432 us a step, of which the step
    counters and the kernel take 292 us. Once the optimizer has state for every weight, this
    calls the same kernel with the same arguments on the optimizer's own state tensors, so the
    update is bit-identical and ``opt.state_dict()`` stays the whole state (tested). Anything
    else (the first step, which creates the state; a GPU; a tensor learning rate or betas, as
    a CUDA graph's capturable Adam has; several parameter groups; options the trainer does not
    use) goes through ``opt.step()``. It runs no optimizer hooks: the trainer registers none.
    """
    group = opt.param_groups[0]
    params = group["params"]
    if not (
        type(opt) is torch.optim.Adam
        and len(opt.param_groups) == 1
        and group["fused"]
        and not any(group[k] for k in ("amsgrad", "maximize", "capturable", "differentiable"))
        and not group.get("decoupled_weight_decay", False)
        and not any(isinstance(v, torch.Tensor) for v in (group["lr"], *group["betas"]))
        and hasattr(torch, "_fused_adam_")
    ):
        opt.step()
        return
    states = [opt.state.get(p) for p in params]
    if not all(states) or any(p.grad is None or p.device.type != "cpu" for p in params):
        opt.step()
        return
    counters, steps = _step_counters(opt, states)
    counters.add_(1)  # as Adam's fused path does, before the kernel
    beta1, beta2 = group["betas"]
    torch._fused_adam_(
        params,
        [p.grad for p in params],
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        list(steps),
        amsgrad=False,
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        maximize=False,
    )
