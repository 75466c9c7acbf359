"""The GAN's networks, and the ``models/gan/`` folder they are saved in.

Two families, chosen by ``train.model``:

- ``mlp``: the article's fully connected networks. The generator maps z (B, latent_dim) through
  ``train.hidden`` widths (ReLU; BatchNorm before each ReLU when ``train.g_batchnorm``) to 784
  tanh outputs, reshaped to (B, 1, 28, 28). The discriminator flattens its input and maps it
  through ``train.d_hidden`` widths (by default twice G's; null: ``train.hidden``), with
  ``train.d_activation`` and ``train.d_dropout``, to one logit.
- ``dcgan``: a DCGAN for 28x28. The generator lifts z to (2C, 7, 7) with a 7x7 transposed
  convolution, then doubles the side twice (14, 28); BatchNorm and ReLU between. The
  discriminator mirrors it with strided convolutions (base width ``train.d_channels``, by
  default G's) and LeakyReLU(0.2), with ``train.d_dropout`` after each, and with
  ``train.d_batchnorm`` the DCGAN paper's BatchNorm after the second.

With ``train.spectral_norm`` every weight layer of the discriminator is spectrally normalised.
With ``train.d_minibatch_std`` its last layer also sees how much a group of samples varies
(``MinibatchStd``), so a generator that draws one digit over and over is told apart.

With ``train.conditional`` both families are class-conditional: G gets a learned embedding of
the digit asked for beside z, and D is a projection discriminator (Miyato & Koyama 2018): its
logit gains the inner product of the digit's embedding with D's last features. Measured on
MNIST against D with the digit's embedding joined to its input, projection won on every metric
for both families (mlp, 20 epochs, 2 seeds: FID 6.2-8.3 against 8.7-10.5, label accuracy
87-91% against 82-85%; dcgan, 3 epochs: FID 2.3 against 9.8, 95.8% against 86.1%).

Every size is passed explicitly; nothing reads module globals. The library keeps to PyTorch
here (safetensors is imported only when weights are written or read) so that training runs on
a machine that has only PyTorch installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mnist_gan.data import NUM_CLASSES
from mnist_gan.params import TrainParams, params_to_dict, section_from_dict
from mnist_gan.utils import load_weights, save_tensors

__all__ = [
    "GENERATOR_FILE",
    "IMAGE_SHAPE",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "MLPDiscriminator",
    "MLPGenerator",
    "MinibatchStd",
    "build_discriminator",
    "build_generator",
    "load_generator",
    "read_config",
    "save_gan",
]

IMAGE_SHAPE = (1, 28, 28)
_PIXELS = 28 * 28
LABEL_DIM = 10  # size of a digit's embedding where it joins an input
LEAKY_SLOPE = 0.2  # the usual GAN discriminator slope (DCGAN paper)

GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
EMA_FILE = "generator_ema.safetensors"
CONFIG_FILE = "config.json"


def _sn(layer: nn.Module, enabled: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if enabled else layer


class MLPGenerator(nn.Module):
    """The article's generator: z -> hidden widths -> 784 tanh pixels.

    Args:
        latent_dim: Size of z.
        hidden: Widths of the hidden layers, in order (the article: 256, 256, 256).
        batchnorm: BatchNorm1d before each hidden ReLU (the article has none).
        num_classes: 0 for an unconditional generator; else the digit asked for is embedded
            (``LABEL_DIM`` numbers) and joins z at the input.
    """

    def __init__(
        self, latent_dim: int, hidden: tuple[int, ...], batchnorm: bool, num_classes: int = 0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim + (LABEL_DIM if num_classes else 0)
        for h in hidden:
            layers.append(nn.Linear(width, h))
            if batchnorm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            width = h
        layers += [nn.Linear(width, _PIXELS), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.embed = nn.Embedding(num_classes, LABEL_DIM) if num_classes else None

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Map z (B, latent_dim), and digits y (B,) when conditional, to images (B, 1, 28, 28)."""
        return self.net(_join(z, y, self.embed)).view(z.shape[0], *IMAGE_SHAPE)


