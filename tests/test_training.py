"""The trainer on tiny synthetic data: epochs, determinism, resume, divergence, EMA, strategy."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mnist_gan.checkpoint import CheckpointStore, fingerprint
from mnist_gan.data import shift_images
from mnist_gan.losses import discriminator_loss
from mnist_gan.models import build_discriminator, build_generator
from mnist_gan.params import TrainParams
from mnist_gan.strategy import EAGER, Strategy, StrategyError, choose_strategy
from mnist_gan.training import METRICS, DivergenceError, GANTrainer, fixed_noise, standing_stats
from mnist_gan.utils import native_bf16

TINY = TrainParams(
    hidden=(32,),
    d_hidden=None,
    batch_size=64,
    epochs=3,
    ema=0.9,
    label_smoothing=0.0,
    checkpoint_every=1,
)
FP = fingerprint(TINY, 0, "data", "cpu", "code", strategy=str(EAGER))
TIMING = ("images_per_sec", "epoch_seconds")


def trainer(cfg: TrainParams, x: torch.Tensor, **options: object) -> GANTrainer:
    """A CPU trainer, eager and float32 unless ``strategy`` says otherwise."""
    return GANTrainer(cfg, x, **{"strategy": EAGER, **options})  # type: ignore[arg-type]


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
    "mlp-article": dataclasses.replace(
        TINY, g_batchnorm=False, d_activation="relu", d_dropout=0, d_minibatch_std=0
    ),
    "dcgan": dataclasses.replace(TINY, model="dcgan", channels=4),
    "dcgan-sn-hinge": dataclasses.replace(
        TINY, model="dcgan", channels=4, spectral_norm=True, loss="hinge"
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_one_epoch_has_finite_metrics(name: str) -> None:
    t = trainer(CASES[name], images(), seed=0, progress=False)
    assert t.steps_per_epoch == 5  # 320 // 64, the last partial batch dropped
    before = {k: v.clone() for k, v in weights(t).items()}
    seen = []
    t.fit(lambda _, stats: seen.append(stats), epochs=1)
    (stats,) = seen
    assert stats.epoch == 1 and t.epoch == 1
    values = stats.as_dict()
    assert t.history == [values]
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
        trainer(cfg, x, seed=0)
    with pytest.raises(ValueError, match="one label per training image"):
        trainer(cfg, x, labels=labels[:-1], seed=0)
    full = trainer(cfg, x, labels=labels, seed=0, progress=False)
    full.fit()
    z = torch.randn(1, cfg.latent_dim).expand(2, -1)
    two = full.sample(z, torch.tensor([3, 7]))
    assert two.shape == (2, 1, 28, 28) and not torch.equal(two[0], two[1])
    # Interrupted after one epoch and resumed: the same weights (the fake digits are drawn
    # from the trainer's own generator, which the checkpoint carries).
    store = CheckpointStore(tmp_path, FP)
    first = trainer(cfg, x, labels=labels, seed=0, progress=False)
    first.fit(epochs=1)
    store.save(first.state_dict())
    resumed = trainer(cfg, x, labels=labels, seed=0, progress=False)
    resumed.load_state_dict(store.load())
    resumed.fit()
    assert_same_weights(full, resumed)
    # Other labels, other training: the trainer really feeds them to the networks.
    other = trainer(cfg, x, labels=labels.flip(0), seed=0, progress=False)
    other.fit()
    assert not torch.equal(weights(other)["d.embed.weight"], weights(full)["d.embed.weight"])


def test_partial_batch_dropped_and_batch_larger_than_data_rejected() -> None:
    t = trainer(TINY, images(300), seed=0, progress=False)
    assert t.steps_per_epoch == 4
    with pytest.raises(ValueError, match=r"train\.batch_size: 64 is larger than the training set"):
        trainer(TINY, images(50), seed=0)
    with pytest.raises(ValueError, match="shape"):
        trainer(TINY, torch.zeros(100, 28, 28), seed=0)


def test_minibatch_groups_that_do_not_split_a_ranks_batch_are_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The params check a batch against train.nproc; a world of another size (torchrun run
    by hand, a benchmark) is checked by the trainer before the first step."""
    cfg = dataclasses.replace(TINY, batch_size=24, d_minibatch_std=4)  # 24 / 4 ranks = 6
    monkeypatch.setattr("mnist_gan.distributed.rank_and_size", lambda: (0, 4))
    with pytest.raises(ValueError, match=r"groups of 4 do not split each of the 4 processes' "
                       r"batch of 6 evenly"):  # fmt: skip
        trainer(cfg, images(), seed=0)


