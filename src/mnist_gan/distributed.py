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
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "STOPPED_WITH_OTHERS",
    "LaunchError",
    "World",
    "all_gather_objects",
    "all_reduce_mean_",
    "any_rank",
    "barrier",
    "broadcast_object",
    "die_with_parent",
    "init",
    "is_lost_peer",
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
    """Whether ``torchrun`` (or ``torch.distributed.launch``) started this process.

    ``LOCAL_RANK`` is the test: some job systems set ``WORLD_SIZE`` and ``RANK`` for a pod
    that then runs torchrun itself.
    """
    return "LOCAL_RANK" in os.environ


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
    if device.type == "cuda":  # one GPU each (a scheduler may show each process only its own)
        device = torch.device("cuda", w.local_rank % torch.cuda.device_count())
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


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if rank_and_size()[1] > 1:
        dist.barrier()


def is_lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process is gone."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)  # gloo raises plain RuntimeErrors from its transport
    return isinstance(exc, RuntimeError) and ("gloo" in text or "NCCL" in text)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# The exit code of a process that stops because another one failed or reported the error: the
# launcher then names the process whose failure is the cause.
STOPPED_WITH_OTHERS = 75


class LaunchError(RuntimeError):
    """A training process failed or was stopped; the message says which and how.

    Attributes:
        resumable: The processes were killed or lost each other (a rerun resumes from the last
            checkpoint), rather than stopped by an error a process printed.
    """

    def __init__(self, message: str, resumable: bool) -> None:
        super().__init__(message)
        self.resumable = resumable


def die_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent (the launcher) dies (Linux).

    Without it, the training processes of a launcher that was killed (``kill -9``, the OOM
    killer, a CI timeout) would train on, log and write outputs unsupervised.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


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

    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # the launcher's own chatter
    cli = ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", str(script), *args]
    # The launcher installs its own signal handlers (to stop the processes); put ours back.
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    handlers = {n: signal.getsignal(getattr(signal, n)) for n in names if hasattr(signal, n)}
    threads_before = os.environ.get("OMP_NUM_THREADS")
    if threads_before is None:  # the processes inherit it; this process keeps its own
        os.environ["OMP_NUM_THREADS"] = str(max(1, threads))
    # The launcher keeps its per-process files (error reports) in a log folder, a new folder in
    # the temp dir per run unless given one: give it one that goes when the run ends.
    logs = tempfile.TemporaryDirectory(prefix="mnist-gan-launch-")
    try:
        run(get_args_parser().parse_args([f"--log-dir={logs.name}", *cli]))
    except ChildFailedError as exc:
        raise _failure(exc.failures, nproc) from None
    except SignalException as exc:
        why = f"interrupted ({exc.sigval.name}); the training processes were stopped"
        raise LaunchError(why, resumable=True) from None
    finally:
        logs.cleanup()
        for n, handler in handlers.items():
            signal.signal(getattr(signal, n), handler)
        if threads_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def _failure(failures: dict[int, Any], nproc: int) -> LaunchError:
    """The cause among the failed processes.

    In order: a process killed by a signal other than SIGTERM (SIGKILL, SIGSEGV, ...); one that
    exited with an error of its own; one killed by SIGTERM (what the launcher sends the others
    when one fails, so that is rarely the cause). A process that stopped because of the others
    exits with :data:`STOPPED_WITH_OTHERS` and is never named.
    """
    term = -int(signal.SIGTERM)
    order = [
        (lambda f: f.exitcode < 0 and f.exitcode != term, True),
        (lambda f: f.exitcode > 0 and f.exitcode != STOPPED_WITH_OTHERS, False),
        (lambda f: f.exitcode == term, True),
    ]
    for matches, resumable in order:
        ranks = sorted(r for r, f in failures.items() if matches(f))
        if ranks:
            f = failures[ranks[0]]
            how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else (
                f"failed (exit code {f.exitcode})")  # fmt: skip
            return LaunchError(f"training process {ranks[0]} of {nproc} {how}", resumable)
    return LaunchError(f"the {nproc} training processes stopped together", True)