class MLPDiscriminator(nn.Module):
    """The article's discriminator: 784 pixels -> hidden widths -> one logit.

    Args:
        hidden: Widths of the hidden layers (the article: 256, 256, 256).
        activation: ``relu`` (the article) or ``leaky_relu`` (slope 0.2).
        dropout: Dropout after each hidden activation; 0 disables it (the article).
        spectral_norm: Spectral normalisation of every linear layer.
        num_classes: 0 for an unconditional discriminator; else it judges an image as a
            picture of the digit y: a projection discriminator (Miyato & Koyama 2018), whose
            logit gains the inner product of y's embedding with the last hidden features.
        minibatch_std: Group size of a ``MinibatchStd`` feature before the last layer; 0: none.
    """

    def __init__(
        self,
        hidden: tuple[int, ...],
        activation: str,
        dropout: float,
        spectral_norm: bool,
        num_classes: int = 0,
        minibatch_std: int = 0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]  # (B, 1, 28, 28) -> (B, 784)
        width = _PIXELS
        for h in hidden:
            layers.append(_sn(nn.Linear(width, h), spectral_norm))
            layers.append(nn.LeakyReLU(LEAKY_SLOPE) if activation == "leaky_relu" else nn.ReLU())
            if dropout > 0:
                layers.append(Dropout(dropout))
            width = h
        if minibatch_std:
            layers.append(MinibatchStd(minibatch_std))
            width += 1
        layers.append(_sn(nn.Linear(width, 1), spectral_norm))
        self.net = nn.Sequential(*layers)
        self.num_classes = num_classes
        self.embed = _label_embedding(num_classes, width, spectral_norm) if num_classes else None

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Map images (B, 1, 28, 28), and digits y (B,) when conditional, to logits (B,)."""
        features = _body(self.net, x)  # (B, H): the last hidden layer's output (H + 1 with
        # the minibatch standard deviation's feature)
        logits = self.net[-1](features).squeeze(1)  # (B, 1) -> (B,)
        if self.embed is None:
            return logits
        return _project(logits, features, y, self.embed)


class MinibatchStd(nn.Module):
    """ProGAN's minibatch standard deviation (Karras et al. 2018, section 3), as one feature.

    The batch is split into groups of ``group`` consecutive samples; each group's standard
    deviation of every feature (and position), averaged, is joined to each member's features:
    (B, F) -> (B, F + 1), (B, C, H, W) -> (B, C + 1, H, W). A batch of near-identical samples
    gets a value near 0 that real batches never have, which D can learn to reject. B must be a
    multiple of ``group`` (a smaller batch is one group). ProGAN's code groups samples g,
    g + B / group, ... instead; with shuffled data either way draws groups at random. Groups
    of consecutive samples never straddle the halves of a [real; fake] batch whose halves are
    multiples of ``group``, so one pass over both gives each sample what two passes give.
    """

    def __init__(self, group: int) -> None:
        super().__init__()
        if group < 1:
            raise ValueError(f"MinibatchStd: group must be >= 1, got {group}")
        self.group = group

    def extra_repr(self) -> str:
        return f"group={self.group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, *rest = x.shape
        g = min(self.group, b)
        if b % g:
            raise ValueError(f"MinibatchStd: a batch of {b} does not split into groups of {g}")
        grouped = x.float().reshape(b // g, g, *rest)  # [i, j]: sample i * g + j
        std = (grouped.var(dim=1, unbiased=False) + 1e-8).sqrt()  # (B / g, *rest)
        per_group = std.flatten(1).mean(dim=1)  # (B / g,)
        feature = per_group.repeat_interleave(g).view(b, 1, *[1] * (len(rest) - 1))
        return torch.cat([x, feature.to(x.dtype).expand(b, 1, *rest[1:])], dim=1)


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask comes from ``torch.rand`` (uniform draws compared with p).

    The same function as ``nn.Dropout`` (zero each element with probability p, scale the rest
    by 1 / (1 - p)), from other random numbers. On the CPU, ``nn.Dropout`` draws its mask with
    ``bernoulli_``, which took a fifth of the mlp's training step; uniform draws and a multiply
    take half that (docs/performance.md). The gradient is autograd's, through the multiply.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        # float32 draws also under autocast, in x's memory format (channels-last for dcgan)
        keep = torch.rand_like(x, dtype=torch.float32) >= self.p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


def _body(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``net`` without its last layer, applied to ``x`` (no new Sequential per call)."""
    *body, _ = net
    for layer in body:
        x = layer(x)
    return x


def _join(z: torch.Tensor, y: torch.Tensor | None, embed: nn.Module | None) -> torch.Tensor:
    """z (B, D) joined by y's embedding (B, E) when the network is conditional: (B, D + E)."""
    if embed is None:
        return z
    if y is None:
        raise ValueError("a class-conditional network needs the digits y")
    return torch.cat([z, embed(y).to(z.dtype)], dim=1)


def _project(
    logits: torch.Tensor, features: torch.Tensor, y: torch.Tensor | None, embed: nn.Module
) -> torch.Tensor:
    """The projection discriminator's logit: ``psi(phi(x)) + <embed(y), phi(x)>``."""
    if y is None:
        raise ValueError("a class-conditional network needs the digits y")
    inner = (embed(y).to(features.dtype) * features.flatten(1)).sum(dim=1)  # (B,)
    return logits + inner


