"""Real data's side of every metric: computed once by the reference stage, cached, checked on load.

:func:`compute_reference` scores real images the way :func:`mnist_gan.metrics.evaluate_samples`
scores samples, for the same sample size: a fixed random subset of the training set (embedded,
and kept) against the test set, and held-out test images against the training set and the other
test images for memorisation. Along the way it embeds the test set and sets up what scoring
samples needs (:class:`mnist_gan.metrics.RealData`: k-NN radii, class shares, the memorisation
threshold). Only the reference stage (``pipeline/reference.py``) computes one; the evaluate stage
loads it and scores only the samples.

The cache is a folder of two files: ``reference.safetensors`` (the tensors) and
``reference.json`` (its format, the settings it was computed for, the files it was computed
from, the memorisation threshold, the classifier's test accuracy and real data's value of every
metric). :func:`load_reference` refuses a folder that is missing, unreadable, of another format
or made for other data, in one line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mnist_gan.classifier import NUM_CLASSES, DigitClassifier, embed
from mnist_gan.metrics import (
    KID_SUBSETS,
    METRIC_NAMES,
    RealData,
    RealSubset,
    Reference,
    check_images,
    knn_radii,
    memorization_space,
    memorization_threshold,
    random_stream,
    score_features,
    score_memorization,
)
from mnist_gan.utils import load_safetensors, save_tensors, sha256_file

__all__ = [
    "REFERENCE_CONFIG",
    "REFERENCE_FORMAT",
    "REFERENCE_WEIGHTS",
    "compute_reference",
    "load_reference",
    "reference_settings",
    "reference_sources",
    "save_reference",
]

REFERENCE_FORMAT = "mnist-gan-reference-v1"
REFERENCE_WEIGHTS = "reference.safetensors"
REFERENCE_CONFIG = "reference.json"
# The tensors of reference.safetensors.
_TENSORS = ("test_feats", "test_logits", "test_radii", "test_share", "subset_index",
            "subset_feats", "subset_logits")  # fmt: skip


# --- computing it ----------------------------------------------------------------------------


def compute_reference(
    classifier: DigitClassifier,
    train_images: Tensor,
    test_images: Tensor,
    *,
    test_labels: Tensor | None,
    k: int,
    num_samples: int,
    is_splits: int,
    seed: int,
    batch_size: int = 1000,
    kid_subsets: int = KID_SUBSETS,
    device: str | torch.device = "cpu",
) -> Reference:
    """Everything :func:`mnist_gan.metrics.evaluate_samples` needs from real data alone to score
    ``num_samples`` samples, and real data's value of every metric.

    Args:
        classifier: The evaluator (:func:`mnist_gan.classifier.load_classifier`).
        train_images: (N, 1, 28, 28) the GAN's training images.
        test_images: (N', 1, 28, 28) held-out images: the reference distribution.
        test_labels: (N',) the test set's digits, or None; with them the reference holds the
            classifier's test accuracy (``label_accuracy``), which a conditional generator's
            evaluation needs.
        k: Neighbours for precision, recall, density and coverage (``evaluate.k``).
        num_samples: Samples it will score (``evaluate.num_samples``).
        is_splits: Splits for the Inception Score (``evaluate.is_splits``).
        seed: ``base.seed``, for the threshold, the real images drawn and the KID subsets.
        batch_size: Images per classifier forward pass.
        kid_subsets: Subsets of KID (100, as torchmetrics; fewer only to save time in tests).
        device: Where to compute, and where the returned tensors are (where samples will be
            scored).

    Raises:
        ValueError: Images that are not finite (N, 1, 28, 28) ones, or a ``k`` out of range.
    """
    for images, what in ((train_images, "training images"), (test_images, "test images")):
        check_images(images, what)
    if not 1 <= k < min(num_samples, len(test_images), len(train_images)):
        raise ValueError(f"evaluate.k = {k} must be >= 1 and below the number of samples")
    classifier.eval()
    real = _real_data(classifier, train_images, test_images, test_labels=test_labels, k=k,
                      seed=seed, batch_size=batch_size, kid_subsets=kid_subsets,
                      device=device)  # fmt: skip
    train_pick, test_pick = _picks(num_samples, len(train_images), len(test_images), seed)
    feats, logits = embed(classifier, train_images[train_pick], batch_size, device)
    subset = RealSubset(train_pick, feats, logits)
    quality, _, _ = score_features(subset.feats, subset.logits, real, is_splits=is_splits,
                                   generator=random_stream(seed, "reference_kid"))  # fmt: skip
    memo, _, _ = score_memorization(real.test_space[test_pick.to(real.device)], real,
                                    exclude_test=test_pick)  # fmt: skip
    metrics = {**quality, **memo}
    if real.test_accuracy is not None:
        metrics["label_accuracy"] = real.test_accuracy
    settings = reference_settings(train_images, test_images, k=k, num_samples=num_samples,
                                  is_splits=is_splits, seed=seed,
                                  kid_subsets=kid_subsets)  # fmt: skip
    return Reference(real, subset, metrics, settings)


def _real_data(
    classifier: DigitClassifier,
    train_images: Tensor,
    test_images: Tensor,
    *,
    test_labels: Tensor | None,
    k: int,
    seed: int,
    batch_size: int,
    kid_subsets: int,
    device: str | torch.device,
) -> RealData:
    """Embed the test set and set up the memorisation search, on ``device``."""
    test_feats, test_logits = embed(classifier, test_images, batch_size, device)
    test_pred = test_logits.argmax(1)
    counts = torch.bincount(test_pred, minlength=NUM_CLASSES)
    accuracy = None
    if test_labels is not None:
        accuracy = (test_pred == test_labels.cpu()).double().mean().item()
    test_feats = test_feats.to(device)
    train_space = memorization_space(train_images.to(device))
    return RealData(
        test_feats=test_feats,
        test_radii=knn_radii(test_feats, k),
        test_share=(counts.double() / counts.sum()).to(device),
        train_space=train_space,
        test_space=memorization_space(test_images.to(device)),
        threshold=memorization_threshold(train_space, random_stream(seed, "threshold")),
        k=k,
        kid_subsets=kid_subsets,
        test_accuracy=accuracy,
        test_logits=test_logits,
    )


def _picks(num_samples: int, num_train: int, num_test: int, seed: int) -> tuple[Tensor, Tensor]:
    """The real images that stand in for samples: up to ``num_samples`` training images (the
    quality reference) and test images (the memorisation reference), drawn from one seeded
    stream in that order."""
    pick = random_stream(seed, "reference")
    train = torch.randperm(num_train, generator=pick)[: min(num_samples, num_train)]
    test = torch.randperm(num_test, generator=pick)[: min(num_samples, num_test)]
    return train, test


def reference_settings(
    train_images: Tensor,
    test_images: Tensor,
    *,
    k: int,
    num_samples: int,
    is_splits: int,
    seed: int,
    kid_subsets: int = KID_SUBSETS,
) -> dict[str, int]:
    """What a reference must have been computed for, to score ``num_samples`` samples
    (:attr:`mnist_gan.metrics.Reference.settings`, compared by
    :func:`mnist_gan.metrics.check_reference`)."""
    return {"k": k, "num_samples": num_samples, "is_splits": is_splits, "seed": seed,
            "kid_subsets": kid_subsets, "num_train": len(train_images),
            "num_test": len(test_images)}  # fmt: skip


def reference_sources(
    classifier_weights: Path, train_file: Path, test_file: Path
) -> dict[str, str]:
    """The SHA-256 of the files a reference is computed from
    (:attr:`mnist_gan.metrics.Reference.sources`)."""
    files = {"classifier": classifier_weights, "train": train_file, "test": test_file}
    return {name: sha256_file(path) for name, path in files.items()}


# --- the cache -------------------------------------------------------------------------------


def save_reference(folder: Path, reference: Reference) -> None:
    """Write ``reference.safetensors`` (tensors) and ``reference.json`` (the rest) to ``folder``.

    The training and test images' pixel vectors are not stored: they are recomputed from the
    data on load (cheap, and 50 MB less in the cache).
    """
    real, subset = reference.real, reference.subset
    tensors = {
        "test_feats": real.test_feats,
        "test_logits": real.test_logits,
        "test_radii": real.test_radii,
        "test_share": real.test_share,
        "subset_index": subset.index,
        "subset_feats": subset.feats,
        "subset_logits": subset.logits,
    }
    save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                 folder / REFERENCE_WEIGHTS)  # fmt: skip
    config = {
        "format": REFERENCE_FORMAT,
        "settings": reference.settings,
        "threshold": real.threshold,
        "test_accuracy": real.test_accuracy,
        "metrics": reference.metrics,
        "sources": reference.sources,
    }
    (folder / REFERENCE_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_reference(
    folder: Path,
    train_images: Tensor,
    test_images: Tensor,
    device: str | torch.device = "cpu",
) -> Reference:
    """Read what :func:`save_reference` wrote, for the same training and test images.

    Args:
        folder: The reference stage's output.
        train_images: (N, 1, 28, 28) the training images it was computed from.
        test_images: (N', 1, 28, 28) the test images it was computed from.
        device: Where to put its tensors (where the samples will be scored).

    Raises:
        ValueError: The folder is missing, unreadable, of another format, or was made for
            other data (one line naming the file).
    """
    folder = Path(folder)
    config_file = folder / REFERENCE_CONFIG
    config = _read_config(config_file)
    settings = config.settings
    made_for = (settings["num_train"], settings["num_test"])
    tensors_file = folder / REFERENCE_WEIGHTS
    try:
        t = load_safetensors(tensors_file)
    except FileNotFoundError as exc:
        raise ValueError(f"{exc} (run the reference stage)") from None
    missing = [n for n in _TENSORS if n not in t]
    if missing:
        raise ValueError(f"{tensors_file}: lacks {', '.join(missing)}")
    lengths = {n: len(t[n]) for n in ("test_feats", "test_logits", "test_radii")}
    if set(lengths.values()) != {made_for[1]}:
        raise ValueError(f"{tensors_file}: test tensors of {lengths} rows, "
                         f"{config_file} says {made_for[1]}")  # fmt: skip
    if made_for != (len(train_images), len(test_images)):
        raise ValueError(
            f"{folder}: made for {made_for[0]} training and {made_for[1]} test images, not "
            f"{len(train_images)} and {len(test_images)}: run the reference stage again"
        )
    real = RealData(
        test_feats=t["test_feats"].to(device),
        test_radii=t["test_radii"].to(device),
        test_share=t["test_share"].to(device),
        train_space=memorization_space(train_images.to(device)),
        test_space=memorization_space(test_images.to(device)),
        threshold=config.threshold,
        k=settings["k"],
        kid_subsets=settings["kid_subsets"],
        test_accuracy=config.test_accuracy,
        test_logits=t["test_logits"],
    )
    subset = RealSubset(t["subset_index"], t["subset_feats"], t["subset_logits"])
    return Reference(real, subset, config.metrics, settings, config.sources)


@dataclass(frozen=True)
class _Config:
    """What ``reference.json`` holds besides its format."""

    settings: dict[str, int]  # with at least _NEEDED_SETTINGS
    metrics: dict[str, float]  # with at least METRIC_NAMES
    threshold: float
    test_accuracy: float | None
    sources: dict[str, str]


# The settings that loading a reference reads (check_reference compares the others).
_NEEDED_SETTINGS = ("num_train", "num_test", "k", "kid_subsets")


def _read_config(config_file: Path) -> _Config:
    """``reference.json``, checked and typed.

    Raises:
        ValueError: The file is missing, unreadable, of another format, malformed or lacks a
            metric (one line naming it).
    """
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{config_file}: not found (run the reference stage)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file}: unreadable ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != REFERENCE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_file}: format {found!r}, expected {REFERENCE_FORMAT!r}")
    try:
        settings = {key: int(v) for key, v in config["settings"].items()}
        for key in _NEEDED_SETTINGS:
            if key not in settings:
                raise KeyError(key)
        accuracy = config["test_accuracy"]
        parsed = _Config(
            settings=settings,
            metrics={key: float(v) for key, v in config["metrics"].items()},
            threshold=float(config["threshold"]),
            test_accuracy=None if accuracy is None else float(accuracy),
            sources={str(key): str(v) for key, v in config.get("sources", {}).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{config_file}: malformed ({type(exc).__name__}: {exc})") from None
    absent = [name for name in METRIC_NAMES if name not in parsed.metrics]
    if absent:
        raise ValueError(f"{config_file}: lacks the metrics {', '.join(absent)}")
    return parsed
