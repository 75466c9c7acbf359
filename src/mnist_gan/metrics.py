"""How good, how diverse and how original the generated digits are: the metrics, and the scoring
of a set of samples against real data's side of them (a :class:`Reference`).

Every metric is computed in the space of the evaluator classifier (:mod:`mnist_gan.classifier`):
its penultimate features for FID, KID, precision, recall, density and coverage; its class
posteriors for the Inception Score and the mode coverage. Memorisation is the exception: copies
are a pixel-level phenomenon, and a classifier's features are built to map different images of
one digit close together (and were fitted to the training images, so train and test are not
alike to it), so near-copies are found in pixel space (see :func:`memorization_space`).

Real data's side of every metric is the same computation with real images in place of the
samples: a fixed random subset of the training set of the same size, scored against the test
set; for memorisation, held-out test images scored against the training set and the other test
images. :mod:`mnist_gan.reference` computes it once (the reference stage), saves and loads it;
this module defines what scoring needs of it (:class:`Reference`) and scores samples against a
given one (:func:`evaluate_samples`), never building one. Everything is batched, and the
nearest-neighbour searches are chunked so that memory stays bounded (about
``chunk * ref_chunk`` floats at a time).

Distances are Euclidean. FID and KID follow torchmetrics (``FrechetInceptionDistance``,
``KernelInceptionDistance``: unbiased covariances, a cubic polynomial kernel, 100 subsets of 1000)
and are checked against it by the tests; they are computed here once from features that the
other metrics share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mnist_gan.classifier import NUM_CLASSES, DigitClassifier, embed

__all__ = [
    "KID_SUBSETS",
    "MEMORIZATION_QUANTILE",
    "METRIC_NAMES",
    "MODE_MIN_RATIO",
    "Evaluation",
    "RealData",
    "RealSubset",
    "Reference",
    "SampleScores",
    "check_images",
    "check_reference",
    "class_kl",
    "evaluate_samples",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "knn_radii",
    "memorization_space",
    "memorization_threshold",
    "mode_count",
    "nearest_neighbours",
    "prdc",
    "random_stream",
    "score_features",
    "score_memorization",
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

# One random stream per random choice, so that one does not shift another.
_STREAMS = {"kid": 1, "reference": 2, "threshold": 3, "reference_kid": 4}


def random_stream(seed: int, name: str) -> torch.Generator:
    """A CPU generator, seeded from ``seed``, for one of the evaluation's random choices.

    Args:
        seed: ``base.seed``.
        name: The choice: ``kid`` (the samples' KID subsets), ``reference`` (the real images
            that stand in for samples), ``threshold`` (the training images that set the
            memorisation threshold) or ``reference_kid`` (real data's KID subsets).
    """
    return torch.Generator().manual_seed(seed * 1000 + _STREAMS[name])


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
    *,
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
    *,
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
    real: Tensor, fake: Tensor, k: int, *, real_radii: Tensor | None = None, chunk: int = 1024
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


# --- real data's side: what the samples are scored against ----------------------------------


@dataclass(frozen=True)
class RealData:
    """What the metrics need from real data to score samples (:func:`score_samples`).

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


@dataclass(frozen=True)
class RealSubset:
    """The training images that stand in for samples in real data's side of the metrics."""

    index: Tensor  # (n,) their indices in the training set
    feats: Tensor  # (n, D) their classifier features
    logits: Tensor  # (n, 10)


@dataclass(frozen=True)
class Reference:
    """Real data's side of every metric, computed once and cached by the reference stage
    (:mod:`mnist_gan.reference`).

    ``real`` is what scoring samples needs, ``metrics`` what real data gets on every metric
    (``label_accuracy``: the classifier's test accuracy), and ``settings`` what both were
    computed for (:func:`mnist_gan.reference.reference_settings`): :func:`evaluate_samples`
    scores samples only against a reference of the same settings.
    """

    real: RealData
    subset: RealSubset
    metrics: dict[str, float]
    settings: dict[str, int]
    # What it was computed from, e.g. {"classifier": sha256, ...}: recorded by the reference
    # stage, compared by the evaluate stage (a reference of another classifier or data is
    # refused).
    sources: dict[str, str] = field(default_factory=dict)


def check_reference(
    reference: Reference, classifier: DigitClassifier, settings: dict[str, int]
) -> None:
    """Refuse a reference that does not fit: another feature width than ``classifier``'s, or
    other values of the ``settings`` given (any of those of
    :func:`mnist_gan.reference.reference_settings`).

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


# --- scoring ---------------------------------------------------------------------------------


def check_images(images: Tensor, what: str) -> None:
    """Refuse anything but finite images of shape (N, 1, 28, 28).

    Raises:
        ValueError: One line starting with ``what``.
    """
    if images.dim() != 4 or tuple(images.shape[1:]) != (1, 28, 28):
        raise ValueError(
            f"{what}: expected images of shape (N, 1, 28, 28), got {tuple(images.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError(f"{what}: images hold NaN or infinite values")


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
    *,
    is_splits: int,
    generator: torch.Generator,
) -> tuple[dict[str, float], Tensor, Tensor]:
    """FID, KID, IS, precision, recall, density, coverage, modes and class_kl of images given
    by their classifier features (M, D) and logits (M, 10).

    Args:
        feats: (M, D) the images' classifier features.
        logits: (M, 10) their logits.
        real: Real data's side.
        is_splits: Splits for the Inception Score.
        generator: Draws the KID subsets (:func:`random_stream`).

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
        **prdc(real.test_feats, feats, real.k, real_radii=real.test_radii),
        "modes": mode_count(counts, share),
        "class_kl": class_kl(counts, share),
    }
    return metrics, pred, counts


