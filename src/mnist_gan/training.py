"""The GAN trainer: device-resident data, no host synchronisation inside a step, resumable.

The normalized training set is copied to the device once. Each epoch draws a permutation on
the device from a seeded ``torch.Generator`` and walks it in ``batch_size`` slices (the last
partial batch is dropped), so no batch ever crosses the host-device boundary. Each step writes
its metrics (losses, mean discriminator probabilities, gradient norms) into a row of a
preallocated device tensor; the host reads that tensor once per epoch. The same read finds the
first step whose loss was not finite (the divergence guard), at no cost inside the step.

The module reads top to bottom: small helpers; :func:`select_step`, which picks the step: the
whole training step through autograd (:func:`mnist_gan.step.gan_step`: D's update, G's update,
the EMA, the metrics, as one function of the parts it updates) or, for the mlp, the same step
with its backward passes written out (:class:`mnist_gan.mlp_step.MLPStep`: no autograd records;
on the CPU op by op, and on a GPU compiled as a whole by ``train.compile``); then
:class:`GANTrainer`, the whole state (networks, EMA, optimizers, generators) and the epoch loop.
How the step runs (op by op, or as a replayed CUDA graph of one step or several) is
:mod:`mnist_gan.runners`, chosen once at construction; Adam and its fast step are
:mod:`mnist_gan.optim`. A benchmark can drive :meth:`GANTrainer.run_steps` for a fixed number of
steps; the train stage calls :meth:`GANTrainer.fit`, which runs epochs, reports each one to a
callback and saves resumable checkpoints through a
:class:`~mnist_gan.checkpoint.CheckpointStore`. Resuming from a checkpoint restores every RNG,
so on the CPU the final weights are bit-identical to an uninterrupted run.

This module uses only PyTorch and numpy (tqdm when installed), so it runs on a GPU machine that
has nothing else.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from mnist_gan import distributed, mlp_step
from mnist_gan.checkpoint import CHECKPOINT_FORMAT, CheckpointStore
from mnist_gan.models import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    build_discriminator,
    build_generator,
    cpu_matmul_math,
    cpu_matmul_precision,
)
from mnist_gan.optim import make_adam, scaled_lr
from mnist_gan.params import TrainParams
from mnist_gan.runners import (
    Batch,
    CudaGraphRunner,
    EagerRunner,
    Step,
    auto_steps_per_replay,
    select_runner,
)
from mnist_gan.step import StepParts, clear_grads, gan_step
from mnist_gan.utils import native_bf16, seed_everything

__all__ = ["METRICS", "DivergenceError", "EpochStats", "GANTrainer", "fixed_noise"]

# What each step records, in this order (one row per step of the epoch).
METRICS = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_g", "grad_norm_d")


def _no_buffer_sync() -> dict[str, bool]:
    """DDP's option that stops it re-broadcasting rank 0's buffers before every forward."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}  # newer PyTorch; broadcast_buffers is deprecated
    return {"broadcast_buffers": False}


class DivergenceError(RuntimeError):
    """A loss became NaN or infinite.

    Attributes:
        epoch: The epoch (1-based) in which it happened.
        step: The step within that epoch (1-based).
        global_step: Steps since the start of training (1-based).
    """

    def __init__(self, epoch: int, step: int, global_step: int, losses: dict[str, float]):
        self.epoch, self.step, self.global_step = epoch, step, global_step
        values = ", ".join(f"{k}={v}" for k, v in losses.items())
        super().__init__(
            f"training diverged: non-finite loss at epoch {epoch}, step {step} "
            f"(global step {global_step}): {values}. Lower the learning rates or try another "
            "loss or stabiliser; the last checkpoint, if any, is kept."
        )


@dataclass(frozen=True)
class EpochStats:
    """What one epoch measured: means over its steps, and its speed."""

    epoch: int
    loss_d: float
    loss_g: float
    d_real: float  # mean D(x) probability on real images
    d_fake: float  # mean D(G(z)) probability on generated images, before the G update
    grad_norm_g: float
    grad_norm_d: float
    images_per_sec: float  # real images seen per second of wall time
    epoch_seconds: float

    def as_dict(self) -> dict[str, float]:
        """The stats as a plain dict (``epoch`` included)."""
        return asdict(self)