def test_two_identical_runs_give_identical_weights() -> None:
    a = trainer(TINY, images(), seed=3, progress=False)
    b = trainer(TINY, images(), seed=3, progress=False)
    a.fit()
    torch.manual_seed(999)  # global RNG state between runs must not matter
    b.fit()
    assert a.epoch == b.epoch == 3
    assert_same_weights(a, b)
    assert without_timing(a.history) == without_timing(b.history)
    c = trainer(TINY, images(), seed=4, progress=False)
    c.fit()
    assert not torch.equal(weights(a)["g.net.0.weight"], weights(c)["g.net.0.weight"])


def test_resume_from_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    full = trainer(TINY, images(), seed=0, progress=False)
    full.fit()

    store = CheckpointStore(tmp_path / "ckpt", FP)
    first = trainer(TINY, images(), seed=0, progress=False)
    first.fit(epochs=1)
    first.history[0] = {"epoch": 1.0}  # a history is restored as it was saved
    store.save(first.state_dict(), run_id="abc123")
    del first
    # A new process: every RNG elsewhere, nothing shared but the checkpoint file.
    torch.manual_seed(12345)
    random.seed(1)
    np.random.seed(2)  # noqa: NPY002
    resumed = trainer(TINY, images(), seed=0, progress=False)
    resumed.fit(epochs=2)  # diverge from the checkpoint first, so loading must undo it all
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
    t = trainer(TINY, images(), seed=0, progress=False)
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
    t = trainer(cfg, images(), seed=0, progress=False)
    history = t.fit(lambda tr, s: seen.append(s.epoch), store, {"run_id": "r"})
    assert saved == [2, 4, 5]  # every 2 epochs, and after the last one
    assert seen == [1, 2, 3, 4, 5]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    state = torch.load(store.path, weights_only=True)  # plain tensors and containers only
    assert state["epoch"] == 5 and state["run_id"] == "r" and state["fingerprint"] == FP
    assert len(state["history"]) == 5


def test_checkpoint_with_other_fingerprint_is_not_resumed(tmp_path: Path) -> None:
    t = trainer(TINY, images(), seed=0, progress=False)
    other = fingerprint(dataclasses.replace(TINY, lr_g=1e-3), 0, "data", "cpu", "old code",
                        strategy=str(EAGER))  # fmt: skip
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
    t = trainer(TINY, images(), seed=0, progress=False)
    wide = trainer(dataclasses.replace(TINY, hidden=(48,)), images(), seed=0, progress=False)
    broken = {**t.state_dict(), "rng": {}}
    for state in (wide.state_dict(), broken, {"format": 2}, "not a dict"):
        with pytest.raises(ValueError, match="checkpoint"):
            t.load_state_dict(state)  # type: ignore[arg-type]


def test_fingerprint_has_one_part_per_cause() -> None:
    def fp(*args: object, **kwargs: object) -> dict[str, str]:
        return fingerprint(*args, **{"strategy": str(EAGER), **kwargs})

    base = fp(TINY, 0, "abc", "cpu", "code")
    assert set(base) == {"params", "data", "device", "code", "world_size", "strategy"}
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
        "strategy": [
            fp(TINY, 0, "abc", "cpu", "code", strategy=str(Strategy(amp=True))),
            fp(TINY, 0, "abc", "cpu", "code", strategy=str(Strategy(compile=True))),
        ],
    }
    for part, prints in changes.items():
        for other in prints:
            assert [k for k in base if base[k] != other[k]] == [part]


