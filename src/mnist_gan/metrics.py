"""How good, how diverse and how original the generated digits are, beside what real data gets.

Every metric is computed in the space of the evaluator classifier (:mod:`mnist_gan.classifier`):
its penultimate features for FID, KID, precision, recall, density and coverage; its class
posteriors for the Inception Score and the mode coverage. Memorisation is the exception: copies
are a pixel-level phenomenon, and a classifier's features are built to map different images of
one digit close together (and were fitted to the training images, so train and test are not
alike to it), so near-copies are found in pixel space (see :func:`memorization_space`).

The real-data reference of every metric is the same computation with real images in place of
the samples: a fixed random subset of the training set of the same size, scored against the test
set; for memorisation, held-out test images scored against the training set and the other test
images. Everything is batched, and the nearest-neighbour searches are chunked so that memory stays
bounded (about ``chunk * ref_chunk`` floats at a time).

Distances are Euclidean. FID and KID follow torchmetrics (``FrechetInceptionDistance``,
``KernelInceptionDistance``: unbiased covariances, a cubic polynomial kernel, 100 subsets of 1000)
and are checked against it by the tests; they are computed here once from features that the
other metrics share.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mnist_gan.classifier import NUM_CLASSES, DigitClassifier, embed
from mnist_gan.utils import load_safetensors, save_tensors, sha256_file

__all__ = [
    "METRIC_NAMES",
    "MEMORIZATION_QUANTILE",
    "MODE_MIN_RATIO",
    "Evaluation",
    "RealData",
    "RealSubset",
    "Reference",
    "balanced_labels",
    "SampleScores",
    "check_reference",
    "class_kl",
    "compute_reference",
    "evaluate_samples",
    "frechet_distance",
    "generate_samples",
    "inception_score",
    "kernel_inception_distance",
    "knn_radii",
    "load_reference",
    "memorization_space",
    "memorization_threshold",
    "mode_count",
    "nearest_neighbours",
    "prdc",
    "reference_scores",
    "reference_settings",
    "reference_sources",
    "reference_subset",
    "save_reference",
    "score_features",
    "score_memorization",
    "score_quality",
    "score_samples",
]

METRIC_NAMES = (
    "fid",
    "kid_mean",
    "kid_std",
    "is_mean",
    "is_std",
    "precision",
    "recall",
    "density",
    "coverage",
    "modes",
    "class_kl",
    "memorized_fraction",
    "nn_ratio",
)
MEMORIZATION_QUANTILE = 0.01  # near-copy: closer to train than 99% of train images to their NN
MEMORIZATION_QUERIES = 2000  # training images whose nearest neighbours set the threshold
MODE_MIN_RATIO = 0.1  # a digit is a mode when it gets >= 10% of its test share (~1% of samples)
KL_PSEUDOCOUNT = 0.5  # per class, so a missing digit gives a large but finite class_kl
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000

# Distinct streams for the random choices, so that one does not shift another.
_SALT_KID, _SALT_REFERENCE, _SALT_THRESHOLD, _SALT_REF_KID = 1, 2, 3, 4


def _rng(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1000 + salt)


# --- distances -------------------------------------------------------------------------------


def _sq_dists(a: Tensor, b: Tensor, b_sq: Tensor, out: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances (m, n) between rows of a (m, d) and b (n, d).

    ``b_sq`` holds the squared norms of b's rows. ``out`` (at least (m, n)) is reused between
    chunks: fresh multi-megabyte tensors cost page faults that rival the arithmetic.
    """
    if out is not None:
        out = out[: len(a), : len(b)]
    # |a|^2 + |b|^2 - 2 a.b as one matrix product; rounding can dip below 0, hence the clamp.
    d = torch.addmm(b_sq[None, :], a, b.T, alpha=-2.0, out=out)
    return d.add_(a.square().sum(1, keepdim=True)).clamp_min_(0.0)


