"""Several training processes (DDP under ``torchrun``): who this process is, and the launch.

``train.nproc`` > 1 makes the train stage start ``nproc`` copies of itself through PyTorch's own
launcher (:func:`launch`, the code behind the ``torchrun`` command, with ``--standalone``: one
machine, a rendezvous on localhost). Each copy learns its place from the variables ``torchrun``
sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), so the same script also
runs under a ``torchrun`` that a user or a cluster starts on several machines.

The process group uses gloo on the CPU and NCCL on GPUs (one GPU per process, ``cuda:LOCAL_RANK``).
Without those variables, or with a world of one, nothing here starts a process group, and
training is the single-process code path, bit for bit.

This module uses only PyTorch, like the trainer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "LaunchError",
    "World",
    "all_gather_objects",
    "all_reduce_mean_",
    "any_rank",
    "broadcast_object",
    "init",
    "launch",
    "launched",
    "rank_and_size",
    "rank_seed",
    "shutdown",
    "world",
]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: 0 .. size - 1 over all machines; rank 0 logs and writes the outputs.
        size: The number of training processes (all machines).
        local_rank: The rank on this machine (picks the GPU).
        local_size: The number of training processes on this machine (shares its CPU cores).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the process that logs, checkpoints and writes outputs."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or anything that sets ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ


def world() -> World:
    """This process's :class:`World`: from ``torchrun``'s variables, or a world of one.

    Raises:
        ValueError: A variable is not an integer, or they contradict each other.
    """
    size = _env_int("WORLD_SIZE", 1)
    w = World(
        rank=_env_int("RANK", 0),
        size=size,
        local_rank=_env_int("LOCAL_RANK", 0),
        local_size=_env_int("LOCAL_WORLD_SIZE", size),
    )
    if not (0 <= w.rank < w.size and 0 <= w.local_rank < w.local_size <= w.size):
        raise ValueError(
            f"inconsistent torchrun variables: RANK={w.rank} WORLD_SIZE={w.size} "
            f"LOCAL_RANK={w.local_rank} LOCAL_WORLD_SIZE={w.local_size}"
        )
    return w


def init(w: World, device: torch.device) -> torch.device:
    """Join the process group of ``w`` (when it has more than one process).

    Args:
        w: This process's place (:func:`world`).
        device: The device ``base.device`` picked; on CUDA each process takes the GPU of its
            local rank.

    Returns:
        This process's device.
    """
    if device.type == "cuda":
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    if w.size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the current process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s own noise, data order and dropout: ``seed`` itself for rank 0.

    So rank 0 draws what a single process draws, and every other rank draws an unrelated
    stream (a hash of seed and rank, not ``seed + rank``, which the next seed would reuse).
    """
    if rank == 0:
        return seed
    digest = hashlib.sha256(f"mnist-gan rank seed {seed} {rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    _, size = rank_and_size()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank; ``obj`` itself without a process group."""
    _, size = rank_and_size()
    if size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (a collective: every rank must call it)."""
    _, size = rank_and_size()
    if size == 1:
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """``t`` replaced by its mean over the ranks, in place (a no-op without a process group)."""
    _, size = rank_and_size()
    if size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(size)
    return t


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class LaunchError(RuntimeError):
    """A training process failed or was stopped; the message says which and how."""


def launch(script: Path, args: list[str], nproc: int, threads: int) -> None:
    """Run ``python script *args`` as ``nproc`` processes on this machine, as ``torchrun`` does.

    The same as ``torchrun --standalone --nproc-per-node=NPROC --max-restarts=0 SCRIPT ARGS``:
    the rendezvous is on localhost, and a failed process stops the others (no restarts: a
    rerun resumes from the last checkpoint instead). Each process prints its own errors; the
    launcher's own log is kept to errors.

    Args:
        script: The script every process runs.
        args: Its arguments.
        nproc: Processes to start.
        threads: CPU threads per process (``OMP_NUM_THREADS``, unless set already).

    Raises:
        LaunchError: A process exited with an error or was killed, or the launcher was
            interrupted; the message names the first failure.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    cli = ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", str(script), *args]
    # The launcher installs its own signal handlers (to stop the processes); put ours back.
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    handlers = {n: signal.getsignal(getattr(signal, n)) for n in names if hasattr(signal, n)}
    try:
        run(get_args_parser().parse_args(cli))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode < 0:
            how = f"was killed by {failure.signal_name()}"
        else:
            how = f"exited with code {failure.exitcode}"
        raise LaunchError(f"training process {rank} of {nproc} {how}") from None
    except SignalException as exc:
        why = f"interrupted ({exc.sigval.name}); the training processes were stopped"
        raise LaunchError(why) from None
    finally:
        for n, handler in handlers.items():
            signal.signal(getattr(signal, n), handler)