def _label_embedding(num_classes: int, dim: int, spectral_norm: bool) -> nn.Module:
    """A learned vector per digit (Glorot-uniform, as in the projection discriminator's code)."""
    embed = nn.Embedding(num_classes, dim)
    nn.init.xavier_uniform_(embed.weight)
    return _sn(embed, spectral_norm)


def _dcgan_init(module: nn.Module) -> None:
    """The DCGAN paper's initialisation: N(0, 0.02) weights, BatchNorm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """A DCGAN generator for 28x28: z -> (2C, 7, 7) -> (C, 14, 14) -> (1, 28, 28).

    Args:
        latent_dim: Size of z.
        channels: Base width C.
        num_classes: 0 for an unconditional generator; else the digit's embedding joins z.
    """

    def __init__(self, latent_dim: int, channels: int, num_classes: int = 0) -> None:
        super().__init__()
        c = channels
        width = latent_dim + (LABEL_DIM if num_classes else 0)
        self.net = nn.Sequential(
            nn.ConvTranspose2d(width, 2 * c, 7, 1, 0, bias=False),  # -> (2C, 7, 7)
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.ConvTranspose2d(2 * c, c, 4, 2, 1, bias=False),  # -> (C, 14, 14)
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.ConvTranspose2d(c, 1, 4, 2, 1),  # -> (1, 28, 28)
            nn.Tanh(),
        )
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.embed = nn.Embedding(num_classes, LABEL_DIM) if num_classes else None
        _dcgan_init(self)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Map z (B, latent_dim), and digits y (B,) when conditional, to images (B, 1, 28, 28)."""
        h = _join(z, y, self.embed)  # (B, latent [+ LABEL_DIM])
        return self.net(h.view(h.shape[0], -1, 1, 1))  # (B, width) -> (B, width, 1, 1)