def nearest_neighbours(
    queries: Tensor,
    refs: Tensor,
    exclude: Tensor | None = None,
    chunk: int = 1024,
    ref_chunk: int = 8192,
) -> tuple[Tensor, Tensor]:
    """Each query's nearest reference: exact, chunked over both sets.

    Args:
        queries: (M, D).
        refs: (N, D).
        exclude: (M,) index into ``refs`` that each query must skip (itself), or None.
        chunk: Queries per block.
        ref_chunk: References per block; a block holds ``chunk * ref_chunk`` floats.

    Returns:
        ``(distances, indices)``, both (M,).
    """
    m, dev = len(queries), queries.device
    dist = torch.empty(m, device=dev)
    index = torch.empty(m, dtype=torch.long, device=dev)
    refs_sq = refs.square().sum(1)
    buf = torch.empty(min(chunk, m), min(ref_chunk, len(refs)), device=dev)
    if exclude is not None:
        exclude = exclude.to(dev)
    for i in range(0, m, chunk):
        q = queries[i : i + chunk]
        best = torch.full((len(q),), math.inf, device=dev)
        best_idx = torch.zeros(len(q), dtype=torch.long, device=dev)
        rows = torch.arange(len(q), device=dev)
        for j in range(0, len(refs), ref_chunk):
            r = refs[j : j + ref_chunk]
            # |b|^2 - 2 a.b (q, r): the ranking of |a - b|^2 per query; |a|^2 is added at the end.
            full = (len(q), len(r)) == tuple(buf.shape)  # the last blocks may be smaller
            d = torch.addmm(
                refs_sq[None, j : j + ref_chunk], q, r.T, alpha=-2.0, out=buf if full else None
            )
            if exclude is not None:
                local = exclude[i : i + chunk] - j
                hit = (local >= 0) & (local < d.shape[1])
                d[rows[hit], local[hit]] = math.inf
            v, ix = d.min(1)
            better = v < best
            best = torch.where(better, v, best)
            best_idx = torch.where(better, ix + j, best_idx)
        dist[i : i + len(q)] = best.add_(q.square().sum(1)).clamp_min_(0.0).sqrt_()
        index[i : i + len(q)] = best_idx
    return dist, index


