"""The trainer on tiny synthetic data: epochs, determinism, resume, divergence, EMA, fallbacks."""

from __future__ import annotations

import copy
import dataclasses
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mnist_gan.checkpoint import CheckpointStore, fingerprint
from mnist_gan.optim import adam_step
from mnist_gan.params import TrainParams
from mnist_gan.runners import (
    GRAPH_WARMUP_STEPS,
    CudaGraphRunner,
    EagerRunner,
    auto_steps_per_replay,
    select_runner,
)
from mnist_gan.training import METRICS, DivergenceError, GANTrainer, fixed_noise
from mnist_gan.utils import native_bf16

TINY = TrainParams(
    hidden=(32,), batch_size=64, epochs=3, ema=0.9, label_smoothing=0.0, checkpoint_every=1
)
FP = fingerprint(TINY, 0, "data", "cpu", "code", strategy="written_out")
TIMING = ("images_per_sec", "epoch_seconds")


def images(n: int = 320, seed: int = 0) -> torch.Tensor:
    """Synthetic 'digits': bright blobs at random places, in [-1, 1], (n, 1, 28, 28)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    centres = torch.rand(n, 2, 1, 1, generator=g) * 16 + 6
    blob = torch.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 18)
    return (blob * 2 - 1).unsqueeze(1)  # (n, 28, 28) -> (n, 1, 28, 28)


def weights(t: GANTrainer) -> dict[str, torch.Tensor]:
    nets = {"g": t.generator, "d": t.discriminator, "ema": t.ema_generator}
    return {f"{n}.{k}": v for n, net in nets.items() if net for k, v in net.state_dict().items()}


def assert_same_weights(a: GANTrainer, b: GANTrainer) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def without_timing(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


CASES = {
    "mlp-bce": TINY,
    "mlp-minimax-smoothing": dataclasses.replace(TINY, loss="minimax", label_smoothing=0.1),
    "mlp-hinge-sn": dataclasses.replace(TINY, loss="hinge", spectral_norm=True, ema=0.0),
    "mlp-article": dataclasses.replace(TINY, g_batchnorm=False, d_activation="relu", d_dropout=0),
    "dcgan": dataclasses.replace(TINY, model="dcgan", channels=4),
    "dcgan-sn-hinge": dataclasses.replace(
        TINY, model="dcgan", channels=4, spectral_norm=True, loss="hinge"
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_one_epoch_has_finite_metrics(name: str) -> None:
    t = GANTrainer(CASES[name], images(), seed=0, progress=False)
    assert t.steps_per_epoch == 5  # 320 // 64, the last partial batch dropped
    before = {k: v.clone() for k, v in weights(t).items()}
    stats = t.run_epoch()
    assert stats.epoch == 1 and t.epoch == 1
    values = stats.as_dict()
    assert set(values) == {"epoch", *METRICS, *TIMING}
    assert all(np.isfinite(v) for v in values.values())
    assert 0 < stats.d_real < 1 and 0 < stats.d_fake < 1
    assert stats.grad_norm_g > 0 and stats.grad_norm_d > 0
    assert stats.images_per_sec == pytest.approx(5 * 64 / stats.epoch_seconds)
    after = {k: v for k, v in weights(t).items() if v.is_floating_point()}  # weights, BN stats
    changed = [k for k, v in after.items() if not torch.equal(v, before[k])]
    assert any(k.startswith("g.") for k in changed) and any(k.startswith("d.") for k in changed)


COND = {
    "mlp": dataclasses.replace(TINY, conditional=True),
    "dcgan": dataclasses.replace(TINY, model="dcgan", channels=4, conditional=True),
}


@pytest.mark.parametrize("name", COND)
def test_conditional_training_uses_the_labels(name: str, tmp_path: Path) -> None:
    """One label per image is required; the digits shape G's output; resume stays exact."""
    cfg, x = COND[name], images()
    labels = torch.arange(len(x)) % 10
    with pytest.raises(ValueError, match="one label per training image"):
        GANTrainer(cfg, x, seed=0)
    with pytest.raises(ValueError, match="one label per training image"):
        GANTrainer(cfg, x, labels=labels[:-1], seed=0)
    full = GANTrainer(cfg, x, labels=labels, seed=0, progress=False)
    full.fit()
    z = torch.randn(1, cfg.latent_dim).expand(2, -1)
    two = full.sample(z, torch.tensor([3, 7]))
    assert two.shape == (2, 1, 28, 28) and not torch.equal(two[0], two[1])
    # Interrupted after one epoch and resumed: the same weights (the fake digits are drawn
    # from the trainer's own generator, which the checkpoint carries).
    store = CheckpointStore(tmp_path, FP)
    first = GANTrainer(cfg, x, labels=labels, seed=0, progress=False)
    first.history.append(first.run_epoch().as_dict())
    store.save(first.state_dict())
    resumed = GANTrainer(cfg, x, labels=labels, seed=0, progress=False)
    resumed.load_state_dict(store.load())
    resumed.fit()
    assert_same_weights(full, resumed)
    # Other labels, other training: the trainer really feeds them to the networks.
    other = GANTrainer(cfg, x, labels=labels.flip(0), seed=0, progress=False)
    other.fit()
    assert not torch.equal(weights(other)["d.embed.weight"], weights(full)["d.embed.weight"])


