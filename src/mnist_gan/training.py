"""The GAN trainer: one training step through autograd, device-resident data, resumable.

A step is D's update, then G's update through the updated D, then G's weight EMA, all through
autograd and ``torch.optim.Adam``; one generator pass serves both updates (as in
pytorch/examples' DCGAN). How the step runs (bf16 autocast, ``torch.compile``, a CUDA graph) is
a :class:`~mnist_gan.strategy.Strategy`, chosen before the trainer is built and never changed;
the step's code is the same under every strategy.

The normalized training set is copied to the device once. Each epoch draws a permutation on
the device from a seeded ``torch.Generator`` and walks it in ``batch_size`` slices (the last
partial batch is dropped), so no batch crosses the host-device boundary. Each step writes its
metrics (losses, mean D probabilities, gradient norms) into a row of a device tensor that the
host reads once per epoch; the same read finds the first step whose loss was not finite (the
divergence guard). :meth:`GANTrainer.fit` is the one way to train: it runs epochs, reports each
to a callback and saves resumable checkpoints. Resuming restores every RNG, so on the CPU the
final weights are bit-identical to an uninterrupted run on the same machine (float results
differ between CPU models).

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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_gan import distributed
from mnist_gan.checkpoint import CHECKPOINT_FORMAT, CheckpointStore
from mnist_gan.data import shift_images
from mnist_gan.losses import discriminator_loss, generator_loss, r1_penalty
from mnist_gan.models import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    build_discriminator,
    build_generator,
    save_gan,
)
from mnist_gan.params import TrainParams
from mnist_gan.strategy import Strategy, StrategyError
from mnist_gan.utils import seed_everything

__all__ = [
    "METRICS",
    "DivergenceError",
    "EpochStats",
    "GANTrainer",
    "fixed_noise",
    "scaled_lr",
    "standing_stats",
]

# What each step records, in this order (one row per step of the epoch).
METRICS = ("loss_d", "loss_g", "d_real", "d_fake", "grad_norm_g", "grad_norm_d")
# Eager steps (on a side stream) before the step is captured as a CUDA graph: they create the
# optimizers' state, the cuBLAS handles and any compiled kernels, as capture requires.
GRAPH_WARMUP_STEPS = 3


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


STANDING_BATCHES = 100  # noise batches that standing statistics average over


@torch.no_grad()
def standing_stats(
    generator: nn.Module, *, batch_size: int, seed: int, batches: int = STANDING_BATCHES
) -> nn.Module:
    """Set ``generator``'s BatchNorm running statistics to its own, and return it in eval mode.

    "Standing statistics" (as in BigGAN's code): the mean and variance each BatchNorm layer
    sees over ``batches`` batches of fresh noise (and, for a conditional generator, uniformly
    drawn digits), averaged with equal weights. Drawn from a generator seeded with ``seed``, on
    the network's device, so the result is the same every time.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d)]
    if not norms:
        return generator.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    device = next(generator.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    classes = generator.num_classes
    generator.train()
    for _ in range(batches):
        z = torch.randn(batch_size, generator.latent_dim, generator=gen, device=device)
        y = torch.randint(classes, (batch_size,), generator=gen, device=device) if classes else None
        generator(z, y)
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return generator.eval()


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


def _has_batch_norm(module: nn.Module) -> bool:
    """Whether a sample's output depends on the statistics of its whole batch (BatchNorm).
    MinibatchStd's groups of consecutive samples do not count: with halves that are multiples
    of the group (checked), one pass over [real; fake] keeps each group within one half."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients, as a device scalar (no synchronisation)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


def _adam(
    params: list[nn.Parameter], lr: float | torch.Tensor, betas: tuple[float, float], s: Strategy
) -> torch.optim.Adam:
    """Adam as the strategy runs it: fused (one kernel for all the weights) when eager; the
    default implementation when compiled (``torch.compile`` fuses it, as PyTorch's
    compiled-optimizer recipe does); capturable in a CUDA graph."""
    options: dict[str, Any] = {"capturable": s.cuda_graph}
    if not s.compile:
        options["fused"] = True
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, **options)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        options.pop("fused", None)
        return torch.optim.Adam(params, lr=lr, betas=betas, **options)


@contextlib.contextmanager
def _side_stream(device: torch.device) -> Iterator[None]:
    """On CUDA, run on a new stream ordered after the current one (a graph's warm-up)."""
    if device.type != "cuda":
        yield
        return
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


class _CudaGraphStep:
    """Runs ``step`` eagerly ``GRAPH_WARMUP_STEPS`` times, then captures it once as a CUDA graph
    and replays it: one launch from Python instead of hundreds. The step must read and write
    only tensors at fixed addresses (the trainer's batch and metrics row, the weights, the
    optimizers' state) and never synchronise with the host."""

    def __init__(self, step: Callable[[], None], device: torch.device, clear: Callable[[], None]):
        self.step, self.device, self.clear = step, device, clear
        self.warmup_left = GRAPH_WARMUP_STEPS
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif self.warmup_left > 0:
            with _side_stream(self.device):
                self.step()
            self.warmup_left -= 1
        else:
            self.clear()  # the captured backward passes allocate the gradients in its pool
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.step()
            except Exception as exc:  # an op that cannot be captured, an old driver, ...
                why = " ".join(str(exc).split())[:200]
                raise StrategyError(
                    f"train.cuda_graph: capturing the training step failed "
                    f"({type(exc).__name__}: {why}); set it to false"
                ) from exc
            self.graph = graph
            graph.replay()  # capture records the kernels without running them


class GANTrainer:
    """Trains one GAN on a tensor of images held on the device.

    Building a trainer seeds ``random``, numpy and torch with ``seed`` and initialises the
    networks from torch's CPU generator (so initial weights do not depend on the device).

    Args:
        cfg: The train params.
        images: float32 (N, 1, 28, 28) in [-1, 1]; copied to ``device`` once.
        labels: int64 (N,) digits of the images; needed (and copied) when ``cfg.conditional``.
        seed: The GAN's seed.
        device: Where to train.
        strategy: How the step runs (:func:`~mnist_gan.strategy.choose_strategy` picks it from
            the params); :data:`~mnist_gan.strategy.EAGER` is the plain float32 step.
        progress: Show a per-epoch progress bar; None shows one when stderr is a terminal.

    D judges the real and the fake batch in one pass (larger matmuls, half the launches) where
    that is the same computation: not when D has BatchNorm (real and fake would be normalised
    together) nor spectral norm (each training pass runs one power iteration). A minibatch
    standard deviation is fine: its groups never straddle the halves. Dropout then draws one
    mask for both halves, from the same distribution. The dcgan networks are kept in
    the channels-last memory format (faster convolutions; the same weights).

    In a process group of several ranks (DDP, see :mod:`mnist_gan.distributed`), ``images`` is
    the whole training set and each rank keeps its shard (every ``size``-th image from its
    rank on) and trains on ``batch_size / size`` images per step; DDP averages the gradients,
    so the ranks train one model on the global batch. Rank 0 seeds its noise, data order and
    dropout with the seed a single process uses; every other rank has its own seed
    (:func:`~mnist_gan.distributed.rank_seed`), so a run is reproducible for a given number of
    ranks. G's BatchNorm is synchronised across ranks on GPUs (``SyncBatchNorm``, which PyTorch
    has only for GPUs); on the CPU, and in D, each rank normalises over its own images. DDP does
    not re-broadcast buffers before each forward pass (:func:`_no_buffer_sync`: the broadcast
    would change D's BatchNorm buffers between its forward passes and its backward,
    pytorch/pytorch#175024); the epoch's metrics are averaged over the ranks.

    Raises:
        ValueError: The images have the wrong shape, fewer than one batch per rank, or a batch
            size the ranks do not divide.
        StrategyError: The strategy asks for a CUDA graph off CUDA or under DDP.
    """

    def __init__(
        self,
        cfg: TrainParams,
        images: torch.Tensor,
        *,
        labels: torch.Tensor | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        strategy: Strategy,
        progress: bool | None = None,
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
        if cfg.d_minibatch_std and self.batch_size % cfg.d_minibatch_std:
            raise ValueError(
                f"train.d_minibatch_std: groups of {cfg.d_minibatch_std} do not split each of "
                f"the {self.world_size} processes' batch of {self.batch_size} evenly"
            )
        if images.shape[0] // self.world_size < self.batch_size:
            raise ValueError(
                f"train.batch_size: {cfg.batch_size} is larger than the training set "
                f"({images.shape[0]} images)"
            )
        if cfg.conditional and (labels is None or labels.shape != images.shape[:1]):
            raise ValueError("train.conditional: the trainer needs one label per training image")
        self.cfg, self.seed, self.device = cfg, seed, torch.device(device)
        cuda = self.device.type == "cuda"
        if strategy.cuda_graph and (not cuda or self.world_size > 1):
            raise StrategyError("train.cuda_graph: a CUDA graph needs CUDA and one process")
        self.strategy = strategy
        # Seeds random, numpy and torch (CPU and CUDA); the returned generator on the device
        # draws the permutations and the noise.
        self.data_generator = seed_everything(seed, self.device)

        self.generator = build_generator(cfg).to(self.device)
        self.discriminator = build_discriminator(cfg).to(self.device)
        if self.rank:  # the same initial weights on every rank; from here, the rank's own RNGs
            self.data_generator = seed_everything(distributed.rank_seed(seed, self.rank), device)
        if self.world_size > 1 and cuda:  # G's batch statistics over the global batch
            self.generator = nn.SyncBatchNorm.convert_sync_batchnorm(self.generator)
        if cfg.model == "dcgan":  # layout only: the same weights and results
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
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.epoch = 0  # completed epochs
        self.history: list[dict[str, float]] = []  # EpochStats.as_dict() per completed epoch
        # Every rank's RNG states (a checkpoint holds them all), gathered after each epoch.
        self._rank_rngs: list[dict[str, Any]] = []
        self._gather_rngs()

        self._g_params = list(self.generator.parameters())
        self._d_params = list(self.discriminator.parameters())
        self.lr_g = scaled_lr(cfg.lr_g, cfg.batch_size, cfg.lr_scaling)
        self.lr_d = scaled_lr(cfg.lr_d, cfg.batch_size, cfg.lr_scaling)
        # A decaying rate is a device tensor where a graph or compiled code reads it (a float
        # would be baked in, and each epoch's new rate would recompile the step).
        self._lr_as_tensor = (strategy.compile or strategy.cuda_graph) and cfg.lr_decay != "none"
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = _adam(self._g_params, self._lr(self.lr_g), betas, strategy)
        self.opt_d = _adam(self._d_params, self._lr(self.lr_d), betas, strategy)

        # G's forward, D's forward in D's update, and D's forward in G's update (D's plain
        # module under DDP: that backward reaches only G's weights, whose gradients G's DDP
        # wrapper reduces).
        self._g: Callable[..., torch.Tensor] = self.generator
        self._d: Callable[..., torch.Tensor] = self.discriminator
        self._d_for_g: Callable[..., torch.Tensor] = self.discriminator
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids, no_sync = [self.device.index] if cuda else None, _no_buffer_sync()
            self._g = DDP(self.generator, device_ids=ids, **no_sync)
            self._d = DDP(self.discriminator, device_ids=ids, **no_sync)
        self._opt_steps: tuple[Callable[[], Any], ...] = (self.opt_d.step, self.opt_g.step)
        self._ema_step: Callable[[], None] = self._update_ema
        if strategy.compile:
            # Static shapes: the one-pass D sees 2B images in D's update and B in G's.
            compile_ = functools.partial(torch.compile, dynamic=False)
            self._g, self._d_for_g = compile_(self._g), compile_(self._d_for_g)
            self._d = self._d_for_g if self._d is self.discriminator else compile_(self._d)
            self._opt_steps = tuple(torch.compile(step) for step in self._opt_steps)
            self._ema_step = torch.compile(self._update_ema)
        self._one_pass_d = not (_has_batch_norm(self.discriminator) or cfg.spectral_norm)
        if self.ema_generator is not None:
            pairs = zip([*self.ema_generator.parameters(), *self.ema_generator.buffers()],
                        [*self._g_params, *self.generator.buffers()], strict=True)  # fmt: skip
            self._ema_pairs = list(pairs)

        # The step's inputs and its metrics: fixed tensors that each step overwrites (a CUDA
        # graph reads and writes them at their addresses).
        b, dev = self.batch_size, self.device
        self._batch = {
            "real": torch.empty(b, *IMAGE_SHAPE, device=dev),
            "z": torch.empty(b, cfg.latent_dim, device=dev),
        }
        if self.labels is not None:
            self._batch["y_real"] = torch.empty(b, dtype=torch.int64, device=dev)
            self._batch["y_fake"] = torch.empty(b, dtype=torch.int64, device=dev)
        self._step_metrics = torch.zeros(len(METRICS), device=dev)
        self._record = torch.zeros(self.steps_per_epoch, len(METRICS), device=dev)
        self._run_step = self._new_runner()
        self._steps_run = 0  # since this trainer was built or loaded

    # --- the step ----------------------------------------------------------------------------

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
                    group["lr"].fill_(lr * factor)  # in place: a graph or compiled code reads it
                else:
                    group["lr"] = lr * factor

    def _new_runner(self) -> Callable[[], None]:
        if not self.strategy.cuda_graph:
            return self._step
        return _CudaGraphStep(self._step, self.device, self._clear_grads)

    def _shift(self, images: torch.Tensor) -> torch.Tensor:
        """DiffAugment: each image D judges, real or fake, translated by its own random offset
        of up to ``d_shift`` pixels (``images`` itself when 0); G learns through it."""
        return shift_images(images, self.cfg.d_shift)

    def _clear_grads(self) -> None:
        self.opt_d.zero_grad(set_to_none=True)
        self.opt_g.zero_grad(set_to_none=True)

    def _autocast(self) -> contextlib.AbstractContextManager:
        # Under a CUDA graph, autocast must not reuse its cache of cast weights across replays.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.strategy.amp,
                              cache_enabled=not self.strategy.cuda_graph)  # fmt: skip

    @torch.no_grad()
    def _update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * G, for G's weights and float buffers (BatchNorm's
        running statistics); integer buffers (its batch counts) are copied."""
        for ema, live in self._ema_pairs:
            if ema.is_floating_point():
                ema.lerp_(live, 1.0 - self.cfg.ema)
            else:
                ema.copy_(live)

    def _step(self) -> None:
        """One training step on ``self._batch``: D's update, G's update through the updated D,
        G's EMA, and the step's METRICS into ``self._step_metrics``. It never synchronises with
        the host and never branches on a tensor's value, so a CUDA graph can capture it."""
        cfg, batch = self.cfg, self._batch
        real, z = batch["real"], batch["z"]
        y_real, y_fake = batch.get("y_real"), batch.get("y_fake")  # None unless conditional
        opt_d_step, opt_g_step = self._opt_steps

        if cfg.r1_gamma:  # the R1 penalty differentiates D's output by its real input
            real = real.detach().requires_grad_()
        with self._autocast():
            fake = self._g(z, y_fake)  # (B, 1, 28, 28)
            if self._one_pass_d:
                y = None if y_real is None else torch.cat([y_real, y_fake])
                both = self._shift(torch.cat([real, fake.detach()]))
                logits = self._d(both, y)  # (2B,): real, then fake
            else:
                logits = torch.cat(
                    [
                        self._d(self._shift(real), y_real),
                        self._d(self._shift(fake.detach()), y_fake),
                    ]
                )
        logits = logits.float()
        real_logits, fake_logits = logits.chunk(2)  # (B,) each
        loss_d = discriminator_loss(cfg.loss, real_logits, fake_logits, cfg.label_smoothing)
        if cfg.r1_gamma:
            loss_d = loss_d + 0.5 * cfg.r1_gamma * r1_penalty(real_logits, real)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward(inputs=self._d_params)
        grad_norm_d = _grad_norm(self._d_params)
        opt_d_step()

        # G's update, through the updated D. inputs= limits backward to G's weights: D's weight
        # gradients are never computed.
        with self._autocast():
            fake_logits_g = self._d_for_g(self._shift(fake), y_fake).float()  # (B,)
        loss_g = generator_loss(cfg.loss, fake_logits_g)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward(inputs=self._g_params)
        grad_norm_g = _grad_norm(self._g_params)
        opt_g_step()

        if self.ema_generator is not None:
            self._ema_step()
        with torch.no_grad():
            d_real, d_fake = torch.sigmoid(logits.detach()).view(2, -1).mean(dim=1).unbind()
            values = (loss_d.detach(), loss_g.detach(), d_real, d_fake, grad_norm_g, grad_norm_d)
            self._step_metrics.copy_(torch.stack(values))

    def _draw_batch(self, idx: torch.Tensor) -> None:
        """The next step's inputs, written into ``self._batch``: the images at ``idx`` (and
        their digits), z, and when conditional the digits asked of G, drawn uniformly."""
        gen, batch = self.data_generator, self._batch
        torch.index_select(self.images, 0, idx, out=batch["real"])
        torch.randn(batch["z"].shape, generator=gen, out=batch["z"])
        if self.labels is not None:
            torch.index_select(self.labels, 0, idx, out=batch["y_real"])
            torch.randint(NUM_CLASSES, batch["y_fake"].shape, generator=gen, out=batch["y_fake"])

    def _one_step(self) -> None:
        """:meth:`_step`, as the strategy runs it. The first step compiles, where the strategy
        compiles: a failure there is the strategy's, reported as such (never a fallback)."""
        if not (self.strategy.compile and self._steps_run == 0):
            self._run_step()
        else:
            try:
                self._run_step()
            except StrategyError:
                raise
            except Exception as exc:
                why = " ".join(str(exc).split())[:200]
                raise StrategyError(
                    f"train.compile: compiling the training step failed "
                    f"({type(exc).__name__}: {why}); set it to false"
                ) from exc
        self._steps_run += 1

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

    # --- epochs ------------------------------------------------------------------------------

    def _run_epoch(self) -> EpochStats:
        """Train one epoch (a fresh permutation, ``steps_per_epoch`` steps) and measure it."""
        epoch, b = self.epoch + 1, self.batch_size
        bar = _progress(self.steps_per_epoch, f"epoch {epoch}/{self.cfg.epochs}", self.progress)
        start = time.perf_counter()
        self._set_lr(epoch)
        n = self.images.shape[0]
        perm = torch.randperm(n, device=self.device, generator=self.data_generator)
        with self._own_rng():
            for i in range(self.steps_per_epoch):
                self._draw_batch(perm[i * b : (i + 1) * b])
                self._one_step()
                self._record[i].copy_(self._step_metrics)
                if bar is not None:
                    bar.update(1)
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
        *,
        epochs: int | None = None,
    ) -> list[dict[str, float]]:
        """Train from the current epoch up to ``epochs`` completed epochs (``cfg.epochs``).

        After each epoch: append its stats to :attr:`history`, call ``callback(trainer, stats)``,
        then, every ``cfg.checkpoint_every`` epochs and after the last one, save a checkpoint.
        The callback may use any RNG: the trainer's own are kept apart.

        Args:
            callback: Called after each epoch (e.g. to log metrics).
            checkpoints: Where to save checkpoints; None saves none.
            checkpoint_meta: Extra plain values stored in each checkpoint (e.g. a run id).
            epochs: Stop after this many completed epochs (a benchmark's or a test's share);
                None: ``cfg.epochs``. The learning-rate decay follows ``cfg.epochs`` either way.

        Returns:
            :attr:`history`, one dict per epoch.

        Raises:
            DivergenceError: A loss was NaN or infinite at some step; the last checkpoint saved
                stays as it was, and the trainer's state is unusable (restore a checkpoint).
            StrategyError: Compiling or capturing the step failed at its first step.
        """
        every, last = self.cfg.checkpoint_every, self.cfg.epochs if epochs is None else epochs
        while self.epoch < last:
            stats = self._run_epoch()
            self.history.append(stats.as_dict())
            if callback is not None:
                callback(self, stats)
            due = self.epoch % every == 0 or self.epoch == self.cfg.epochs if every else False
            if checkpoints is not None and due:
                checkpoints.save(self.state_dict(), **(checkpoint_meta or {}))
        return self.history

    # --- sampling ----------------------------------------------------------------------------

    def sampling_generator(self) -> nn.Module:
        """The generator that samples: what grids show and what is saved.

        The EMA generator when there is one (in eval mode), else G itself. With
        ``train.standing_stats`` the EMA generator is a copy whose BatchNorm statistics are its
        own (:func:`standing_stats`): the EMA of G's running statistics belongs to none of the
        weights it averages. Touches no RNG and no training state.
        """
        if self.ema_generator is None:
            return self.generator
        if not self.cfg.standing_stats:
            return self.ema_generator
        # A fresh network of the configured layers (plain BatchNorm where DDP made it
        # SyncBatchNorm), built without touching the global RNG, holding the EMA's weights.
        with torch.random.fork_rng(devices=[]):
            net = build_generator(self.cfg).to(self.device)
        net.load_state_dict(self.ema_generator.state_dict())
        return standing_stats(net, batch_size=self.cfg.batch_size, seed=self.seed)

    def save(self, model_dir: str | Path) -> None:
        """Write the GAN folder (:func:`mnist_gan.models.save_gan`): G, D and, when there is
        an EMA, the generator that samples (:meth:`sampling_generator`)."""
        ema = self.sampling_generator() if self.ema_generator is not None else None
        save_gan(model_dir, self.cfg, self.seed, self.generator, self.discriminator, ema)

    @torch.no_grad()
    def sample(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 1, 28, 28) on the CPU for z (B, latent_dim), from
        :meth:`sampling_generator` in eval mode.

        ``y`` (B,): the digits asked for, for a conditional generator.
        """
        net = self.sampling_generator()
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
        self._run_step = self._new_runner()
        self._steps_run = 0
