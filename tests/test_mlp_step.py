"""The mlp step with its backward written out (mnist_gan.mlp_step) against autograd's gan_step."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import pytest
import torch
from test_training import images

from mnist_gan.mlp_step import MLPStep
from mnist_gan.params import TrainParams
from mnist_gan.step import gan_step
from mnist_gan.training import GANTrainer, compile_asked, cpu_has_bf16, select_step

TINY = TrainParams(hidden=(32, 24), batch_size=64, ema=0.9, amp=False, latent_dim=16)
CPU = torch.device("cpu")


def test_step_selection() -> None:
    gpu = torch.device("cuda")
    # The written-out step where it pays: on the CPU, compiled or not; compiled on a GPU.
    for device, compiled in ((CPU, False), (CPU, True), (gpu, True)):
        assert select_step(TrainParams(), device, 1, compiled) == "written_out", device
    # What the written-out step does not cover, or does not speed up, runs autograd's gan_step.
    other = {
        "dcgan": (TrainParams(model="dcgan"), CPU, 1, False),
        "conditional": (TrainParams(conditional=True), CPU, 1, False),
        "spectral norm": (TrainParams(spectral_norm=True), gpu, 1, True),
        "DDP": (TrainParams(), CPU, 2, False),
        "GPU, not compiled": (TrainParams(), gpu, 1, False),
        "another device": (TrainParams(), torch.device("mps"), 1, True),
    }
    for name, args in other.items():
        assert select_step(*args) == "autograd", name
    assert GANTrainer(TINY, images(), seed=0).step_kind == "written_out"
    assert GANTrainer(dataclasses.replace(TINY, conditional=True), images(),
                      labels=torch.arange(320) % 10).step_kind == "autograd"  # fmt: skip
    forced = GANTrainer(TINY, images(), seed=0, step="autograd")
    assert forced.step_kind == "autograd" and not isinstance(forced._step_fn, MLPStep)
    with pytest.raises(ValueError, match="step: 'fast'"):
        GANTrainer(TINY, images(), seed=0, step="fast")
    written = GANTrainer(TINY, images(), seed=0, step="written_out")
    assert written.step_kind == "written_out" and isinstance(written._step_fn, MLPStep)
    with pytest.raises(ValueError, match="'written_out' covers the mlp networks"):
        GANTrainer(dataclasses.replace(TINY, spectral_norm=True), images(), step="written_out")


def test_compile_auto_compiles_where_it_pays() -> None:
    """train.compile: auto compiles the written-out step on a CUDA GPU only; true and false
    are what they say everywhere."""
    gpu = torch.device("cuda")
    auto = TrainParams()
    assert auto.compile == "auto"
    assert compile_asked(auto, gpu, 1, "auto")
    assert not compile_asked(auto, CPU, 1, "auto")  # no gain there, and other dropout draws
    assert not compile_asked(auto, gpu, 1, "autograd")
    for other in ({"model": "dcgan"}, {"conditional": True}, {"spectral_norm": True}):
        assert not compile_asked(dataclasses.replace(auto, **other), gpu, 1, "auto"), other
    assert not compile_asked(auto, gpu, 2, "auto")  # DDP
    for value in (True, False):
        cfg = dataclasses.replace(auto, compile=value)
        assert all(compile_asked(cfg, d, 1, "auto") is value for d in (CPU, gpu))
    assert GANTrainer(TINY, images(), seed=0).compiled is False  # auto, on the CPU


def _state(t: GANTrainer) -> dict[str, torch.Tensor]:
    nets = {"g": t.generator, "d": t.discriminator, "ema": t.ema_generator}
    return {f"{n}.{k}": v for n, net in nets.items() if net for k, v in net.state_dict().items()}


def _pair(cfg: TrainParams) -> tuple[GANTrainer, GANTrainer]:
    written, auto = (GANTrainer(cfg, images(), seed=0, progress=False) for _ in range(2))
    assert written.step_kind == "written_out"
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


def _steps(t: GANTrainer, n: int) -> list[torch.Tensor]:
    """``n`` steps on the same batches for every trainer: their METRICS."""
    g = torch.Generator().manual_seed(1)
    return [
        t.train_step({"real": images(64, seed=i), "z": torch.randn(64, 16, generator=g)})
        for i in range(n)
    ]


@pytest.mark.slow
def test_compiled_step_is_the_eager_step() -> None:
    """train.compile compiles the written-out step as a whole, each part as one graph (a graph
    break is an error under fullgraph, and a failure would warn), and computes what the eager
    step computes: without dropout, the same metrics and weights to float32 rounding. With
    dropout (its masks from the compiled kernels' own draws) two runs agree bit for bit."""
    cfg = dataclasses.replace(TINY, d_dropout=0.0)
    eager = GANTrainer(cfg, images(), seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = GANTrainer(dataclasses.replace(cfg, compile=True), images(), seed=0,
                              progress=False)  # fmt: skip
        metrics = _steps(compiled, 3)
    assert compiled.compiled and compiled._step_fn.compiled
    assert compiled._step_fn._proven == {"d", "g", "end"}
    torch.testing.assert_close(torch.stack(metrics), torch.stack(_steps(eager, 3)),
                               rtol=1e-3, atol=1e-5)  # fmt: skip
    wa, wb = _state(compiled), _state(eager)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=2 * 3 * cfg.lr_g, msg=key)
    # The optimizers' updates ran inside the compiled parts, never as the fused kernel.
    fused = []
    compiled._step_fn._adam_step = fused.append
    _steps(compiled, 1)
    assert fused == []

    runs = [GANTrainer(dataclasses.replace(TINY, compile=True), images(), seed=0,
                       progress=False) for _ in range(2)]  # fmt: skip
    first, second = (torch.stack(_steps(t, 3)) for t in runs)
    assert all(t.compiled and t._step_fn._proven == {"d", "g", "end"} for t in runs)
    assert torch.equal(first, second)
    for (key, a), b in zip(_state(runs[0]).items(), _state(runs[1]).values(), strict=True):
        assert torch.equal(a, b), key
    # The compiled masks drop about d_dropout of D's units: D's update differs from no dropout.
    assert not torch.equal(first, torch.stack(metrics))


def test_a_step_that_fails_to_compile_warns_and_runs_eagerly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.compile compiles on the first call: a failure there leaves the weights untouched,
    and the step runs eagerly from then on, as an eager trainer does (bit for bit)."""
    calls = []

    def lazy_failure(fn, **kwargs):  # what torch.compile returns where its compiler fails
        def compiled(*args):
            calls.append(fn.__name__)
            raise RuntimeError("no C++ compiler")

        return compiled

    eager = GANTrainer(TINY, images(), seed=0, progress=False)
    t = GANTrainer(TINY, images(), seed=0, progress=False)
    monkeypatch.setattr(torch, "compile", lazy_failure)
    t._step_fn = MLPStep(t._parts, t.generator, t.discriminator, bf16=False, compile=True)
    assert t._step_fn.compiled
    with pytest.warns(RuntimeWarning, match="compiling the mlp step failed.*no C\\+\\+ compiler"):
        first = t.train_step({"real": images(64, seed=0), "z": torch.zeros(64, 16)})
    assert not t._step_fn.compiled and not t.compiled and calls == ["_d_update"]
    assert torch.equal(first, eager.train_step({"real": images(64, seed=0),
                                                "z": torch.zeros(64, 16)}))  # fmt: skip
    assert torch.equal(torch.stack(_steps(t, 2)), torch.stack(_steps(eager, 2)))
    for (key, a), b in zip(_state(t).items(), _state(eager).values(), strict=True):
        assert torch.equal(a, b), key


def test_a_compiled_part_that_fails_after_running_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a first call's failure is the compiler's: a later one is a real error."""
    runs = []

    def works_once(fn, **kwargs):
        def compiled(*args):
            runs.append(fn.__name__)
            if runs.count(fn.__name__) > 1:
                raise RuntimeError("out of memory")
            return fn(*args)

        return compiled

    t = GANTrainer(TINY, images(), seed=0, progress=False)
    monkeypatch.setattr(torch, "compile", works_once)
    t._step_fn = MLPStep(t._parts, t.generator, t.discriminator, bf16=False, compile=True)
    _steps(t, 1)
    with pytest.raises(RuntimeError, match="out of memory"):
        _steps(t, 1)


@pytest.mark.slow
def test_compiled_step_follows_a_decaying_learning_rate_without_recompiling() -> None:
    """Each epoch's learning rate reaches the compiled update through a tensor, so the step
    compiles once (a float would be compiled in as a constant, or recompile every epoch)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # nothing compiled by earlier tests to reuse
    cfg = dataclasses.replace(TINY, compile=True, lr_decay="linear", epochs=4)
    t = GANTrainer(cfg, images(), seed=0, progress=False)
    assert all(isinstance(o.param_groups[0]["lr"], torch.Tensor) for o in (t.opt_g, t.opt_d))
    start = counters["stats"]["unique_graphs"]
    t.run_epoch()
    compiled_graphs = counters["stats"]["unique_graphs"]
    assert compiled_graphs >= start + 3  # the counter counts: each part compiled once
    before = [p.detach().clone() for p in t.generator.parameters()]
    t.fit()
    assert counters["stats"]["unique_graphs"] == compiled_graphs  # no part compiled again
    assert t._step_fn.compiled and t.epoch == 4
    assert float(t.opt_g.param_groups[0]["lr"]) == pytest.approx(cfg.lr_g / 4)
    assert any(not torch.equal(a, b) for a, b in zip(before, t.generator.parameters(), strict=True))


def test_the_compiled_adam_update_covers_only_the_trainers_adam() -> None:
    from mnist_gan.mlp_step import adam_inputs

    w = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="amsgrad"):
        adam_inputs(torch.optim.Adam([w], amsgrad=True))
    with pytest.raises(ValueError, match="without weight decay"):
        adam_inputs(torch.optim.Adam([w], weight_decay=0.1))
    with pytest.raises(ValueError, match="one-group Adam"):
        adam_inputs(torch.optim.AdamW([w]))
    opt = torch.optim.Adam([w], fused=True)
    params, grads, m, v, steps, lr, beta1, beta2, eps = adam_inputs(opt)
    assert params == [w] and lr == 1e-3 and (beta1, beta2, eps) == (0.9, 0.999, 1e-8)
    # The state it creates is the one Adam's fused step creates and continues from.
    assert steps[0].dtype == torch.float32 and steps[0].dim() == 0 and float(steps[0]) == 0.0
    w.grad = torch.full((3,), 0.5)
    opt.step()
    assert float(opt.state[w]["step"]) == 1.0 and opt.state[w]["exp_avg"] is m[0]


def test_adam_math_is_torchs_adam() -> None:
    """Three updates of adam_math against torch.optim.Adam's (fused) from the same weights."""
    from mnist_gan.mlp_step import adam_inputs, adam_math

    g = torch.Generator().manual_seed(0)
    start = torch.randn(5, 4, generator=g)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_a = torch.optim.Adam([ours], lr=0.01, betas=(0.5, 0.999), fused=True)
    opt_b = torch.optim.Adam([theirs], lr=0.01, betas=(0.5, 0.999), fused=True)
    for _ in range(3):
        grad = torch.randn(5, 4, generator=g)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        with torch.no_grad():
            adam_math(*adam_inputs(opt_a))
        opt_b.step()
    # Float32 rounding in another order (lerp, the division before the step size): the weights
    # moved by about 0.03 agree to 1e-6 (a missing bias correction or eps term: 1e-3 and more).
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(opt_a.state[ours]["exp_avg_sq"], opt_b.state[theirs]["exp_avg_sq"])
    assert float(opt_a.state[ours]["step"]) == 3.0