def test_partial_batch_dropped_and_batch_larger_than_data_rejected() -> None:
    t = GANTrainer(TINY, images(300), seed=0, progress=False)
    assert t.steps_per_epoch == 4
    with pytest.raises(ValueError, match=r"train\.batch_size: 64 is larger than the training set"):
        GANTrainer(TINY, images(50), seed=0)
    with pytest.raises(ValueError, match="shape"):
        GANTrainer(TINY, torch.zeros(100, 28, 28), seed=0)


def test_two_identical_runs_give_identical_weights() -> None:
    a = GANTrainer(TINY, images(), seed=3, progress=False)
    b = GANTrainer(TINY, images(), seed=3, progress=False)
    a.fit()
    torch.manual_seed(999)  # global RNG state between runs must not matter
    b.fit()
    assert a.epoch == b.epoch == 3
    assert_same_weights(a, b)
    assert without_timing(a.history) == without_timing(b.history)
    c = GANTrainer(TINY, images(), seed=4, progress=False)
    c.fit()
    assert not torch.equal(weights(a)["g.net.0.weight"], weights(c)["g.net.0.weight"])


def test_resume_from_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    full = GANTrainer(TINY, images(), seed=0, progress=False)
    full.fit()

    store = CheckpointStore(tmp_path / "ckpt", FP)
    first = GANTrainer(TINY, images(), seed=0, progress=False)
    first.run_epoch()
    first.history.append({"epoch": 1.0})  # what fit records; restored as is
    store.save(first.state_dict(), run_id="abc123")
    del first
    # A new process: every RNG elsewhere, nothing shared but the checkpoint file.
    torch.manual_seed(12345)
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002
    resumed = GANTrainer(TINY, images(), seed=0, progress=False)
    resumed.run_epoch()  # diverge from the checkpoint first, so loading must undo it all
    state = store.load()
    assert state is not None and state["run_id"] == "abc123" and state["epoch"] == 1
    assert "epoch 1" in store.note
    resumed.load_state_dict(state)
    resumed.fit()
    assert resumed.epoch == 3
    assert_same_weights(full, resumed)
    assert resumed.history[0] == {"epoch": 1.0}
    assert without_timing(resumed.history[1:]) == without_timing(full.history[1:])


def test_checkpoint_restores_python_and_numpy_global_rngs(tmp_path: Path) -> None:
    t = GANTrainer(TINY, images(), seed=0, progress=False)
    store = CheckpointStore(tmp_path, FP)
    store.save(t.state_dict())
    want = (random.random(), float(np.random.rand()))  # noqa: NPY002
    state = store.load()
    assert state is not None
    t.load_state_dict(state)
    assert (random.random(), float(np.random.rand())) == want  # noqa: NPY002


def test_fit_saves_checkpoints_on_schedule(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, epochs=5, checkpoint_every=2)
    saved: list[int] = []

    class Recording(CheckpointStore):
        def save(self, state: dict, **meta: object) -> None:
            saved.append(state["epoch"])
            super().save(state, **meta)

    store = Recording(tmp_path / "ckpt", FP)
    seen: list[int] = []
    t = GANTrainer(cfg, images(), seed=0, progress=False)
    history = t.fit(lambda tr, s: seen.append(s.epoch), store, {"run_id": "r"})
    assert saved == [2, 4, 5]  # every 2 epochs, and after the last one
    assert seen == [1, 2, 3, 4, 5]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    state = torch.load(store.path, weights_only=True)  # plain tensors and containers only
    assert state["epoch"] == 5 and state["run_id"] == "r" and state["fingerprint"] == FP
    assert len(state["history"]) == 5


