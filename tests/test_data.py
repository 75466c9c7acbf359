"""The normalize stage: IDX validation, scaling to [-1, 1], safetensors I/O and statistics.

Everything here runs on tiny synthetic IDX files written by the tests; real MNIST is covered by
tests/test_pipeline_data.py.
"""

from __future__ import annotations

import json
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import load_stage

from mnist_gan.data import (
    DataError,
    dataset_stats,
    load_normalized,
    normalize,
    prepare,
    read_idx_images,
    read_idx_labels,
    save_normalized,
    shift_images,
)
from mnist_gan.utils import _umask

ROOT = Path(__file__).resolve().parents[1]
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    return struct.pack(">IIII", magic, *images.shape) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + np.asarray(labels, np.uint8).tobytes()


class Raw:
    """A raw folder of synthetic IDX files: 7 training and 4 test images."""

    def __init__(self, folder: Path) -> None:
        rng = np.random.default_rng(1)
        self.train_x = rng.integers(0, 256, (7, 28, 28)).astype(np.uint8)
        self.train_x[0, 0, 0], self.train_x[0, 0, 1] = 0, 255  # both ends of the range
        self.train_y = np.array([3, 1, 4, 1, 5, 9, 2], np.uint8)
        self.test_x = rng.integers(0, 256, (4, 28, 28)).astype(np.uint8)
        self.test_y = np.array([0, 0, 7, 8], np.uint8)
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.write(TRAIN_IMAGES, idx_images(self.train_x))
        self.write(TRAIN_LABELS, idx_labels(self.train_y))
        self.write(TEST_IMAGES, idx_images(self.test_x))
        self.write(TEST_LABELS, idx_labels(self.test_y))

    def write(self, name: str, content: bytes) -> Path:
        (self.folder / name).write_bytes(content)
        return self.folder / name


@pytest.fixture
def raw(tmp_path: Path) -> Raw:
    return Raw(tmp_path / "raw")


def expected_scaled(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64)[:, None] / 127.5 - 1.0  # (N, 28, 28) -> (N, 1, 28, 28)


# --- parsing and scaling --------------------------------------------------------------------


