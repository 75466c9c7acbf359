"""Network shapes and ranges, and the GAN folder's save/load round trip."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from mnist_gan.models import (
    DCGANDiscriminator,
    Dropout,
    MinibatchStd,
    MLPDiscriminator,
    build_discriminator,
    build_generator,
    load_generator,
    read_config,
    save_gan,
)
from mnist_gan.params import ParamsError, TrainParams, load_params, params_to_dict

CONFIGS = {
    "mlp-article": TrainParams(
        d_hidden=None, g_batchnorm=False, d_activation="relu", d_dropout=0.0, d_minibatch_std=0
    ),
    "mlp-default": TrainParams(),
    "mlp-small-sn": TrainParams(hidden=(32, 16), d_hidden=None, latent_dim=8, spectral_norm=True),
    "dcgan": TrainParams(model="dcgan", channels=8),
    "dcgan-sn": TrainParams(model="dcgan", channels=8, spectral_norm=True, latent_dim=16),
    "dcgan-bn-wide-d": TrainParams(
        model="dcgan", channels=8, d_channels=16, d_batchnorm=True, d_dropout=0.0
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_ranges(name: str) -> None:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    g, d = build_generator(cfg), build_discriminator(cfg)
    z = torch.randn(8, cfg.latent_dim) * 10  # large z pushes tanh towards its bounds
    images = g(z)
    assert images.shape == (8, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0  # not a constant output
    logits = d(images)
    assert logits.shape == (8,)
    assert torch.isfinite(logits).all()
    # Logits are unbounded (no sigmoid inside D): large inputs move them well past (0, 1).
    assert d.eval()(torch.randn(4, 1, 28, 28) * 1000).abs().max() > 1


# d_minibatch_std 0: D judges one image as each of the 10 digits, a batch of 10.
CONDITIONAL = {
    "mlp": TrainParams(
        hidden=(32, 16), d_hidden=None, latent_dim=8, conditional=True, d_minibatch_std=0
    ),
    "mlp-sn": TrainParams(
        hidden=(32,),
        d_hidden=None,
        latent_dim=8,
        conditional=True,
        spectral_norm=True,
        d_minibatch_std=0,
    ),
    "dcgan": TrainParams(
        model="dcgan", channels=4, latent_dim=8, conditional=True, d_minibatch_std=0
    ),
}


@pytest.mark.parametrize("name", CONDITIONAL)
def test_conditional_networks_depend_on_the_digit(name: str) -> None:
    cfg = CONDITIONAL[name]
    torch.manual_seed(0)
    g, d = build_generator(cfg).eval(), build_discriminator(cfg).eval()
    z = torch.randn(1, cfg.latent_dim).expand(10, -1)  # the same z for every digit
    digits = torch.arange(10)
    images = g(z, digits)
    assert images.shape == (10, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1
    assert not torch.equal(images[0], images[1])  # only the digit differs
    same = images[:1].expand(10, -1, -1, -1)
    logits = d(same, digits)  # one image judged as each digit
    assert logits.shape == (10,) and torch.isfinite(logits).all()
    assert logits.unique().numel() == 10
    with pytest.raises(ValueError, match="needs the digits"):
        g(z)
    with pytest.raises(ValueError, match="needs the digits"):
        d(images)


def test_unconditional_networks_keep_their_parameter_names() -> None:
    """train.conditional: false builds the parameters it always has (saved weights still load);
    a conditional network adds only the label embedding."""
    cfg = TrainParams(hidden=(32,), d_hidden=None, latent_dim=8)
    for build in (build_generator, build_discriminator):
        torch.manual_seed(0)
        plain = build(cfg)
        torch.manual_seed(0)
        conditional = build(
            TrainParams(hidden=(32,), d_hidden=None, latent_dim=8, conditional=True)
        )
        keys = set(plain.state_dict())
        assert keys == set(conditional.state_dict()) - {"embed.weight"}
        assert not any("embed" in k for k in keys)


def test_article_sizes() -> None:
    g = build_generator(CONFIGS["mlp-article"])
    d = build_discriminator(CONFIGS["mlp-article"])
    g_linear = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
    d_linear = [m for m in d.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in g_linear] == [
        (100, 256),
        (256, 256),
        (256, 256),
        (256, 784),
    ]
    assert [(m.in_features, m.out_features) for m in d_linear] == [
        (784, 256),
        (256, 256),
        (256, 256),
        (256, 1),
    ]
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.Dropout)) for m in g.modules())
    assert not any(isinstance(m, (torch.nn.Dropout, torch.nn.LeakyReLU)) for m in d.modules())


def test_stabiliser_options_change_the_networks() -> None:
    g = build_generator(TrainParams())
    d = build_discriminator(TrainParams())
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in g.modules()) == 3
    assert sum(isinstance(m, torch.nn.Dropout) for m in d.modules()) == 3
    assert sum(isinstance(m, torch.nn.LeakyReLU) for m in d.modules()) == 3
    sn = MLPDiscriminator((16,), "relu", 0.0, spectral_norm=True)
    linear = [m for m in sn.net if isinstance(m, torch.nn.Linear)]
    assert len(linear) == 2 and all(torch.nn.utils.parametrize.is_parametrized(m) for m in linear)
    dc = DCGANDiscriminator(8, spectral_norm=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in dc.modules())


def test_d_hidden_sets_the_mlp_discriminators_widths_alone() -> None:
    """d_hidden widens D and leaves G as hidden makes it; null gives D hidden's widths."""

    def widths(net: torch.nn.Module) -> list[tuple[int, int]]:
        return [(m.in_features, m.out_features) for m in net.modules()
                if isinstance(m, torch.nn.Linear)]  # fmt: skip

    default = TrainParams()
    assert default.d_hidden == (512, 512, 512) and default.hidden == (256, 256, 256)
    d = build_discriminator(dataclasses.replace(default, d_minibatch_std=0))
    assert widths(d) == [(784, 512), (512, 512), (512, 512), (512, 1)]
    assert widths(build_generator(default))[0] == (100, 256)  # G keeps hidden
    cfg = TrainParams(hidden=(32, 16), d_hidden=(24,), latent_dim=8, d_minibatch_std=4)
    assert widths(build_discriminator(cfg)) == [(784, 24), (25, 1)]  # + the minibatch std
    assert widths(build_generator(cfg)) == [(8, 32), (32, 16), (16, 784)]
    same = TrainParams(hidden=(32, 16), d_hidden=None, d_minibatch_std=0)
    assert widths(build_discriminator(same)) == [(784, 32), (32, 16), (16, 1)]
    for bad, message in (((), "d_hidden: must list at least one width"),
                         ((8, 0), "d_hidden: widths must be >= 1")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            TrainParams(d_hidden=bad)


def test_dcgan_discriminator_options() -> None:
    """d_dropout, d_batchnorm and d_channels build the dcgan D they name."""

    def layers(**changes: object) -> list[torch.nn.Module]:
        return list(build_discriminator(TrainParams(model="dcgan", channels=8, **changes)).net)

    def count(kind: type, modules: list[torch.nn.Module]) -> int:
        return sum(isinstance(m, kind) for m in modules)

    default = layers()  # d_dropout after both LeakyReLUs, no BatchNorm
    assert count(torch.nn.Dropout, default) == 2 and count(torch.nn.BatchNorm2d, default) == 0
    assert all(m.p == TrainParams().d_dropout for m in default if isinstance(m, torch.nn.Dropout))
    dropout = layers(d_dropout=0.3)
    assert [m.p for m in dropout if isinstance(m, torch.nn.Dropout)] == [0.3, 0.3]
    paper = layers(d_batchnorm=True, d_dropout=0.0)  # the DCGAN paper's D
    assert count(torch.nn.Dropout, paper) == 0 and count(torch.nn.BatchNorm2d, paper) == 1
    assert paper[2].bias is None  # BatchNorm's shift replaces the convolution's bias
    wide = layers(d_channels=24, d_minibatch_std=0)
    convs = [m for m in wide if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(1, 24), (24, 48), (48, 1)]
    convs = [m for m in layers(d_channels=24, d_minibatch_std=4) if isinstance(m, torch.nn.Conv2d)]
    assert convs[-1].in_channels == 49  # the group's spread, one channel more
    g = build_generator(TrainParams(model="dcgan", channels=8, d_channels=24))
    assert g.net[0].out_channels == 16  # G keeps channels
    with pytest.raises(ValueError, match="spectral norm"):
        DCGANDiscriminator(8, spectral_norm=True, batchnorm=True)
    with pytest.raises(ValueError, match="d_batchnorm"):
        TrainParams(model="dcgan", spectral_norm=True, d_batchnorm=True)
    with pytest.raises(ValueError, match="d_channels"):
        TrainParams(model="dcgan", d_channels=0)


def test_minibatch_std_is_each_groups_spread() -> None:
    """The joined feature: the standard deviation over each group (g consecutive samples) of
    every feature, averaged; the same value for each member of a group."""
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0], [1.0, 5.0]])  # groups {0, 1}, {2, 3}
    out = MinibatchStd(2)(x)
    assert out.shape == (4, 3) and torch.equal(out[:, :2], x)
    # group {0, 1}: stds 1 and 0 -> 0.5; group {2, 3}: stds 0 and 2 -> 1 (up to the 1e-8)
    torch.testing.assert_close(out[:, 2], torch.tensor([0.5, 0.5, 1.0, 1.0]), atol=1e-4, rtol=0)
    same = MinibatchStd(4)(torch.ones(4, 3))  # a batch of copies: no spread
    assert same[:, 3].max().item() < 1e-3
    images = torch.randn(8, 3, 7, 7).to(memory_format=torch.channels_last)
    out = MinibatchStd(4)(images)  # (B, C, H, W): one more channel, constant over positions
    assert out.shape == (8, 4, 7, 7) and torch.equal(out[:, :3], images)
    groups = images.reshape(2, 4, 3, 7, 7).std(dim=1, unbiased=False).flatten(1).mean(dim=1)
    torch.testing.assert_close(out[:, 3, 0, 0], groups.repeat_interleave(4), atol=1e-4, rtol=0)
    assert torch.equal(out[:, 3], out[:, 3, :1, :1].expand(8, 7, 7))
    torch.testing.assert_close(MinibatchStd(16)(x), MinibatchStd(4)(x))  # a small batch: 1 group
    with pytest.raises(ValueError, match="a batch of 6 does not split into groups of 4"):
        MinibatchStd(4)(torch.zeros(6, 2))
    with pytest.raises(ValueError, match="group must be >= 1"):
        MinibatchStd(0)


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
def test_minibatch_std_lets_d_see_the_rest_of_a_group(model: str, conditional: bool) -> None:
    """With d_minibatch_std, D's logit for a sample moves when another member of its group
    changes, and not when a sample of another group does; without it, never."""
    x, y = torch.randn(8, 1, 28, 28), torch.randint(10, (8,)) if conditional else None

    def logits(d: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return d.eval()(batch, y)

    for group in (0, 4):  # groups of 4 in a batch of 8: {0, 1, 2, 3} and {4, 5, 6, 7}
        cfg = TrainParams(model=model, channels=8, hidden=(32, 16), d_hidden=None,
                          conditional=conditional, d_minibatch_std=group)  # fmt: skip
        torch.manual_seed(0)
        d = build_discriminator(cfg)
        assert sum(isinstance(m, MinibatchStd) for m in d.modules()) == (1 if group else 0)
        before = logits(d, x)
        in_group, other_group = x.clone(), x.clone()
        in_group[3] += 1.0
        other_group[4] += 1.0
        assert torch.equal(logits(d, other_group)[0], before[0])
        assert torch.equal(logits(d, in_group)[0], before[0]) == (group == 0)


def test_dropout_keeps_the_memory_format() -> None:
    """Dropout's mask is drawn in its input's memory format (channels-last for dcgan's D), the
    same numbers as nn.Dropout's distribution would give: zeros, or 1 / (1 - p)."""
    x = torch.ones(4, 8, 7, 7).to(memory_format=torch.channels_last)
    out = Dropout(0.25).train()(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.unique(), torch.tensor([0.0, 1 / 0.75]))
    assert 0.15 < (out == 0).float().mean().item() < 0.35


@pytest.mark.parametrize("minibatch_std", [0, 4])
def test_discriminator_compiles_as_one_graph_outside_training(minibatch_std: int) -> None:
    # train.compile compiles D as one graph: nothing in its forward breaks it.
    d = MLPDiscriminator((16, 8), "leaky_relu", 0.3, spectral_norm=False,
                         minibatch_std=minibatch_std).eval()  # fmt: skip
    explained = torch._dynamo.explain(d)(torch.randn(8, 1, 28, 28))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_spectral_norm_bounds_the_discriminator_weights() -> None:
    d = MLPDiscriminator((64,), "relu", 0.0, spectral_norm=True)
    for _ in range(20):  # power iteration converges during training-mode forwards
        d(torch.randn(8, 1, 28, 28))
    d.eval()
    for m in d.net:
        if isinstance(m, torch.nn.Linear):
            assert torch.linalg.matrix_norm(m.weight, ord=2) < 1.05


@pytest.mark.parametrize("ema", [True, False])
def test_save_and_load_generator_round_trip(tmp_path: Path, ema: bool) -> None:
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=4, ema=0.9 if ema else 0.0)
    torch.manual_seed(0)
    g, d = build_generator(cfg), build_discriminator(cfg)
    g_ema = build_generator(cfg) if ema else None  # other weights than g
    save_gan(tmp_path, cfg, 7, g, d, g_ema)
    names = sorted(p.name for p in tmp_path.iterdir())
    want = ["config.json", "discriminator.safetensors", "generator.safetensors"]
    assert names == sorted(want + (["generator_ema.safetensors"] if ema else []))
    assert read_config(tmp_path) == (cfg, 7)

    z = torch.randn(3, 4)
    loaded, loaded_cfg = load_generator(tmp_path)
    assert loaded_cfg == cfg and not loaded.training
    expected = (g_ema if ema else g).eval()
    assert torch.equal(loaded(z), expected(z))
    plain, _ = load_generator(tmp_path, prefer_ema=False)
    assert torch.equal(plain(z), g.eval()(z))