def test_linear_lr_decay_per_epoch_and_exact_resume(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, lr_decay="linear", lr_g=3e-4, lr_d=6e-4, epochs=4)
    t = trainer(cfg, images(), seed=0, progress=False)
    rates = []
    for epoch in range(1, 5):
        t.fit(epochs=epoch)
        rates += [t.opt_g.param_groups[0]["lr"], t.opt_d.param_groups[0]["lr"]]
    assert rates == pytest.approx([r * f for f in (1.0, 0.75, 0.5, 0.25) for r in (3e-4, 6e-4)])
    constant = trainer(dataclasses.replace(cfg, lr_decay="none"), images(), seed=0)
    constant.fit()
    assert constant.opt_g.param_groups[0]["lr"] == 3e-4
    with pytest.raises(AssertionError):
        assert_same_weights(t, constant)  # the decay changed training

    store = CheckpointStore(tmp_path, FP)
    half = trainer(dataclasses.replace(cfg, epochs=4), images(), seed=0, progress=False)
    half.fit(epochs=2)
    store.save(half.state_dict())
    resumed = trainer(cfg, images(), seed=0, progress=False)
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
    t = trainer(TINY, images(), seed=0, progress=False)
    t.fit(epochs=1)
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
    t = trainer(cfg, images(), seed=0, progress=False)
    with pytest.raises(DivergenceError, match=r"epoch 1, step 1 \(global step 1\).*loss_g=nan"):
        t.fit()
    assert t.epoch == 0 and t.history == []


def test_ema_follows_its_formula() -> None:
    cfg = dataclasses.replace(TINY, ema=0.75)
    t = trainer(cfg, images(64), seed=0, progress=False)  # one batch: an epoch is one step
    assert t.ema_generator is not None
    init = {k: v.clone() for k, v in t.ema_generator.state_dict().items()}
    assert all(torch.equal(init[k], v) for k, v in t.generator.state_dict().items())
    t.fit(epochs=1)
    g, ema = t.generator.state_dict(), t.ema_generator.state_dict()
    for k, v in ema.items():
        if v.is_floating_point():  # weights and BatchNorm statistics are averaged
            torch.testing.assert_close(v, 0.75 * init[k] + 0.25 * g[k])
        else:  # the batch counter is copied
            assert torch.equal(v, g[k])
    assert not torch.equal(ema["net.0.weight"], g["net.0.weight"])
    assert trainer(dataclasses.replace(TINY, ema=0.0), images(), seed=0).ema_generator is None


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


def test_sample_touches_no_rng_or_mode() -> None:
    t = trainer(TINY, images(), seed=0, progress=False)
    cpu, data = torch.get_rng_state(), t.data_generator.get_state()
    z = fixed_noise(6, TINY.latent_dim, seed=0)
    assert torch.equal(z, fixed_noise(6, TINY.latent_dim, seed=0))
    out = t.sample(z)
    assert out.shape == (6, 1, 28, 28) and out.device.type == "cpu"
    assert out.min() >= -1 and out.max() <= 1
    assert torch.equal(torch.get_rng_state(), cpu)
    assert torch.equal(t.data_generator.get_state(), data)
    assert t.generator.training


def test_progress_bar_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    trainer(TINY, images(), seed=0, progress=True).fit(epochs=1)
    assert "epoch 1/3" in capsys.readouterr().err
    trainer(TINY, images(), seed=0).fit(epochs=1)  # stderr is not a terminal under pytest
    assert capsys.readouterr().err == ""


# --- the strategy: chosen once, before the first step ----------------------------------------


@pytest.mark.parametrize("native", [True, False])
def test_auto_on_the_cpu_is_eager_in_bf16_where_native(monkeypatch, native: bool) -> None:
    """auto on the CPU: bf16 autocast where the CPU computes bf16 natively (measured faster),
    never compiled (measured slower); explicit false is the plain float32 step."""
    monkeypatch.setattr("mnist_gan.strategy.native_bf16", lambda device: native)
    assert choose_strategy(TrainParams(), "cpu") == Strategy(amp=native)
    off = TrainParams(amp=False, compile=False, cuda_graph=False)
    assert choose_strategy(off, "cpu") == EAGER
    assert str(EAGER) == "eager float32"
    assert str(Strategy(amp=True)) == "eager bf16"
    assert str(Strategy(amp=True, compile=True, cuda_graph=True)) == "compiled cuda_graph bf16"


