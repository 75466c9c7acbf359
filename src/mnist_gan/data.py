"""MNIST as the pipeline sees it: IDX parsing with validation, scaling to [-1, 1], safetensors I/O.

The raw IDX files (see http://yann.lecun.com/exdb/mnist/) are big-endian: a magic number (2051
for images, 2049 for labels), the item count, for images the rows and columns, then one unsigned
byte per pixel or label. Every defect (bad magic, wrong dimensions, a size that disagrees with
the header, image and label counts that differ, a label outside 0-9) is a :class:`DataError`
naming the file and the defect.

Normalized sets are safetensors files holding ``images`` float32 (N, 1, 28, 28) in [-1, 1] and
``labels`` int64 (N,). The [-1, 1] range matches the generator's tanh output.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mnist_gan.utils import load_safetensors, save_tensors

__all__ = [
    "IMAGE_MAGIC",
    "LABEL_MAGIC",
    "RAW_FILES",
    "DataError",
    "dataset_stats",
    "load_normalized",
    "normalize",
    "prepare",
    "read_idx_images",
    "read_idx_labels",
    "read_raw_split",
    "save_normalized",
    "shift_images",
]

IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
SIDE = 28
NUM_CLASSES = 10

# split -> (images file, labels file), as the fetch stage stores them.
RAW_FILES: Mapping[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class DataError(ValueError):
    """Input data is missing or malformed.

    Attributes:
        problems: One line per defect, each naming the file: ``<path>: <defect>``.
    """

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found (run the fetch stage first)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _check_magic(path: Path, magic: int, want: int, what: str) -> None:
    if magic == want:
        return
    other = {IMAGE_MAGIC: "an IDX image file", LABEL_MAGIC: "an IDX label file"}
    hint = f"; it looks like {other[magic]}" if magic in other else ""
    raise DataError(f"{path}: bad magic number {magic} (expected {want} for {what}{hint})")


def _check_size(path: Path, actual: int, header: int, count: int, item: int, what: str) -> None:
    want = header + count * item
    if actual < want:
        raise DataError(
            f"{path}: truncated: the header announces {count} {what} ({want} bytes) "
            f"but the file holds {actual} bytes"
        )
    if actual > want:
        raise DataError(
            f"{path}: {actual - want} unexpected bytes after the {count} {what} "
            "the header announces"
        )


def read_idx_images(path: str | Path) -> np.ndarray:
    """Read and validate an IDX image file.

    Args:
        path: The decompressed file (``*-images-idx3-ubyte``).

    Returns:
        uint8 array (N, 28, 28).

    Raises:
        DataError: The file is missing, has a bad magic number, images that are not 28x28,
            no images, or a size that disagrees with its header.
    """
    path = Path(path)
    data = _read(path)
    if len(data) < 16:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the 16-byte header")
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    _check_magic(path, magic, IMAGE_MAGIC, "an IDX image file")
    if (rows, cols) != (SIDE, SIDE):
        raise DataError(f"{path}: images are {rows}x{cols}, expected {SIDE}x{SIDE}")
    if count == 0:
        raise DataError(f"{path}: holds no images")
    _check_size(path, len(data), 16, count, rows * cols, "images")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(path: str | Path) -> np.ndarray:
    """Read and validate an IDX label file.

    Args:
        path: The decompressed file (``*-labels-idx1-ubyte``).

    Returns:
        uint8 array (N,) with values in 0-9.

    Raises:
        DataError: The file is missing, has a bad magic number, a size that disagrees with
            its header, or a label outside 0-9.
    """
    path = Path(path)
    data = _read(path)
    if len(data) < 8:
        raise DataError(f"{path}: truncated: {len(data)} bytes, shorter than the 8-byte header")
    magic, count = struct.unpack(">II", data[:8])
    _check_magic(path, magic, LABEL_MAGIC, "an IDX label file")
    _check_size(path, len(data), 8, count, 1, "labels")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        first = int(bad[0])
        raise DataError(
            f"{path}: label {int(labels[first])} at index {first} is outside 0-9 "
            f"({bad.size} bad label{'s' if bad.size > 1 else ''} in all)"
        )
    return labels


def read_raw_split(raw_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one split's image and label files from the fetch stage's folder.

    Args:
        raw_dir: The folder holding the decompressed IDX files.
        split: ``"train"`` or ``"test"``.

    Returns:
        uint8 images (N, 28, 28) and uint8 labels (N,).

    Raises:
        DataError: Every defect found in the two files, or counts that disagree.
    """
    images_name, labels_name = RAW_FILES[split]
    raw_dir = Path(raw_dir)
    problems: list[str] = []
    images = labels = None
    try:
        images = read_idx_images(raw_dir / images_name)
    except DataError as exc:
        problems.extend(exc.problems)
    try:
        labels = read_idx_labels(raw_dir / labels_name)
    except DataError as exc:
        problems.extend(exc.problems)
    if images is not None and labels is not None and len(images) != len(labels):
        problems.append(
            f"{raw_dir / labels_name}: holds {len(labels)} labels but "
            f"{raw_dir / images_name} holds {len(images)} images"
        )
    if problems:
        raise DataError(problems)
    assert images is not None and labels is not None
    return images, labels