def fixed_noise(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """The same z (n, latent_dim) on every device for a seed: for comparable sample grids."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # a bare GPU machine: no bar
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16) and this PyTorch lets
    oneDNN use it for float32 work (``torch.backends.mkldnn.matmul.fp32_precision``, 2.9+)."""
    return cpu_matmul_precision() is not None and native_bf16(torch.device("cpu"))


def amp_bf16(device: torch.device) -> bool:
    """Whether ``train.amp`` computes in bf16 on ``device``: a CUDA GPU with native bf16
    (:func:`~mnist_gan.utils.native_bf16`) or a CPU where :func:`cpu_has_bf16`."""
    if device.type == "cuda":
        return native_bf16(device)
    return device.type == "cpu" and cpu_has_bf16()


def _cpu_bf16_math(enabled: bool) -> contextlib.AbstractContextManager:
    """Within: oneDNN computes float32 matmuls with bf16 inputs and float32 sums.

    The CPU's counterpart of TF32 on GPUs: the tensors, the optimizer and every other op stay
    float32. Convolutions stay float32 too: bf16 math made the dcgan step slower on this
    project's Xeon (227 against 194 ms, 1 thread). A process-wide setting, so it is set around
    the trainer's autograd steps and restored; trainers stepping in several threads at once
    would have to agree on it (nothing in the project does so).
    """
    return cpu_matmul_math("bf16") if enabled else contextlib.nullcontext()


def _can_compile(device: torch.device) -> bool:
    """Whether ``torch.compile`` works on ``device``; False, after a warning, where it cannot
    (no compiler, an old GPU, ...). Compilation is lazy: this compiles a tiny function."""
    try:
        torch.compile(lambda x: x * 2.0 + 1.0)(torch.ones(4, device=device))
    except Exception as exc:  # backends fail in many ways
        warnings.warn(
            f"train.compile: torch.compile is unavailable here ({type(exc).__name__}: "
            f"{exc}); training eagerly",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _compiled(forwards: tuple[Callable[..., torch.Tensor], ...]
              ) -> tuple[Callable[..., torch.Tensor], ...]:  # fmt: skip
    """``torch.compile`` of (G, D in D's update, D's plain module for G's update): what the
    autograd step compiles (the written-out step compiles itself)."""
    # Static shapes: the one-pass D sees 2B images in D's update and B in G's; with dynamic
    # shapes the second size would recompile D into slower symbolic-size kernels for both.
    compile_ = functools.partial(torch.compile, dynamic=False)
    g_fwd, d_fwd, d_plain = forwards
    d_for_g = compile_(d_plain)
    d_fwd = compile_(d_fwd) if d_fwd is not d_plain else d_for_g  # DDP's wrapper, or D
    return compile_(g_fwd), d_fwd, d_for_g


def _has_batch_statistics(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _numpy_state() -> dict[str, Any] | None:
    try:
        import numpy as np
    except ImportError:
        return None
    # numpy's legacy global state: what third-party code draws from, so a resume restores it.
    name, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),  # plain tensors: weights_only loads
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _set_numpy_state(state: dict[str, Any] | None) -> None:
    if state is None:
        return
    import numpy as np

    keys = state["keys"].numpy().astype(np.uint32)
    legacy = (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])
    np.random.set_state(legacy)  # noqa: NPY002


# --- which step, compiled or not -------------------------------------------------------------


def select_step(cfg: TrainParams, device: torch.device, world_size: int, compiled: bool) -> str:
    """Which step function the trainer runs: ``written_out`` or ``autograd``.

    ``written_out`` (:class:`mnist_gan.mlp_step.MLPStep`, the same step with its backward
    passes written out) for the mlp networks, unconditional, without spectral norm, in one
    process (the default configuration), where it pays: on the CPU, where it saves autograd's
    bookkeeping, and compiled on a CUDA GPU, where it compiles as a whole, optimizers included
    (measured on an H200: 0.230 ms a step against 0.470 for autograd's step; run eagerly it
    launches as many kernels as autograd's, 0.472 ms). :func:`~mnist_gan.step.gan_step`
    through autograd everywhere else (its forward passes compiled where ``compiled``). A
    trainer whose ``fuse_d`` is switched off runs ``gan_step``.
    """
    pays = device.type == "cpu" or (device.type == "cuda" and compiled)
    return "written_out" if pays and written_out_covers(cfg, world_size) else "autograd"


def written_out_covers(cfg: TrainParams, world_size: int) -> bool:
    """Whether :class:`mnist_gan.mlp_step.MLPStep` computes this configuration's step: the mlp
    networks, unconditional, without spectral norm, in one process."""
    return world_size == 1 and cfg.model == "mlp" and not cfg.conditional and not cfg.spectral_norm


def compile_asked(cfg: TrainParams, device: torch.device, world_size: int, step: str) -> bool:
    """Whether ``train.compile`` asks for ``torch.compile`` here: ``true``, ``false``, or
    ``auto``: where it is measured to pay, the written-out mlp step on a CUDA GPU (compiling
    costs seconds once; on the CPU it gains nothing and draws other dropout masks)."""
    if cfg.compile != "auto":
        return bool(cfg.compile)
    return device.type == "cuda" and step != "autograd" and written_out_covers(cfg, world_size)


class GANTrainer:
    """Trains one GAN on a tensor of images held on the device.

    Building a trainer seeds ``random``, numpy and torch with ``seed`` and initialises the
    networks from torch's CPU generator (so initial weights do not depend on the device).

    Args:
        cfg: The train params.
        images: float32 (N, 1, 28, 28) in [-1, 1]; copied to ``device`` once.
        labels: int64 (N,) digits of the images; needed (and copied) when ``cfg.conditional``.
        seed: ``base.seed``.
        device: Where to train.
        progress: Show a per-epoch progress bar; None shows one when stderr is a terminal.
        channels_last: Keep the dcgan networks in the channels-last memory format (faster
            convolutions: measured 1.26x on the CPU); None: on for dcgan, off for mlp.
        step: ``auto``: the step :func:`select_step` picks; ``autograd``
            (:func:`~mnist_gan.step.gan_step`) or ``written_out``
            (:class:`~mnist_gan.mlp_step.MLPStep`, where it covers the configuration) on any
            device, to compare the two.
        steps_per_replay: Steps per CUDA graph replay
            (:class:`~mnist_gan.runners.CudaGraphRunner`), from 1 to an epoch's steps, or
            ``auto`` (:func:`~mnist_gan.runners.auto_steps_per_replay`). 1, the default, until
            more is measured on a GPU; runs with other values draw other noise on a GPU.

    The fast path, each part falling back where it is unavailable: the data on the device; fused
    Adam; one pass of D over the real and the fake batch together when D has neither BatchNorm nor
    spectral norm (the default mlp D; not the dcgan D); ``train.amp``: bf16 autocast on CUDA GPUs
    that support bf16, and on CPUs with AMX or AVX512-BF16 bf16 operands in the written-out mlp step
    (:mod:`mnist_gan.mlp_step`) and oneDNN's bf16 math for float32 matmuls in the autograd step
    (which engages only with AMX); on CUDA, the whole D+G step captured once as a CUDA graph and
    replayed (``train.cuda_graph``, :class:`~mnist_gan.runners.CudaGraphRunner`), so a step costs
    three kernel launches from Python instead of hundreds, and with ``train.compile`` (``auto``:
    there, for the mlp) that step is the written-out mlp step compiled as a whole, optimizers
    included (119 kernels instead of 193).

    In a process group of several ranks (DDP, see :mod:`mnist_gan.distributed`), ``images`` is
    the whole training set and each rank keeps its shard (every ``size``-th image from its
    rank on) and trains on ``batch_size / size`` images per step; DDP averages the gradients,
    so the ranks train one model on the global batch. Rank 0 seeds its noise, data order and
    dropout with the seed a single process uses (it draws less of each: its share); every other
    rank has its own seed (:func:`~mnist_gan.distributed.rank_seed`), so a run is reproducible
    for a given number of ranks. G's BatchNorm is synchronised across ranks on GPUs
    (``SyncBatchNorm``, which PyTorch has only for GPUs); on the CPU, and in D, each rank
    normalises over its own images. DDP does not re-broadcast buffers before each forward pass
    (:func:`_no_buffer_sync`: the broadcast would change D's BatchNorm buffers between its
    forward passes and its backward, pytorch/pytorch#175024); the epoch's metrics are averaged
    over the ranks.

    Raises:
        ValueError: The images have the wrong shape, fewer than one batch per rank, or a batch
            size the ranks do not divide.
    """

    def __init__(
        self,
        cfg: TrainParams,
        images: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: bool | None = None,
        channels_last: bool | None = None,
        step: str = "auto",
        steps_per_replay: int | str = 1,
    ) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(
                f"training images have shape {tuple(images.shape)}, want (N, 1, 28, 28)"
            )
        self.rank, self.world_size = distributed.rank_and_size()
        if cfg.batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size: {cfg.batch_size} does not split evenly across "
                f"{self.world_size} training processes"
            )
        self.batch_size = cfg.batch_size // self.world_size  # this rank's share of a batch
        if images.shape[0] // self.world_size < self.batch_size:
            raise ValueError(
                f"train.batch_size: {cfg.batch_size} is larger than the training set "
                f"({images.shape[0]} images)"
            )
        if cfg.conditional and (labels is None or labels.shape != images.shape[:1]):
            raise ValueError("train.conditional: the trainer needs one label per training image")
        self.cfg, self.seed, self.device = cfg, seed, torch.device(device)
        cuda = self.device.type == "cuda"
        # Seeds random, numpy and torch (CPU and CUDA); the returned generator on the device
        # draws the permutations and the noise.
        self.data_generator = seed_everything(seed, self.device)

        self.generator = build_generator(cfg).to(self.device)
        self.discriminator = build_discriminator(cfg).to(self.device)
        if self.rank:  # the same initial weights on every rank; from here, the rank's own RNGs
            self.data_generator = seed_everything(distributed.rank_seed(seed, self.rank), device)
        if self.world_size > 1 and cuda:  # G's batch statistics over the global batch
            self.generator = nn.SyncBatchNorm.convert_sync_batchnorm(self.generator)
        self.channels_last = cfg.model == "dcgan" if channels_last is None else channels_last
        if self.channels_last:  # layout only: the same weights and results
            self.generator.to(memory_format=torch.channels_last)
            self.discriminator.to(memory_format=torch.channels_last)
        # Dropout draws from torch's global RNG. The trainer keeps its own copy of that state and
        # swaps it in around its steps, so other code (a callback, a second trainer) can use the
        # global RNG without changing the training, and a checkpoint captures it exactly.
        self._rng_cpu = torch.get_rng_state()
        self._rng_cuda = torch.cuda.get_rng_state(self.device) if cuda else None
        self.ema_generator: nn.Module | None = None
        if cfg.ema > 0:
            self.ema_generator = copy.deepcopy(self.generator).eval().requires_grad_(False)
        # This rank's shard, equal in size on every rank (one image in ``size`` from ``rank``).
        shard = slice(self.rank, self.world_size * (images.shape[0] // self.world_size),
                      self.world_size)  # fmt: skip
        self.images = images[shard].to(self.device, torch.float32).contiguous()
        self.labels = labels[shard].to(self.device, torch.int64) if cfg.conditional else None
        self.steps_per_epoch = self.images.shape[0] // self.batch_size
        if steps_per_replay == "auto":
            steps_per_replay = auto_steps_per_replay(self.steps_per_epoch)
        if not isinstance(steps_per_replay, int) or not (
            1 <= steps_per_replay <= self.steps_per_epoch
        ):
            raise ValueError(
                f"steps_per_replay: {steps_per_replay!r} is not 'auto' or a whole number of "
                f"steps from 1 to an epoch's {self.steps_per_epoch}"
            )
        self.steps_per_replay = steps_per_replay

        # train.compile: the whole written-out step, or the autograd step's forward passes.
        if step not in ("auto", "autograd", "written_out"):
            raise ValueError(f"step: {step!r} is not one of 'auto', 'autograd', 'written_out'")
        if step == "written_out" and not written_out_covers(cfg, self.world_size):
            raise ValueError(
                "step: 'written_out' covers the mlp networks, unconditional, without spectral "
                "norm, in one process"
            )
        asked = compile_asked(cfg, self.device, self.world_size, step)
        compiling = asked and _can_compile(self.device)
        # The step itself, chosen once: the mlp's backward written out, or autograd.
        self.step_kind = step
        if step == "auto":
            self.step_kind = select_step(cfg, self.device, self.world_size, compiling)
        # How the step runs, chosen once: under a CUDA graph, Adam's step counters (and a
        # decaying learning rate) must live on the GPU, where the graph reads them. The compiled
        # written-out step reads a decaying learning rate from a tensor too (a float would be
        # compiled in as a constant, and each epoch's new rate would recompile the step).
        runner, why_not = select_runner(cfg, self.device, self.world_size)
        if why_not:
            warnings.warn(why_not, RuntimeWarning, stacklevel=2)
        graph = runner == "cuda_graph"
        self._g_params = list(self.generator.parameters())
        self._d_params = list(self.discriminator.parameters())
        betas = (cfg.beta1, cfg.beta2)
        self.lr_g = scaled_lr(cfg.lr_g, cfg.batch_size, cfg.lr_scaling)
        self.lr_d = scaled_lr(cfg.lr_d, cfg.batch_size, cfg.lr_scaling)
        in_graph_adam = compiling and self.step_kind == "written_out"
        self._lr_as_tensor = (graph or in_graph_adam) and cfg.lr_decay != "none"
        self.opt_g = make_adam(self._g_params, self._lr(self.lr_g), betas, graph)
        self.opt_d = make_adam(self._d_params, self._lr(self.lr_d), betas, graph)
        # bf16 needs no loss scaling; GPUs before Ampere and CPUs without AMX or AVX512-BF16
        # lack it and train in float32.
        self.amp = cfg.amp and amp_bf16(self.device)
        self.progress = sys.stderr.isatty() if progress is None else progress

        self._record = torch.zeros(self.steps_per_epoch, len(METRICS), device=self.device)
        self._perm: torch.Tensor | None = None
        self._cursor = 0  # next batch within the current permutation
        self.epoch = 0  # completed epochs
        self.history: list[dict[str, float]] = []  # EpochStats.as_dict() per completed epoch
        # Every rank's RNG states (a checkpoint holds them all), gathered after each epoch.
        self._rank_rngs: list[dict[str, Any]] = []
        self._gather_rngs()

        # G's forward, D's forward in D's update, and D's forward in G's update (through D's
        # plain module under DDP: that backward reaches only G's weights, whose gradients G's
        # DDP wrapper reduces).
        g_fwd: Callable[..., torch.Tensor] = self.generator
        d_fwd: Callable[..., torch.Tensor] = self.discriminator
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids, no_sync = [self.device.index] if cuda else None, _no_buffer_sync()
            g_fwd = DDP(self.generator, device_ids=ids, **no_sync)
            d_fwd = DDP(self.discriminator, device_ids=ids, **no_sync)
        forwards = (g_fwd, d_fwd, self.discriminator)
        self._compiled_forwards = compiling and self.step_kind == "autograd"
        if self._compiled_forwards:
            forwards = _compiled(forwards)
        g_fwd, d_fwd, d_for_g = forwards
        self._parts = StepParts(
            cfg=cfg,
            g_fwd=g_fwd,
            d_fwd=d_fwd,
            d_for_g=d_for_g,
            g_params=self._g_params,
            d_params=self._d_params,
            opt_g=self.opt_g,
            opt_d=self.opt_d,
            ema=self._ema_tensors() if self.ema_generator is not None else None,
            # D's update judges real and fake in one pass (larger matmuls, half the launches)
            # where that is the same computation: not with BatchNorm (real and fake batch
            # statistics would mix) nor spectral norm (each training pass runs one power
            # iteration). Dropout then draws one mask for both halves: the same distribution.
            fuse_d=not (_has_batch_statistics(self.discriminator) or cfg.spectral_norm),
            autocast=self._autocast,
        )
        self._runner: EagerRunner | CudaGraphRunner = self._new_runner(graph)
        self._step_fn: Step = functools.partial(gan_step, self._parts)
        if self.step_kind == "written_out":
            self._step_fn = mlp_step.MLPStep(
                self._parts, self.generator, self.discriminator, self.amp, compiling
            )

    # --- construction helpers -------------------------------------------------------------

    def _lr(self, lr: float) -> float | torch.Tensor:
        """A learning rate as the optimizers hold it here: a device tensor or a float."""
        return torch.tensor(lr, device=self.device) if self._lr_as_tensor else lr

    def _set_lr(self, epoch: int) -> None:
        """The learning rates of ``epoch`` (1-based) under ``train.lr_decay``."""
        if self.cfg.lr_decay == "none":
            return
        factor = 1.0 - (epoch - 1) / self.cfg.epochs
        for opt, lr in ((self.opt_g, self.lr_g), (self.opt_d, self.lr_d)):
            for group in opt.param_groups:
                if isinstance(group["lr"], torch.Tensor):
                    group["lr"].fill_(lr * factor)  # in place: a captured graph reads it
                else:
                    group["lr"] = lr * factor

    def _ema_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list, list]:
        assert self.ema_generator is not None
        ema_p = list(self.ema_generator.parameters())
        ema_b = list(self.ema_generator.buffers())
        g_b = list(self.generator.buffers())
        float_b = [i for i, b in enumerate(g_b) if b.is_floating_point()]
        int_b = [i for i, b in enumerate(g_b) if not b.is_floating_point()]
        return (
            ema_p + [ema_b[i] for i in float_b],
            self._g_params + [g_b[i] for i in float_b],
            [ema_b[i] for i in int_b],
            [g_b[i] for i in int_b],
        )

    def _new_runner(self, graph: bool) -> EagerRunner | CudaGraphRunner:
        if not graph:
            return EagerRunner()
        k, dev = self.steps_per_replay, self.device
        static = self._empty_batches(k)  # the graph's inputs, at fixed addresses
        # The graph's output: each step's METRICS, in rows of 8 floats (32-byte aligned for
        # compiled kernels).
        records = torch.zeros(k, 8, device=dev)[:, : len(METRICS)]
        return CudaGraphRunner(static, records, dev, self._grads_to_none)

    def _grads_to_none(self) -> None:
        clear_grads(self._d_params)
        clear_grads(self._g_params)

    @property
    def math(self) -> str:
        """The matmul math the trainer uses here: ``bf16`` (``train.amp`` where the hardware
        has it) or ``float32``. Part of a checkpoint's
        :func:`~mnist_gan.checkpoint.fingerprint`."""
        return "bf16" if self.amp else "float32"

    @property
    def cpu_bf16_math(self) -> bool:
        """Whether the step runs under oneDNN's bf16 math for float32 matmuls: the autograd step
        on a CPU with ``amp`` (the written-out step takes bf16 operands instead)."""
        return self.amp and self.device.type == "cpu" and self.step_kind == "autograd"

    @property
    def compiled(self) -> bool:
        """Whether the step runs compiled: the written-out step until a part of it fails to
        compile (it then runs eagerly), or the autograd step's compiled forward passes."""
        if isinstance(self._step_fn, mlp_step.MLPStep):
            return self._step_fn.compiled
        return self._compiled_forwards

    @property
    def strategy(self) -> str:
        """How the step runs, in words: the step, ``compiled`` where it is, and ``cuda_graph xK``
        where K steps are one replay (e.g. ``written_out compiled cuda_graph x1``). Before the
        first step, what was chosen; after a fallback (compiling or capture failed), what runs.
        Part of a checkpoint's :func:`~mnist_gan.checkpoint.fingerprint`."""
        words = [self.step_kind] + (["compiled"] if self.compiled else [])
        if self.cuda_graph:
            words.append(f"cuda_graph x{self.steps_per_replay}")
        return " ".join(words)

    @property
    def cuda_graph(self) -> bool:
        """Whether the step runs (or will run, after its warm-up) as a CUDA graph."""
        return isinstance(self._runner, CudaGraphRunner)

    @property
    def fuse_d(self) -> bool:
        """Whether D judges the real and the fake batch in one pass."""
        return self._parts.fuse_d

    @fuse_d.setter
    def fuse_d(self, value: bool) -> None:
        """Switching the one pass off (to compare the two) also leaves the written-out step,
        which judges real and fake in one pass only."""
        self._parts.fuse_d = value
        if not value and self.step_kind == "written_out":
            self.step_kind, self._step_fn = "autograd", functools.partial(gan_step, self._parts)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp and self.device.type == "cuda":
            # A CUDA graph must not reuse autocast's cache of cast weights across replays.
            return torch.autocast(
                device_type=self.device.type,
                dtype=torch.bfloat16,
                cache_enabled=not self.cuda_graph,
            )
        return contextlib.nullcontext()

    # --- one step ----------------------------------------------------------------------------

    def _new_permutation(self) -> None:
        n = self.images.shape[0]
        self._perm = torch.randperm(n, device=self.device, generator=self.data_generator)
        self._cursor = 0

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run with the trainer's own state of torch's global RNG (CPU, and CUDA when used)."""
        outer_cpu = torch.get_rng_state()
        torch.set_rng_state(self._rng_cpu)
        if self._rng_cuda is not None:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self._rng_cuda, self.device)
        try:
            yield
        finally:
            self._rng_cpu = torch.get_rng_state()
            torch.set_rng_state(outer_cpu)
            if self._rng_cuda is not None:
                self._rng_cuda = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    @contextlib.contextmanager
    def _stepping(self) -> Iterator[None]:
        """The trainer's own RNG state and, where :attr:`cpu_bf16_math`, bf16 matmul math."""
        with self._own_rng(), _cpu_bf16_math(self.cpu_bf16_math):
            yield

    def step(self) -> None:
        """One discriminator and one generator update on the next batch; never synchronises.

        A new permutation of the data is drawn when the current one is used up.
        """
        with self._stepping():
            self._steps(1)

    def run_steps(self, n: int) -> None:
        """``n`` steps, as :meth:`step` does them, swapping the RNG state once (for benchmarks);
        on a CUDA graph, whole replays where they fit."""
        with self._stepping():
            self._steps(n)

    def train_step(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One D and one G update on a batch given by the caller, eagerly.

        Args:
            batch: ``real`` (b, 1, 28, 28) and ``z`` (b, latent_dim); when conditional, also
                ``y_real`` and ``y_fake`` (b,). With several ranks, this rank's share.

        Returns:
            The step's METRICS (6,), on the device.
        """
        record = torch.zeros(len(METRICS), device=self.device)
        with self._stepping():
            self._step_fn({k: v.to(self.device) for k, v in batch.items()}, record)
        return record

    def _steps(self, n: int, bar: Any = None) -> None:
        """``n`` steps, handed to the runner in pieces of up to a replay's worth, counted from
        the epoch's start, within an epoch's permutation (a new one is drawn where the current
        one is used up)."""
        b = self.batch_size
        while n > 0:
            if self._perm is None or self._cursor >= self.steps_per_epoch:
                self._new_permutation()
            assert self._perm is not None
            i, per = self._cursor, self._runner.steps
            k = min(n, per - i % per, self.steps_per_epoch - i)  # pieces from the epoch's start
            fill = functools.partial(self._batches, self._perm[i * b : (i + k) * b])
            self._runner = self._runner.run(self._step_fn, fill, self._record[i : i + k])
            self._cursor, n = i + k, n - k
            if bar is not None:
                bar.update(k)

    def _empty_batches(self, n: int) -> Batch:
        """Room for ``n`` steps' inputs, stacked, as :meth:`_batches` fills them."""
        b, dev = self.batch_size, self.device
        out = {
            "real": torch.empty(n, b, *IMAGE_SHAPE, device=dev),
            "z": torch.empty(n, b, self.cfg.latent_dim, device=dev),
        }
        if self.labels is not None:
            out["y_real"] = torch.empty(n, b, dtype=torch.int64, device=dev)
            out["y_fake"] = torch.empty(n, b, dtype=torch.int64, device=dev)
        return out

    def _batches(self, idx: torch.Tensor, out: Batch | None = None) -> Batch:
        """A piece's inputs (``idx``: its steps' images, n batches of B), stacked: ``real``
        images (n, B, 1, 28, 28) and ``z`` (n, B, latent_dim); when conditional, also ``y_real``
        (n, B), the real images' digits, and ``y_fake`` (n, B), the digits asked of G, drawn
        uniformly. One gather and one draw of each for the n steps, written into
        ``out[name][:n]`` (a graph's inputs), else into new tensors."""
        gen, b = self.data_generator, self.batch_size
        n = len(idx) // b
        out = self._empty_batches(n) if out is None else out
        torch.index_select(self.images, 0, idx, out=out["real"][:n].view(n * b, *IMAGE_SHAPE))
        torch.randn(out["z"][:n].shape, generator=gen, out=out["z"][:n])
        if self.labels is not None:
            torch.index_select(self.labels, 0, idx, out=out["y_real"][:n].view(n * b))
            torch.randint(NUM_CLASSES, (n, b), generator=gen, out=out["y_fake"][:n])
        return out

    # --- epochs ------------------------------------------------------------------------------

    def run_epoch(self) -> EpochStats:
        """Train one epoch (a fresh permutation, ``steps_per_epoch`` steps) and measure it.

        Raises:
            DivergenceError: A loss was NaN or infinite at some step of the epoch; the trainer's
                state is then unusable (restore a checkpoint).
        """
        epoch = self.epoch + 1
        bar = _progress(self.steps_per_epoch, f"epoch {epoch}/{self.cfg.epochs}", self.progress)
        start = time.perf_counter()
        self._set_lr(epoch)
        self._new_permutation()
        with self._stepping():
            self._steps(self.steps_per_epoch, bar)
        # (steps, METRICS), averaged over the ranks: the epoch's one synchronisation.
        record = distributed.all_reduce_mean_(self._record).cpu()
        seconds = time.perf_counter() - start
        self._gather_rngs()
        if bar is not None:
            bar.close()
        bad = ~torch.isfinite(record[:, :2]).all(dim=1)
        if bool(bad.any()):
            step = int(bad.nonzero()[0, 0])
            losses = dict(zip(METRICS[:2], record[step, :2].tolist(), strict=True))
            raise DivergenceError(
                epoch, step + 1, self.epoch * self.steps_per_epoch + step + 1, losses
            )
        self.epoch = epoch
        means = record.double().mean(dim=0).tolist()
        images = self.steps_per_epoch * self.cfg.batch_size
        return EpochStats(epoch, *means, images_per_sec=images / seconds, epoch_seconds=seconds)

    def fit(
        self,
        callback: Callable[[GANTrainer, EpochStats], None] | None = None,
        checkpoints: CheckpointStore | None = None,
        checkpoint_meta: dict[str, Any] | None = None,
    ) -> list[dict[str, float]]:
        """Train from the current epoch up to ``cfg.epochs``.

        After each epoch: append its stats to :attr:`history`, call ``callback(trainer, stats)``,
        then, every ``cfg.checkpoint_every`` epochs and after the last one, save a checkpoint.
        The callback may use any RNG: the trainer's own are kept apart.

        Args:
            callback: Called after each epoch (e.g. to log metrics).
            checkpoints: Where to save checkpoints; None saves none.
            checkpoint_meta: Extra plain values stored in each checkpoint (e.g. a run id).

        Returns:
            :attr:`history`, one dict per epoch.

        Raises:
            DivergenceError: See :meth:`run_epoch`. The last checkpoint saved stays as it was.
        """
        every = self.cfg.checkpoint_every
        while self.epoch < self.cfg.epochs:
            stats = self.run_epoch()
            self.history.append(stats.as_dict())
            if callback is not None:
                callback(self, stats)
            due = self.epoch % every == 0 or self.epoch == self.cfg.epochs if every else False
            if checkpoints is not None and due:
                checkpoints.save(self.state_dict(), **(checkpoint_meta or {}))
        return self.history

    # --- sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 1, 28, 28) on the CPU for z (B, latent_dim), in eval mode.

        ``y`` (B,): the digits asked for, for a conditional generator. Uses the EMA generator
        when there is one. Touches no RNG and no training state.
        """
        net = self.ema_generator if self.ema_generator is not None else self.generator
        was_training = net.training
        net.eval()
        try:
            return net(z.to(self.device), None if y is None else y.to(self.device)).float().cpu()
        finally:
            net.train(was_training)

    # --- state -------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        return {
            "torch": self._rng_cpu.clone(),
            "cuda": None if self._rng_cuda is None else self._rng_cuda.clone(),
            "data": self.data_generator.get_state(),
            "numpy": _numpy_state(),
            "python": random.getstate(),
        }

    def _gather_rngs(self) -> None:
        """Every rank's RNG states, for rank 0's checkpoint (a collective; none for one rank)."""
        if self.world_size > 1:
            self._rank_rngs = distributed.all_gather_objects(self._rng_state())

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly: weights, optimizers, RNGs, history.

        With several ranks, ``rng_by_rank`` holds every rank's RNG states as of the end of the
        last epoch (when they are gathered), so take it between epochs, as :meth:`fit` does.
        It involves no other rank: rank 0 can save it alone.
        """
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": self.epoch,
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "ema_generator": None
            if self.ema_generator is None
            else self.ema_generator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "rng": self._rng_state(),
            "history": [dict(h) for h in self.history],
        }
        if self.world_size > 1:
            state["rng_by_rank"] = self._rank_rngs
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (e.g. from a checkpoint).

        Raises:
            ValueError: The state does not fit this trainer (another format, missing entries,
                tensors of other shapes). The trainer may then be partly changed: build a new
                one rather than train on.
        """
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"unsupported checkpoint format {found!r}")
        try:
            self._load_state(state)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            why = " ".join(str(exc).split())[:300]
            raise ValueError(
                f"checkpoint does not fit this trainer ({type(exc).__name__}: {why})"
            ) from None

    def _load_state(self, state: dict[str, Any]) -> None:
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        if self.ema_generator is not None:
            self.ema_generator.load_state_dict(state["ema_generator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        for opt in (self.opt_g, self.opt_d):  # the saved rate, as this trainer keeps it
            for group in opt.param_groups:
                group["lr"] = self._lr(float(group["lr"]))
        if self.world_size > 1:
            if len(state["rng_by_rank"]) != self.world_size:
                raise ValueError(f"it holds {len(state['rng_by_rank'])} ranks' RNG states")
            self._rank_rngs = state["rng_by_rank"]
            rng = self._rank_rngs[self.rank]
        else:
            rng = state["rng"]
        self._rng_cpu = rng["torch"].clone()
        if self._rng_cuda is not None:
            self._rng_cuda = rng["cuda"].clone()
        self.data_generator.set_state(rng["data"])
        _set_numpy_state(rng["numpy"])
        python = rng["python"]
        random.setstate((python[0], tuple(python[1]), python[2]))
        self.epoch = int(state["epoch"])
        self.history = [dict(h) for h in state["history"]]
        # The optimizers now hold new state tensors: a captured graph would update the old ones.
        self._runner = self._new_runner(self.cuda_graph)
        self._perm, self._cursor = None, 0