def test_auto_on_cuda_takes_the_graph_and_bf16_in_one_process(monkeypatch) -> None:
    """Decided from the device and the process count, without a GPU: bf16 where native, the
    CUDA graph in one process only (DDP's all-reduce is not captured), compile where it works."""
    monkeypatch.setattr("mnist_gan.strategy.native_bf16", lambda device: device.type == "cuda")
    plain = TrainParams(r1_gamma=0.0)  # the default's R1 rules both out: the next test
    one = choose_strategy(plain, "cuda", world_size=1)
    assert one.amp and one.cuda_graph
    ddp = choose_strategy(plain, "cuda", world_size=2)
    assert ddp.amp and not ddp.cuda_graph and not ddp.compile


@pytest.mark.parametrize(
    ("options", "world_size", "message"),
    [
        ({"cuda_graph": True}, 1, r"train\.cuda_graph: true needs a CUDA device.*on cpu"),
        ({"cuda_graph": True}, 2, r"train\.cuda_graph: true .* 2 training processes"),
        ({"amp": True}, 1, r"train\.amp: true, but this cpu does not compute bf16 natively"),
    ],
    ids=["graph-on-cpu", "graph-under-ddp", "amp-without-bf16"],
)
def test_an_explicit_request_that_cannot_be_met_is_one_line(
    monkeypatch, options: dict, world_size: int, message: str
) -> None:
    monkeypatch.setattr("mnist_gan.strategy.native_bf16", lambda device: False)
    with pytest.raises(StrategyError, match=message) as err:
        choose_strategy(TrainParams(**options), "cpu", world_size)
    assert "\n" not in str(err.value) and "set it to auto or false" in str(err.value)


def test_amp_true_on_a_cpu_with_bf16_trains_in_bf16(monkeypatch) -> None:
    """bf16 autocast on the CPU where asked for: other numbers than float32 from step one."""
    monkeypatch.setattr("mnist_gan.strategy.native_bf16", lambda device: True)
    strategy = choose_strategy(TrainParams(amp=True), "cpu")
    assert strategy == Strategy(amp=True) and str(strategy) == "eager bf16"
    bf16, fp32 = (trainer(TINY, images(64), seed=0, strategy=s) for s in (strategy, EAGER))
    for t in (bf16, fp32):
        t.fit(epochs=1)
    assert bf16.history[0]["loss_d"] != fp32.history[0]["loss_d"]
    assert np.isfinite(bf16.history[0]["loss_d"])


def test_compile_true_where_torch_compile_fails_is_a_strategy_error(monkeypatch) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    with pytest.raises(StrategyError, match=r"train\.compile: true, but torch\.compile fails"):
        choose_strategy(TrainParams(compile=True, r1_gamma=0.0), "cpu")  # R1: its own error
    assert not choose_strategy(TrainParams(compile="auto"), "cpu").compile


def test_a_step_that_fails_to_compile_stops_training_never_falls_back(monkeypatch) -> None:
    """Compiling is lazy: a failure at the first step is the strategy's, not a reason to run
    something else than what was logged."""

    def fails_when_run(*args: object, **kwargs: object) -> object:
        def run(*a: object, **k: object) -> object:
            raise RuntimeError("inductor: no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", fails_when_run)
    t = trainer(TINY, images(), seed=0, strategy=Strategy(compile=True))
    with pytest.raises(StrategyError, match=r"compiling the training step failed.*set it to false"):
        t.fit(epochs=1)
    assert t.epoch == 0 and t.strategy == Strategy(compile=True)


