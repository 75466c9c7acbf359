"""Params validation: every bad file is an error naming the file and ``section.key``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import load_stage

from mnist_gan.params import Params, ParamsError, load_params, params_to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_committed_params_equal_the_defaults() -> None:
    assert load_params(ROOT / "params.yaml") == Params()


def test_missing_sections_take_their_defaults(tmp_path: Path) -> None:
    params = load_params(write(tmp_path, "normalize:\n  train_limit: 5\n"))
    assert params.normalize.train_limit == 5
    assert params.fetch == Params().fetch and params.train == Params().train
    assert load_params(write(tmp_path, "")) == Params()


def test_values_are_coerced_to_field_types(tmp_path: Path) -> None:
    text = "fetch:\n  timeout: 5\n  mirrors: [a, b]\ntrain:\n  lr_g: 2e-4\n  hidden: [64, 32]\n"
    params = load_params(write(tmp_path, text))
    assert params.fetch.timeout == 5.0 and isinstance(params.fetch.timeout, float)
    assert params.fetch.mirrors == ("a", "b")
    # YAML 1.1 reads 2e-4 (no dot) as a string; it is still a number here.
    assert params.train.lr_g == pytest.approx(2e-4) and isinstance(params.train.lr_g, float)
    assert params.train.hidden == (64, 32)
    assert params_to_dict(params.fetch)["mirrors"] == ["a", "b"]
    # An optional integer: null (the default, base.seed) or a number.
    assert load_params(write(tmp_path, "train:\n  seed: null\n")).train.seed is None
    assert load_params(write(tmp_path, "train:\n  seed: 3\n")).train.seed == 3
    # Switches with an automatic setting: true, false or auto.
    for key in ("amp", "compile", "cuda_graph"):
        for value in (True, False, "auto"):
            text = f"train:\n  {key}: {str(value).lower()}\n"
            assert getattr(load_params(write(tmp_path, text)).train, key) == value


def test_params_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Params().fetch.retries = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus:\n  x: 1\n", "unknown section bogus"),
        ("fetch:\n  retry: 3\n", "unknown key fetch.retry"),
        ("fetch:\n  retries: three\n", "fetch.retries: must be an integer, got 'three'"),
        ("fetch:\n  retries: true\n", "fetch.retries: must be an integer, got True"),
        ("fetch:\n  timeout: soon\n", "fetch.timeout: must be a number, got 'soon'"),
        ("fetch:\n  mirrors: http://x/\n", "fetch.mirrors: must be a list"),
        ("fetch:\n  mirrors: [1]\n", "fetch.mirrors[0]: must be a string, got 1"),
        ("base:\n  device: gpu\n", "base.device: must be one of 'auto', 'cpu', 'cuda', got 'gpu'"),
        ("base:\n  seed: -1\n", "base.seed: must be >= 0"),
        ("train:\n  seed: -1\n", "train.seed: must be >= 0 (or null: base.seed)"),
        ("train:\n  r1_gamma: -0.1\n", "train.r1_gamma: must be >= 0 (0 = off)"),
        ("train:\n  d_shift: 9\n", "train.d_shift: must be in [0, 8]"),
        ("train:\n  d_minibatch_std: -1\n", "train.d_minibatch_std: must be 0 (off) or a group"),
        ("train:\n  d_minibatch_std: 1\n", "train.d_minibatch_std: must be 0 (off) or a group"),
        (
            "train:\n  d_minibatch_std: 5\n",
            "train.d_minibatch_std: groups of 5 do not split each process's batch of 128 evenly",
        ),
        (
            "train:\n  d_minibatch_std: 64\n  nproc: 4\n",
            "train.d_minibatch_std: groups of 64 do not split each process's batch of 32 evenly",
        ),
        ("train:\n  seed: one\n", "train.seed: must be an integer, got 'one'"),
        (
            "train:\n  compile: yes please\n",
            "train.compile: must be true, false or 'auto', got 'yes please'",
        ),
        ("train:\n  compile: 1\n", "train.compile: must be true, false or 'auto', got 1"),
        (
            "train:\n  cuda_graph: sometimes\n",
            "train.cuda_graph: must be true, false or 'auto', got 'sometimes'",
        ),
        ("base:\n  threads: -2\n", "base.threads: must be >= 0"),
        ("fetch:\n  timeout: 0\n", "fetch.timeout: must be > 0"),
        ("fetch:\n  retries: 0\n", "fetch.retries: must be >= 1"),
        ("fetch:\n  backoff: -1\n", "fetch.backoff: must be >= 0"),
        ("normalize:\n  train_limit: -1\n", "normalize.train_limit: must be >= 0"),
        ("normalize: 5\n", "normalize: must be a mapping, got int"),
        ("- a\n- b\n", "must be a mapping of sections, got list"),
        ("fetch: [\n", "not valid YAML"),
    ],
)
def test_bad_params_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=f"{tmp_path / 'none.yaml'}: params file not found"):
        load_params(tmp_path / "none.yaml")


@pytest.mark.parametrize("stage", ["fetch", "normalize"])
def test_stage_exits_2_and_writes_nothing_on_bad_params(tmp_path: Path, stage: str) -> None:
    bad = {"fetch": "fetch:\n  retries: 0\n", "normalize": "normalize:\n  train_limit: -3\n"}
    params = write(tmp_path, bad[stage])
    out = tmp_path / "out"
    args = ["--out", str(out), "--params", str(params)]
    if stage == "normalize":
        args += ["--raw", str(tmp_path / "raw"), "--metrics", str(tmp_path / "m.json")]
    result = CliRunner().invoke(load_stage(stage).main, args, env={"MNIST_MIRROR": str(tmp_path)})
    assert result.exit_code == 2
    key = "normalize.train_limit" if stage == "normalize" else "fetch.retries"
    assert result.stderr.startswith(f"error: {params}: ") and key in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("stage", ["fetch", "normalize"])
def test_stage_exits_2_on_missing_params(tmp_path: Path, stage: str) -> None:
    args = ["--out", str(tmp_path / "out"), "--params", str(tmp_path / "nope.yaml")]
    if stage == "normalize":
        args += ["--raw", str(tmp_path / "raw"), "--metrics", str(tmp_path / "m.json")]
    result = CliRunner().invoke(load_stage(stage).main, args)
    assert result.exit_code == 2
    assert "params file not found" in result.stderr
    assert list(tmp_path.iterdir()) == []
