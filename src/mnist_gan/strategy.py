"""How the training step runs: chosen once, before the first step, and never changed.

Three of PyTorch's own features make the step faster where they pay, each asked for by a param
of the same name (``true``, ``false`` or ``auto``):

- ``train.amp``: bf16 autocast (no loss scaling needed). ``auto``: wherever bf16 is native, on
  CUDA GPUs from Ampere on and on CPUs with AMX or AVX512-BF16 (on a Zen 4 CPU the mlp step
  measured 1.3x faster than in float32: docs/performance.md); float32 elsewhere.
- ``train.compile``: ``torch.compile`` of G, D, both Adam steps and the EMA update. ``auto``: on
  CUDA, unless ``train.r1_gamma`` asks for its penalty (a double backward, which compiled code
  does not support). On the CPU compiling measured slower than the eager step
  (docs/performance.md).
- ``train.cuda_graph``: the whole step (forward and backward passes, both Adam steps, EMA,
  metrics) captured once as a CUDA graph and replayed. ``auto``: on CUDA in one process (DDP's
  gradient all-reduce is not captured here), unless ``train.r1_gamma`` asks for its penalty:
  capturing its double backward has not been checked on a GPU yet (``benchmarks/gpu_check.sh``
  does), so only ``true`` tries it.

:func:`choose_strategy` turns the params into a :class:`Strategy` for a device. An explicit
``true`` that cannot be met raises :class:`StrategyError`, whose message is one line that says
which param to change; the train stage prints it and exits with code 2. The trainer raises the
same error where compiling or capturing fails at the first step: it never switches strategy
mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mnist_gan.params import TrainParams
from mnist_gan.utils import native_bf16

__all__ = ["EAGER", "Strategy", "StrategyError", "choose_strategy"]


class StrategyError(RuntimeError):
    """An explicitly requested way of running the step cannot be met here."""


@dataclass(frozen=True)
class Strategy:
    """How the trainer runs its step; see the module docstring."""

    amp: bool = False
    compile: bool = False
    cuda_graph: bool = False

    def __str__(self) -> str:
        """In words, as logged to MLflow as ``train.strategy``: e.g. ``compiled cuda_graph
        bf16``; ``eager float32`` with none of them."""
        words = ["compiled" if self.compile else "eager"]
        words += ["cuda_graph"] if self.cuda_graph else []
        return " ".join([*words, "bf16" if self.amp else "float32"])


# The plain step: float32, op by op. What the CPU runs by default, and what tests compare to.
EAGER = Strategy()


def _compiles(device: torch.device) -> str | None:
    """None where ``torch.compile`` works on ``device``; else why not (compiles a tiny
    function: compilation is lazy, and a missing compiler shows only when it runs)."""
    try:
        torch.compile(lambda x: x * 2.0 + 1.0)(torch.ones(4, device=device))
    except Exception as exc:  # backends fail in many ways
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def choose_strategy(cfg: TrainParams, device: torch.device | str, world_size: int = 1) -> Strategy:
    """The strategy ``cfg`` asks for on ``device`` with ``world_size`` training processes.

    Raises:
        StrategyError: ``true`` for something this device, PyTorch or process count lacks.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    where = f"{device.type}" + (f" with {world_size} training processes" if world_size > 1 else "")

    if cfg.amp == "auto":
        amp = native_bf16(device)
    else:
        amp = bool(cfg.amp)
        if amp and not native_bf16(device):
            raise StrategyError(
                f"train.amp: true, but this {device.type} does not compute bf16 natively "
                "(a CUDA GPU from Ampere on, or a CPU with AMX or AVX512-BF16); set it to auto "
                "or false"
            )

    if cfg.cuda_graph == "auto":
        graph = cuda and world_size == 1 and not cfg.r1_gamma
    else:
        graph = bool(cfg.cuda_graph)
        if graph and (not cuda or world_size > 1):
            raise StrategyError(
                f"train.cuda_graph: true needs a CUDA device in one training process; this run "
                f"is on {where}; set it to auto or false"
            )

    if cfg.compile == "auto":
        compile_ = cuda and world_size == 1 and not cfg.r1_gamma and _compiles(device) is None
    else:
        compile_ = bool(cfg.compile)
        if compile_ and cfg.r1_gamma:
            raise StrategyError(
                "train.compile: true, but torch.compile does not support the double backward "
                "of train.r1_gamma's penalty; set compile to auto or false, or r1_gamma to 0"
            )
        why = _compiles(device) if compile_ else None
        if why:
            raise StrategyError(
                f"train.compile: true, but torch.compile fails on {device.type} here ({why}); "
                "set it to auto or false"
            )
    return Strategy(amp=amp, compile=compile_, cuda_graph=graph)
