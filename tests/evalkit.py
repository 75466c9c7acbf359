"""Shared, cached material for the classifier and evaluate tests: real MNIST and a quick evaluator.

Several test modules use these; ``functools.cache`` makes each one built once per test session
(a session-scoped fixture defined in two modules would be built twice).
"""

from __future__ import annotations

import functools
import gzip
import tempfile
from pathlib import Path

import torch

from mnist_gan.classifier import DigitClassifier, train_classifier
from mnist_gan.data import normalize, read_raw_split
from mnist_gan.params import ClassifierParams

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
QUICK_PARAMS = ClassifierParams(epochs=1, batch_size=32, lr=3e-3, shift=0)
QUICK_TRAIN = 4000  # images the quick evaluator trains on, for one epoch


@functools.cache
def real_mnist(mirror: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The mirror's train and test sets, normalized: images (N, 1, 28, 28) in [-1, 1], labels."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in FILES:
            gz = mirror / f"{name}.gz"
            data = gzip.decompress(gz.read_bytes()) if gz.exists() else (mirror / name).read_bytes()
            (Path(tmp) / name).write_bytes(data)
        out = {}
        for split in ("train", "test"):
            images, labels = read_raw_split(tmp, split)
            out[split] = (normalize(images), torch.from_numpy(labels.astype("int64")))
    return out


@functools.cache
def quick_classifier(mirror: Path, seed: int = 0) -> DigitClassifier:
    """An evaluator trained for one epoch on the first 4,000 training images (about 97%).

    The tests use seed 0. Another CPU model rounds differently and so trains other weights from
    the same seed, and a CPU with AMX or AVX512-BF16 trains it in bf16 (``classifier.amp``, as
    the pipeline does); ``tests/metric_spread.py`` trains it with other seeds to size the tests'
    bounds on what it measures.
    """
    data = real_mnist(mirror)
    images, labels = data["train"]
    test_images, test_labels = data["test"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights whichever test module asks first
    try:
        model, _ = train_classifier(
            images[:QUICK_TRAIN],
            labels[:QUICK_TRAIN],
            test_images[:100],
            test_labels[:100],
            QUICK_PARAMS,
            seed=seed,
        )
    finally:
        torch.set_num_threads(threads)
    return model
