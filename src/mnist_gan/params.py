"""Typed, validated access to ``params.yaml``.

Every stage reads its section once through :func:`load_params`. The file is parsed into frozen
dataclasses; an unknown key, a wrong type or a value out of range raises :class:`ParamsError`
naming the file and ``section.key`` before any work starts. The committed ``params.yaml`` lists
every key, so ``dvc params diff`` and ``dvc exp show`` tell the whole truth; the dataclass
defaults equal it and serve the library and the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

__all__ = [
    "BaseParams",
    "ClassifierParams",
    "EvaluateParams",
    "FetchParams",
    "NormalizeParams",
    "Params",
    "ParamsError",
    "PromoteParams",
    "TrainParams",
    "load_params",
    "params_to_dict",
    "section_from_dict",
]

# The mirrors torchvision's MNIST dataset uses, in its order.
PUBLIC_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)


_S = TypeVar("_S")


class ParamsError(ValueError):
    """A params file is missing, malformed, or holds a bad value.

    The message always names the file and, where it applies, ``section.key``.
    """


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class BaseParams:
    """Settings shared by every stage."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # PyTorch's CPU threads. Float sums are split by thread, so CPU results are bit-identical only
    # for the same count (and CPU instruction set); 0 takes PyTorch's default, one per core.
    threads: int = 2

    def __post_init__(self) -> None:
        _check(self.seed >= 0, "seed: must be >= 0")
        _check(self.threads >= 0, "threads: must be >= 0")


@dataclass(frozen=True)
class FetchParams:
    """Where the raw MNIST files come from."""

    mirrors: tuple[str, ...] = PUBLIC_MIRRORS
    timeout: float = 30.0  # seconds without a byte before a download is abandoned
    retries: int = 3  # attempts per file and mirror before the next mirror is tried
    backoff: float = 1.0  # seconds before the first retry; doubles after each failure

    def __post_init__(self) -> None:
        _check(self.timeout > 0, "timeout: must be > 0")
        _check(self.retries >= 1, "retries: must be >= 1")
        _check(self.backoff >= 0, "backoff: must be >= 0")


@dataclass(frozen=True)
class NormalizeParams:
    """How the raw IDX files become training tensors."""

    train_limit: int = 0  # keep only the first N training images; 0 keeps all

    def __post_init__(self) -> None:
        _check(self.train_limit >= 0, "train_limit: must be >= 0")


