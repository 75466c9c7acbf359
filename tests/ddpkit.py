"""Workers for the DDP tests: each runs in a spawned process as one rank of a gloo group.

A worker joins the group through a file store (no TCP rendezvous), uses one CPU thread, does its
part and writes what the test compares into ``out`` (a folder), as ``rank{r}.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mnist_gan.params import TrainParams
from mnist_gan.strategy import EAGER
from mnist_gan.training import GANTrainer


def blobs(n: int, seed: int = 0) -> torch.Tensor:
    """Synthetic images (n, 1, 28, 28) in [-1, 1]: a bright blob at a random place."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    c = torch.rand(n, 2, 1, 1, generator=g) * 16 + 6
    return (torch.exp(-((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) / 18) * 2 - 1).unsqueeze(1)


def weights(trainer: GANTrainer) -> dict[str, torch.Tensor]:
    """G's and D's parameters and buffers, by name."""
    nets = {"g": trainer.generator, "d": trainer.discriminator}
    return {
        f"{n}.{k}": v.detach().clone() for n, m in nets.items() for k, v in m.state_dict().items()
    }


def _join(rank: int, size: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)


def fit_epochs(rank: int, size: int, store: str, cfg: dict, resume_from: str | None,
               out: str) -> None:  # fmt: skip
    """``trainer.fit()`` (optionally from a checkpoint state) on 240 blobs; saves what it saw."""
    _join(rank, size, store)
    params = TrainParams(**cfg)
    trainer = GANTrainer(params, blobs(240), seed=0, progress=False, strategy=EAGER)
    if resume_from:
        trainer.load_state_dict(torch.load(resume_from, weights_only=True))
    trainer.fit()
    result: dict[str, Any] = {
        "weights": weights(trainer),
        "images": trainer.images.clone(),
        "history": trainer.history,
        "state": trainer.state_dict(),
        "batch_size": trainer.batch_size,
        "steps_per_epoch": trainer.steps_per_epoch,
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def spawn(fn: Any, size: int, tmp: Path, *args: Any) -> list[Any]:
    """Run ``fn(rank, size, store, *args, out)`` in ``size`` processes; their saved results."""
    out = tmp / f"out-{fn.__name__}-{len(list(tmp.glob('out-*')))}"
    out.mkdir()
    store = str(out / "store")
    env = {"OMP_NUM_THREADS": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        mp.start_processes(fn, args=(size, store, *args, str(out)), nprocs=size,
                           start_method="spawn")  # fmt: skip
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(size)]