def test_checkpoint_with_other_fingerprint_is_not_resumed(tmp_path: Path) -> None:
    t = GANTrainer(TINY, images(), seed=0, progress=False)
    other = fingerprint(dataclasses.replace(TINY, lr_g=1e-3), 0, "data", "cpu", "old code",
                        strategy="written_out")  # fmt: skip
    CheckpointStore(tmp_path, other).save(t.state_dict())
    store = CheckpointStore(tmp_path, FP)
    assert store.load() is None
    assert "made with other params, code; not resumed from" in store.note  # says which parts
    for junk in (b"not a checkpoint", b""):
        (tmp_path / CheckpointStore.FILE).write_bytes(junk)
        assert store.load() is None and "unreadable" in store.note
    torch.save({"epoch": 3, "fingerprint": "a string, as format 1 had"}, store.path)
    assert store.load() is None and "not a checkpoint of this trainer's format" in store.note
    torch.save([1, 2, 3], store.path)
    assert store.load() is None and "not a checkpoint of this trainer's format" in store.note
    store.save(t.state_dict())  # replaced by the current run's
    assert store.load() is not None


def test_a_checkpoint_that_does_not_fit_is_a_value_error() -> None:
    """Even with a matching fingerprint (a file forged or damaged in place), a bad state is a
    ValueError naming what did not fit, never another exception."""
    t = GANTrainer(TINY, images(), seed=0, progress=False)
    wide = GANTrainer(dataclasses.replace(TINY, hidden=(48,)), images(), seed=0, progress=False)
    broken = {**t.state_dict(), "rng": {}}
    for state in (wide.state_dict(), broken, {"format": 2}, "not a dict"):
        with pytest.raises(ValueError, match="checkpoint"):
            t.load_state_dict(state)  # type: ignore[arg-type]


def test_fingerprint_has_one_part_per_cause() -> None:
    def fp(*args: object, **kwargs: object) -> dict[str, str]:
        return fingerprint(*args, **{"strategy": "written_out", **kwargs})

    base = fp(TINY, 0, "abc", "cpu", "code")
    assert set(base) == {"params", "data", "device", "code", "world_size", "math", "strategy"}
    assert base == fp(dataclasses.replace(TINY), 0, "abc", "cpu", "code")
    changes = {
        "params": [
            fp(dataclasses.replace(TINY, lr_g=1e-3), 0, "abc", "cpu", "code"),
            fp(dataclasses.replace(TINY, hidden=(32, 32)), 0, "abc", "cpu", "code"),
            fp(TINY, 1, "abc", "cpu", "code"),  # the seed
        ],
        "data": [fp(TINY, 0, "abd", "cpu", "code")],
        "device": [fp(TINY, 0, "abc", "cuda", "code")],
        "code": [fp(TINY, 0, "abc", "cpu", "other code")],
        "world_size": [fp(TINY, 0, "abc", "cpu", "code", world_size=2)],
        "math": [fp(TINY, 0, "abc", "cpu", "code", math="bf16")],
        "strategy": [fp(TINY, 0, "abc", "cpu", "code", strategy="autograd compiled")],
    }
    for part, prints in changes.items():
        for other in prints:
            assert [k for k in base if base[k] != other[k]] == [part]


def test_strategy_says_what_runs() -> None:
    """The trainer's strategy, as the fingerprint takes it: the step, compiling, the graph."""
    cpu = GANTrainer(TINY, images(), seed=0, progress=False)
    assert cpu.strategy == "written_out"
    forced = GANTrainer(TINY, images(), seed=0, progress=False, step="autograd")
    assert forced.strategy == "autograd"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # where this PyTorch cannot compile
        compiled = GANTrainer(dataclasses.replace(TINY, compile=True), images(), seed=0)
    assert compiled.strategy == ("written_out compiled" if compiled.compiled else "written_out")
    graph = graph_trainer(StandIn(fail=True), steps_per_replay=2)
    assert graph.strategy == "written_out cuda_graph x2"
    with pytest.warns(RuntimeWarning, match="capturing the training step failed"):
        graph.run_steps(GRAPH_WARMUP_STEPS + 4)
    assert graph.strategy == "written_out"  # what runs after the fallback


