"""Small helpers every stage shares: seeding, device choice, atomic writes, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "atomic_dir",
    "atomic_path",
    "load_safetensors",
    "load_weights",
    "native_bf16",
    "resolve_device",
    "save_tensors",
    "seed_everything",
    "sha256_file",
    "set_threads",
    "write_json",
]


def seed_everything(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """Seed ``random``, ``numpy`` and ``torch``, and return a generator for sampling.

    Args:
        seed: The seed, from ``base.seed``.
        device: Where the returned generator draws its numbers.

    Returns:
        A ``torch.Generator`` on ``device`` seeded with ``seed``: pass it to every sampling call
        so that draws do not depend on what else consumed the global RNG.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds code that uses the legacy global RNG
    torch.manual_seed(seed)
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    return gen


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for PyTorch's operators (``base.threads``; 0 keeps the default).

    CPU kernels split their float sums by thread, so the count is part of what makes a CPU run
    reproducible: 1, 2 and 4 threads train different weights from the same seed.
    """
    if threads > 0:
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    """The device for ``base.device``: ``auto`` picks CUDA when it is available.

    Raises:
        RuntimeError: ``cuda`` was asked for and no CUDA device is available.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU from Ampere on (compute capability
    8.0), or a CPU with AMX or AVX512-BF16. Elsewhere bf16 is emulated, slower than float32
    (``torch.cuda.is_bf16_supported()`` counts emulation as support by default). On ROCm builds
    the capability is the GPU's gfx version, at least 9, so every AMD GPU counts as native."""
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.get_device_capability(index) >= (8, 0)
    if device.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private, so probed
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _umask() -> int:
    """The process's umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place when the block succeeds.

    A crash or an exception leaves ``path`` as it was (or absent) and removes the temporary file,
    so DVC never caches a half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes it private (0600); give open()'s permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; swap it into place on success.

    The previous folder, if any, is replaced only once the new one is complete; on an exception
    it is left untouched and the temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private (0700); give mkdir's permissions
    old = path.parent / f".{path.name}.old"
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as sorted, indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (on the CPU).

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: The file is not a readable safetensors file (truncated, or another format),
            in one line naming it.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError, OSError, ...: the types differ between versions
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({why})") from None


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors' ``save_file``, leaving the file with the permissions ``open()`` gives.

    safetensors (0.8) writes its files private (mode 0600) whatever the umask, so a teammate
    reading a shared checkout, or a server run by another user, could not open the weights or
    the data; this gives them 0666 less the umask, as every other output of the stages has.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    Path(path).chmod(0o666 & ~_umask())


def load_weights(module: nn.Module, path: str | Path, hint: str = "") -> None:
    """Load a safetensors file into ``module``, checking that every tensor fits first.

    Args:
        module: The network, built from its config.
        path: Its weights.
        hint: Appended to the error, e.g. what to run to make the file again.

    Raises:
        FileNotFoundError: There is no such file.
        ValueError: Unreadable, or tensors missing, unexpected or of another shape: one line
            that names the file and the first such tensor of each kind.
    """
    state = load_safetensors(path)
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    if shapes:
        k = shapes[0]
        got, want = tuple(state[k].shape), tuple(own[k].shape)
        problems.append(f"{len(shapes)} of another shape (first: {k} {got}, want {want})")
    if problems:
        name = type(module).__name__
        raise ValueError(
            f"{path}: weights do not fit the {name} of the config: tensors "
            f"{'; '.join(problems)}{hint}"
        )
    module.load_state_dict(state)