class DCGANDiscriminator(nn.Module):
    """A DCGAN discriminator for 28x28: (1, 28, 28) -> (C, 14, 14) -> (2C, 7, 7) -> logit.

    Args:
        channels: Base width C.
        spectral_norm: Spectral normalisation of every convolution.
        num_classes: 0 for an unconditional discriminator; else a projection discriminator:
            the inner product of y's embedding with the (2C, 7, 7) features (2C + 1 channels
            with ``minibatch_std``) joins the logit.
        dropout: Dropout after each LeakyReLU; 0 disables it.
        batchnorm: BatchNorm after the second convolution, as in the DCGAN paper (not with
            ``spectral_norm``, whose bound it would undo).
        minibatch_std: Group size of a ``MinibatchStd`` channel before the last convolution;
            0: none.
    """

    def __init__(
        self,
        channels: int,
        spectral_norm: bool,
        num_classes: int = 0,
        *,
        dropout: float = 0.0,
        batchnorm: bool = False,
        minibatch_std: int = 0,
    ) -> None:
        super().__init__()
        if batchnorm and spectral_norm:
            raise ValueError("BatchNorm would undo spectral norm's bound on D: pick one")
        c = channels
        last = 2 * c + (1 if minibatch_std else 0)  # channels the last convolution sees

        def drop() -> list[nn.Module]:
            return [Dropout(dropout)] if dropout > 0 else []

        self.net = nn.Sequential(
            _sn(nn.Conv2d(1, c, 4, 2, 1), spectral_norm),  # -> (C, 14, 14)
            nn.LeakyReLU(LEAKY_SLOPE),
            *drop(),
            _sn(nn.Conv2d(c, 2 * c, 4, 2, 1, bias=not batchnorm), spectral_norm),  # (2C, 7, 7)
            *([nn.BatchNorm2d(2 * c)] if batchnorm else []),
            nn.LeakyReLU(LEAKY_SLOPE),
            *drop(),
            *([MinibatchStd(minibatch_std)] if minibatch_std else []),
            _sn(nn.Conv2d(last, 1, 7, 1, 0), spectral_norm),  # -> (1, 1, 1)
        )
        self.num_classes = num_classes
        self.embed = None
        if num_classes:  # one number per feature the last convolution sees
            self.embed = _label_embedding(num_classes, last * 7 * 7, spectral_norm)
        _dcgan_init(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Map images (B, 1, 28, 28), and digits y (B,) when conditional, to logits (B,)."""
        if self.embed is None:
            return self.net(x).flatten()  # (B, 1, 1, 1) -> (B,)
        features = _body(self.net, x)  # (B, 2C, 7, 7)
        return _project(self.net[-1](features).flatten(), features, y, self.embed)


def build_generator(cfg: TrainParams) -> nn.Module:
    """A freshly initialised generator for ``cfg`` (drawing from torch's global RNG)."""
    classes = NUM_CLASSES if cfg.conditional else 0
    if cfg.model == "mlp":
        return MLPGenerator(cfg.latent_dim, tuple(cfg.hidden), cfg.g_batchnorm, classes)
    if cfg.model == "dcgan":
        return DCGANGenerator(cfg.latent_dim, cfg.channels, classes)
    raise ValueError(f"train.model: unknown model {cfg.model!r} (expected mlp or dcgan)")


def build_discriminator(cfg: TrainParams) -> nn.Module:
    """A freshly initialised discriminator for ``cfg`` (drawing from torch's global RNG)."""
    classes = NUM_CLASSES if cfg.conditional else 0
    if cfg.model == "mlp":
        widths = cfg.hidden if cfg.d_hidden is None else cfg.d_hidden
        return MLPDiscriminator(tuple(widths), cfg.d_activation, cfg.d_dropout,
                                cfg.spectral_norm, classes, cfg.d_minibatch_std)  # fmt: skip
    if cfg.model == "dcgan":
        width = cfg.channels if cfg.d_channels is None else cfg.d_channels
        return DCGANDiscriminator(width, cfg.spectral_norm, classes, dropout=cfg.d_dropout,
                                  batchnorm=cfg.d_batchnorm,
                                  minibatch_std=cfg.d_minibatch_std)  # fmt: skip
    raise ValueError(f"train.model: unknown model {cfg.model!r} (expected mlp or dcgan)")


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous CPU tensors that share no memory.
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_gan(
    model_dir: str | Path,
    cfg: TrainParams,
    seed: int,
    generator: nn.Module,
    discriminator: nn.Module,
    ema_generator: nn.Module | None = None,
) -> None:
    """Write the GAN folder: weights as safetensors and ``config.json``.

    The files depend only on the weights, the params and the seed (no timestamps or paths),
    so identical training gives identical bytes. Write into an ``utils.atomic_dir`` folder so
    that the real output appears only once complete.

    Args:
        model_dir: An existing (normally empty, temporary) folder.
        cfg: The train params the networks were built from.
        seed: ``base.seed`` of the run.
        generator: The trained generator.
        discriminator: The trained discriminator.
        ema_generator: The generator's weight average, when ``cfg.ema > 0``.
    """
    model_dir = Path(model_dir)
    save_tensors(_state(generator), model_dir / GENERATOR_FILE)
    save_tensors(_state(discriminator), model_dir / DISCRIMINATOR_FILE)
    if ema_generator is not None:
        save_tensors(_state(ema_generator), model_dir / EMA_FILE)
    config = {"seed": seed, "train": params_to_dict(cfg)}
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (model_dir / CONFIG_FILE).write_text(text, encoding="utf-8")


def read_config(model_dir: str | Path) -> tuple[TrainParams, int]:
    """The train params and seed stored in a GAN folder's ``config.json``.

    The params are validated by the code that validates ``params.yaml``: an unknown key, a
    wrong type or a value out of range is an error naming the file and ``train.key``.

    Raises:
        FileNotFoundError: No ``config.json`` (not a GAN folder, or train has not run).
        ValueError: The file is not valid JSON or holds bad params (a ``ParamsError``).
    """
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the train stage first)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a GAN config ({exc})") from None
    if not isinstance(config, dict) or set(config) != {"seed", "train"}:
        keys = sorted(config) if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path}: not a GAN config (want keys seed and train, got {keys})")
    seed = config["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{path}: seed: must be an integer >= 0, got {seed!r}")
    return section_from_dict(TrainParams, config["train"], "train", str(path)), seed


def load_generator(
    model_dir: str | Path, prefer_ema: bool = True, device: torch.device | str = "cpu"
) -> tuple[nn.Module, TrainParams]:
    """Load the trained generator from a GAN folder, in eval mode.

    Args:
        model_dir: The folder :func:`save_gan` wrote (``models/gan``).
        prefer_ema: Use the EMA weights when the folder has them.
        device: Where to put the network.

    Returns:
        The generator, mapping z (B, latent_dim) to images (B, 1, 28, 28) in [-1, 1], and the
        train params it was built with.

    Raises:
        FileNotFoundError: The folder lacks ``config.json`` or the generator's weights.
        ValueError: The config is bad, or the weights are unreadable or do not fit the
            configured network (one line naming the file).
    """
    model_dir = Path(model_dir)
    cfg, _ = read_config(model_dir)
    path = model_dir / EMA_FILE
    if not (prefer_ema and path.is_file()):
        path = model_dir / GENERATOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the train stage first)")
    generator = build_generator(cfg)
    load_weights(generator, path, hint=" (run the train stage again: dvc repro train)")
    return generator.to(device).eval(), cfg