def test_saved_files_are_deterministic(tmp_path: Path) -> None:
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=4)
    for name in ("a", "b"):
        torch.manual_seed(0)
        (tmp_path / name).mkdir()
        save_gan(tmp_path / name, cfg, 0, build_generator(cfg), build_discriminator(cfg))
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config == {"seed": 0, "train": params_to_dict(cfg)}
    assert config["train"]["hidden"] == [16]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_permissions_of_the_umask(tmp_path: Path, umask: int) -> None:
    # safetensors alone writes 0600: teammates on a shared checkout could not read the weights.
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=4, ema=0.9)
    old = os.umask(umask)
    try:
        save_gan(tmp_path, cfg, 0, build_generator(cfg), build_discriminator(cfg),
                 build_generator(cfg))  # fmt: skip
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in tmp_path.iterdir()}
    assert len(modes) == 4 and set(modes.values()) == {0o666 & ~umask}, modes


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_generator(tmp_path)
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=4)
    save_gan(tmp_path, cfg, 0, build_generator(cfg), build_discriminator(cfg))
    config = json.loads((tmp_path / "config.json").read_text())
    config["train"]["hidden"] = [32]  # no longer fits the stored weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"generator.safetensors: weights do not fit.* shape"):
        load_generator(tmp_path)
    config["train"]["bogus"] = 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: unknown key train.bogus"):
        load_generator(tmp_path)
    (tmp_path / "generator.safetensors").unlink()
    config["train"].pop("bogus")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="generator.safetensors"):
        load_generator(tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("d_activation", "elu", "train.d_activation: must be one of 'relu', 'leaky_relu'"),
        ("hidden", 256, "train.hidden: must be a list"),
        ("d_hidden", 512, "train.d_hidden: must be a list"),
        ("g_batchnorm", "yes", "train.g_batchnorm: must be true or false"),
        ("latent_dim", 0, "train.latent_dim: must be >= 1"),
    ],
)
def test_config_is_validated_like_params_yaml(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=4)
    save_gan(tmp_path, cfg, 0, build_generator(cfg), build_discriminator(cfg))
    config = json.loads((tmp_path / "config.json").read_text())
    config["train"][key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: {message}"):
        read_config(tmp_path)
    # The same key in params.yaml gets the same words.
    (tmp_path / "params.yaml").write_text(json.dumps({"train": {key: value}}))
    with pytest.raises(ParamsError, match=message):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    "broken",
    ["truncated", "empty", "not safetensors", "another network's"],
)
def test_unreadable_or_foreign_weights_are_one_line_errors(tmp_path: Path, broken: str) -> None:
    cfg = TrainParams(hidden=(16,), d_hidden=None, latent_dim=4)
    save_gan(tmp_path, cfg, 0, build_generator(cfg), build_discriminator(cfg))
    weights = tmp_path / "generator.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(
        {
            "truncated": good[: len(good) // 2],
            "empty": b"",
            "not safetensors": b"PK\x03\x04 a zip file, say",
            "another network's": (tmp_path / "discriminator.safetensors").read_bytes(),
        }[broken]
    )
    with pytest.raises(ValueError) as info:
        load_generator(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{weights}: ") and "\n" not in message
    want = "weights do not fit" if broken == "another network's" else "not a readable safetensors"
    assert want in message