def test_linear_lr_decay_per_epoch_and_exact_resume(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, lr_decay="linear", lr_g=3e-4, lr_d=6e-4, epochs=4)
    t = GANTrainer(cfg, images(), seed=0, progress=False)
    rates = []
    for _ in range(4):
        t.run_epoch()
        rates += [t.opt_g.param_groups[0]["lr"], t.opt_d.param_groups[0]["lr"]]
    assert rates == pytest.approx([r * f for f in (1.0, 0.75, 0.5, 0.25) for r in (3e-4, 6e-4)])
    constant = GANTrainer(dataclasses.replace(cfg, lr_decay="none"), images(), seed=0)
    constant.fit()
    assert constant.opt_g.param_groups[0]["lr"] == 3e-4
    with pytest.raises(AssertionError):
        assert_same_weights(t, constant)  # the decay changed training

    store = CheckpointStore(tmp_path, FP)
    half = GANTrainer(dataclasses.replace(cfg, epochs=4), images(), seed=0, progress=False)
    for _ in range(2):
        half.run_epoch()
    store.save(half.state_dict())
    resumed = GANTrainer(cfg, images(), seed=0, progress=False)
    resumed.load_state_dict(store.load())
    resumed.fit()
    assert_same_weights(resumed, t)


def test_clear_removes_checkpoint_and_leftovers_only(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    store = CheckpointStore(folder, FP)
    store.clear()  # nothing there yet: no error
    store.save({"epoch": 1})
    (folder / ".checkpoint.pt.abcd.tmp").write_bytes(b"left by a kill")
    store.clear()
    assert not folder.exists()
    store.save({"epoch": 1})
    (folder / "notes.txt").write_text("someone else's file")
    store.clear()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


def test_divergence_names_epoch_and_step_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, FP)
    t = GANTrainer(TINY, images(), seed=0, progress=False)
    t.run_epoch()
    t.history.append({"epoch": 1.0})
    store.save(t.state_dict())
    good = store.path.read_bytes()
    with torch.no_grad():  # a NaN weight makes the first loss of epoch 2 NaN
        next(t.discriminator.parameters()).fill_(float("nan"))
    with pytest.raises(DivergenceError, match=r"epoch 2, step 1 \(global step 6\)") as err:
        t.fit(checkpoints=store)
    assert (err.value.epoch, err.value.step, err.value.global_step) == (2, 1, 6)
    assert "loss_d=nan" in str(err.value)
    assert store.path.read_bytes() == good
    assert t.epoch == 1 and len(t.history) == 1


def test_huge_learning_rate_trips_the_guard() -> None:
    # Adam moves every weight by about lr: after D's first update its logits overflow, so the
    # generator's loss of step 1 (computed through the updated D) is already NaN.
    cfg = dataclasses.replace(TINY, lr_g=1e30, lr_d=1e30)
    t = GANTrainer(cfg, images(), seed=0, progress=False)
    with pytest.raises(DivergenceError, match=r"epoch 1, step 1 \(global step 1\).*loss_g=nan"):
        t.fit()
    assert t.epoch == 0 and t.history == []


def test_ema_follows_its_formula() -> None:
    cfg = dataclasses.replace(TINY, ema=0.75)
    t = GANTrainer(cfg, images(), seed=0, progress=False)
    assert t.ema_generator is not None
    init = {k: v.clone() for k, v in t.ema_generator.state_dict().items()}
    assert all(torch.equal(init[k], v) for k, v in t.generator.state_dict().items())
    t.step()
    g, ema = t.generator.state_dict(), t.ema_generator.state_dict()
    for k, v in ema.items():
        if v.is_floating_point():  # weights and BatchNorm statistics are averaged
            torch.testing.assert_close(v, 0.75 * init[k] + 0.25 * g[k])
        else:  # the batch counter is copied
            assert torch.equal(v, g[k])
    assert not torch.equal(ema["net.0.weight"], g["net.0.weight"])
    assert GANTrainer(dataclasses.replace(TINY, ema=0.0), images(), seed=0).ema_generator is None


