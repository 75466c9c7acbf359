"""The mlp step with its backward written out (mnist_gan.mlp_step) against autograd's gan_step."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from test_training import images

from mnist_gan.mlp_step import MLPStep
from mnist_gan.params import TrainParams
from mnist_gan.training import GANTrainer, cpu_has_bf16, gan_step, select_step

TINY = TrainParams(hidden=(32, 24), batch_size=64, ema=0.9, amp=False, latent_dim=16)
CPU = torch.device("cpu")


def test_step_selection() -> None:
    assert select_step(TrainParams(), CPU, 1, False) == "mlp_cpu"
    # What the written-out step does not cover runs autograd's gan_step.
    other = {
        "dcgan": (TrainParams(model="dcgan"), CPU, 1, False),
        "conditional": (TrainParams(conditional=True), CPU, 1, False),
        "spectral norm": (TrainParams(spectral_norm=True), CPU, 1, False),
        "DDP": (TrainParams(), CPU, 2, False),
        "compiled": (TrainParams(), CPU, 1, True),
        "GPU": (TrainParams(), torch.device("cuda"), 1, False),
    }
    for name, args in other.items():
        assert select_step(*args) == "autograd", name
    assert GANTrainer(TINY, images(), seed=0).step_kind == "mlp_cpu"
    assert GANTrainer(dataclasses.replace(TINY, conditional=True), images(),
                      labels=torch.arange(320) % 10).step_kind == "autograd"  # fmt: skip


def _state(t: GANTrainer) -> dict[str, torch.Tensor]:
    nets = {"g": t.generator, "d": t.discriminator, "ema": t.ema_generator}
    return {f"{n}.{k}": v for n, net in nets.items() if net for k, v in net.state_dict().items()}


def _pair(cfg: TrainParams) -> tuple[GANTrainer, GANTrainer]:
    written, auto = (GANTrainer(cfg, images(), seed=0, progress=False) for _ in range(2))
    assert written.step_kind == "mlp_cpu"
    auto._step_fn = functools.partial(gan_step, auto._parts)  # the same trainer, autograd
    return written, auto


VARIANTS = {
    "default recipe": {},
    "the article literally": {"g_batchnorm": False, "d_activation": "relu", "d_dropout": 0.0},
    "minimax, smoothing": {"loss": "minimax", "label_smoothing": 0.2},
    "hinge, no EMA": {"loss": "hinge", "label_smoothing": 0.0, "ema": 0.0},
    "relu D with dropout": {"d_activation": "relu", "d_dropout": 0.5},
}


@pytest.mark.parametrize("name", VARIANTS)
def test_written_out_step_is_autograds_step(name: str) -> None:
    """The same gradients, metrics, BatchNorm statistics, EMA and random draws, step by step."""
    cfg = dataclasses.replace(TINY, **VARIANTS[name])
    written, auto = _pair(cfg)
    rtol, rel_atol = 1e-3, 1e-5
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        batch = {"real": images(64, seed=step), "z": torch.randn(64, cfg.latent_dim, generator=g)}
        a, b = written.train_step(batch), auto.train_step(batch)
        torch.testing.assert_close(a, b, rtol=rtol, atol=rel_atol)
        for net in ("generator", "discriminator"):
            pa = list(getattr(written, net).named_parameters())
            pb = dict(getattr(auto, net).named_parameters())
            # Gradients that are zero but for rounding (a bias before BatchNorm, which the
            # normalisation cancels) are compared at the scale of the network's largest one.
            scale = max(p.grad.abs().max().item() for p in pb.values())
            for key, p in pa:
                atol = rel_atol * scale
                torch.testing.assert_close(p.grad, pb[key].grad, rtol=rtol, atol=atol, msg=key)
        # Other code may clear the gradients between steps (zero_grad): the step restores them.
        written.opt_d.zero_grad(set_to_none=True)
        written.opt_g.zero_grad(set_to_none=True)
    # The same draws from the global RNG (dropout masks): the streams stay in step.
    assert torch.equal(written._rng_cpu, auto._rng_cpu)
    # Weights, BatchNorm's running statistics and step count, the EMA: within what Adam makes of
    # rounding-level gradient differences (at most 2 lr per step, for near-zero gradients).
    wa, wb = _state(written), _state(auto)
    assert wa.keys() == wb.keys()
    for key in wa:
        if wa[key].is_floating_point():
            torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=2 * 3 * cfg.lr_g, msg=key)
        else:
            assert torch.equal(wa[key], wb[key]), key  # num_batches_tracked


def _bf16(t: GANTrainer) -> GANTrainer:
    """``t`` with the written-out step in bf16 operands, as on a CPU with native bf16 (on any
    CPU: oneDNN computes bf16 matmuls without AMX or AVX512-BF16 too, only slower)."""
    t._step_fn = MLPStep(t._parts, t.generator, t.discriminator, bf16=True)
    return t


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16 operands"])
def test_written_out_step_trains_deterministically_and_learns(bf16: bool) -> None:
    """Two runs agree bit for bit, and D learns to tell the real blobs from G's early noise."""
    cfg = dataclasses.replace(TINY, epochs=2, d_dropout=0.0)
    runs = [GANTrainer(cfg, images(), seed=3, progress=False) for _ in range(2)]
    if bf16:
        runs = [_bf16(t) for t in runs]
    for t in runs:
        t.fit()
    for (k, a), b in zip(runs[0].generator.state_dict().items(),
                         runs[1].generator.state_dict().values(), strict=True):  # fmt: skip
        assert torch.equal(a, b), k
    first = runs[0].history[0]
    assert first["d_real"] > first["d_fake"]


