"""How the training step runs: op by op (:class:`EagerRunner`), or as a replayed CUDA graph of
one step or several (:class:`CudaGraphRunner`), chosen once by :func:`select_runner`.

A runner takes the step as a function (``step(batch, record)``: one D and one G update on one batch,
the step's metrics written into ``record``) and a ``fill`` that draws a piece's batches; what the
step computes is the step's business. :class:`mnist_gan.training.GANTrainer` hands it an epoch in
pieces and keeps the runner each piece returns (a graph that fails to capture hands over to an eager
runner), so nothing is switched mid-run by a flag.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from mnist_gan.params import TrainParams

__all__ = [
    "GRAPH_WARMUP_STEPS",
    "MAX_STEPS_PER_REPLAY",
    "CudaGraphRunner",
    "EagerRunner",
    "auto_steps_per_replay",
    "capture_cuda_graph",
    "select_runner",
    "side_stream",
]

# Eager steps (on a side stream) before the whole step is captured as a CUDA graph: they
# create the optimizer state, cuBLAS/cuDNN handles and any compiled kernels.
GRAPH_WARMUP_STEPS = 3
# The most steps one CUDA graph replay runs under ``steps_per_replay="auto"``
# (:func:`auto_steps_per_replay`).
MAX_STEPS_PER_REPLAY = 16

Batch = dict[str, torch.Tensor]
# fill(out): the batches of a piece's n steps, stacked ((n, B, ...) each): new tensors when
# ``out`` is None, else written into ``out[name][:n]`` (a graph's inputs).
Fill = Callable[[Batch | None], Batch]
Step = Callable[[Mapping[str, torch.Tensor], torch.Tensor], None]


def _slot(batches: Batch, k: int) -> Batch:
    """Step ``k``'s batch from stacked batches: views, ``(B, ...)`` each."""
    return {name: t[k] for name, t in batches.items()}


def select_runner(
    cfg: TrainParams, device: torch.device, world_size: int
) -> tuple[str, str | None]:
    """How the trainer runs its step: ``eager`` or ``cuda_graph``; and a warning, or None.

    The whole step is one CUDA graph when ``train.cuda_graph`` asks for it, on a CUDA device,
    in a single process. Elsewhere the step runs eagerly: silently on a CPU (the param is on by
    default), with a warning under DDP (its gradient all-reduce is not captured here).
    """
    if not cfg.cuda_graph or device.type != "cuda":
        return "eager", None
    if world_size > 1:
        return "eager", (
            "train.cuda_graph: not used with several training processes (DDP's gradient "
            "all-reduce is not captured here); training without CUDA graphs"
        )
    return "cuda_graph", None