def test_r1_rules_out_compiling_the_step_and_auto_capturing_it(monkeypatch) -> None:
    """R1's penalty is a double backward, which compiled code does not support: auto leaves
    the step uncompiled (on CUDA, where it would compile), true is a one-line error that names
    both params. auto does not capture it in a CUDA graph either (not yet checked on a GPU);
    true does. The default has R1: on CUDA it runs eager, in bf16."""
    monkeypatch.setattr("mnist_gan.strategy.native_bf16", lambda device: True)
    monkeypatch.setattr("mnist_gan.strategy._compiles", lambda device: None)
    r1 = TrainParams(r1_gamma=1.0)
    assert choose_strategy(TrainParams(r1_gamma=0.0), "cuda") == Strategy(True, True, True)
    assert choose_strategy(r1, "cuda") == Strategy(amp=True)
    assert choose_strategy(TrainParams(), "cuda") == Strategy(amp=True)
    assert choose_strategy(dataclasses.replace(r1, cuda_graph=True), "cuda").cuda_graph
    with pytest.raises(StrategyError, match=r"train\.compile: true.*r1_gamma") as err:
        choose_strategy(dataclasses.replace(r1, compile=True), "cpu")
    assert "\n" not in str(err.value)


def test_a_cuda_graph_is_refused_off_cuda() -> None:
    with pytest.raises(StrategyError, match="CUDA"):
        trainer(TINY, images(), seed=0, strategy=Strategy(cuda_graph=True))


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_one() -> None:
    """torch.compile of G, D, both Adam steps and the EMA: the same training up to rounding
    (other kernels sum in another order), without recompiling per step."""
    # No dropout masks (the same draws), no R1 (a double backward cannot be compiled).
    cfg = dataclasses.replace(TINY, d_dropout=0.0, r1_gamma=0.0)
    compiled = trainer(cfg, images(), seed=0, strategy=Strategy(compile=True))
    eager = trainer(cfg, images(), seed=0)
    for t in (compiled, eager):
        t.fit(epochs=2)
    for a, b in zip(compiled.history, eager.history, strict=True):
        for key in METRICS:
            assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key
    # The bias of a Linear in front of BatchNorm has no gradient but rounding, which Adam
    # turns into steps of up to lr: it, and the running mean that follows it, are left out, and
    # G's output is compared with batch statistics, where that bias cancels exactly. (The
    # running mean lags the bias, so in eval mode the two differ by about lr: 1.7e-4 at 4e-4.)
    layers = list(eager.generator.named_modules())
    shifted = {
        f"{net}.{key}"
        for net in ("g", "ema")
        for (a, linear), (b, norm) in itertools.pairwise(layers)
        if isinstance(linear, torch.nn.Linear) and isinstance(norm, torch.nn.BatchNorm1d)
        for key in (f"{a}.bias", f"{b}.running_mean")
    }
    assert shifted and shifted <= weights(eager).keys()
    for (name, a), b in zip(weights(compiled).items(), weights(eager).values(), strict=True):
        if a.is_floating_point() and name not in shifted:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    z = torch.randn(64, TINY.latent_dim, generator=torch.Generator().manual_seed(1))
    for net in ("generator", "ema_generator"):
        with torch.no_grad():
            out = [getattr(t, net).train()(z) for t in (compiled, eager)]
        torch.testing.assert_close(*out, rtol=1e-3, atol=1e-4, msg=net)


# --- D judges real and fake in one pass where that is the same computation -------------------


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
@pytest.mark.parametrize("minibatch_std", [0, 4])
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_one_pass_of_d_is_two_passes(model: str, minibatch_std: int, conditional: bool) -> None:
    """What the trainer's one pass over real and fake relies on: for a D without BatchNorm the
    logits and D's gradients are those of two passes, each image judged with its own digit.
    MinibatchStd's groups of consecutive samples stay within the real or the fake half."""
    cfg = dataclasses.replace(TINY, model=model, channels=4, d_dropout=0.0,
                              d_minibatch_std=minibatch_std, conditional=conditional)  # fmt: skip
    torch.manual_seed(0)
    d = build_discriminator(cfg)
    real, fake = images(64, seed=1), images(64, seed=2)
    y_real, y_fake = (torch.randint(10, (64,)) if conditional else None for _ in range(2))
    y = torch.cat([y_real, y_fake]) if conditional else None
    one = d(torch.cat([real, fake]), y)
    one.sum().backward()
    grads_one = [p.grad.clone() for p in d.parameters()]
    d.zero_grad()
    two = torch.cat([d(real, y_real), d(fake, y_fake)])
    two.sum().backward()
    torch.testing.assert_close(one, two)
    for a, p in zip(grads_one, d.parameters(), strict=True):  # convolutions sum in other orders
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-4)


