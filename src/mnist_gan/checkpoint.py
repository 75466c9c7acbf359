"""Resumable checkpoints: what a run's training depends on (:func:`fingerprint`), and the one
checkpoint file a run keeps (:class:`CheckpointStore`), resumed from only when every part of the
fingerprint matches."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mnist_gan.params import TrainParams, params_to_dict
from mnist_gan.utils import atomic_path

__all__ = ["CHECKPOINT_FORMAT", "CheckpointStore", "fingerprint"]

CHECKPOINT_FORMAT = 2  # 2: the fingerprint is a dict of parts


def fingerprint(
    cfg: TrainParams,
    seed: int,
    data_sha256: str,
    device: str,
    code: str,
    world_size: int = 1,
    *,
    strategy: str,
) -> dict[str, str]:
    """What determines training, part by part: a checkpoint resumes only when every part matches.

    Args:
        cfg: The train params.
        seed: ``base.seed`` (part of ``params``).
        data_sha256: SHA-256 of the training data file.
        device: The device type (``cpu`` or ``cuda``): RNG states do not carry across them.
        code: A hash of the project code that trains (the train stage's code deps), so that
            weights trained by old code are never continued by new code.
        world_size: The number of training processes: each has its own share of the data and
            its own RNG streams, so a checkpoint resumes only in a world of the same size.
        strategy: How the trainer runs its step (:class:`~mnist_gan.strategy.Strategy` in words,
            e.g. ``eager float32``): ``auto`` chooses it by device, and compiled kernels, CUDA
            graphs and bf16 each compute other numbers; a checkpoint resumes only under the same
            strategy.

    Returns:
        ``{"params": ..., "data": ..., "device": ..., "code": ..., "world_size": ...,
        "strategy": ...}``, plain strings.
    """
    blob = json.dumps({"train": params_to_dict(cfg), "seed": seed}, sort_keys=True)
    return {
        "params": hashlib.sha256(blob.encode()).hexdigest(),
        "data": data_sha256,
        "device": device,
        "code": code,
        "world_size": str(world_size),
        "strategy": strategy,
    }


class CheckpointStore:
    """One resumable checkpoint file in a folder kept outside the cached outputs.

    Each save replaces ``checkpoint.pt`` atomically, so a kill at any moment leaves the previous
    good checkpoint. A checkpoint carries the :func:`fingerprint` of the run that made it and is
    resumed from only when every part matches; otherwise it is ignored (:attr:`note` says which
    parts differ) and replaced by the next save.

    Args:
        folder: The folder (created on the first save).
        fingerprint: :func:`fingerprint` of the current run.
    """

    FILE = "checkpoint.pt"

    def __init__(self, folder: str | Path, fingerprint: Mapping[str, str]) -> None:
        self.folder = Path(folder)
        self.fingerprint = dict(fingerprint)
        self.note = ""  # why load() returned None, for the log

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.folder / self.FILE

    def load(self) -> dict[str, Any] | None:
        """The checkpoint's contents when it exists and matches the fingerprint, else None.

        Never raises for a bad file: an unreadable, foreign or older-format checkpoint is
        ignored, and :attr:`note` says why.
        """
        if not self.path.is_file():
            self.note = f"no checkpoint at {self.path}"
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign file: never resume from it
            self.note = f"{self.path}: unreadable checkpoint ignored ({type(exc).__name__})"
            return None
        stored = state.get("fingerprint") if isinstance(state, dict) else None
        if not isinstance(stored, dict) or state.get("format") != CHECKPOINT_FORMAT:
            self.note = f"{self.path}: not a checkpoint of this trainer's format; not resumed from"
            return None
        differ = [part for part, value in self.fingerprint.items() if stored.get(part) != value]
        if differ:
            self.note = (
                f"{self.path}: made with other {', '.join(differ)}; not resumed from "
                "(training starts afresh)"
            )
            return None
        self.note = f"resuming from {self.path} (epoch {state.get('epoch')})"
        return state

    def save(self, state: dict[str, Any], **meta: Any) -> None:
        """Write ``state`` plus ``meta`` and the fingerprint, atomically."""
        with atomic_path(self.path) as tmp:
            torch.save({**state, **meta, "fingerprint": self.fingerprint}, tmp)

    def clear(self) -> None:
        """Delete the checkpoint (and temporary files a kill left), then the folder if empty."""
        if not self.folder.is_dir():
            return
        for f in self.folder.glob(f".{self.FILE}.*.tmp"):
            f.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.folder.rmdir()
