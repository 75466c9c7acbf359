"""The evaluator classifier: shapes, augmentation, determinism, saving, the stage script."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from click.testing import CliRunner
from conftest import load_stage
from evalkit import quick_classifier, real_mnist
from safetensors.torch import load_file, save_file

from mnist_gan.classifier import (
    DigitClassifier,
    embed,
    evaluate_classifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from mnist_gan.metrics import inception_score
from mnist_gan.params import ClassifierParams


def test_shapes_and_feature_width() -> None:
    model = DigitClassifier(features=32).eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert model(x).shape == (5, 10)
    assert model.features(x).shape == (5, 32)
    assert model.num_features == 32
    feats, logits = embed(model, x, batch_size=2)
    torch.testing.assert_close(logits, model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(feats, model.features(x), rtol=1e-4, atol=1e-5)


def _tiny_data(n: int = 256) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 10
    images = torch.full((n, 1, 28, 28), -1.0)
    # Each class lights its own row band, with noise: learnable in one short epoch.
    for c in range(10):
        images[labels == c, 0, 2 + 2 * c : 4 + 2 * c, 4:24] = 1.0
    images += 0.1 * torch.randn(images.shape, generator=gen)
    return images.clamp(-1, 1), labels


def test_training_is_deterministic() -> None:
    images, labels = _tiny_data(128)
    params = ClassifierParams(epochs=2, batch_size=32, lr=5e-3, features=16, shift=1)
    seen = []
    a, stats = train_classifier(images, labels, images[:64], labels[:64], params, 0,
                                on_epoch=seen.append)  # fmt: skip
    b, _ = train_classifier(images, labels, images[:64], labels[:64], params, 0)
    c, _ = train_classifier(images, labels, images[:64], labels[:64], params, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [s.epoch for s in seen] == [1, 2] and stats == seen[-1]
    assert seen[1].train_loss < seen[0].train_loss
    assert not a.training


@pytest.mark.parametrize("native", [True, False])
def test_amp_trains_in_bf16_only_where_the_device_has_it(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """classifier.amp: bf16 autocast where bf16 is native (emulated bf16 is slower than float32),
    float32 elsewhere; told whether the CPU has bf16, so both branches run on any CPU."""
    monkeypatch.setattr("mnist_gan.classifier.native_bf16", lambda device: native)
    images, labels = _tiny_data(64)
    params = ClassifierParams(epochs=1, batch_size=32, features=16, shift=0)
    computed: set[torch.dtype] = set()  # the dtypes the convolutions compute in

    def record(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Conv2d):
            computed.add(out.dtype)

    def trained(amp: bool) -> dict[str, torch.Tensor]:
        computed.clear()
        hook = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            model, _ = train_classifier(images, labels, images[:8], labels[:8],
                                        dataclasses.replace(params, amp=amp), 0)  # fmt: skip
        finally:
            hook.remove()
        return model.state_dict()

    off = trained(False)
    assert computed == {torch.float32}
    on = trained(True)
    # The per-epoch test pass is float32 either way; training is bf16 where that is native.
    assert computed == ({torch.bfloat16, torch.float32} if native else {torch.float32})
    same = all(torch.equal(off[k], on[k]) for k in off)
    assert same is not native
    assert all(v.dtype != torch.bfloat16 for v in on.values())  # float32 (and int) weights


def test_pooling_before_relu_is_the_same_function() -> None:
    """The blocks pool before their ReLU: values and gradients equal those of ReLU first."""
    torch.manual_seed(0)
    block = DigitClassifier(features=16).body[1]
    conv, bn, pool, relu = block
    assert isinstance(pool, torch.nn.MaxPool2d) and isinstance(relu, torch.nn.ReLU)
    x = torch.randn(8, 16, 14, 14)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = block(a)
    yb = pool(torch.relu(bn(conv(b))))
    assert torch.equal(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(a.grad, b.grad)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    model = DigitClassifier(features=24).eval()
    save_classifier(model, tmp_path, ClassifierParams(features=24), seed=7)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["seed"] == 7 and config["params"]["features"] == 24
    loaded = load_classifier(tmp_path)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.equal(loaded(x), model(x))
    assert not loaded.training


def test_load_refuses_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="classifier.safetensors"):
        load_classifier(tmp_path)
    save_classifier(DigitClassifier(features=24), tmp_path, ClassifierParams(features=24), 0)
    good = json.loads((tmp_path / "config.json").read_text())

    def refused(config: object, match: str) -> None:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=match) as info:
            load_classifier(tmp_path)
        assert "\n" not in str(info.value)

    refused({**good, "architecture": "resnet"}, "architecture 'resnet'")
    # weights of 24 features under a config of 48
    refused({**good, "params": {**good["params"], "features": 48}}, "weights do not fit")
    refused("{not json", "not a classifier config")
    refused([1, 2], "not a classifier config")
    # The params are validated as params.yaml's classifier section is.
    refused({**good, "params": {**good["params"], "features": "24"}},
            "config.json: classifier.features: must be an integer")  # fmt: skip
    refused({**good, "params": {**good["params"], "width": 3}},
            "config.json: unknown key classifier.width")  # fmt: skip

    (tmp_path / "config.json").write_text(json.dumps(good))
    weights = tmp_path / "classifier.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="classifier.safetensors: not a readable safetensors"):
        load_classifier(tmp_path)


def test_quick_classifier_separates_digits(shared_mirror: Path) -> None:
    model = quick_classifier(shared_mirror)
    images, labels = real_mnist(shared_mirror)["test"]
    _, accuracy = evaluate_classifier(model, images[5000:], labels[5000:])
    assert accuracy > 0.93  # seeds 0-29: 0.974-0.985 (tests/metric_spread.py)


def _write_split(folder: Path, name: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"images": images.contiguous(), "labels": labels}, str(folder / name))


@pytest.fixture(scope="module")
def stage() -> ModuleType:
    """``pipeline/classifier.py`` imported as a module."""
    return load_stage("classifier")


def test_classifier_stage_writes_model_and_metrics(tmp_path: Path, stage: object) -> None:
    images, labels = _tiny_data(320)
    _write_split(tmp_path / "data", "train.safetensors", images[:256], labels[:256])
    _write_split(tmp_path / "data", "test.safetensors", images[256:], labels[256:])
    params = tmp_path / "params.yaml"
    params.write_text(
        "base: {seed: 3, device: cpu, threads: 1}\n"
        "classifier: {epochs: 1, batch_size: 32, lr: 0.002, features: 16, shift: 1}\n"
    )
    args = ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "models/classifier"),
            "--metrics", str(tmp_path / "metrics/c.json"), "--params", str(params)]  # fmt: skip
    res = CliRunner().invoke(stage.main, args)
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output
    metrics = json.loads((tmp_path / "metrics/c.json").read_text())
    assert set(metrics) == {"test_accuracy", "test_loss", "train_loss"}
    # The saved weights are those the library trains from the stage's params and seed...
    cfg = ClassifierParams(epochs=1, batch_size=32, lr=0.002, features=16, shift=1)
    expected, _ = train_classifier(images[:256], labels[:256], images[256:], labels[256:], cfg, 3)
    saved = load_file(str(tmp_path / "models/classifier/classifier.safetensors"))
    assert saved.keys() == expected.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in expected.state_dict().items())
    # ...and the metrics are what that model scores on the test split.
    model = load_classifier(tmp_path / "models/classifier")
    test_loss, test_accuracy = evaluate_classifier(model, images[256:], labels[256:])
    assert metrics["test_accuracy"] == round(test_accuracy, 6)
    assert metrics["test_loss"] == round(test_loss, 6)
    # Deterministic: a second run gives the same bytes.
    first = (tmp_path / "models/classifier/classifier.safetensors").read_bytes()
    assert CliRunner().invoke(stage.main, args).exit_code == 0
    assert (tmp_path / "models/classifier/classifier.safetensors").read_bytes() == first

    # Bad data: a clear error, an exit code, and the earlier good output kept.
    (tmp_path / "data/test.safetensors").write_bytes(b"garbage")
    res = CliRunner().invoke(stage.main, args)
    assert res.exit_code == 1
    assert "test.safetensors: not a readable safetensors file" in res.output
    assert (tmp_path / "models/classifier/classifier.safetensors").read_bytes() == first
    # Bad params: exit 2 naming the key.
    params.write_text("classifier: {epochs: 0}\n")
    res = CliRunner().invoke(stage.main, args)
    assert res.exit_code == 2 and "classifier.epochs" in res.output


@pytest.mark.slow
def test_full_classifier_reaches_target_and_is_confident(shared_mirror: Path) -> None:
    """The default params on all of MNIST: at least 99.2% test accuracy and IS >= 9.5.

    Seeds 0-9 gave 99.34-99.47% and IS 9.67-9.70 (``tests/metric_spread.py --full``). The
    target the README states, 99.3%, sat 4 test images below the lowest seed: too close for a
    bound that must hold on every CPU, so the bound leaves 14. Trained channels-last in bf16
    (``classifier.amp`` on a Zen 4 with AVX512-BF16), seeds 0-2 gave 99.40-99.44% and IS
    9.68-9.70; channels-last float32, seed 0, 99.43%.
    """
    data = real_mnist(shared_mirror)
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    model, stats = train_classifier(train_x, train_y, test_x, test_y, ClassifierParams(), seed=0)
    assert stats.test_accuracy >= 0.992
    _, logits = embed(model, test_x)
    is_mean, _ = inception_score(logits, splits=10)
    assert is_mean >= 9.5