def test_the_trainer_takes_bf16_operands_where_the_cpu_computes_bf16() -> None:
    for amp in (False, True):
        step = GANTrainer(dataclasses.replace(TINY, amp=amp), images(), seed=0)._step_fn
        assert isinstance(step, MLPStep)
        native = amp and cpu_has_bf16()
        assert step.dtype == (torch.bfloat16 if native else torch.float32), amp


BF16_VARIANTS = {
    "default recipe": {},
    "the article literally": {"g_batchnorm": False, "d_activation": "relu", "d_dropout": 0.0},
    "hinge, no EMA": {"loss": "hinge", "label_smoothing": 0.0, "ema": 0.0},
}


@pytest.mark.parametrize("name", BF16_VARIANTS)
def test_bf16_operands_give_the_float32_gradients_within_bf16_rounding(name: str) -> None:
    """One step from the same weights: every gradient points where float32's does (cosine
    similarity), the metrics agree to bf16 rounding. Networks of half the default width: a CPU
    without native bf16 emulates its matmuls, slowly."""
    cfg = TrainParams(amp=False, hidden=(128, 128, 128), batch_size=64, **BF16_VARIANTS[name])
    low, exact = (GANTrainer(cfg, images(), seed=0, progress=False) for _ in range(2))
    _bf16(low)
    z = torch.randn(cfg.batch_size, cfg.latent_dim, generator=torch.Generator().manual_seed(2))
    batch = {"real": images(cfg.batch_size, seed=1), "z": z}
    torch.testing.assert_close(low.train_step(batch), exact.train_step(batch), rtol=2e-2, atol=0)
    assert torch.equal(low._rng_cpu, exact._rng_cpu)  # the same dropout masks
    for net in ("generator", "discriminator"):
        pa = dict(getattr(low, net).named_parameters())
        pb = dict(getattr(exact, net).named_parameters())
        scale = max(p.grad.norm().item() for p in pb.values())
        differ = False
        for key, p in pb.items():
            a, b = pa[key].grad, p.grad
            differ |= not torch.equal(a, b)
            if b.norm() < 1e-3 * scale:  # zero but for rounding: a bias before BatchNorm
                assert a.norm() < 1e-3 * scale, key
                continue
            # Measured: 0.988-1.0, norms within 2.2% (bf16 autocast through autograd: 0.94-0.98).
            cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
            assert cosine > 0.97, (key, cosine.item())
            torch.testing.assert_close(a.norm(), b.norm(), rtol=0.08, atol=0, msg=key)
        assert differ, f"{net}: bit-identical to float32, so the bf16 operands did not run"