@dataclass(frozen=True)
class ClassifierParams:
    """The evaluator CNN whose features judge the generated digits."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3  # peak learning rate of the one-cycle schedule
    features: int = 128  # dimension of the penultimate (feature) layer
    shift: int = 2  # augmentation: random translations of up to this many pixels; 0 disables
    amp: bool = True  # train in bf16 autocast where the device computes bf16 natively

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "epochs: must be >= 1")
        _check(self.batch_size >= 2, "batch_size: must be >= 2")
        _check(self.lr > 0, "lr: must be > 0")
        _check(self.features >= 1, "features: must be >= 1")
        _check(0 <= self.shift <= 8, "shift: must be in [0, 8]")


@dataclass(frozen=True)
class TrainParams:
    """The GAN and how it is trained.

    Defaults: the article's sizes, loss, optimiser, batch and epochs, with the fixes that
    measurement chose (BatchNorm in G, LeakyReLU and dropout in D, an EMA of G, one-sided label
    smoothing, an R1 penalty on D, a minibatch standard deviation in D, twice Adam's learning
    rates, a D twice as wide as G). The article literally:
    ``d_hidden=None, g_batchnorm=False, d_activation="relu", d_dropout=0.0, ema=0.0,
    label_smoothing=0.0, r1_gamma=0.0, d_minibatch_std=0, lr_g=2e-4, lr_d=2e-4``.
    """

    model: Literal["mlp", "dcgan"] = "mlp"
    loss: Literal["bce", "minimax", "hinge"] = "bce"
    latent_dim: int = 100
    hidden: tuple[int, ...] = (256, 256, 256)  # mlp hidden widths (G, and D unless d_hidden)
    # mlp: D's hidden widths; None: hidden. Twice G's widths: measured better than equal ones.
    d_hidden: tuple[int, ...] | None = (512, 512, 512)
    g_batchnorm: bool = True  # BatchNorm on G's hidden layers (mlp); off = the article literally
    d_activation: Literal["relu", "leaky_relu"] = "leaky_relu"  # mlp discriminator
    d_dropout: float = 0.1  # D: after each hidden activation; 0 = the article literally
    # D sees real and fake images translated by up to this many pixels, each by its own random
    # offset (DiffAugment's translation; G learns through it); 0 = off.
    d_shift: int = 0
    channels: int = 64  # dcgan base width
    d_channels: int | None = None  # dcgan: D's base width; None: channels
    d_batchnorm: bool = False  # dcgan: BatchNorm after D's second convolution (DCGAN paper)
    # D: ProGAN's minibatch standard deviation over groups of this many samples, one feature
    # more before D's last layer; 0 = off.
    d_minibatch_std: int = 4
    # Class-conditional: G draws the digit it is asked for, D judges image and digit together.
    conditional: bool = False
    # The GAN's seed (weights, noise, data order); None: base.seed. A sweep varies this one, so
    # that every point is judged by the same evaluator (base.seed also seeds the classifier).
    seed: int | None = None
    batch_size: int = 128
    epochs: int = 100
    lr_g: float = 4e-4  # twice the article's 2e-4: measured better with the fixes above
    lr_d: float = 4e-4
    beta1: float = 0.5
    beta2: float = 0.999
    ema: float = 0.9995  # decay of the generator's weight EMA; 0 disables it
    # The EMA generator's BatchNorm statistics recomputed for its own weights when it samples
    # and is saved ("standing statistics"), instead of the EMA of the live G's statistics.
    standing_stats: bool = True
    spectral_norm: bool = False  # spectral norm on D's layers
    label_smoothing: float = 0.1  # one-sided: real targets become 1 - label_smoothing
    # R1 penalty: r1_gamma / 2 * E||grad_x D(x)||^2 on real images, added to D's loss; 0 = off.
    r1_gamma: float = 0.1
    # How the step runs (mnist_gan.strategy): each true | false | auto. auto decides before the
    # first step by device; true where it cannot be met stops the stage (exit 2).
    amp: bool | Literal["auto"] = "auto"  # bf16 autocast (auto: where bf16 is native)
    compile: bool | Literal["auto"] = "auto"  # torch.compile G, D, Adam (auto: on CUDA)
    cuda_graph: bool | Literal["auto"] = "auto"  # one CUDA graph per step (auto: on CUDA)
    # How lr_g and lr_d (tuned for batch 128) change with batch_size: none | sqrt | linear.
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"
    # none: constant learning rates; linear: both decay linearly over the epochs, epoch e
    # (1-based) training at (1 - (e - 1) / epochs) of lr_g and lr_d.
    lr_decay: Literal["none", "linear"] = "none"
    # Training processes on this machine (DDP under torchrun); batch_size is split across them.
    nproc: int = 1
    checkpoint_every: int = 5  # epochs between resumable checkpoints; 0 disables them
    sample_every: int = 5  # epochs between logged sample grids; 0 logs only the final one

    def __post_init__(self) -> None:
        _check(self.seed is None or self.seed >= 0, "seed: must be >= 0 (or null: base.seed)")
        _check(self.latent_dim >= 1, "latent_dim: must be >= 1")
        _check(len(self.hidden) >= 1, "hidden: must list at least one width")
        _check(all(h >= 1 for h in self.hidden), "hidden: widths must be >= 1")
        _check(self.d_hidden is None or len(self.d_hidden) >= 1,
               "d_hidden: must list at least one width (or null: hidden)")  # fmt: skip
        _check(self.d_hidden is None or all(h >= 1 for h in self.d_hidden),
               "d_hidden: widths must be >= 1")  # fmt: skip
        _check(0.0 <= self.d_dropout < 1.0, "d_dropout: must be in [0, 1)")
        _check(0 <= self.d_shift <= 8, "d_shift: must be in [0, 8]")
        _check(self.channels >= 1, "channels: must be >= 1")
        _check(self.d_channels is None or self.d_channels >= 1,
               "d_channels: must be >= 1 (or null: channels)")  # fmt: skip
        _check(
            not (self.d_batchnorm and self.spectral_norm),
            "d_batchnorm: BatchNorm would undo spectral_norm's bound on D; set one of them false",
        )
        _check(self.batch_size >= 2, "batch_size: must be >= 2")
        _check(self.epochs >= 1, "epochs: must be >= 1")
        _check(self.lr_g > 0, "lr_g: must be > 0")
        _check(self.lr_d > 0, "lr_d: must be > 0")
        _check(0.0 <= self.beta1 < 1.0, "beta1: must be in [0, 1)")
        _check(0.0 <= self.beta2 < 1.0, "beta2: must be in [0, 1)")
        _check(0.0 <= self.ema < 1.0, "ema: must be in [0, 1)")
        _check(0.0 <= self.label_smoothing < 0.5, "label_smoothing: must be in [0, 0.5)")
        _check(
            self.label_smoothing == 0.0 or self.loss != "hinge",
            "label_smoothing: applies to the bce and minimax losses only; use 0 with hinge",
        )
        _check(self.r1_gamma >= 0.0, "r1_gamma: must be >= 0 (0 = off)")
        _check(self.nproc >= 1, "nproc: must be >= 1")
        _check(
            self.batch_size % self.nproc == 0,
            f"batch_size: {self.batch_size} does not split evenly across nproc {self.nproc} "
            "processes",
        )
        _check(
            self.d_minibatch_std == 0 or self.d_minibatch_std >= 2,
            "d_minibatch_std: must be 0 (off) or a group of >= 2 samples",
        )
        per_process = self.batch_size // self.nproc
        _check(
            self.d_minibatch_std == 0 or per_process % self.d_minibatch_std == 0,
            f"d_minibatch_std: groups of {self.d_minibatch_std} do not split each process's "
            f"batch of {per_process} evenly",
        )
        _check(self.checkpoint_every >= 0, "checkpoint_every: must be >= 0")
        _check(self.sample_every >= 0, "sample_every: must be >= 0")


@dataclass(frozen=True)
class EvaluateParams:
    """How generated samples are judged."""

    num_samples: int = 10_000
    batch_size: int = 1000
    k: int = 5  # neighbours for precision, recall, density and coverage
    is_splits: int = 10  # splits for the Inception Score's mean and std

    def __post_init__(self) -> None:
        _check(self.num_samples >= 10, "num_samples: must be >= 10")
        _check(self.batch_size >= 1, "batch_size: must be >= 1")
        _check(self.k >= 1, "k: must be >= 1")
        _check(self.is_splits >= 1, "is_splits: must be >= 1")
        _check(self.num_samples >= self.is_splits, "is_splits: must be <= num_samples")


@dataclass(frozen=True)
class PromoteParams:
    """The promotion gate (``make promote``): when a new generator replaces the champion."""

    # The challenger's FID must be at most (1 - fid_margin) times the champion's.
    fid_margin: float = 0.02

    def __post_init__(self) -> None:
        _check(0.0 <= self.fid_margin < 1.0, "fid_margin: must be in [0, 1)")


@dataclass(frozen=True)
class Params:
    """All of ``params.yaml``: one section per stage plus ``base``."""

    base: BaseParams = field(default_factory=BaseParams)
    fetch: FetchParams = field(default_factory=FetchParams)
    normalize: NormalizeParams = field(default_factory=NormalizeParams)
    classifier: ClassifierParams = field(default_factory=ClassifierParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    promote: PromoteParams = field(default_factory=PromoteParams)


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _spelled(hint: Any) -> list[str]:
    """The values a union's alternative takes, as params.yaml spells them (for messages)."""
    if hint is bool:
        return ["true", "false"]
    if typing.get_origin(hint) is Literal:
        return [repr(choice) for choice in typing.get_args(hint)]
    raise TypeError(f"unsupported union alternative {hint}")  # pragma: no cover


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against the type ``hint``, returning it in the field's own type."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or isinstance(value, bool):
            allowed = ", ".join(map(repr, choices))
            raise ParamsError(f"{where}: must be one of {allowed}, got {value!r}")
        return value
    if origin is tuple:
        (item,) = (a for a in typing.get_args(hint) if a is not Ellipsis)
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: must be a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:  # YAML's null
            return None
        alternatives = [a for a in args if a is not type(None)]
        if len(alternatives) == 1:  # optional: the one type's own message
            return _coerce(value, alternatives[0], where)
        for inner in alternatives:  # the first that takes the value, in the hint's order
            with contextlib.suppress(ParamsError):
                return _coerce(value, inner, where)
        words = [word for inner in alternatives for word in _spelled(inner)]
        raise ParamsError(f"{where}: must be {', '.join(words[:-1])} or {words[-1]}, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: must be an integer, got {value!r}")
        return value
    if hint is float:
        # YAML 1.1 reads "2e-4" (no dot) as a string; accept a numeric string as a number.
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {hint}")  # pragma: no cover