def auto_steps_per_replay(steps_per_epoch: int, most: int = MAX_STEPS_PER_REPLAY) -> int:
    """How many steps one CUDA graph replay runs under ``steps_per_replay="auto"``: the largest
    divisor of ``steps_per_epoch`` from ``most // 2`` to ``most`` (13 for MNIST's 468 steps of
    128), so that an epoch is whole replays; else ``most`` (the epoch's last few steps then run
    one by one), or the whole epoch where it is shorter."""
    fits = [k for k in range(most // 2, most + 1) if steps_per_epoch % k == 0]
    return max(fits) if fits else min(most, steps_per_epoch)


class EagerRunner:
    """Runs the step op by op, as Python calls it."""

    name = "eager"
    steps = 1  # steps per call that it runs as one unit

    def run(self, step: Step, fill: Fill, records: torch.Tensor) -> EagerRunner:
        """One piece: ``len(records)`` steps on new batches, step ``j``'s metrics into
        ``records[j]``; returns the runner for the next piece (itself)."""
        batches = fill(None)
        for j in range(len(records)):
            step(_slot(batches, j), records[j])
        return self


def capture_cuda_graph(fn: Callable[[], None]) -> Callable[[], None]:
    """Record ``fn``'s kernels as a CUDA graph (without running them); returns its replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@contextlib.contextmanager
def side_stream(device: torch.device, side: Any = None) -> Iterator[None]:
    """On CUDA, run on a side stream (``side``, else a new one) ordered after the current one
    (as warm-up for a graph)."""
    if device.type != "cuda":
        yield
        return
    side = side or torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)
    side.wait_stream(main)
    try:
        with torch.cuda.stream(side):
            yield
    finally:
        main.wait_stream(side)


class CudaGraphRunner:
    """Runs ``steps`` whole steps (D and G updates, EMA, metrics) as one CUDA graph.

    The trainer hands it an epoch in pieces of up to ``steps`` steps. Each piece's batches are
    drawn at once (one gather of the images, one draw of the noise) into ``static``: ``steps``
    stacked batches at fixed addresses, one slot per step. A whole piece, once ``warmup`` steps
    have run, is one replay of the graph: one launch from Python instead of hundreds per step.
    Before that (the warm-up: it creates the optimizers' state, the library handles and any
    compiled kernels, as capture requires), and for a piece cut short (an epoch's last steps
    where ``steps`` does not divide it), the piece's steps run one by one, eagerly, on a side
    stream, from the same slots. The first whole piece after the warm-up is captured, then
    replayed. Each step writes its metrics into a row of ``records``; one copy per piece hands
    them on. If capture fails, the runner warns, runs the piece eagerly and hands over to an
    :class:`EagerRunner`.

    Replaying several steps saves what lies between replays: the launch, and the batch's
    gather and noise kernels. The noise of a piece is one draw of ``steps`` batches, which on a
    GPU is not ``steps`` draws of one, so runs with other ``steps`` differ; on the CPU (tests,
    with a stand-in ``capture``) they are the same numbers where a batch's noise is a multiple
    of 16 values. Whether a piece is replayed or run eagerly does not change its draws.

    Args:
        static: The graph's inputs, stacked: ``real`` (steps, B, 1, 28, 28), ``z``
            (steps, B, latent_dim), and ``y_real``, ``y_fake`` (steps, B) when conditional.
        records: (steps, M) tensor, one row per step of a replay, into which the graph's
            steps write their metrics (the trainer's rows are 8 floats apart: 32-byte aligned
            for compiled kernels).
        device: The CUDA device (another device only in tests, with a stand-in ``capture``).
        before_capture: Called before capturing: sets the gradients to None, so that the
            captured backward passes allocate them in the graph's memory pool.
        capture: Records a function and returns its replay (default :func:`capture_cuda_graph`).
        warmup: Eager steps before the capture.
    """

    name = "cuda_graph"

    def __init__(
        self,
        static: Batch,
        records: torch.Tensor,
        device: torch.device,
        before_capture: Callable[[], None],
        capture: Callable[[Callable[[], None]], Callable[[], None]] = capture_cuda_graph,
        warmup: int = GRAPH_WARMUP_STEPS,
    ) -> None:
        self.static, self.records, self.device = static, records, device
        self.steps = records.shape[0]
        self.before_capture, self.capture = before_capture, capture
        self.warmup_left = warmup
        self.replay: Callable[[], None] | None = None
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _one_by_one(self, step: Step, n: int, side: bool) -> None:
        """The first ``n`` slots' steps, eagerly (on the side stream if ``side``)."""
        with side_stream(self.device, self._side) if side else contextlib.nullcontext():
            for k in range(n):
                step(_slot(self.static, k), self.records[k])

    def run(self, step: Step, fill: Fill, records: torch.Tensor) -> EagerRunner | CudaGraphRunner:
        """One piece: ``len(records)`` (at most ``steps``) steps on new batches, step ``j``'s
        metrics into ``records[j]``; returns the runner for the next piece."""
        n = len(records)
        assert n <= self.steps, f"a piece of {n} steps for a graph of {self.steps}"
        fill(self.static)
        runner: EagerRunner | CudaGraphRunner = self
        if n < self.steps or self.warmup_left > 0:  # the warm-up, or a piece cut short
            self._one_by_one(step, n, side=True)
            self.warmup_left = max(0, self.warmup_left - n)
        elif self.replay is not None or self._capture(step):
            self.replay()
        else:  # capture failed: the batches already drawn, eagerly, and eagerly from now on
            self._one_by_one(step, n, side=False)
            runner = EagerRunner()
        records.copy_(self.records[:n])
        return runner

    def _capture(self, step: Step) -> bool:
        """Capture the graph of ``steps`` steps; False, after a warning, where that fails."""
        self.before_capture()
        try:
            self.replay = self.capture(functools.partial(self._one_by_one, step, self.steps, False))
        except Exception as exc:  # an op that cannot be captured, an old driver, ...
            warnings.warn(
                f"train.cuda_graph: capturing the training step failed "
                f"({type(exc).__name__}: {exc}); training without CUDA graphs",
                RuntimeWarning,
                stacklevel=5,
            )
            self.before_capture()
            return False
        return True
