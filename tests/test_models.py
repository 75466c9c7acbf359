"""Network shapes and ranges, and the GAN folder's save/load round trip."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from mnist_gan.models import (
    DCGANDiscriminator,
    Dropout,
    MLPDiscriminator,
    ScoreLinear,
    _dropout_mask,
    _dropout_masks,
    build_discriminator,
    build_generator,
    load_generator,
    read_config,
    save_gan,
)
from mnist_gan.params import ParamsError, TrainParams, load_params, params_to_dict

CONFIGS = {
    "mlp-article": TrainParams(g_batchnorm=False, d_activation="relu", d_dropout=0.0),
    "mlp-default": TrainParams(),
    "mlp-small-sn": TrainParams(hidden=(32, 16), latent_dim=8, spectral_norm=True),
    "dcgan": TrainParams(model="dcgan", channels=8),
    "dcgan-sn": TrainParams(model="dcgan", channels=8, spectral_norm=True, latent_dim=16),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_and_ranges(name: str) -> None:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    g, d = build_generator(cfg), build_discriminator(cfg)
    z = torch.randn(5, cfg.latent_dim) * 10  # large z pushes tanh towards its bounds
    images = g(z)
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0  # not a constant output
    logits = d(images)
    assert logits.shape == (5,)
    assert torch.isfinite(logits).all()
    # Logits are unbounded (no sigmoid inside D): large inputs move them well past (0, 1).
    assert d.eval()(torch.randn(4, 1, 28, 28) * 1000).abs().max() > 1


CONDITIONAL = {
    "mlp": TrainParams(hidden=(32, 16), latent_dim=8, conditional=True),
    "mlp-sn": TrainParams(hidden=(32,), latent_dim=8, conditional=True, spectral_norm=True),
    "dcgan": TrainParams(model="dcgan", channels=4, latent_dim=8, conditional=True),
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
    cfg = TrainParams(hidden=(32,), latent_dim=8)
    for build in (build_generator, build_discriminator):
        torch.manual_seed(0)
        plain = build(cfg)
        torch.manual_seed(0)
        conditional = build(TrainParams(hidden=(32,), latent_dim=8, conditional=True))
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
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in DCGANDiscriminator(8, False).modules())


@pytest.mark.parametrize(("p", "shape"), [(0.3, (400, 500)), (0.5, (333, 601)), (0.05, (7, 5, 3))])
def test_dropout_keeps_each_element_with_probability_one_minus_p(
    p: float, shape: tuple[int, ...]
) -> None:
    drop = Dropout(p)
    x = torch.ones(shape)
    torch.manual_seed(0)
    y = drop(x)
    assert y.shape == x.shape
    kept = y != 0
    # The kept share's standard deviation is sqrt(p (1 - p) / n): at most 0.0012 here but for
    # the 105-element tensor (0.021).
    tolerance = 5 * (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept.double().mean().item() - (1 - p)) < tolerance
    # p is rounded to a multiple of 2**-16 (q); kept elements are scaled by 1 / (1 - q), so the
    # expected value of an element is exactly kept.
    q = round(p * 2**16) / 2**16
    assert abs(q - p) <= 2**-17
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / (1 - q)))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # drawn from torch's global RNG: seeded, repeatable
    assert not torch.equal(drop(x), y)
    x.requires_grad_(True)  # gradients flow through the kept elements only, scaled alike
    out = drop(x)
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, out.detach())
    # A bf16 input keeps its dtype and the kept share.
    low = drop(torch.ones(shape, dtype=torch.bfloat16))
    assert low.dtype == torch.bfloat16
    assert abs((low != 0).double().mean().item() - (1 - p)) < tolerance
    drop.eval()
    assert drop(x) is x
    assert Dropout(0.0)(x) is x


def test_dropout_masks_are_independent_between_elements() -> None:
    # Four elements share each 64-bit random word: their keep decisions must not be correlated
    # (a field taken from the wrong bits would be, or would be constant).
    drop = Dropout(0.5)
    torch.manual_seed(1)
    kept = torch.stack([drop(torch.ones(4096)) != 0 for _ in range(64)]).double()  # (64, 4096)
    words = kept.view(64, 1024, 4)  # the four fields of each word
    for i in range(4):
        assert abs(words[..., i].mean().item() - 0.5) < 0.01  # each field: 1/2 kept
        for j in range(i + 1, 4):
            corr = torch.corrcoef(torch.stack([words[..., i].flatten(), words[..., j].flatten()]))
            assert abs(corr[0, 1].item()) < 0.02  # 65,536 pairs: the sd of r is 0.004


def test_masks_drawn_at_once_are_the_masks_drawn_one_by_one() -> None:
    # Sizes not divisible by 4 leave unused fields in a mask's last word, as one by one.
    shapes = [torch.Size((256, 256)), torch.Size((3, 5)), torch.Size((7,)), torch.Size((2, 9))]
    torch.manual_seed(3)
    together = _dropout_masks(shapes, 0.3)
    after_together = torch.rand(4)
    torch.manual_seed(3)
    for mask, shape in zip(together, shapes, strict=True):
        assert mask.shape == shape and mask.dtype == torch.float32
        assert torch.equal(mask, _dropout_mask(torch.empty(shape), 0.3))
    assert torch.equal(torch.rand(4), after_together)  # the generator left where it was


@pytest.mark.parametrize("classes", [0, 10])
def test_discriminator_pass_draws_its_masks_at_once_with_the_same_result(classes: int) -> None:
    # D's training pass on the CPU draws its three masks before its first layer: the logits
    # and gradients are those of its layers run one by one, each Dropout drawing its own.
    torch.manual_seed(0)
    d = MLPDiscriminator((32, 16, 8), "leaky_relu", 0.3, spectral_norm=False, num_classes=classes)
    x = torch.randn(6, 1, 28, 28)
    y = torch.arange(6) % 10 if classes else None

    def one_by_one() -> torch.Tensor:
        features = x.flatten(1)
        for layer in list(d.net)[1:-1]:
            features = layer(features)  # each Dropout module draws its own mask
        logits = d.net[-1](features).squeeze(1)
        if d.embed is None:
            return logits
        return logits + (d.embed(y) * features).sum(dim=1)

    outputs = []
    for forward in (lambda: d(x, y), one_by_one):
        torch.manual_seed(7)
        out = forward()
        grads = torch.autograd.grad(out.square().sum(), list(d.parameters()))
        outputs.append([out, *grads])
    for a, b in zip(*outputs, strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(7)
    assert not torch.equal(d(x, y), d(x, y))  # fresh masks on every pass
    d.eval()
    assert torch.equal(d(x, y), d(x, y))  # no dropout in eval mode


def test_discriminator_compiles_as_one_graph_outside_training() -> None:
    # torch.compile cannot read oneDNN's matmul setting: D's last layer must not ask for it
    # while compiling (each read split D's graph in two).
    d = MLPDiscriminator((16, 8), "leaky_relu", 0.3, spectral_norm=False).eval()
    explained = torch._dynamo.explain(d)(torch.randn(4, 1, 28, 28))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


@pytest.mark.skipif(
    not hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"),
    reason="this PyTorch has no oneDNN bf16 setting for float32 matmuls (2.9+)",
)
def test_score_layer_keeps_float32_math_under_the_cpu_bf16_setting() -> None:
    torch.manual_seed(0)
    layer = ScoreLinear(256, 1)
    x = torch.randn(64, 256, requires_grad=True)
    grad = torch.randn(64, 1)
    matmul = torch.backends.mkldnn.matmul
    outer = matmul.fp32_precision

    def forward_backward(module: torch.nn.Module, precision: str) -> list[torch.Tensor]:
        x.grad = None
        module.zero_grad(set_to_none=True)
        matmul.fp32_precision = precision
        try:
            out = module(x)
            out.backward(grad)
        finally:
            matmul.fp32_precision = outer
        assert matmul.fp32_precision == outer  # the layer restores the setting
        return [out.detach(), x.grad, module.weight.grad, module.bias.grad]

    plain = torch.nn.Linear(256, 1)
    plain.load_state_dict(layer.state_dict())  # the same parameter names
    expected = forward_backward(plain, "ieee")  # float32 math
    for got, want in zip(forward_backward(layer, "bf16"), expected, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(forward_backward(layer, "ieee"), expected, strict=True):
        assert torch.equal(got, want)
    # Without grad for the weights (G's update through D), only the input's gradient.
    layer.zero_grad(set_to_none=True)
    layer.requires_grad_(False)
    x.grad = None
    matmul.fp32_precision = "bf16"
    try:
        layer(x).backward(grad)
    finally:
        matmul.fp32_precision = outer
    assert torch.equal(x.grad, expected[1]) and layer.weight.grad is None


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
    cfg = TrainParams(hidden=(16,), latent_dim=4, ema=0.9 if ema else 0.0)
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
    cfg = TrainParams(hidden=(16,), latent_dim=4)
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
    cfg = TrainParams(hidden=(16,), latent_dim=4, ema=0.9)
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
    cfg = TrainParams(hidden=(16,), latent_dim=4)
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
        ("g_batchnorm", "yes", "train.g_batchnorm: must be true or false"),
        ("latent_dim", 0, "train.latent_dim: must be >= 1"),
    ],
)
def test_config_is_validated_like_params_yaml(
    tmp_path: Path, key: str, value: object, message: str
) -> None:
    cfg = TrainParams(hidden=(16,), latent_dim=4)
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
    cfg = TrainParams(hidden=(16,), latent_dim=4)
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