@pytest.mark.parametrize(
    "options",
    [
        {"fused": True},  # the trainer's CPU Adam: the kernel called directly after step 1
        {"fused": True, "weight_decay": 0.01},
        {"fused": False},  # not covered: opt.step()
        {"fused": True, "lr": torch.tensor(1e-3)},  # a tensor learning rate: opt.step()
    ],
    ids=["fused", "weight-decay", "not-fused", "tensor-lr"],
)
def test_adam_step_is_opt_step_bit_for_bit(options: dict) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(9, 7), torch.nn.ReLU(), torch.nn.Linear(7, 1))
    twin = copy.deepcopy(net)
    kwargs = {"lr": 1e-3, "betas": (0.5, 0.999), **options}
    opt, opt_twin = (torch.optim.Adam(n.parameters(), **kwargs) for n in (net, twin))
    calls = []
    opt.register_step_post_hook(lambda *_: calls.append(1))  # counts the opt.step() calls
    for step in range(6):
        x = torch.randn(16, 9)
        for n, o in ((net, opt), (twin, opt_twin)):
            o.zero_grad(set_to_none=True)
            n(x).square().mean().backward()
        adam_step(opt)
        opt_twin.step()
        if step == 2:  # a decaying learning rate changes the group's float between steps
            for o in (opt, opt_twin):
                o.param_groups[0]["lr"] = o.param_groups[0]["lr"] * 0.5
        if step == 3:  # a resume replaces the state's step counters: the next steps count on
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for a, b in zip(net.parameters(), twin.parameters(), strict=True):
            assert torch.equal(a, b)
    state, state_twin = opt.state_dict()["state"], opt_twin.state_dict()["state"]
    for i in state_twin:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state[i][key], state_twin[i][key])
    assert all(state[i]["step"].item() == 6 for i in state)
    direct = options.get("fused") and not isinstance(options.get("lr"), torch.Tensor)
    assert len(calls) == (1 if direct else 6)  # directly from the second step on, or never


def test_one_pass_of_d_over_real_and_fake_is_the_two_passes() -> None:
    """D without batch statistics judges real and fake in one pass: the same training."""
    cfg = dataclasses.replace(TINY, d_dropout=0.0, amp=False)  # no masks to draw differently
    fused, apart = (GANTrainer(cfg, images(), seed=0, progress=False) for _ in range(2))
    assert fused.fuse_d
    apart.fuse_d = False
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        batch = {"real": images(64, seed=step), "z": torch.randn(64, cfg.latent_dim, generator=g)}
        a, b = fused.train_step(batch), apart.train_step(batch)
        # Losses, D's mean outputs on real and fake, gradient norms: the same sums in another
        # order (Adam's first steps magnify rounding in near-zero gradients: 3e-3 relative).
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)
        assert a[2] > a[3] + 0.01 or step == 0  # d_real and d_fake kept apart, in order
    # BatchNorm (dcgan's D) mixes real and fake batch statistics, spectral norm runs a power
    # iteration per pass: two passes for both.
    dcgan = dataclasses.replace(TINY, model="dcgan", channels=4)
    assert not GANTrainer(dcgan, images(), seed=0).fuse_d
    assert not GANTrainer(dataclasses.replace(dcgan, spectral_norm=True), images()).fuse_d
    assert not GANTrainer(dataclasses.replace(cfg, spectral_norm=True), images()).fuse_d


def test_one_pass_of_a_conditional_d_keeps_each_images_digit() -> None:
    cfg = dataclasses.replace(TINY, d_dropout=0.0, amp=False, conditional=True)
    digits = torch.arange(320) % 10
    fused, apart = (GANTrainer(cfg, images(), labels=digits, seed=0) for _ in range(2))
    apart.fuse_d = False
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        z = torch.randn(64, cfg.latent_dim, generator=g)
        batch = {"real": images(64, seed=step), "z": z, "y_real": digits[:64],
                 "y_fake": torch.randint(10, (64,), generator=g)}  # fmt: skip
        a, b = fused.train_step(batch), apart.train_step(batch)
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-4)


class _MatmulMath(TorchDispatchMode):
    """Records oneDNN's float32 matmul math, and the operands' dtype, at every matmul under it."""

    def __enter__(self) -> list[tuple[str, torch.dtype]]:
        self.seen: list[tuple[str, torch.dtype]] = []
        super().__enter__()
        return self.seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm"):
            self.seen.append((torch.backends.mkldnn.matmul.fp32_precision, args[-1].dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    ("capability", "native"), [((7, 5), False), ((8, 0), True), ((9, 0), True)]
)
def test_native_bf16_means_ampere_or_later_on_cuda(monkeypatch, capability, native: bool) -> None:
    """``amp`` on CUDA only where bf16 is native: ``torch.cuda.is_bf16_supported()`` also says
    yes to a T4's or V100's emulated bf16. The capability asked for is the given device's."""
    asked: list[int] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda index: asked.append(index) or capability)  # fmt: skip
    assert native_bf16(torch.device("cuda")) is native
    assert native_bf16(torch.device("cuda", 1)) is native
    assert asked == [3, 1]
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize("amx", [True, False])
@pytest.mark.parametrize("avx512_bf16", [True, False])
def test_native_bf16_on_the_cpu_means_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert native_bf16(torch.device("cpu")) is (amx or avx512_bf16)