def test_prepare_reads_and_scales_both_splits(raw: Raw) -> None:
    splits = prepare(raw.folder)
    assert list(splits) == ["train", "test"]
    for split, x, y in [("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)]:
        images, labels = splits[split]
        assert images.dtype == torch.float32 and images.shape == (len(x), 1, 28, 28)
        assert labels.dtype == torch.int64 and labels.tolist() == y.tolist()
        np.testing.assert_allclose(images.numpy(), expected_scaled(x), rtol=0, atol=1e-6)
    train = splits["train"][0]
    assert train[0, 0, 0, 0].item() == -1.0 and train[0, 0, 0, 1].item() == 1.0
    assert train.min().item() == -1.0 and train.max().item() == 1.0


def test_normalize_maps_every_byte_monotonically_into_range() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    out = normalize(pixels)
    assert out.shape == (1, 1, 16, 16)
    flat = out.flatten()
    assert flat[0].item() == -1.0 and flat[-1].item() == 1.0
    assert torch.all(flat[1:] > flat[:-1])
    with pytest.raises(TypeError, match="uint8"):
        normalize(pixels.astype(np.float32))


def test_train_limit_keeps_the_first_images_and_the_whole_test_set(raw: Raw) -> None:
    splits = prepare(raw.folder, train_limit=3)
    assert splits["train"][1].tolist() == raw.train_y[:3].tolist()
    np.testing.assert_allclose(
        splits["train"][0].numpy(), expected_scaled(raw.train_x[:3]), atol=1e-6
    )
    assert len(splits["test"][1]) == len(raw.test_y)
    assert len(prepare(raw.folder, train_limit=100)["train"][1]) == 7  # more than there is


MALFORMED = {
    "bad magic (images)": (
        TRAIN_IMAGES,
        lambda r: idx_images(r.train_x, magic=2049),
        "bad magic number 2049 (expected 2051 for an IDX image file; "
        "it looks like an IDX label file)",
    ),
    "bad magic (labels)": (
        TEST_LABELS,
        lambda r: idx_labels(r.test_y, magic=0x12345678),
        f"bad magic number {0x12345678} (expected 2049 for an IDX label file)",
    ),
    "truncated images": (
        TRAIN_IMAGES,
        lambda r: idx_images(r.train_x)[:-10],
        f"truncated: the header announces 7 images ({16 + 7 * 784} bytes) "
        f"but the file holds {16 + 7 * 784 - 10} bytes",
    ),
    "truncated header": (
        TEST_IMAGES,
        lambda r: b"\x00\x00\x08",
        "truncated: 3 bytes, shorter than the 16-byte header",
    ),
    "truncated labels": (
        TRAIN_LABELS,
        lambda r: idx_labels(r.train_y)[:-1],
        "truncated: the header announces 7 labels (15 bytes) but the file holds 14 bytes",
    ),
    "trailing bytes": (
        TEST_LABELS,
        lambda r: idx_labels(r.test_y) + b"\x00\x00",
        "2 unexpected bytes after the 4 labels the header announces",
    ),
    "wrong dimensions": (
        TEST_IMAGES,
        lambda r: idx_images(np.zeros((4, 27, 28), np.uint8)),
        "images are 27x28, expected 28x28",
    ),
    "count mismatch": (
        TRAIN_LABELS,
        lambda r: idx_labels(r.train_y[:5]),
        f"holds 5 labels but {{folder}}/{TRAIN_IMAGES} holds 7 images",
    ),
    "label of 12": (
        TRAIN_LABELS,
        lambda r: idx_labels(np.array([3, 1, 12, 1, 5, 9, 2])),
        "label 12 at index 2 is outside 0-9 (1 bad label in all)",
    ),
    "missing file": (TEST_LABELS, None, "file not found (run the fetch stage first)"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_names_file_and_defect(raw: Raw, case: str) -> None:
    name, make, defect = MALFORMED[case]
    if make is None:
        (raw.folder / name).unlink()
    else:
        raw.write(name, make(raw))
    with pytest.raises(DataError) as err:
        prepare(raw.folder)
    assert err.value.problems == [f"{raw.folder / name}: {defect.format(folder=raw.folder)}"]


def test_every_defect_is_reported_at_once(raw: Raw) -> None:
    raw.write(TRAIN_IMAGES, b"junk")
    raw.write(TEST_LABELS, idx_labels(np.array([0, 0, 70, 8])))
    with pytest.raises(DataError) as err:
        prepare(raw.folder)
    assert [p.split(": ")[0] for p in err.value.problems] == [
        str(raw.folder / TRAIN_IMAGES),
        str(raw.folder / TEST_LABELS),
    ]


def test_readers_return_header_shaped_arrays(raw: Raw) -> None:
    images = read_idx_images(raw.folder / TRAIN_IMAGES)
    labels = read_idx_labels(raw.folder / TRAIN_LABELS)
    assert images.shape == (7, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, raw.train_x)
    np.testing.assert_array_equal(labels, raw.train_y)


# --- safetensors I/O and statistics ---------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path, raw: Raw) -> None:
    images, labels = prepare(raw.folder)["train"]
    path = tmp_path / "train.safetensors"
    save_normalized(path, images, labels)
    got_x, got_y = load_normalized(path)
    assert torch.equal(got_x, images) and torch.equal(got_y, labels)
    # Same input, same bytes: no timestamps in the file.
    again = tmp_path / "again.safetensors"
    save_normalized(again, images, labels)
    assert again.read_bytes() == path.read_bytes()


def test_save_rejects_wrong_dtypes_and_shapes(tmp_path: Path) -> None:
    x = torch.zeros(3, 1, 28, 28)
    y = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="images are torch.float64"):
        save_normalized(tmp_path / "a", x.double(), y)
    with pytest.raises(ValueError, match=r"images have shape \(3, 28, 28\)"):
        save_normalized(tmp_path / "a", x[:, 0], y)
    with pytest.raises(ValueError, match=r"labels have shape \(2,\), expected \(3,\)"):
        save_normalized(tmp_path / "a", x, y[:2])
    assert not (tmp_path / "a").exists()


def test_load_normalized_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DataError, match=f"{missing}: file not found"):
        load_normalized(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match=f"{junk}: not a readable safetensors file"):
        load_normalized(junk)
    from safetensors.torch import save_file

    partial = tmp_path / "partial.safetensors"
    save_file({"images": torch.zeros(2, 1, 28, 28)}, str(partial))
    with pytest.raises(DataError, match=f"{partial}: lacks tensor\\(s\\) labels"):
        load_normalized(partial)


def test_dataset_stats_match_an_independent_computation(raw: Raw) -> None:
    splits = prepare(raw.folder)
    stats = dataset_stats(splits)
    for split, x, y in [("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)]:
        ref = expected_scaled(x)
        assert stats[f"{split}_count"] == len(y)
        assert stats[f"{split}_mean"] == pytest.approx(ref.mean(), abs=1e-6)
        assert stats[f"{split}_std"] == pytest.approx(ref.std(), abs=1e-6)
        assert stats[f"{split}_min"] == pytest.approx(ref.min(), abs=1e-6)
        assert stats[f"{split}_max"] == pytest.approx(ref.max(), abs=1e-6)
        assert [stats[f"{split}_class_{d}"] for d in range(10)] == np.bincount(
            y, minlength=10
        ).tolist()
    assert len(stats) == 2 * 15


# --- the stage script -----------------------------------------------------------------------


def invoke(raw_dir: Path, out: Path, metrics: Path, params: Path):
    stage = load_stage("normalize")
    args = ["--raw", str(raw_dir), "--out", str(out), "--metrics", str(metrics)]
    return CliRunner().invoke(stage.main, [*args, "--params", str(params)])


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("normalize:\n  train_limit: 0\n")
    return path


def test_stage_writes_sets_and_flat_metrics(tmp_path: Path, raw: Raw, params_file: Path) -> None:
    out, metrics = tmp_path / "normalized", tmp_path / "metrics" / "normalize.json"
    result = invoke(raw.folder, out, metrics, params_file)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["test.safetensors", "train.safetensors"]
    for f in out.iterdir():  # readable as any other output is (safetensors alone writes 0600)
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~_umask(), f.name
    images, labels = load_normalized(out / "train.safetensors")
    assert images.shape == (7, 1, 28, 28) and labels.tolist() == raw.train_y.tolist()
    stats = json.loads(metrics.read_text())
    assert stats["train_count"] == 7 and stats["test_count"] == 4
    assert stats["train_class_1"] == 2 and stats["test_class_0"] == 2
    assert all(isinstance(v, (int, float)) for v in stats.values())  # flat, for dvc metrics


def test_stage_applies_train_limit(tmp_path: Path, raw: Raw) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("normalize:\n  train_limit: 2\n")
    out, metrics = tmp_path / "normalized", tmp_path / "normalize.json"
    assert invoke(raw.folder, out, metrics, params).exit_code == 0
    assert load_normalized(out / "train.safetensors")[1].tolist() == [3, 1]
    assert json.loads(metrics.read_text())["test_count"] == 4


def test_stage_on_malformed_input_fails_without_output(
    tmp_path: Path, raw: Raw, params_file: Path
) -> None:
    raw.write(TRAIN_LABELS, idx_labels(np.array([3, 1, 12, 1, 5, 9, 2])))
    raw.write(TEST_IMAGES, idx_images(raw.test_x)[:-1])
    out, metrics = tmp_path / "normalized", tmp_path / "normalize.json"
    result = invoke(raw.folder, out, metrics, params_file)
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"error: {raw.folder / TRAIN_LABELS}: label 12 at index 2 is outside 0-9 "
        "(1 bad label in all)",
        f"error: {raw.folder / TEST_IMAGES}: truncated: the header announces 4 images "
        f"({16 + 4 * 784} bytes) but the file holds {16 + 4 * 784 - 1} bytes",
    ]
    assert not out.exists() and not metrics.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs


def test_stage_failure_keeps_earlier_good_output(
    tmp_path: Path, raw: Raw, params_file: Path
) -> None:
    out, metrics = tmp_path / "normalized", tmp_path / "normalize.json"
    assert invoke(raw.folder, out, metrics, params_file).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    metrics_before = metrics.read_bytes()
    raw.write(TRAIN_IMAGES, idx_images(raw.train_x, magic=1234))
    result = invoke(raw.folder, out, metrics, params_file)
    assert result.exit_code == 1
    assert f"{raw.folder / TRAIN_IMAGES}: bad magic number 1234" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert metrics.read_bytes() == metrics_before


def test_shift_images_moves_content_and_fills_background() -> None:
    images = torch.full((64, 1, 28, 28), -1.0)
    images[:, 0, 10:18, 10:18] = 1.0  # a square away from the borders
    out = shift_images(images, 2, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert ((out == 1.0).sum(dim=(1, 2, 3)) == 64).all()  # nothing lost, only moved
    moved = (out != images).flatten(1).any(1)
    assert moved.float().mean() > 0.8  # 24 of 25 offsets move it
    rows = (out[:, 0] == 1.0).any(2).float().argmax(1)  # first row of the square
    assert set(rows.tolist()) <= set(range(8, 13)) and len(set(rows.tolist())) > 1
    same = shift_images(images, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, same)
    assert shift_images(images, 0, torch.Generator()) is images


def test_shift_images_is_differentiable_and_draws_from_the_global_rng() -> None:
    """What DiffAugment in the GAN's step (train.d_shift) relies on: the gradient reaches each
    input pixel that stays in the image, once, and none that is shifted out; without a
    generator the offsets come from torch's global RNG, so the trainer's seed fixes them."""
    images = torch.rand(32, 1, 28, 28, requires_grad=True)
    torch.manual_seed(3)
    out = shift_images(images, 2)
    out.sum().backward()
    grad = images.grad
    assert set(grad.unique().tolist()) == {0.0, 1.0}
    kept = grad.sum(dim=(1, 2, 3))  # (28 - |dy|) * (28 - |dx|) pixels survive the shift
    assert ((kept <= 28 * 28) & (kept >= 26 * 26)).all() and (kept < 28 * 28).any()
    torch.manual_seed(3)
    assert torch.equal(shift_images(images, 2), out)