def test_one_pass_would_mix_the_batch_statistics_of_dcgans_d() -> None:
    """Why the DCGAN paper's D (BatchNorm) gets two passes: one pass normalises real and fake
    together."""
    cfg = dataclasses.replace(
        TINY, model="dcgan", channels=4, d_batchnorm=True, d_dropout=0.0, d_minibatch_std=0
    )
    torch.manual_seed(0)
    d = build_discriminator(cfg)
    real, fake = images(64, seed=1), -images(64, seed=2)
    one, two = d(torch.cat([real, fake])), torch.cat([d(real), d(fake)])
    assert not torch.allclose(one, two, atol=1e-3)


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_minibatch_std_gets_one_pass_and_trains(model: str) -> None:
    """A D with MinibatchStd judges real and fake in one pass (its groups never mix them), and
    trains like any other D; BatchNorm in D and spectral norm still get two passes."""
    cfg = dataclasses.replace(TINY, model=model, channels=4, d_minibatch_std=4, epochs=1)
    t = trainer(cfg, images())
    assert t._one_pass_d
    assert not trainer(dataclasses.replace(cfg, spectral_norm=True), images())._one_pass_d
    if model == "dcgan":
        assert not trainer(dataclasses.replace(cfg, d_batchnorm=True), images())._one_pass_d
    before = {k: v.clone() for k, v in t.discriminator.state_dict().items()}
    t.fit()
    assert all(math.isfinite(v) for v in t.history[-1].values())
    assert any(not torch.equal(v, t.discriminator.state_dict()[k]) for k, v in before.items())