@pytest.mark.parametrize("native", [True, False], ids=["bf16-cpu", "float32-cpu"])
def test_cpu_bf16_math_only_for_the_autograd_step_and_only_where_the_cpu_has_it(
    monkeypatch, native: bool
) -> None:
    """On a CPU with native bf16, ``amp`` means bf16 operands in the written-out step, which
    leaves oneDNN's setting alone, and bf16 math for float32 matmuls inside the autograd step
    (D's last layer in float32: ieee); elsewhere float32 matmuls. Checked on any CPU: the
    trainer is told whether the CPU has bf16 (bf16 products run without it, only slower)."""
    monkeypatch.setattr("mnist_gan.training.cpu_has_bf16", lambda: native)
    outer = torch.backends.mkldnn.matmul.fp32_precision
    t = GANTrainer(dataclasses.replace(TINY, amp=True), images(), seed=0, progress=False)
    assert t.amp is native and t.step_kind == "written_out"
    autograd = GANTrainer(dataclasses.replace(TINY, amp=True), images(), seed=0, progress=False)
    autograd.fuse_d = False  # leaves the written-out step
    assert autograd.step_kind == "autograd"
    with _MatmulMath() as written_out:
        t.step()
    with _MatmulMath() as through_autograd:
        autograd.step()
    assert len(written_out) > 10 and len(through_autograd) > 10
    assert {math for math, _ in written_out} == {outer}
    # bf16 operands for the hidden layers on a bf16 CPU; D's last layer in float32
    operands = {torch.bfloat16, torch.float32} if native else {torch.float32}
    assert {dtype for _, dtype in written_out} == operands
    assert {dtype for _, dtype in through_autograd} == {torch.float32}
    if native:  # the hidden layers in bf16 math, D's last layer in float32 (ieee)
        assert {math for math, _ in through_autograd} == {"bf16", "ieee"}
    else:
        assert {math for math, _ in through_autograd} == {outer}
    assert torch.backends.mkldnn.matmul.fp32_precision == outer  # restored after the steps
    off = GANTrainer(dataclasses.replace(TINY, amp=False), images(), seed=0, progress=False)
    assert off.amp is False
    off.step()
    # bf16 products round differently: the first step's losses already differ.
    assert torch.equal(t._record[0], off._record[0]) is not native
    assert t.math == ("bf16" if native else "float32") and off.math == "float32"


def test_runner_selection() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    on, off = TrainParams(cuda_graph=True), TrainParams(cuda_graph=False)
    assert select_runner(on, cuda, 1) == ("cuda_graph", None)
    assert select_runner(off, cuda, 1) == ("eager", None)
    assert select_runner(on, cpu, 1) == ("eager", None)  # on by default: silent on a CPU
    name, warning = select_runner(on, cuda, 2)
    assert name == "eager" and warning is not None and "several training processes" in warning
    t = GANTrainer(TINY, images(), seed=0, progress=False)
    assert isinstance(t._runner, EagerRunner) and t.cuda_graph is False


class StandIn:
    """A stand-in for CUDA graph capture on the CPU: the replay runs the recorded function.

    A real graph replays its kernels on the tensors it captured, so each replay checks that the
    runner's inputs and outputs (``static``, ``records``) are still the tensors they were at
    capture, at the same addresses.
    """

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.captures, self.replays = fail, 0, 0
        self.runner: CudaGraphRunner | None = None

    def _addresses(self) -> dict[str, int]:
        assert self.runner is not None
        tensors = {**self.runner.static, "records": self.runner.records}
        return {name: t.data_ptr() for name, t in tensors.items()}

    def __call__(self, fn):
        self.captures += 1
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        captured = self._addresses()

        def replay() -> None:
            assert self._addresses() == captured
            self.replays += 1
            fn()

        return replay