def _build(cls: type, raw: Any, section: str, source: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: {section}: must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        keys = ", ".join(f"{section}.{k}" for k in unknown)
        raise ParamsError(f"{source}: unknown key {keys} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{source}: {section}.{k}") for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as exc:
        msg = str(exc)
        key, _, why = msg.partition(": ")
        if not why:  # a check on the whole section, without a key of its own
            key, why = "", msg
        where = f"{section}.{key}" if key else section
        raise ParamsError(f"{source}: {where}: {why}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file.

    Args:
        path: The YAML file, one section per stage plus ``base``. A missing section takes
            its defaults; a missing file is an error.

    Returns:
        The whole, validated configuration.

    Raises:
        ParamsError: The file is missing or unreadable, is not YAML, or holds an unknown
            section or key, a value of the wrong type, or a value out of range.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{source}: params file not found") from None
    except OSError as exc:
        raise ParamsError(f"{source}: cannot read params file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{source}: not valid YAML: {exc}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ParamsError(
            f"{source}: unknown section {', '.join(unknown)} (known: {', '.join(sections)})"
        )
    hints = typing.get_type_hints(Params)
    built = {name: _build(hints[name], raw.get(name), name, source) for name in sections}
    return Params(**built)


def section_from_dict(cls: type[_S], raw: Any, section: str, source: str) -> _S:
    """Validate one section given as plain data, exactly as :func:`load_params` does.

    For the copies of a section that outputs carry (a model folder's ``config.json``), so that
    they are held to the same rules as ``params.yaml``.

    Args:
        cls: The section's dataclass, e.g. :class:`TrainParams`.
        raw: A mapping of keys to plain values (lists for tuples).
        section: The section's name, for messages (``train``).
        source: The file it came from, for messages.

    Raises:
        ParamsError: naming ``source`` and ``section.key``: an unknown key, a wrong type or a
            value out of range.
    """
    return _build(cls, raw, section, source)


def params_to_dict(obj: Any) -> dict[str, Any]:
    """A params dataclass as plain, YAML- and JSON-friendly data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(obj))
