"""The evaluate stage: its outputs, and logging into the MLflow run that train recorded."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import ROOT, load_stage
from evalkit import QUICK_PARAMS, quick_classifier, real_mnist
from mlflow.tracking import MlflowClient
from PIL import Image

from mnist_gan.classifier import save_classifier
from mnist_gan.data import save_normalized
from mnist_gan.metrics import METRIC_NAMES
from mnist_gan.models import build_discriminator, build_generator, save_gan
from mnist_gan.params import TrainParams

KEYS = set(METRIC_NAMES) | {f"real_{name}" for name in METRIC_NAMES}
FIGURES = {"samples.png", "per_digit.png", "nearest_train.png"}


@pytest.fixture(scope="module")
def stage() -> ModuleType:
    """``pipeline/evaluate.py`` imported as a module."""
    return load_stage("evaluate")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, shared_mirror: Path) -> Path:
    """Small real data, the quick evaluator, an untrained GAN (with EMA) and params.yaml."""
    root = tmp_path_factory.mktemp("evaluate")
    data = real_mnist(shared_mirror)
    (root / "data").mkdir()
    for split, n in (("train", 3000), ("test", 1000)):
        images, labels = data[split]
        save_normalized(root / f"data/{split}.safetensors", images[:n], labels[:n])
    (root / "models/classifier").mkdir(parents=True)
    save_classifier(quick_classifier(shared_mirror), root / "models/classifier", QUICK_PARAMS, 0)
    cfg = TrainParams(hidden=(32,), latent_dim=16, ema=0.9)
    torch.manual_seed(0)
    nets = build_generator(cfg), build_discriminator(cfg), build_generator(cfg)
    (root / "models/gan").mkdir(parents=True)
    save_gan(root / "models/gan", cfg, 0, *nets)
    params = {
        "base": {"seed": 0, "device": "cpu"},
        "evaluate": {"num_samples": 300, "batch_size": 128, "k": 5, "is_splits": 5},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def args(root: Path, out: Path) -> list[str]:
    return [
        "--data", str(root / "data"), "--gan", str(root / "models/gan"),
        "--classifier", str(root / "models/classifier"),
        "--metrics", str(out / "metrics/evaluate.json"), "--plots", str(out / "plots/evaluate"),
        "--run-id-file", str(out / ".mlflow_run_id"), "--params", str(root / "params.yaml"),
    ]  # fmt: skip


def invoke(stage: object, root: Path, out: Path, store: str) -> object:
    try:
        return CliRunner().invoke(stage.main, args(root, out), env={"MLFLOW_TRACKING_URI": store})
    finally:
        mlflow.end_run()  # in case a failure left one active


def test_evaluate_logs_into_the_run_that_train_wrote(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    client = MlflowClient(store)
    name = stage.tracking.EXPERIMENT  # where the train stage puts its runs
    found = client.get_experiment_by_name(name)
    experiment = found.experiment_id if found else client.create_experiment(name)
    train_run = client.create_run(experiment, tags={"stage": "train"}).info.run_id
    client.set_terminated(train_run)
    (tmp_path / ".mlflow_run_id").write_text(train_run + "\n")

    res = invoke(stage, project, tmp_path, store)
    assert res.exit_code == 0, res.output
    assert "new run" not in res.output

    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert set(metrics) == KEYS
    assert metrics["real_modes"] == 10 and metrics["real_fid"] < metrics["fid"]
    logged = client.get_run(train_run).data
    for key in KEYS:
        assert logged.metrics[key] == pytest.approx(metrics[key]), key
    assert sum(logged.metrics[f"class_share_{d}"] for d in range(10)) == pytest.approx(1.0)
    assert logged.tags["evaluate.num_samples"] == "300"
    artifacts = {Path(a.path).name for a in client.list_artifacts(train_run, "evaluate")}
    assert artifacts == FIGURES | {"evaluate.json"}
    runs = client.search_runs([experiment], "tags.stage = 'evaluate'")
    assert runs == []  # no run of its own

    plots = tmp_path / "plots/evaluate"
    assert {p.name for p in plots.iterdir()} == FIGURES
    for name in FIGURES:
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.width > 100


def test_without_a_run_id_a_new_run_and_the_same_outputs(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    outputs = []
    for out in (first, second):
        res = invoke(stage, project, out, store)
        assert res.exit_code == 0, res.output
        assert f"no run id in {out / '.mlflow_run_id'}" in res.output
        outputs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert outputs[0] == outputs[1]  # deterministic, figures included
    assert len(outputs[0]) == 1 + len(FIGURES)
    client = MlflowClient(store)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.stage = 'evaluate'"
    )
    assert len(runs) == 2
    assert all("fid" in r.data.metrics for r in runs)


def test_bad_inputs_fail_cleanly_and_keep_earlier_outputs(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluate.json").write_text('{"fid": 1.0}\n')
    bad_args = args(project, tmp_path)
    bad_args[bad_args.index("--classifier") + 1] = str(tmp_path / "nowhere")
    res = CliRunner().invoke(stage.main, bad_args, env={"MLFLOW_TRACKING_URI": store})
    assert res.exit_code == 1
    assert "nowhere/classifier.safetensors: missing" in res.output
    assert (tmp_path / "metrics/evaluate.json").read_text() == '{"fid": 1.0}\n'
    assert not (tmp_path / "plots").exists()

    bad_params = tmp_path / "params.yaml"
    bad_params.write_text("evaluate: {k: 0}\n")
    bad_args = args(project, tmp_path)
    bad_args[bad_args.index("--params") + 1] = str(bad_params)
    res = CliRunner().invoke(stage.main, bad_args, env={"MLFLOW_TRACKING_URI": store})
    assert res.exit_code == 2 and "evaluate.k" in res.output


def test_dvc_yaml_declares_the_outputs() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    evaluate, classifier = stages["evaluate"], stages["classifier"]
    assert "metrics/evaluate.json" in str(evaluate["metrics"])
    assert "plots/evaluate" in str(evaluate["plots"])
    assert "metrics/classifier.json" in str(classifier["metrics"])
    assert "models/classifier" in classifier["outs"]
    for dep in ("models/gan", "models/classifier", "src/mnist_gan/metrics.py"):
        assert dep in evaluate["deps"]