def graph_trainer(capture: StandIn, cfg: TrainParams = TINY, **options: object) -> GANTrainer:
    """A CPU trainer whose step runs through CudaGraphRunner with a stand-in capture."""
    t = GANTrainer(cfg, images(), seed=0, progress=False, **options)
    t._runner = t._new_runner(True)
    assert isinstance(t._runner, CudaGraphRunner) and t.cuda_graph
    t._runner.capture, capture.runner = capture, t._runner
    return t


def test_graph_runner_warms_up_captures_once_then_replays() -> None:
    """Warm-up steps, one capture, replays: the training of the eager runner, exactly."""
    capture = StandIn()
    graph, eager = graph_trainer(capture), GANTrainer(TINY, images(), seed=0, progress=False)
    for step in range(GRAPH_WARMUP_STEPS + 4):
        graph.step()
        eager.step()
        expected = 0 if step < GRAPH_WARMUP_STEPS else 1  # captured once, after the warm-up
        assert capture.captures == expected and graph.cuda_graph
        # Each step's metrics leave the graph's output through the epoch's record.
        assert torch.equal(graph._record[: step + 1], eager._record[: step + 1])
    assert_same_weights(graph, eager)
    timeless = [without_timing([t.run_epoch().as_dict()]) for t in (graph, eager)]
    assert timeless[0] == timeless[1]  # the epoch's means, read from the same records
    assert_same_weights(graph, eager)
    # A restored checkpoint means new optimizer state: a new graph (warm-up, capture) follows.
    graph.load_state_dict(eager.state_dict())
    assert graph._runner.replay is None and graph._runner.warmup_left == GRAPH_WARMUP_STEPS


def test_failed_capture_warns_and_trains_on_eagerly() -> None:
    capture = StandIn(fail=True)
    graph, eager = graph_trainer(capture), GANTrainer(TINY, images(), seed=0, progress=False)
    for _ in range(GRAPH_WARMUP_STEPS):
        graph.step()
    with pytest.warns(RuntimeWarning, match="capturing the training step failed"):
        graph.step()  # the capture fails; this step runs eagerly
    assert isinstance(graph._runner, EagerRunner) and not graph.cuda_graph
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph.step()  # no second attempt, no second warning
    for _ in range(GRAPH_WARMUP_STEPS + 2):
        eager.step()
    assert capture.captures == 1
    assert_same_weights(graph, eager)  # no step lost or repeated
    assert torch.equal(graph._record, eager._record)


def test_auto_steps_per_replay_divides_the_epoch_where_it_can() -> None:
    assert auto_steps_per_replay(468) == 13  # MNIST's 60,000 images in batches of 128
    assert auto_steps_per_replay(480) == 16
    assert auto_steps_per_replay(467) == 16  # a prime: the epoch's last 3 steps run alone
    assert auto_steps_per_replay(5) == 5 and auto_steps_per_replay(1) == 1  # the whole epoch
    for bad in (0, 6, "many", 2.0):  # TINY's epoch has 5 steps
        with pytest.raises(ValueError, match="steps_per_replay"):
            GANTrainer(TINY, images(), seed=0, progress=False, steps_per_replay=bad)
    t = GANTrainer(TINY, images(), seed=0, progress=False, steps_per_replay="auto")
    assert t.steps_per_replay == 5


def test_graph_runner_replays_several_steps_at_once() -> None:
    """Two steps per replay: warm-up steps, one capture, replays of two steps, and steps left
    over run one by one; the training of the eager runner, exactly (the noise of a replay's
    steps is drawn at once: 64 x 100 values a batch, a multiple of 16, gives the same numbers
    on the CPU as one draw a step)."""
    capture = StandIn()
    graph = graph_trainer(capture, steps_per_replay=2)
    eager = GANTrainer(TINY, images(), seed=0, progress=False)
    assert graph._runner.steps == 2 and graph._runner.static["z"].shape == (2, 64, 100)
    first = [t.run_epoch().as_dict() for t in (graph, eager)]
    # 5 steps in pieces of 2, 2, 1: the warm-up (3 steps, 4 with its piece's), 1 left over
    assert capture.captures == 0 and graph._runner.warmup_left == 0
    second = [t.run_epoch().as_dict() for t in (graph, eager)]
    assert (capture.captures, capture.replays) == (1, 2)  # steps 1-2, 3-4; step 5 alone
    assert without_timing(first[:1]) == without_timing(first[1:])
    assert without_timing(second[:1]) == without_timing(second[1:])
    assert torch.equal(graph._record, eager._record)
    assert_same_weights(graph, eager)
    graph.run_steps(7)  # across an epoch's end: whole replays where they fit
    eager.run_steps(7)
    assert (capture.captures, capture.replays) == (1, 5)  # 1-2, 3-4, 5 alone; the next 1-2
    assert_same_weights(graph, eager)


