"""The common baseline: a GAN training loop the way most MNIST tutorials write it.

Everything here is deliberately ordinary, not tuned to look slow:

- ``torchvision.datasets.MNIST`` over the raw IDX files, with the tutorials' transform
  ``Compose([ToTensor(), Normalize((0.5,), (0.5,))])`` (pixels to [-1, 1], the same scaling as
  the project's normalize stage);
- a ``DataLoader(batch_size=128, shuffle=True, drop_last=True)`` with the default
  ``num_workers=0`` (what the tutorials show; on this project's 2-core machines worker processes
  would only compete with the training loop for the same cores);
- ``.to(device)`` on every batch, plain ``torch.optim.Adam`` with its defaults;
- ``.item()`` on each loss every step, to keep a per-step loss history.

The networks and losses are the project's own (``mnist_gan.models``, ``mnist_gan.losses``, with
the R1 penalty where ``train.r1_gamma`` asks for it), so a benchmark against this loop measures
the training loop and nothing else.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mnist_gan.data import RAW_FILES
from mnist_gan.losses import discriminator_loss, generator_loss, r1_penalty
from mnist_gan.models import build_discriminator, build_generator
from mnist_gan.params import TrainParams

__all__ = ["BaselineTrainer", "mnist_dataset", "torchvision_root"]


def torchvision_root(raw_dir: str | Path, dest: str | Path) -> Path:
    """Lay out ``dest/MNIST/raw/<files>`` as symlinks to the IDX files in ``raw_dir``.

    ``torchvision.datasets.MNIST`` reads ``<root>/MNIST/raw/``; the fetch stage writes the same
    four decompressed files to ``data/raw/``, so links are enough (no copy, no download).

    Args:
        raw_dir: A folder holding the four decompressed MNIST IDX files.
        dest: An existing folder to build the layout in (normally a temporary one).

    Returns:
        The root to pass to ``datasets.MNIST``.

    Raises:
        FileNotFoundError: ``raw_dir`` lacks one of the four files.
    """
    raw_dir = Path(raw_dir).resolve()
    folder = Path(dest) / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for names in RAW_FILES.values():
        for name in names:
            src = raw_dir / name
            if not src.is_file():
                raise FileNotFoundError(f"{src}: not found (torchvision's MNIST needs all four)")
            link = folder / name
            if not link.exists():
                link.symlink_to(src)
    return Path(dest)


def mnist_dataset(root: str | Path) -> datasets.MNIST:
    """The training set as tutorials build it (``download=False``: the files are local)."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    return datasets.MNIST(str(root), train=True, download=False, transform=transform)


class BaselineTrainer:
    """The tutorial training loop, steppable for a fixed number of batches.

    A tutorial writes ``for epoch ...: for real, _ in loader: <step>``. Here the same loop pulls
    batches from the loader's iterator and starts a new epoch (a new shuffled pass) when it is
    exhausted, so a benchmark can run it for exactly ``n`` steps, pause, and continue.

    Args:
        cfg: The train params (model, loss, sizes, optimiser settings, batch size).
        raw_dir: A folder holding the four decompressed MNIST IDX files.
        device: Where the networks train.
        seed: Seeds the networks' initialisation and the loader's shuffling.
        num_workers: The DataLoader's worker processes (tutorials: the default 0).

    Attributes:
        steps_done: Steps taken so far.
        item_calls: ``.item()`` calls made (two per step: the D and G losses).
        batches_loaded: Batches drawn from the DataLoader.
        losses_d: Per-step discriminator losses (Python floats, as tutorials keep them).
        losses_g: Per-step generator losses.
    """

    def __init__(
        self,
        cfg: TrainParams,
        raw_dir: str | Path,
        device: torch.device | str = "cpu",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self._tmp = tempfile.TemporaryDirectory(prefix="mnist-baseline-")
        root = torchvision_root(raw_dir, self._tmp.name)
        torch.manual_seed(seed)
        self.loader = DataLoader(
            mnist_dataset(root),
            batch_size=cfg.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=num_workers,
        )
        self.generator = build_generator(cfg).to(self.device)
        self.discriminator = build_discriminator(cfg).to(self.device)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_d, betas=betas)
        self._batches: Iterator | None = None
        self.steps_done = 0
        self.item_calls = 0
        self.batches_loaded = 0
        self.losses_d: list[float] = []
        self.losses_g: list[float] = []

    def _next_batch(self) -> torch.Tensor:
        if self._batches is None:
            self._batches = iter(self.loader)
        try:
            real, _ = next(self._batches)
        except StopIteration:  # end of an epoch: the next pass reshuffles
            self._batches = iter(self.loader)
            real, _ = next(self._batches)
        self.batches_loaded += 1
        return real

    def step(self) -> None:
        """One discriminator update then one generator update, on one loader batch."""
        g, d, cfg = self.generator, self.discriminator, self.cfg
        real = self._next_batch().to(self.device)  # (B, 1, 28, 28) in [-1, 1]
        b = real.size(0)

        # Discriminator: real images towards 1, generated ones towards 0.
        self.opt_d.zero_grad()
        z = torch.randn(b, cfg.latent_dim, device=self.device)
        fake = g(z)
        if cfg.r1_gamma:  # R1 differentiates D's output by the real images
            real.requires_grad_()
        real_logits = d(real)
        loss_d = discriminator_loss(cfg.loss, real_logits, d(fake.detach()), cfg.label_smoothing)
        if cfg.r1_gamma:
            loss_d = loss_d + 0.5 * cfg.r1_gamma * r1_penalty(real_logits, real)
        loss_d.backward()
        self.opt_d.step()

        # Generator: fool the updated discriminator with the same fakes.
        self.opt_g.zero_grad()
        loss_g = generator_loss(cfg.loss, d(fake))
        loss_g.backward()
        self.opt_g.step()

        self.losses_d.append(loss_d.item())
        self.losses_g.append(loss_g.item())
        self.item_calls += 2
        self.steps_done += 1

    def run(self, steps: int) -> None:
        """Take ``steps`` training steps."""
        self.generator.train()
        self.discriminator.train()
        for _ in range(steps):
            self.step()

    def close(self) -> None:
        """Remove the temporary torchvision layout."""
        self._batches = None
        self._tmp.cleanup()