def knn_radii(feats: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Distance from each point to its k-th nearest *other* point of the same set, (N,)."""
    n = len(feats)
    if not 1 <= k < n:
        raise ValueError(f"k = {k} needs 1 <= k < number of points ({n})")
    out = torch.empty(n, device=feats.device)
    sq = feats.square().sum(1)
    buf = torch.empty(min(chunk, n), n, device=feats.device)
    for i in range(0, n, chunk):
        d = _sq_dists(feats[i : i + chunk], feats, sq, buf)  # (c, N)
        rows = torch.arange(len(d), device=feats.device)
        d[rows, rows + i] = math.inf  # a point is not its own neighbour
        out[i : i + len(d)] = d.topk(k, dim=1, largest=False).values[:, -1].sqrt()
    return out


# --- quality and diversity -------------------------------------------------------------------


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """FID between two feature sets (N, D), (M, D): Gaussians fitted with unbiased covariances.

    ``tr(sqrt(S_a S_b))`` is computed as the trace of the symmetric ``sqrt(S_a) S_b sqrt(S_a)``'s
    square root (same eigenvalues, but real and stable), in float64.
    """
    a, b = feats_a.double(), feats_b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)  # (D, D), divided by N - 1
    ev, vec = torch.linalg.eigh(cov_a)
    sqrt_a = (vec * ev.clamp_min(0).sqrt()) @ vec.T
    mid = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = torch.linalg.eigvalsh((mid + mid.T) / 2).clamp_min(0).sqrt().sum()
    fid = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt
    return float(fid)


def _poly_mmd(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD^2 with the kernel (x.y / D + coef)^degree (torchmetrics' ``poly_mmd``)."""
    gamma = 1.0 / x.shape[1]
    m = len(x)

    def kernel_sum(u: Tensor, v: Tensor, drop_diag: bool) -> Tensor:
        k = (u @ v.T).mul_(gamma).add_(coef).pow_(degree)  # (m, m)
        # Row sums in float32, their total in float64: the MMD is a small difference of large
        # sums, and a float64 pass over every entry would cost as much as the products.
        total = k.sum(1).double().sum()
        return total - k.diagonal().double().sum() if drop_diag else total

    value = (kernel_sum(x, x, True) + kernel_sum(y, y, True)) / (m * (m - 1))
    value -= 2 * kernel_sum(x, y, False) / m**2
    return float(value)


def kernel_inception_distance(
    feats_real: Tensor,
    feats_fake: Tensor,
    generator: torch.Generator,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
) -> tuple[float, float]:
    """KID: the unbiased polynomial MMD^2 over random subsets; mean and (population) std.

    ``subset_size`` is capped at the smaller set's size.
    """
    size = min(subset_size, len(feats_real), len(feats_fake))
    if size < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    scores = torch.empty(subsets, dtype=torch.float64)
    dev = feats_real.device
    for s in range(subsets):  # a loop over subsets, not samples
        # The subsets are drawn on the CPU (the same on any device), then gathered where the
        # features are.
        r = feats_real[torch.randperm(len(feats_real), generator=generator)[:size].to(dev)]
        f = feats_fake[torch.randperm(len(feats_fake), generator=generator)[:size].to(dev)]
        scores[s] = _poly_mmd(r, f)
    return float(scores.mean()), float(scores.std(unbiased=False))


def inception_score(logits: Tensor, splits: int) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` per split of ``logits`` (N, 10); mean and std over splits.

    Higher is better; at most 10 for ten classes (confident predictions, balanced classes).
    """
    if not 1 <= splits <= len(logits):
        raise ValueError(f"is_splits = {splits} needs 1 <= is_splits <= samples ({len(logits)})")
    log_p = F.log_softmax(logits.double(), dim=1)  # (N, 10)
    scores = []
    for part in log_p.chunk(splits):  # a loop over splits, not samples
        log_marginal = part.exp().mean(0).log()  # (10,)
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(kl.exp())
    values = torch.stack(scores)
    std = values.std() if splits > 1 else torch.zeros(())
    return float(values.mean()), float(std)


def prdc(
    real: Tensor, fake: Tensor, k: int, real_radii: Tensor | None = None, chunk: int = 1024
) -> dict[str, float]:
    """Precision, recall, density and coverage (Kynkaanniemi et al. 2019; Naeem et al. 2020).

    A point's k-NN ball has the radius of its k-th nearest neighbour within its own set.
    Precision: share of fakes inside some real ball. Recall: share of reals inside some fake
    ball. Density: mean number of real balls holding a fake, divided by k (1 for matching
    distributions, above 1 for samples crowded on dense real regions). Coverage: share of real
    balls that hold at least one fake. Strict inequalities, as in the reference code.

    Args:
        real: (N, D) real features.
        fake: (M, D) generated features.
        k: Neighbours for the radii.
        real_radii: (N,) precomputed ``knn_radii(real, k)``.
        chunk: Fakes per block (a block is ``chunk * N`` floats).
    """
    if real_radii is None:
        real_radii = knn_radii(real, k, chunk)
    fake_radii = knn_radii(fake, k, chunk)
    real_r2, fake_r2 = real_radii.square(), fake_radii.square()  # compare squared distances
    real_sq = real.square().sum(1)
    dev = real.device
    holding = torch.empty(len(fake), device=dev)  # per fake: how many real balls hold it
    recall_margin = torch.full((len(real),), math.inf, device=dev)  # min_j d^2 - fake_r2[j]
    nearest_fake = torch.full((len(real),), math.inf, device=dev)  # per real: min_j d^2
    buf = torch.empty(min(chunk, len(fake)), len(real), device=dev)
    tmp = torch.empty_like(buf)
    for i in range(0, len(fake), chunk):
        d = _sq_dists(fake[i : i + chunk], real, real_sq, buf)  # (c, N) squared
        c = len(d)
        # Float arithmetic instead of boolean reductions, which are several times slower here.
        inside = torch.sub(real_r2[None, :], d, out=tmp[:c]).sign_().clamp_min_(0.0)  # d < r^2
        holding[i : i + c] = inside.sum(1)
        torch.minimum(nearest_fake, d.amin(0), out=nearest_fake)
        margin = torch.sub(d, fake_r2[i : i + c, None], out=tmp[:c])
        torch.minimum(recall_margin, margin.amin(0), out=recall_margin)
    return {
        "precision": float((holding > 0).double().mean()),
        "recall": float((recall_margin < 0).double().mean()),
        "density": float(holding.double().mean() / k),
        "coverage": float((nearest_fake < real_r2).double().mean()),
    }


def mode_count(counts: Tensor, ref_share: Tensor, min_ratio: float = MODE_MIN_RATIO) -> int:
    """Digits whose share of the samples is at least ``min_ratio`` times their reference share."""
    share = counts.double() / counts.sum()
    return int((share >= min_ratio * ref_share.double()).sum())


def class_kl(counts: Tensor, ref_share: Tensor, pseudocount: float = KL_PSEUDOCOUNT) -> float:
    """``KL(reference || generated)`` of the class distributions, in nats; lower is better.

    This direction punishes missing digits (the mode collapse it is meant to catch). The
    generated histogram gets ``pseudocount`` per class so that a missing digit gives a large,
    finite value (about 6.5 for a single digit in 10,000 samples).
    """
    p = ref_share.double()
    q = (counts.double() + pseudocount) / (counts.sum() + pseudocount * len(counts))
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p))
    return float(terms.sum())


# --- memorisation ----------------------------------------------------------------------------


def memorization_space(images: Tensor) -> Tensor:
    """Images (N, 1, 28, 28) as the vectors (N, 196) in which near-copies are sought.

    Pixels, mean-pooled 2x2 to 14x14: a copy stays a copy (distance ~0), the search is four
    times cheaper than at 28x28 (it dominates the cost of the evaluation), and single-pixel stroke
    jitter matters less.
    """
    return F.avg_pool2d(images.float(), 2).flatten(1)  # (N, 1, 14, 14) -> (N, 196)


def memorization_threshold(
    train_space: Tensor,
    generator: torch.Generator,
    quantile: float = MEMORIZATION_QUANTILE,
    queries: int = MEMORIZATION_QUERIES,
) -> float:
    """The near-copy distance: the ``quantile`` of training images' distances to their nearest
    other training image (over a fixed random subset of ``queries`` of them).

    A generator that does not copy puts about ``quantile`` of its samples under it, as held-out
    test images do; copies sit at ~0, far under it.
    """
    idx = torch.randperm(len(train_space), generator=generator)[: min(queries, len(train_space))]
    idx = idx.to(train_space.device)
    dist, _ = nearest_neighbours(train_space[idx], train_space, exclude=idx)
    return float(torch.quantile(dist.double(), quantile))


def score_memorization(
    space: Tensor,
    real: RealData,
    exclude_test: Tensor | None = None,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """``memorized_fraction`` and ``nn_ratio`` of samples already in :func:`memorization_space`.

    Args:
        space: (M, 196) the samples.
        real: The prepared real data.
        exclude_test: (M,) each sample's own index in the test set, when the samples are test
            images (the real-data reference), so that a test image is not its own neighbour.

    Returns:
        The two metrics; the distances to and indices of each sample's nearest training image.
    """
    d_train, i_train = nearest_neighbours(space, real.train_space)
    d_test, _ = nearest_neighbours(space, real.test_space, exclude=exclude_test)
    metrics = {
        "memorized_fraction": float((d_train < real.threshold).float().mean()),
        # Below 1 means closer to the training set than to unseen digits; compare with real_.
        "nn_ratio": float((d_train / d_test.clamp_min(1e-6)).mean()),
    }
    return metrics, d_train, i_train


# --- putting it together ---------------------------------------------------------------------


@dataclass(frozen=True)
class RealData:
    """What the metrics need from real data, computed once for samples and references.

    Its tensors sit on one device (:attr:`device`), where the samples are scored.
    """

    test_feats: Tensor  # (N_test, D)
    test_radii: Tensor  # (N_test,) k-NN radii for precision, recall, density, coverage
    test_share: Tensor  # (10,) the classifier's predicted class shares on the test set
    train_space: Tensor  # (N_train, 196) for memorisation
    test_space: Tensor  # (N_test, 196)
    threshold: float  # near-copy distance in memorisation space
    k: int  # neighbours for precision, recall, density and coverage
    kid_subsets: int = KID_SUBSETS
    test_accuracy: float | None = None  # the classifier's, when the test labels are given
    test_logits: Tensor | None = None  # (N_test, 10)

    @property
    def device(self) -> torch.device:
        """Where the real data's tensors are, and the samples are scored."""
        return self.test_feats.device

    @classmethod
    def prepare(
        cls,
        classifier: DigitClassifier,
        train_images: Tensor,
        test_images: Tensor,
        k: int,
        seed: int,
        batch_size: int = 1000,
        kid_subsets: int = KID_SUBSETS,
        test_labels: Tensor | None = None,
        device: str | torch.device = "cpu",
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
        return cls(
            test_feats=test_feats,
            test_radii=knn_radii(test_feats, k),
            test_share=(counts.double() / counts.sum()).to(device),
            train_space=train_space,
            test_space=memorization_space(test_images.to(device)),
            threshold=memorization_threshold(train_space, _rng(seed, _SALT_THRESHOLD)),
            k=k,
            kid_subsets=kid_subsets,
            test_accuracy=accuracy,
            test_logits=test_logits,
        )


@dataclass(frozen=True)
class SampleScores:
    """The metrics of one set of images, and what the figures show."""

    metrics: dict[str, float]
    predictions: Tensor  # (M,) the classifier's digit for each image
    counts: Tensor  # (10,) histogram of the predictions
    nn_train_dist: Tensor  # (M,) distance to the nearest training image (memorisation space)
    nn_train_index: Tensor  # (M,) its index in the training set


def score_features(
    feats: Tensor,
    logits: Tensor,
    real: RealData,
    is_splits: int,
    generator: torch.Generator,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """FID, KID, IS, precision, recall, density, coverage, modes and class_kl of images given
    by their classifier features (M, D) and logits (M, 10).

    Returns:
        The metrics, the predicted digits (M,) and their histogram (10,), on the CPU.
    """
    feats = feats.to(real.device)
    pred = logits.argmax(1).cpu()
    counts = torch.bincount(pred, minlength=NUM_CLASSES)
    kid_mean, kid_std = kernel_inception_distance(
        real.test_feats, feats, generator, subsets=real.kid_subsets
    )
    is_mean, is_std = inception_score(logits, is_splits)
    share = real.test_share.cpu()
    metrics = {
        "fid": frechet_distance(real.test_feats, feats),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "is_mean": is_mean,
        "is_std": is_std,
        **prdc(real.test_feats, feats, real.k, real.test_radii),
        "modes": mode_count(counts, share),
        "class_kl": class_kl(counts, share),
    }
    return metrics, pred, counts


def score_quality(
    images: Tensor,
    classifier: DigitClassifier,
    real: RealData,
    is_splits: int,
    generator: torch.Generator,
    batch_size: int = 1000,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """:func:`score_features` of ``images`` (M, 1, 28, 28), embedded on the real data's device.

    Returns:
        The metrics, the predicted digits (M,) and their histogram (10,).
    """
    feats, logits = embed(classifier, images, batch_size, real.device)  # (M, D), (M, 10)
    return score_features(feats, logits, real, is_splits, generator)


def _check_images(images: Tensor, what: str) -> None:
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(
            f"{what}: expected images of shape (N, 1, 28, 28), got {tuple(images.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{what}: images hold NaN or infinite values")


def score_samples(
    images: Tensor,
    classifier: DigitClassifier,
    real: RealData,
    is_splits: int,
    seed: int,
    batch_size: int = 1000,
) -> SampleScores:
    """Every metric of generated ``images`` (M, 1, 28, 28) in [-1, 1]."""
    _check_images(images, "samples")
    quality, pred, counts = score_quality(
        images, classifier, real, is_splits, _rng(seed, _SALT_KID), batch_size
    )
    memo, d_train, i_train = score_memorization(memorization_space(images.to(real.device)), real)
    return SampleScores({**quality, **memo}, pred, counts, d_train.cpu(), i_train.cpu())


@dataclass(frozen=True)
class RealSubset:
    """The training images that stand in for samples in the real-data reference."""

    index: Tensor  # (n,) their indices in the training set
    feats: Tensor  # (n, D) their classifier features
    logits: Tensor  # (n, 10)


def _reference_picks(num_samples: int, num_train: int, num_test: int,
                     seed: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The real images that stand in for samples: up to ``num_samples`` training images (the
    quality reference) and test images (the memorisation reference), drawn from one seeded
    stream in that order."""
    pick = _rng(seed, _SALT_REFERENCE)
    train = torch.randperm(num_train, generator=pick)[: min(num_samples, num_train)]
    test = torch.randperm(num_test, generator=pick)[: min(num_samples, num_test)]
    return train, test


def reference_subset(
    train_images: Tensor,
    classifier: DigitClassifier,
    num_samples: int,
    seed: int,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
) -> RealSubset:
    """A fixed random subset of ``num_samples`` training images (at most all), embedded."""
    index, _ = _reference_picks(num_samples, len(train_images), 0, seed)
    feats, logits = embed(classifier, train_images[index], batch_size, device)
    return RealSubset(index, feats, logits)


def reference_scores(
    train_images: Tensor,
    test_images: Tensor,
    classifier: DigitClassifier,
    real: RealData,
    num_samples: int,
    is_splits: int,
    seed: int,
    batch_size: int = 1000,
    subset: RealSubset | None = None,
) -> dict[str, float]:
    """What real data gets on every metric, with the same sample size.

    A fixed random subset of ``num_samples`` training images is scored like samples; for
    memorisation, held-out test images (up to ``num_samples``) are scored against the training
    set and the *other* test images. ``subset``: :func:`reference_subset`, when already made.
    """
    if subset is None:
        subset = reference_subset(train_images, classifier, num_samples, seed, batch_size,
                                  real.device)  # fmt: skip
    quality, _, _ = score_features(
        subset.feats, subset.logits, real, is_splits, _rng(seed, _SALT_REF_KID)
    )
    _, held_out = _reference_picks(num_samples, len(train_images), len(test_images), seed)
    memo, _, _ = score_memorization(
        real.test_space[held_out.to(real.device)], real, exclude_test=held_out
    )
    return {**quality, **memo}


# --- the cached reference (the reference stage) ----------------------------------------------

REFERENCE_FORMAT = "mnist-gan-reference-v1"
REFERENCE_WEIGHTS = "reference.safetensors"
REFERENCE_CONFIG = "reference.json"


@dataclass(frozen=True)
class Reference:
    """The real-data side of every metric, computed once and cached by the reference stage.

    ``real`` is what scoring samples needs, ``metrics`` what real data gets on every metric
    (``label_accuracy``: the classifier's test accuracy), and ``settings`` what both were
    computed for: :func:`evaluate_samples` uses a reference only with the same settings.
    """

    real: RealData
    subset: RealSubset
    metrics: dict[str, float]
    settings: dict[str, int]
    # What it was computed from, e.g. {"classifier": sha256, ...}: recorded by the reference
    # stage, compared by the evaluate stage (a reference of another classifier or data is
    # refused).
    sources: dict[str, str] = field(default_factory=dict)


def compute_reference(
    classifier: DigitClassifier,
    train_images: Tensor,
    test_images: Tensor,
    test_labels: Tensor | None,
    k: int,
    num_samples: int,
    is_splits: int,
    seed: int,
    batch_size: int = 1000,
    kid_subsets: int = KID_SUBSETS,
    device: str | torch.device = "cpu",
) -> Reference:
    """Everything :func:`evaluate_samples` computes from real data alone, for ``num_samples``
    samples: test features, logits and k-NN radii, the memorisation threshold, the training
    subset that stands in for samples, and real data's value of every metric
    (``label_accuracy``, the classifier's test accuracy, when ``test_labels`` are given)."""
    for images, what in ((train_images, "training images"), (test_images, "test images")):
        _check_images(images, what)
    if not 1 <= k < min(num_samples, len(test_images), len(train_images)):
        raise ValueError(f"evaluate.k = {k} must be >= 1 and below the number of samples")
    classifier.eval()
    real = RealData.prepare(classifier, train_images, test_images, k, seed, batch_size,
                            kid_subsets, test_labels, device)  # fmt: skip
    subset = reference_subset(train_images, classifier, num_samples, seed, batch_size, device)
    metrics = reference_scores(train_images, test_images, classifier, real, num_samples,
                               is_splits, seed, batch_size, subset)  # fmt: skip
    if real.test_accuracy is not None:
        metrics["label_accuracy"] = real.test_accuracy
    settings = reference_settings(k, num_samples, is_splits, seed, train_images, test_images,
                                  kid_subsets)  # fmt: skip
    return Reference(real, subset, metrics, settings)


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

    Raises:
        ValueError: The folder is missing, unreadable, of another format, or was made for
            other data (one line naming the file).
    """
    folder = Path(folder)
    config_file = folder / REFERENCE_CONFIG
    try:
        config = json.loads(config_file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{config_file}: not found (run the reference stage)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file}: unreadable ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != REFERENCE_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_file}: format {found!r}, expected {REFERENCE_FORMAT!r}")
    names = ("test_feats", "test_logits", "test_radii", "test_share", "subset_index",
             "subset_feats", "subset_logits")  # fmt: skip
    try:
        settings = {key: int(v) for key, v in config["settings"].items()}
        made_for = (settings["num_train"], settings["num_test"])
        k, kid_subsets = settings["k"], settings["kid_subsets"]
        metrics = {key: float(v) for key, v in config["metrics"].items()}
        threshold, accuracy = float(config["threshold"]), config["test_accuracy"]
        accuracy = None if accuracy is None else float(accuracy)
        sources = {str(key): str(v) for key, v in config.get("sources", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{config_file}: malformed ({type(exc).__name__}: {exc})") from None
    absent = [name for name in METRIC_NAMES if name not in metrics]
    if absent:
        raise ValueError(f"{config_file}: lacks the metrics {', '.join(absent)}")
    try:
        t = load_safetensors(folder / REFERENCE_WEIGHTS)
    except FileNotFoundError as exc:
        raise ValueError(f"{exc} (run the reference stage)") from None
    missing = [n for n in names if n not in t]
    if missing:
        raise ValueError(f"{folder / REFERENCE_WEIGHTS}: lacks {', '.join(missing)}")
    lengths = {n: len(t[n]) for n in ("test_feats", "test_logits", "test_radii")}
    if set(lengths.values()) != {made_for[1]}:
        raise ValueError(f"{folder / REFERENCE_WEIGHTS}: test tensors of {lengths} rows, "
                         f"{config_file} says {made_for[1]}")  # fmt: skip
    if made_for != (len(train_images), len(test_images)):
        raise ValueError(
            f"{folder}: made for {made_for[0]} training and {made_for[1]} test images, not "
            f"{len(train_images)} and {len(test_images)}: run the reference stage again"
        )
    test_feats = t["test_feats"].to(device)
    real = RealData(
        test_feats=test_feats,
        test_radii=t["test_radii"].to(device),
        test_share=t["test_share"].to(device),
        train_space=memorization_space(train_images.to(device)),
        test_space=memorization_space(test_images.to(device)),
        threshold=threshold,
        k=k,
        kid_subsets=kid_subsets,
        test_accuracy=accuracy,
        test_logits=t["test_logits"],
    )
    subset = RealSubset(t["subset_index"], t["subset_feats"], t["subset_logits"])
    return Reference(real, subset, metrics, settings, sources)


def check_reference(
    reference: Reference, classifier: DigitClassifier, settings: dict[str, int]
) -> None:
    """Refuse a reference that does not fit: another feature width than ``classifier``'s, or
    other ``settings`` (:func:`reference_settings`).

    Raises:
        ValueError: One line saying what differs, and what to run.
    """
    again = "compute it again (dvc repro reference)"
    width = reference.real.test_feats.shape[1]
    if width != classifier.num_features:
        raise ValueError(f"the reference holds {width}-d features, the classifier makes "
                         f"{classifier.num_features}-d ones: {again}")  # fmt: skip
    have = reference.settings
    differ = [f"{key} {have.get(key)}, not {value}" for key, value in settings.items()
              if have.get(key) != value]  # fmt: skip
    if differ:
        raise ValueError(f"the reference was computed for other settings ({'; '.join(differ)})"
                         f": {again}")  # fmt: skip


def reference_settings(k: int, num_samples: int, is_splits: int, seed: int,
                       train_images: Tensor, test_images: Tensor,
                       kid_subsets: int = KID_SUBSETS) -> dict[str, int]:  # fmt: skip
    """What a reference must have been computed for, to score ``num_samples`` samples."""
    return {"k": k, "num_samples": num_samples, "is_splits": is_splits, "seed": seed,
            "kid_subsets": kid_subsets, "num_train": len(train_images),
            "num_test": len(test_images)}  # fmt: skip


def reference_sources(
    classifier_weights: Path, train_file: Path, test_file: Path
) -> dict[str, str]:
    """The SHA-256 of the files a reference is computed from (:attr:`Reference.sources`)."""
    files = {"classifier": classifier_weights, "train": train_file, "test": test_file}
    return {name: sha256_file(path) for name, path in files.items()}


@dataclass(frozen=True)
class Evaluation:
    """The samples' scores, and the flat metrics file (samples, then ``real_`` references)."""

    samples: SampleScores
    reference: dict[str, float]
    threshold: float  # the near-copy distance (memorisation space)

    @property
    def names(self) -> tuple[str, ...]:
        """:data:`METRIC_NAMES`, and ``label_accuracy`` for a conditional generator's samples."""
        extra = ("label_accuracy",) if "label_accuracy" in self.samples.metrics else ()
        return METRIC_NAMES + extra

    def flat(self) -> dict[str, Any]:
        """The keys of ``metrics/evaluate.json``: :attr:`names` and their ``real_`` twins."""
        out: dict[str, Any] = {}
        for name in self.names:
            out[name] = _clean(self.samples.metrics[name], name)
        for name in self.names:
            out[f"real_{name}"] = _clean(self.reference[name], name)
        return out


def _clean(value: float, name: str) -> float | int:
    # modes is a count; the rest are rounded so the JSON does not change with the last bits.
    if name == "modes":
        return int(value)
    return round(float(value), 6)


def evaluate_samples(
    samples: Tensor,
    classifier: DigitClassifier,
    train_images: Tensor,
    test_images: Tensor,
    k: int,
    is_splits: int,
    seed: int,
    batch_size: int = 1000,
    kid_subsets: int = KID_SUBSETS,
    labels: Tensor | None = None,
    test_labels: Tensor | None = None,
    reference: Reference | None = None,
    device: str | torch.device = "cpu",
) -> Evaluation:
    """Score generated digits and the real-data references of every metric.

    Args:
        samples: (M, 1, 28, 28) generated images in [-1, 1].
        classifier: The evaluator (:func:`mnist_gan.classifier.load_classifier`).
        train_images: (N, 1, 28, 28) the GAN's training images.
        test_images: (N', 1, 28, 28) held-out images: the reference distribution.
        k: Neighbours for precision, recall, density and coverage (``evaluate.k``).
        is_splits: Splits for the Inception Score (``evaluate.is_splits``).
        seed: ``base.seed``, for the KID subsets, the reference subset and the threshold.
        batch_size: Images per classifier forward pass.
        kid_subsets: Subsets of KID (100, as torchmetrics; fewer only to save time in tests).
        labels: (M,) the digits a conditional generator was asked for; adds
            ``label_accuracy``, the share of samples the classifier calls the digit asked for.
            Its reference is the classifier's accuracy on the test set (``test_labels``).
        test_labels: (N',) the test set's digits; needed with ``labels``.
        reference: The real-data side, computed once (:func:`compute_reference` with the same
            settings, e.g. the reference stage's); None computes it here, with the same result.
        device: Where to score when ``reference`` is None (else where the reference is).
    """
    if reference is None:
        test_accuracy = test_labels is not None
    else:
        test_accuracy = reference.real.test_accuracy is not None
    if labels is not None and (labels.shape != samples.shape[:1] or not test_accuracy):
        raise ValueError("label_accuracy needs one label per sample and the test labels")
    _check_images(samples, "samples")
    if reference is None:
        reference = compute_reference(classifier, train_images, test_images, test_labels, k,
                                      len(samples), is_splits, seed, batch_size, kid_subsets,
                                      device)  # fmt: skip
    else:
        want = reference_settings(k, len(samples), is_splits, seed, train_images, test_images,
                                  kid_subsets)  # fmt: skip
        check_reference(reference, classifier, want)
    real = reference.real
    classifier.eval()
    scores = score_samples(samples, classifier, real, is_splits, seed, batch_size)
    ref_metrics = {k: v for k, v in reference.metrics.items() if k != "label_accuracy"}
    if labels is not None:
        hits = scores.predictions == labels.cpu()
        scores.metrics["label_accuracy"] = hits.double().mean().item()
        ref_metrics["label_accuracy"] = real.test_accuracy
    return Evaluation(scores, ref_metrics, real.threshold)


def balanced_labels(n: int) -> Tensor:
    """``n`` digits, each as often as the others (0, 1, ..., 9, 0, 1, ...): what a conditional
    generator is asked for when it is judged."""
    return torch.arange(n) % NUM_CLASSES


@torch.no_grad()
def generate_samples(
    generator: nn.Module,
    num_samples: int,
    latent_dim: int,
    seed: int,
    batch_size: int = 1000,
    device: str | torch.device = "cpu",
    labels: Tensor | None = None,
) -> Tensor:
    """Draw ``num_samples`` images (N, 1, 28, 28) from ``generator`` with z ~ N(0, I), seeded.

    The noise is drawn on the CPU from its own generator, so the samples do not depend on the
    device or on what else used the global RNG. ``labels`` (N,): the digits to ask a
    conditional generator for (e.g. :func:`balanced_labels`).
    """
    rng = torch.Generator().manual_seed(seed)
    generator.eval()
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        z = torch.randn(n, latent_dim, generator=rng).to(device)  # (n, latent_dim)
        y = None if labels is None else labels[start : start + n].to(device)  # (n,)
        images = generator(z) if y is None else generator(z, y)  # (n, 1, 28, 28)
        out.append(images.float().cpu())
    images = torch.cat(out)
    _check_images(images, "generator output")
    return images