def test_failed_capture_of_several_steps_runs_their_batches_eagerly() -> None:
    capture = StandIn(fail=True)
    graph = graph_trainer(capture, steps_per_replay=2)
    eager = GANTrainer(TINY, images(), seed=0, progress=False)
    graph.run_steps(GRAPH_WARMUP_STEPS)  # pieces of 2 and 1
    with pytest.warns(RuntimeWarning, match="capturing the training step failed"):
        graph.run_steps(4)  # steps 4 and 5 alone; the next epoch's first 2 fail to capture
    assert isinstance(graph._runner, EagerRunner) and capture.captures == 1
    eager.run_steps(GRAPH_WARMUP_STEPS + 4)
    assert_same_weights(graph, eager)  # no step lost or repeated, no batch redrawn
    assert torch.equal(graph._record, eager._record)


@pytest.mark.slow
def test_compiled_step_replays_several_steps_as_it_runs_one() -> None:
    """The compiled written-out step in a graph of 3 steps (a stand-in capture on the CPU):
    each slot of the graph's inputs is a view at another offset, and the parts compile once
    each all the same (no recompiling per slot), with the results of one step per replay."""
    cfg = dataclasses.replace(TINY, compile=True, epochs=4)
    graphs = torch._dynamo.utils.counters["stats"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would be a failure here
        one = graph_trainer(StandIn(), cfg)
        one.run_steps(10)
        capture = StandIn()
        three = graph_trainer(capture, cfg, steps_per_replay=3)
        three.run_steps(GRAPH_WARMUP_STEPS)  # one piece, eagerly: compiles each part (slots 0-2)
        compiled = graphs["unique_graphs"]
        three.run_steps(7)  # steps 4-5 (the epoch's end), a replay of 1-3 (slots 0-2), then 4-5
    assert one.compiled and three.compiled and capture.replays == 1
    assert graphs["unique_graphs"] == compiled  # no part compiled again for another slot
    assert torch.equal(one._record, three._record)
    assert_same_weights(one, three)


def test_step_runs_any_number_of_steps() -> None:
    t = GANTrainer(TINY, images(), seed=0, progress=False)
    for _ in range(12):  # more than two epochs' worth: permutations are redrawn as needed
        t.step()
    assert t.epoch == 0  # steps alone do not complete epochs
    assert torch.isfinite(t._record).all()


def test_sample_touches_no_rng_or_mode() -> None:
    t = GANTrainer(TINY, images(), seed=0, progress=False)
    cpu, data = torch.get_rng_state(), t.data_generator.get_state()
    z = fixed_noise(6, TINY.latent_dim, seed=0)
    assert torch.equal(z, fixed_noise(6, TINY.latent_dim, seed=0))
    out = t.sample(z)
    assert out.shape == (6, 1, 28, 28) and out.device.type == "cpu"
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(torch.get_rng_state(), cpu)
    assert torch.equal(t.data_generator.get_state(), data)
    assert t.generator.training


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="train.compile.*no compiler here"):
        t = GANTrainer(dataclasses.replace(TINY, compile=True), images(), seed=0)
    assert t.compiled is False
    assert np.isfinite(t.run_epoch().loss_d)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["written_out", "autograd"])
def test_compiled_training_matches_shapes_and_stays_finite(step: str) -> None:
    """train.compile: true compiles the written-out step as a whole, and the autograd step's
    forward passes (what dcgan, conditional and spectral-norm runs get); neither falls back."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback would be a failure here
        t = GANTrainer(dataclasses.replace(TINY, compile=True), images(), seed=0, progress=False,
                       step=step)  # fmt: skip
        stats = t.run_epoch()  # compiles on the first step
    assert t.compiled is True and t.step_kind == step
    assert np.isfinite(stats.loss_d) and np.isfinite(stats.loss_g)
    if step == "autograd":  # the forward passes are compiled modules
        assert t._parts.g_fwd is not t.generator and t._parts.d_for_g is not t.discriminator


def test_progress_bar_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    GANTrainer(TINY, images(), seed=0, progress=True).run_epoch()
    assert "epoch 1/3" in capsys.readouterr().err
    GANTrainer(TINY, images(), seed=0).run_epoch()  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""
