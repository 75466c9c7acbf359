"""The GAN losses against hand-computed values, and their behaviour at extreme logits."""

from __future__ import annotations

import math

import pytest
import torch

from mnist_gan.losses import LOSSES, discriminator_loss, generator_loss


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


REAL = torch.tensor([2.0, -1.0])
FAKE = torch.tensor([0.5, -3.0])


def test_bce_discriminator_loss_by_hand() -> None:
    # mean(-log sig(real)) + mean(-log(1 - sig(fake)))
    want = (
        -(math.log(_sig(2.0)) + math.log(_sig(-1.0))) / 2
        - (math.log(1 - _sig(0.5)) + math.log(1 - _sig(-3.0))) / 2
    )
    for kind in ("bce", "minimax"):  # both share the discriminator's cross-entropy
        got = discriminator_loss(kind, REAL, FAKE).item()
        assert got == pytest.approx(want, rel=1e-6)


def test_label_smoothing_is_one_sided_by_hand() -> None:
    s = 0.1
    real_term = [-(1 - s) * math.log(_sig(x)) - s * math.log(1 - _sig(x)) for x in (2.0, -1.0)]
    fake_term = [-math.log(1 - _sig(x)) for x in (0.5, -3.0)]  # fake targets stay 0
    want = sum(real_term) / 2 + sum(fake_term) / 2
    got = discriminator_loss("bce", REAL, FAKE, label_smoothing=s).item()
    assert got == pytest.approx(want, rel=1e-6)
    assert got != pytest.approx(discriminator_loss("bce", REAL, FAKE).item(), rel=1e-3)


def test_generator_losses_by_hand() -> None:
    nonsat = -(math.log(_sig(0.5)) + math.log(_sig(-3.0))) / 2
    saturating = (math.log(1 - _sig(0.5)) + math.log(1 - _sig(-3.0))) / 2
    assert generator_loss("bce", FAKE).item() == pytest.approx(nonsat, rel=1e-6)
    assert generator_loss("minimax", FAKE).item() == pytest.approx(saturating, rel=1e-6)
    assert generator_loss("minimax", FAKE).item() < 0
    assert generator_loss("hinge", FAKE).item() == pytest.approx(1.25, rel=1e-6)


def test_hinge_discriminator_loss_by_hand() -> None:
    # mean(relu(1 - [2, -1])) + mean(relu(1 + [0.5, -3])) = (0 + 2) / 2 + (1.5 + 0) / 2
    assert discriminator_loss("hinge", REAL, FAKE).item() == pytest.approx(1.75, rel=1e-6)


@pytest.mark.parametrize("kind", LOSSES)
def test_losses_and_gradients_finite_at_extreme_logits(kind: str) -> None:
    extreme = torch.tensor([-1e4, -80.0, 0.0, 80.0, 1e4])
    for dtype in (torch.float32, torch.bfloat16):
        real = extreme.to(dtype).clone().requires_grad_()
        fake = extreme.flip(0).to(dtype).requires_grad_()
        smoothing = 0.1 if kind != "hinge" else 0.0
        loss_d = discriminator_loss(kind, real, fake, smoothing)
        loss_g = generator_loss(kind, fake)
        assert loss_d.dtype == torch.float32 and loss_g.dtype == torch.float32
        assert torch.isfinite(loss_d) and torch.isfinite(loss_g)
        (loss_d + loss_g).backward()
        assert torch.isfinite(real.grad).all() and torch.isfinite(fake.grad).all()


def test_confident_discriminator_bce_matches_large_logit_limit() -> None:
    # A naive log(sigmoid(x)) underflows to -inf at x = -200; softplus gives exactly 200.
    fake = torch.tensor([-200.0])
    assert generator_loss("bce", fake).item() == pytest.approx(200.0, rel=1e-6)


def test_minimax_generator_gradient_saturates_where_bce_does_not() -> None:
    # The reason for the non-saturating loss: when D rejects fakes confidently (logit -10),
    # the saturating loss gives the generator almost no gradient.
    grads = {}
    for kind in ("bce", "minimax"):
        fake = torch.tensor([-10.0], requires_grad=True)
        generator_loss(kind, fake).backward()
        grads[kind] = abs(fake.grad.item())
    assert grads["bce"] > 0.99
    assert grads["minimax"] < 1e-4


def test_unknown_loss_is_an_error() -> None:
    with pytest.raises(ValueError, match="train.loss"):
        discriminator_loss("wasserstein", REAL, FAKE)
    with pytest.raises(ValueError, match="train.loss"):
        generator_loss("wasserstein", FAKE)
