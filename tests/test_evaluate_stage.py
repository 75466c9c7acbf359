"""The evaluate stage: its outputs, and logging into the MLflow run of the generator it scored."""

from __future__ import annotations

import json
import shlex
import shutil
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

from mnist_gan.classifier import evaluate_classifier, load_classifier, save_classifier
from mnist_gan.data import load_normalized, save_normalized
from mnist_gan.metrics import METRIC_NAMES, evaluate_samples
from mnist_gan.models import build_discriminator, build_generator, load_generator, save_gan
from mnist_gan.params import TrainParams
from mnist_gan.reference import compute_reference
from mnist_gan.sampling import generate_samples
from mnist_gan.utils import sha256_file

KEYS = set(METRIC_NAMES) | {f"real_{name}" for name in METRIC_NAMES}
FIGURES = {"samples.png", "per_digit.png", "nearest_train.png"}
EXPERIMENT = "mnist-gan"  # names other people rely on (the guide's contract)
GENERATOR_TAG = "generator_sha256"


@pytest.fixture(scope="module")
def stage() -> ModuleType:
    """``pipeline/evaluate.py`` imported as a module."""
    return load_stage("evaluate")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_gan(folder: Path, seed: int, conditional: bool = False) -> Path:
    """An untrained GAN (with EMA) in ``folder``; its weights, and their hash, follow ``seed``."""
    cfg = TrainParams(hidden=(32,), d_hidden=None, latent_dim=16, ema=0.9, conditional=conditional)
    torch.manual_seed(seed)
    nets = build_generator(cfg), build_discriminator(cfg), build_generator(cfg)
    folder.mkdir(parents=True)
    save_gan(folder, cfg, 0, *nets)
    return folder


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
    make_gan(root / "models/gan", seed=0)
    params = {
        "base": {"seed": 0, "device": "cpu"},
        "evaluate": {"num_samples": 300, "batch_size": 128, "k": 5, "is_splits": 5},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    res = CliRunner().invoke(load_stage("reference").main, reference_args(root, root))
    assert res.exit_code == 0, res.output
    return root


def reference_args(root: Path, out: Path) -> list[str]:
    return [
        "--data", str(root / "data"), "--classifier", str(root / "models/classifier"),
        "--out", str(out / "reference"), "--params", str(root / "params.yaml"),
    ]  # fmt: skip


def args(root: Path, out: Path, gan: Path | None = None) -> list[str]:
    return [
        "--data", str(root / "data"), "--gan", str(gan or root / "models/gan"),
        "--classifier", str(root / "models/classifier"), "--reference", str(root / "reference"),
        "--metrics", str(out / "metrics/evaluate.json"), "--plots", str(out / "plots/evaluate"),
        "--run-id-file", str(out / ".mlflow_run_id"), "--params", str(root / "params.yaml"),
    ]  # fmt: skip


def invoke(stage: object, arguments: list[str], store: str, **env: str) -> object:
    try:
        return CliRunner().invoke(stage.main, arguments, env={"MLFLOW_TRACKING_URI": store, **env})
    finally:
        mlflow.end_run()  # in case a failure left one active


def train_run(client: MlflowClient, gan: Path | None, name: str = "train") -> str:
    """A finished run as the train stage leaves it: tagged with the generator's SHA-256."""
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    tags = {"stage": "train"}
    if gan is not None:
        tags[GENERATOR_TAG] = sha256_file(gan / "generator.safetensors")
    run_id = client.create_run(experiment, tags=tags, run_name=name).info.run_id
    client.set_terminated(run_id)
    return run_id


def test_evaluate_logs_into_the_run_that_trained_the_generator(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    client = MlflowClient(store, registry_uri=store)
    gan = project / "models/gan"
    trained = train_run(client, gan)
    # The last run train wrote, as after a restore from the run cache: another generator's.
    stale = train_run(client, make_gan(tmp_path / "other-gan", seed=1), name="stale")
    (tmp_path / ".mlflow_run_id").write_text(stale + "\n")

    res = invoke(stage, args(project, tmp_path), store)
    assert res.exit_code == 0, res.output
    assert "new run" not in res.output

    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert set(metrics) == KEYS
    assert metrics["real_modes"] == 10 and metrics["real_fid"] < metrics["fid"]
    logged = client.get_run(trained).data
    for key in KEYS:
        assert logged.metrics[key] == pytest.approx(metrics[key]), key
    assert sum(logged.metrics[f"class_share_{d}"] for d in range(10)) == pytest.approx(1.0)
    assert logged.tags["evaluate.num_samples"] == "300"
    artifacts = {Path(a.path).name for a in client.list_artifacts(trained, "evaluate")}
    assert artifacts == FIGURES | {"evaluate.json"}
    assert client.get_run(stale).data.metrics == {}  # nothing in the other generator's run
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    assert client.search_runs([experiment], "tags.stage = 'evaluate'") == []  # no run of its own

    plots = tmp_path / "plots/evaluate"
    assert {p.name for p in plots.iterdir()} == FIGURES
    for name in FIGURES:
        with Image.open(plots / name) as image:
            assert image.format == "PNG" and image.width > 100


def test_a_conditional_generator_is_asked_for_every_digit_and_its_version_tagged(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    client = MlflowClient(store, registry_uri=store)
    gan = make_gan(tmp_path / "gan", seed=4, conditional=True)
    trained = train_run(client, gan)
    if not client.search_registered_models("name = 'mnist-gan-generator'"):
        client.create_registered_model("mnist-gan-generator")
    # Found by the weights' hash: a rerun after a lost server may have registered them twice.
    sha = {"generator_sha256": sha256_file(gan / "generator.safetensors")}
    version, again = (client.create_model_version("mnist-gan-generator", "file:///x", tags=sha,
                                                  run_id=trained) for _ in range(2))  # fmt: skip
    other = client.create_model_version("mnist-gan-generator", "file:///y", run_id=trained,
                                        tags={"generator_sha256": "0" * 64})  # fmt: skip
    res = invoke(stage, args(project, tmp_path, gan), store)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert set(metrics) == KEYS | {"label_accuracy", "real_label_accuracy"}
    # The classifier's test accuracy on the project's 1,000 test digits is the reference.
    test_images, test_labels = load_normalized(project / "data/test.safetensors")
    classifier = load_classifier(project / "models/classifier")
    _, accuracy = evaluate_classifier(classifier, test_images, test_labels)
    assert metrics["real_label_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert 0 <= metrics["label_accuracy"] < 0.5  # an untrained generator draws no digit at will
    for v in (version, again):
        tags = client.get_model_version("mnist-gan-generator", v.version).tags
        for key in ("fid", "modes", "memorized_fraction", "real_memorized_fraction",
                    "label_accuracy"):  # fmt: skip
            assert float(tags[key]) == pytest.approx(metrics[key]), key
        assert tags["classifier_sha256"] == sha256_file(
            project / "models/classifier/classifier.safetensors"
        )
        # How it was scored, so that the gate can tell a like-for-like comparison.
        assert tags["evaluate.num_samples"] == "300" and tags["base.seed"] == "0"
    assert "fid" not in client.get_model_version("mnist-gan-generator", other.version).tags


def test_metrics_are_linked_to_the_logged_model_of_each_version_of_the_weights(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    """What the promotion gate reads: evaluate's metrics on the logged models behind the
    registered versions of these weights, also when no run of this store trained them (the
    new run logged no model, so MLflow's own step-0 rule would link nothing)."""
    client = MlflowClient(store, registry_uri=store)
    gan = make_gan(tmp_path / "gan", seed=5)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    exp_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
    other_run = client.create_run(exp_id).info.run_id  # not tagged with these weights
    models = [client.create_logged_model(exp_id, source_run_id=other_run) for _ in range(2)]
    if not client.search_registered_models("name = 'mnist-gan-generator'"):
        client.create_registered_model("mnist-gan-generator")
    sha = {"generator_sha256": sha256_file(gan / "generator.safetensors")}
    mlflow.set_tracking_uri(store)  # MLflow finds a models:/ source's model through it
    for model in models:
        client.create_model_version("mnist-gan-generator", f"models:/{model.model_id}",
                                    run_id=other_run, tags=sha)  # fmt: skip
    res = invoke(stage, args(project, tmp_path, gan), store)
    assert res.exit_code == 0, res.output
    assert "logging into a new run" in res.output
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    runs = client.search_runs([exp_id], f"tags.{GENERATOR_TAG} = '{sha['generator_sha256']}'")
    for model in models:
        logged = client.get_logged_model(model.model_id).metrics
        assert {m.key: m.value for m in logged}["fid"] == pytest.approx(metrics["fid"])
        assert {m.run_id for m in logged} == {runs[0].info.run_id}
        assert {m.key for m in logged} >= KEYS
    assert len(client.get_metric_history(runs[0].info.run_id, "fid")) == 1  # logged once


def test_the_recorded_run_id_only_breaks_a_tie(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    """Two runs trained the same weights: the one train last recorded wins, else the newest."""
    client = MlflowClient(store, registry_uri=store)
    gan = make_gan(tmp_path / "gan", seed=2)
    older, newer = train_run(client, gan, "older"), train_run(client, gan, "newer")
    (tmp_path / ".mlflow_run_id").write_text(older + "\n")
    assert invoke(stage, args(project, tmp_path, gan), store).exit_code == 0
    assert "fid" in client.get_run(older).data.metrics
    assert "fid" not in client.get_run(newer).data.metrics
    (tmp_path / ".mlflow_run_id").unlink()
    assert invoke(stage, args(project, tmp_path, gan), store).exit_code == 0
    assert "fid" in client.get_run(newer).data.metrics


def test_weights_from_elsewhere_get_a_new_run_tagged_with_their_hash(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    """No run of this store trained these weights (they came through DVC's cache): a new run
    carries their hash, the DVC experiment and the commit, and the outputs are the same."""
    gan = make_gan(tmp_path / "gan", seed=3)
    sha = sha256_file(gan / "generator.safetensors")
    first, second = tmp_path / "a", tmp_path / "b"
    outputs, notes = [], []
    for out in (first, second):
        res = invoke(stage, args(project, out, gan), store, DVC_EXP_NAME="from-a-teammate")
        assert res.exit_code == 0, res.output
        notes.append(f"no run in {store} trained {gan / 'generator.safetensors'}" in res.output)
        outputs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert notes == [True, False]  # the second evaluation finds the run the first one made
    assert outputs[0] == outputs[1]  # deterministic, figures included
    assert len(outputs[0]) == 1 + len(FIGURES)
    client = MlflowClient(store, registry_uri=store)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    runs = client.search_runs([experiment], f"tags.{GENERATOR_TAG} = '{sha}'")
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert tags["stage"] == "evaluate" and tags["dvc_exp_name"] == "from-a-teammate"
    assert "fid" in runs[0].data.metrics
    assert len(client.get_metric_history(runs[0].info.run_id, "fid")) == 2


def test_bad_inputs_fail_cleanly_and_keep_earlier_outputs(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/evaluate.json").write_text('{"fid": 1.0}\n')

    def refused(arguments: list[str], message: str, code: int = 1, uri: str = store) -> None:
        res = invoke(stage, arguments, uri)
        assert res.exit_code == code, res.output
        assert message in res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
        assert (tmp_path / "metrics/evaluate.json").read_text() == '{"fid": 1.0}\n'
        assert not (tmp_path / "plots").exists()

    bad_args = args(project, tmp_path)
    bad_args[bad_args.index("--classifier") + 1] = str(tmp_path / "nowhere")
    refused(bad_args, "nowhere/classifier.safetensors: missing")

    # A truncated generator, and a foreign classifier (the GAN's weights in its place).
    gan = make_gan(tmp_path / "gan", seed=0)
    weights = gan / "generator_ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    refused(args(project, tmp_path, gan), f"{weights}: not a readable safetensors file")
    foreign = tmp_path / "classifier"
    shutil.copytree(project / "models/classifier", foreign)
    shutil.copy(project / "models/gan/generator.safetensors", foreign / "classifier.safetensors")
    bad_args = args(project, tmp_path)
    bad_args[bad_args.index("--classifier") + 1] = str(foreign)
    refused(bad_args, "classifier.safetensors: weights do not fit the DigitClassifier")

    # A GAN config that params.yaml's rules refuse.
    gan = make_gan(tmp_path / "gan-elu", seed=0)
    config = json.loads((gan / "config.json").read_text())
    (gan / "config.json").write_text(json.dumps({**config, "train": {"d_activation": "elu"}}))
    refused(args(project, tmp_path, gan), "config.json: train.d_activation: must be one of")

    refused(args(project, tmp_path), "unknown scheme 'mlfow'", uri="mlfow://localhost:5000")

    bad_params = tmp_path / "params.yaml"
    bad_params.write_text("evaluate: {k: 0}\n")
    bad_args = args(project, tmp_path)
    bad_args[bad_args.index("--params") + 1] = str(bad_params)
    refused(bad_args, "evaluate.k", code=2)


@pytest.mark.parametrize("name", ["reference", "evaluate"])
def test_what_the_dvc_yaml_command_writes_is_what_dvc_tracks(
    project: Path, name: str, store: str, tmp_path: Path
) -> None:
    """Run the stage with the arguments of its dvc.yaml command, rooted in a scratch folder:
    each file it writes lies under a declared out, metric or plot, and each of those exists
    (DVC would fail on a missing one, and miss an undeclared one)."""
    stage = load_stage(name)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][name]
    words = shlex.split(spec["cmd"])
    assert words[:2] == ["python", f"pipeline/{name}.py"]
    inputs = {"--data": project / "data", "--gan": project / "models/gan",
              "--classifier": project / "models/classifier",
              "--reference": project / "reference"}  # fmt: skip
    arguments = []
    for flag, value in zip(words[2::2], words[3::2], strict=True):
        arguments += [flag, str(inputs.get(flag, tmp_path / value))]
    arguments += ["--params", str(project / "params.yaml")]
    res = invoke(stage, arguments, store)
    assert res.exit_code == 0, res.output

    def names(entries: list) -> set[str]:
        return {e if isinstance(e, str) else next(iter(e)) for e in entries}

    tracked = names(spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", []))
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    untracked = {w for w in written if not any(w == t or w.startswith(t + "/") for t in tracked)}
    # The run id train records is a git-ignored hint for MLflow, not a pipeline output.
    assert untracked <= {".mlflow_run_id"}, untracked
    assert all((tmp_path / t).exists() for t in tracked), tracked
    assert written  # it did write


def test_the_reference_is_real_datas_side_computed_once(
    project: Path, stage: object, store: str, tmp_path: Path
) -> None:
    """The reference stage's output gives evaluate the real_ values that computing them in
    place gives; it is deterministic; evaluate refuses a reference made for other settings."""
    reference = load_stage("reference")
    res = CliRunner().invoke(reference.main, reference_args(project, tmp_path))
    assert res.exit_code == 0, res.output
    files = {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()}
    assert files == {p.name: p.read_bytes() for p in (project / "reference").iterdir()}
    real = json.loads((tmp_path / "reference/reference.json").read_text())["metrics"]
    assert set(real) == set(METRIC_NAMES) | {"label_accuracy"}

    res = invoke(stage, args(project, tmp_path), store)
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    for name in METRIC_NAMES:  # evaluate.json's are rounded to 6 decimals
        assert metrics[f"real_{name}"] == pytest.approx(real[name], abs=5e-7), name
    # The same numbers as the library scoring the samples against real data's side computed
    # in memory, without the cache.
    train, _ = load_normalized(project / "data/train.safetensors")
    test, _ = load_normalized(project / "data/test.safetensors")
    classifier = load_classifier(project / "models/classifier")
    generator, cfg = load_generator(project / "models/gan", prefer_ema=True)
    samples = generate_samples(generator, 300, latent_dim=cfg.latent_dim, seed=0, batch_size=128)
    computed = compute_reference(classifier, train, test, test_labels=None, k=5, num_samples=300,
                                 is_splits=5, seed=0, batch_size=128)  # fmt: skip
    in_memory = evaluate_samples(samples, classifier, computed, is_splits=5, seed=0, batch_size=128)
    assert metrics == in_memory.flat()

    # evaluate.k changed, the reference not remade: one line, nothing written.
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["evaluate"]["k"] = 4
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "k4"
    bad_args = args(project, out)
    bad_args[bad_args.index("--params") + 1] = str(tmp_path / "params.yaml")
    res = invoke(stage, bad_args, store)
    assert res.exit_code == 1, res.output
    assert "the reference was computed for other settings (k 5, not 4)" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()

    # A reference of another classifier (its recorded hash differs): one line, nothing written.
    other = tmp_path / "other-reference"
    shutil.copytree(project / "reference", other)
    config = json.loads((other / "reference.json").read_text())
    assert set(config["sources"]) == {"classifier", "train", "test"}
    config["sources"]["classifier"] = "0" * 64
    (other / "reference.json").write_text(json.dumps(config))
    bad_args = args(project, out)
    bad_args[bad_args.index("--reference") + 1] = str(other)
    res = invoke(stage, bad_args, store)
    assert res.exit_code == 1, res.output
    assert f"{other} was computed from another classifier than these" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()

    # A missing classifier: one line, and the earlier reference is kept.
    bad_args = reference_args(project, tmp_path)
    bad_args[bad_args.index("--classifier") + 1] = str(tmp_path / "nowhere")
    res = CliRunner().invoke(reference.main, bad_args)
    assert res.exit_code == 1 and "nowhere/classifier.safetensors" in res.output
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()}