def score_samples(
    images: Tensor,
    classifier: DigitClassifier,
    real: RealData,
    *,
    is_splits: int,
    seed: int,
    batch_size: int = 1000,
) -> SampleScores:
    """Every metric of generated ``images`` (M, 1, 28, 28) in [-1, 1], embedded and scored on
    the real data's device."""
    check_images(images, "samples")
    feats, logits = embed(classifier, images, batch_size, real.device)  # (M, D), (M, 10)
    quality, pred, counts = score_features(
        feats, logits, real, is_splits=is_splits, generator=random_stream(seed, "kid")
    )
    memo, d_train, i_train = score_memorization(memorization_space(images.to(real.device)), real)
    return SampleScores({**quality, **memo}, pred, counts, d_train.cpu(), i_train.cpu())


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
    reference: Reference,
    *,
    is_splits: int,
    seed: int,
    batch_size: int = 1000,
    labels: Tensor | None = None,
) -> Evaluation:
    """Score generated digits against real data's side of every metric.

    Args:
        samples: (M, 1, 28, 28) generated images in [-1, 1].
        classifier: The evaluator (:func:`mnist_gan.classifier.load_classifier`) that
            ``reference`` was computed with.
        reference: Real data's side (:func:`mnist_gan.reference.load_reference`), computed for
            M samples, ``is_splits`` and ``seed``. The samples are scored where its tensors
            are, with its ``k`` and KID subsets.
        is_splits: Splits for the Inception Score (``evaluate.is_splits``).
        seed: ``base.seed``, for the KID subsets.
        batch_size: Images per classifier forward pass.
        labels: (M,) the digits a conditional generator was asked for; adds
            ``label_accuracy``, the share of samples the classifier calls the digit asked for.
            Its reference is the classifier's test accuracy, which ``reference`` holds when it
            was computed with the test labels.

    Raises:
        ValueError: The samples are not finite (M, 1, 28, 28) images; ``labels`` are not one
            per sample, or the reference lacks the test accuracy; the reference was computed
            for other settings or with another classifier's features.
    """
    if labels is not None and (
        labels.shape != samples.shape[:1] or reference.real.test_accuracy is None
    ):
        raise ValueError(
            "label_accuracy needs one label per sample and a reference computed with the test "
            "labels"
        )
    check_images(samples, "samples")
    check_reference(
        reference, classifier, {"num_samples": len(samples), "is_splits": is_splits, "seed": seed}
    )
    real = reference.real
    classifier.eval()
    scores = score_samples(
        samples, classifier, real, is_splits=is_splits, seed=seed, batch_size=batch_size
    )
    ref_metrics = {k: v for k, v in reference.metrics.items() if k != "label_accuracy"}
    if labels is not None:
        hits = scores.predictions == labels.cpu()
        scores.metrics["label_accuracy"] = hits.double().mean().item()
        ref_metrics["label_accuracy"] = real.test_accuracy
    return Evaluation(scores, ref_metrics, real.threshold)