def normalize(images: np.ndarray) -> torch.Tensor:
    """Scale uint8 pixels to float32 in [-1, 1] (0 -> -1, 255 -> 1), the generator's tanh range.

    Args:
        images: uint8 array (N, 28, 28).

    Returns:
        float32 tensor (N, 1, 28, 28).
    """
    if images.dtype != np.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {images.dtype}")
    scaled = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(scaled).unsqueeze(1)  # (N, 28, 28) -> (N, 1, 28, 28)


def prepare(
    raw_dir: str | Path, train_limit: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read, validate and normalize both splits.

    Args:
        raw_dir: The fetch stage's folder of decompressed IDX files.
        train_limit: Keep only the first N training images; 0 keeps all. The test set is
            always whole.

    Returns:
        ``{"train": (images, labels), "test": (images, labels)}``: float32 images
        (N, 1, 28, 28) in [-1, 1] and int64 labels (N,).

    Raises:
        DataError: Every defect found in any of the four files.
    """
    if train_limit < 0:
        raise ValueError(f"train_limit must be >= 0, got {train_limit}")
    problems: list[str] = []
    raw: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in RAW_FILES:
        try:
            raw[split] = read_raw_split(raw_dir, split)
        except DataError as exc:
            problems.extend(exc.problems)
    if problems:
        raise DataError(problems)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for split, (images, labels) in raw.items():
        if split == "train" and train_limit:
            images, labels = images[:train_limit], labels[:train_limit]
        out[split] = (normalize(images), torch.from_numpy(labels.astype(np.int64)))
    return out


def _check_normalized(images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    problems = []
    if images.dtype != torch.float32:
        problems.append(f"images are {images.dtype}, expected torch.float32")
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, SIDE, SIDE):
        problems.append(f"images have shape {tuple(images.shape)}, expected (N, 1, 28, 28)")
    if labels.dtype != torch.int64:
        problems.append(f"labels are {labels.dtype}, expected torch.int64")
    n = images.shape[0] if images.dim() else None
    if labels.dim() != 1 or labels.shape[0] != n:
        problems.append(f"labels have shape {tuple(labels.shape)}, expected ({n},) like images")
    return problems


def save_normalized(path: str | Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Write a normalized set as safetensors (``images`` and ``labels``).

    Args:
        path: The ``.safetensors`` file to write (its folder must exist). Write into a
            temporary folder and rename it (``utils.atomic_dir``) for atomic output.
        images: float32 (N, 1, 28, 28) in [-1, 1].
        labels: int64 (N,).

    Raises:
        ValueError: Wrong dtypes or shapes.
    """
    problems = _check_normalized(images, labels)
    if problems:
        raise ValueError("; ".join(problems))
    # One metadata key only: safetensors writes a map of several in no fixed order, and no
    # timestamps or paths, so identical inputs give identical bytes.
    save_tensors(
        {"images": images.contiguous(), "labels": labels.contiguous()},
        path,
        metadata={"scaling": "x / 127.5 - 1"},
    )


def load_normalized(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a normalized set written by :func:`save_normalized`.

    Args:
        path: A ``train.safetensors`` or ``test.safetensors`` file.

    Returns:
        float32 images (N, 1, 28, 28) in [-1, 1] and int64 labels (N,).

    Raises:
        DataError: The file is missing, unreadable, or lacks the expected tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (run the normalize stage first)")
    try:
        tensors = load_safetensors(path)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    missing = [k for k in ("images", "labels") if k not in tensors]
    if missing:
        raise DataError(f"{path}: lacks tensor(s) {', '.join(missing)}")
    images, labels = tensors["images"], tensors["labels"]
    problems = _check_normalized(images, labels)
    if problems:
        raise DataError([f"{path}: {p}" for p in problems])
    return images, labels


def _summary(images: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float | int]:
    n = images.numel()
    total = torch.zeros((), dtype=torch.float64)
    squares = torch.zeros((), dtype=torch.float64)
    # Sums in float64, chunked, so the statistics are exact to print precision and no
    # float64 copy of the whole set is made.
    for chunk in images.reshape(-1).split(1 << 22):
        c = chunk.double()
        total += c.sum()
        squares += (c * c).sum()
    mean = (total / n).item()
    std = max(squares.item() / n - mean * mean, 0.0) ** 0.5  # population std
    stats: dict[str, float | int] = {
        f"{prefix}_count": int(labels.numel()),
        f"{prefix}_mean": round(mean, 6),
        f"{prefix}_std": round(std, 6),
        f"{prefix}_min": round(images.min().item(), 6),
        f"{prefix}_max": round(images.max().item(), 6),
    }
    counts = torch.bincount(labels, minlength=NUM_CLASSES)
    stats.update({f"{prefix}_class_{d}": int(counts[d]) for d in range(NUM_CLASSES)})
    return stats


def dataset_stats(
    splits: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, float | int]:
    """Flat statistics for ``metrics/normalize.json`` (one key per number, for ``dvc metrics``).

    Args:
        splits: As returned by :func:`prepare`.

    Returns:
        For each split: ``<split>_count``, ``_mean``, ``_std``, ``_min``, ``_max`` of the
        normalized pixels, and ``<split>_class_0`` .. ``_class_9`` label counts.
    """
    stats: dict[str, float | int] = {}
    for split, (images, labels) in splits.items():
        stats.update(_summary(images, labels, split))
    return stats


def shift_images(
    images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by its own random whole-pixel offset, filling with background.

    Differentiable in ``images``: the classifier's augmentation, and DiffAugment's translation
    of everything the GAN's D sees (``train.d_shift``), whose gradient reaches G through it.

    Args:
        images: (B, 1, H, W) in [-1, 1]; -1 is the background.
        max_shift: Largest offset in pixels along each axis; 0 returns ``images``.
        generator: Draws the offsets, so augmentation is reproducible; None: torch's global
            generator of the images' device.

    Returns:
        The shifted images, same shape.
    """
    if max_shift == 0:
        return images
    b, _, h, w = images.shape
    s = max_shift
    padded = F.pad(images, (s, s, s, s), value=-1.0)  # (B, 1, H+2s, W+2s)
    device = images.device if generator is None else generator.device
    dy = torch.randint(0, 2 * s + 1, (b,), generator=generator, device=device)
    dx = torch.randint(0, 2 * s + 1, (b,), generator=generator, device=device)
    dy, dx = dy.to(images.device), dx.to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (B, W)
    idx = torch.arange(b, device=images.device)[:, None, None]
    # One gather for the whole batch: (B, H, W) crops of the padded images.
    return padded[idx, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)