def test_standing_stats_are_the_generators_own_batch_statistics() -> None:
    """Each BatchNorm's running mean and variance become the plain average, over the noise
    batches, of what that layer sees: here one batch, whose z the test draws again."""
    cfg = dataclasses.replace(TINY, hidden=(16, 8))
    g = build_generator(cfg)
    linear, norm = g.net[0], g.net[1]
    norm.running_mean.fill_(5.0)  # stale statistics, as an EMA of other weights leaves
    standing_stats(g, batch_size=64, seed=7, batches=1)
    z = torch.randn(64, cfg.latent_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        h = linear(z)
    torch.testing.assert_close(norm.running_mean, h.mean(0))
    torch.testing.assert_close(norm.running_var, h.var(0))  # unbiased, as BatchNorm keeps it
    assert not g.training and norm.momentum == 0.1
    again = standing_stats(build_generator(cfg), batch_size=64, seed=7, batches=1)
    again.load_state_dict(g.state_dict())
    standing_stats(again, batch_size=64, seed=7, batches=1)
    for k, v in g.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k  # the same every time


def test_the_sampling_generator_is_the_ema_with_standing_stats() -> None:
    """What grids and the saved model use: the EMA's weights, its own BatchNorm statistics,
    and no draw from the global RNG; train.standing_stats: false gives the EMA itself."""
    t = trainer(TINY, images(), seed=0)
    t.fit(epochs=1)
    rng = torch.get_rng_state()
    net = t.sampling_generator()
    assert torch.equal(torch.get_rng_state(), rng)
    ema = t.ema_generator.state_dict()
    own = net.state_dict()
    stats = [k for k in own if "running_" in k]
    assert stats and all(torch.equal(own[k], ema[k]) for k in own if k not in stats
                         and "num_batches" not in k)  # fmt: skip
    assert not any(torch.allclose(own[k], ema[k]) for k in stats)
    z = fixed_noise(8, TINY.latent_dim, 0)
    assert torch.equal(t.sample(z), net(z))
    off = trainer(dataclasses.replace(TINY, standing_stats=False), images(), seed=0)
    assert off.sampling_generator() is off.ema_generator


# --- the R1 penalty --------------------------------------------------------------------------


def d_update_by_hand(
    g: torch.nn.Module, d: torch.nn.Module, real: torch.Tensor, z: torch.Tensor, gamma: float
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """D's loss and D's gradients for one batch, written out: the bce loss plus
    gamma / 2 * the mean over the real images of ||grad_x D(x)||^2."""
    real = real.clone().requires_grad_()
    real_logits, fake_logits = d(real), d(g(z).detach())
    loss = discriminator_loss("bce", real_logits, fake_logits, 0.0)
    (grad_x,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
    loss = loss + gamma / 2 * grad_x.pow(2).flatten(1).sum(1).mean()
    return loss, list(torch.autograd.grad(loss, list(d.parameters())))


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_r1_penalty_is_in_ds_loss_and_its_gradient(model: str) -> None:
    """The trainer's D update with r1_gamma: the loss and D's gradients (the penalty's
    dependence on D's weights included) of the formula written out by hand, and a different
    update from r1_gamma 0."""
    cfg = dataclasses.replace(TINY, model=model, channels=4, d_dropout=0.0, r1_gamma=10.0)
    grads = {}
    for gamma in (0.0, cfg.r1_gamma):
        t = trainer(dataclasses.replace(cfg, r1_gamma=gamma), images(), seed=0)
        g, d = copy.deepcopy(t.generator), copy.deepcopy(t.discriminator)
        t._draw_batch(torch.arange(64))
        real, z = t._batch["real"].clone(), t._batch["z"].clone()
        t._one_step()
        loss, expected = d_update_by_hand(g, d, real, z, gamma)
        assert t._step_metrics[METRICS.index("loss_d")].item() == pytest.approx(loss.item(), 1e-5)
        grads[gamma] = [p.grad for p in t.discriminator.parameters()]
        for got, want in zip(grads[gamma], expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The penalty moves D's update by far more than the tolerance above.
    close = [
        torch.allclose(a, b, rtol=1e-2, atol=1e-5) for a, b in zip(*grads.values(), strict=True)
    ]
    assert not all(close)


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_d_shift_translates_what_d_sees_real_and_fake(model: str) -> None:
    """DiffAugment (train.d_shift): D's update is the one of a D that judges translated real
    and fake images, the offsets drawn from the global RNG in the step's order (real and fake
    together, then the fake G is judged on), and G still gets its gradients through it."""
    cfg = dataclasses.replace(TINY, model=model, channels=4, d_dropout=0.0, r1_gamma=0.0, d_shift=2)
    t = trainer(cfg, images(), seed=0)
    assert t._one_pass_d
    g, d = copy.deepcopy(t.generator), copy.deepcopy(t.discriminator)
    t._draw_batch(torch.arange(64))
    real, z = t._batch["real"].clone(), t._batch["z"].clone()
    torch.manual_seed(5)
    t._one_step()
    torch.manual_seed(5)
    fake = g(z).detach()
    real_logits, fake_logits = d(shift_images(torch.cat([real, fake]), 2)).chunk(2)
    loss = discriminator_loss("bce", real_logits, fake_logits, 0.0)
    expected = torch.autograd.grad(loss, list(d.parameters()))
    assert t._step_metrics[METRICS.index("loss_d")].item() == pytest.approx(loss.item(), 1e-5)
    for got, want in zip((p.grad for p in t.discriminator.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # Unshifted images give D another update, by far more than the tolerance above.
    plain = discriminator_loss("bce", *d(torch.cat([real, fake])).chunk(2), 0.0)
    unshifted = torch.autograd.grad(plain, list(d.parameters()))
    pairs = zip(expected, unshifted, strict=True)
    close = [torch.allclose(a, b, rtol=1e-2, atol=1e-5) for a, b in pairs]
    assert not all(close)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in t.generator.parameters())
