"""The promotion gate (pipeline/promote.py): rules, aliases and exit codes, on a real registry."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import ROOT, load_stage
from mlflow import MlflowClient
from mlflow.entities import Metric
from servers import free_port

from mnist_gan.models import build_discriminator, build_generator, save_gan
from mnist_gan.params import TrainParams
from mnist_gan.utils import sha256_file

NAME = "mnist-gan-generator"  # the registered model's name (the guide's contract)
GOOD = {"fid": 3.0, "modes": 10, "memorized_fraction": 0.001, "real_memorized_fraction": 0.01}
# What evaluate logs as metrics (the rest of a version's tags say how it was scored).
GATE_KEYS = (*GOOD, "label_accuracy", "is_mean", "precision", "recall", "coverage")


@pytest.fixture(scope="module")
def stage() -> ModuleType:
    return load_stage("promote")


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def make_gan(folder: Path, seed: int) -> Path:
    cfg = TrainParams(hidden=(8,), d_hidden=None, latent_dim=4)
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    save_gan(folder, cfg, 0, build_generator(cfg), build_discriminator(cfg))
    return folder


def register(client: MlflowClient, gan: Path, metrics: dict | None) -> str:
    """A version as the train stage registers it (from a logged model) and evaluate scores it:
    the metrics logged linked to the logged model, and copied onto the version as tags (for
    the UI). metrics None: not scored yet."""
    experiment = client.get_experiment_by_name("mnist-gan")
    exp_id = experiment.experiment_id if experiment else client.create_experiment("mnist-gan")
    run_id = client.create_run(exp_id).info.run_id
    model = client.create_logged_model(exp_id, source_run_id=run_id, name="generator")
    if not client.search_registered_models(f"name = '{NAME}'"):
        client.create_registered_model(NAME)
    tags = {"generator_sha256": sha256_file(gan / "generator.safetensors"),
            "classifier_sha256": "c0ffee"}  # fmt: skip
    tags.update({k: str(v) for k, v in (metrics or {}).items()})
    # MLflow reads the logged model behind a models:/ source through the global tracking URI.
    mlflow.set_tracking_uri(client.tracking_uri)
    version = client.create_model_version(NAME, f"models:/{model.model_id}", run_id=run_id,
                                          tags=tags).version  # fmt: skip
    log_scores(client, version, metrics or {})
    return version


def log_scores(client: MlflowClient, version: str, metrics: dict) -> None:
    """Log metrics as evaluate does: into the version's run, linked to its logged model."""
    found = client.get_model_version(NAME, version)
    model_id = found.source.removeprefix("models:/")
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, 0, model_id=model_id, run_id=found.run_id)
             for k, v in metrics.items() if k in GATE_KEYS]  # fmt: skip
    client.log_batch(found.run_id, metrics=batch)


def promote(stage: ModuleType, gan: Path, store: str, tmp_path: Path, margin: float = 0.02,
            *extra: str):  # fmt: skip
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"promote": {"fid_margin": margin}}))
    args = ["--gan", str(gan), "--params", str(params), *extra]
    return CliRunner().invoke(stage.main, args, env={"MLFLOW_TRACKING_URI": store})


def aliases(client: MlflowClient) -> dict[str, str]:
    return dict(client.get_registered_model(NAME).aliases)


def test_rules_at_their_edges(stage: ModuleType) -> None:
    at_bound = {**GOOD, "fid": 3.0 * 0.98}
    assert all(r.passed for r in stage.rules(at_bound, GOOD, 0.02))
    worse = stage.rules({**GOOD, "fid": 3.0 * 0.98 + 1e-6}, GOOD, 0.02)
    assert [r.metric for r in worse if not r.passed] == ["fid"]
    nine = stage.rules({**GOOD, "fid": 1.0, "modes": 9}, GOOD, 0.02)
    assert [r.metric for r in nine if not r.passed] == ["modes"]
    copies = stage.rules({**GOOD, "fid": 1.0, "memorized_fraction": 0.0101}, GOOD, 0.02)
    assert [r.metric for r in copies if not r.passed] == ["memorized_fraction"]
    first = stage.rules(GOOD, None, 0.02)  # no champion: no FID to beat
    assert [r.metric for r in first] == ["modes", "memorized_fraction"]


def test_the_gate_moves_champion_only_when_it_passes(
    stage: ModuleType, store: str, tmp_path: Path
) -> None:
    client = MlflowClient(store, registry_uri=store)
    first = make_gan(tmp_path / "first", seed=0)
    v1 = register(client, first, GOOD)
    res = promote(stage, first, store, tmp_path)
    assert res.exit_code == 0, res.output
    assert f"promoted: {NAME} version {v1} is the champion" in res.output
    assert aliases(client) == {"champion": v1, "challenger": v1}

    # Worse FID: refused with 3, the champion stays, the challenger moves; the table says why.
    worse = make_gan(tmp_path / "worse", seed=1)
    v2 = register(client, worse, {**GOOD, "fid": 3.5, "label_accuracy": 0.9})
    res = promote(stage, worse, store, tmp_path)
    assert res.exit_code == 3, res.output
    assert aliases(client) == {"champion": v1, "challenger": v2}
    row = next(line for line in res.output.splitlines() if line.startswith("fid "))
    assert row.split()[1:5] == ["3", "3.5", "<=", "2.94"] and row.endswith("FAIL")
    assert "label_accuracy" in res.output and f"champion stays version {v1}" in res.output

    # Better by more than the margin, all digits, no copying: promoted.
    better = make_gan(tmp_path / "better", seed=2)
    v3 = register(client, better, {**GOOD, "fid": 2.5})
    res = promote(stage, better, store, tmp_path)
    assert res.exit_code == 0, res.output
    assert f"(was version {v1})" in res.output
    assert aliases(client) == {"champion": v3, "challenger": v3}

    # Better FID but a digit missing, or copying more than real data: refused.
    for i, metrics in enumerate(({**GOOD, "fid": 1.0, "modes": 9},
                                 {**GOOD, "fid": 1.0, "memorized_fraction": 0.05})):  # fmt: skip
        gan = make_gan(tmp_path / f"bad{i}", seed=3 + i)
        version = register(client, gan, metrics)
        assert promote(stage, gan, store, tmp_path).exit_code == 3
        assert aliases(client) == {"champion": v3, "challenger": version}

    # Scored another way than the champion: compared all the same, with a note saying how.
    how = {"base.seed": "0", "evaluate.num_samples": "10000", "evaluate.k": "5",
           "evaluate.is_splits": "10"}  # fmt: skip
    other = make_gan(tmp_path / "other", seed=9)
    register(client, other, {**GOOD, **how, "fid": 2.6, "evaluate.num_samples": "1000"})
    for key, value in how.items():
        client.set_model_version_tag(NAME, v3, key, value)
    res = promote(stage, other, store, tmp_path)
    assert res.exit_code == 3
    assert "note: evaluate.num_samples 10000 vs 1000: the comparison may not be" in res.output

    # The champion's own weights: nothing to do.
    res = promote(stage, better, store, tmp_path)
    assert res.exit_code == 0 and "is the champion already" in res.output


def test_errors_exit_1_with_one_line(stage: ModuleType, store: str, tmp_path: Path) -> None:
    client = MlflowClient(store, registry_uri=store)
    gan = make_gan(tmp_path / "gan", seed=0)
    res = promote(stage, gan, store, tmp_path)  # never registered
    assert res.exit_code == 1
    assert f"no version of {NAME}" in res.output and len(res.output.strip().splitlines()) == 1
    version = register(client, gan, None)  # registered, not evaluated yet
    res = promote(stage, gan, store, tmp_path)
    assert res.exit_code == 1
    assert f"version {version} (logged model m-" in res.output
    assert "has no fid, modes, memorized_fraction, real_memorized_fraction yet" in res.output
    assert "champion" not in aliases(client)
    # Tags do not count: all four on the version, and only fid logged.
    for key, value in GOOD.items():
        client.set_model_version_tag(NAME, version, key, str(value))
    log_scores(client, version, {"fid": 3.0})
    res = promote(stage, gan, store, tmp_path)
    assert res.exit_code == 1 and "has no modes, memorized_fraction" in res.output
    assert len(res.output.strip().splitlines()) == 1
    # A version registered from files, not from a logged model: nothing to read metrics from.
    other = make_gan(tmp_path / "other", seed=1)
    tags = {"generator_sha256": sha256_file(other / "generator.safetensors"),
            **{k: str(v) for k, v in GOOD.items()}}  # fmt: skip
    version = client.create_model_version(NAME, f"file://{other}", tags=tags).version
    res = promote(stage, other, store, tmp_path)
    assert res.exit_code == 1 and f"version {version} was registered from file://" in res.output
    assert "not from a logged model" in res.output
    res = promote(stage, tmp_path / "nowhere", store, tmp_path)
    assert res.exit_code == 1 and "generator.safetensors" in res.output
    res = promote(stage, gan, f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}", tmp_path)
    assert res.exit_code == 1 and "does not exist" in res.output


def test_the_gate_decides_on_logged_metrics_not_on_edited_tags(
    stage: ModuleType, store: str, tmp_path: Path
) -> None:
    client = MlflowClient(store, registry_uri=store)
    champion = make_gan(tmp_path / "champion", seed=0)
    v1 = register(client, champion, GOOD)
    assert promote(stage, champion, store, tmp_path).exit_code == 0
    worse = make_gan(tmp_path / "worse", seed=1)
    v2 = register(client, worse, {**GOOD, "fid": 3.5})
    # By hand: the champion's FID tag made worse, the challenger's better. Read from the tags,
    # the challenger would win (1.0 <= 0.98 * 10).
    client.set_model_version_tag(NAME, v1, "fid", "10")
    client.set_model_version_tag(NAME, v2, "fid", "1.0")
    res = promote(stage, worse, store, tmp_path)
    assert res.exit_code == 3, res.output
    assert aliases(client) == {"champion": v1, "challenger": v2}
    row = next(line for line in res.output.splitlines() if line.startswith("fid "))
    assert row.split()[1:3] == ["3", "3.5"] and row.endswith("FAIL")
    assert f"v{v2} tag fid=1.0 (logged: 3.5)" in res.output
    assert f"v{v1} tag fid=10 (logged: 3)" in res.output
    # And the other way: a better challenger whose tag was made worse is still promoted.
    better = make_gan(tmp_path / "better", seed=2)
    v3 = register(client, better, {**GOOD, "fid": 2.0})
    client.set_model_version_tag(NAME, v3, "fid", "50")
    res = promote(stage, better, store, tmp_path)
    assert res.exit_code == 0, res.output
    assert aliases(client) == {"champion": v3, "challenger": v3}


def test_a_dry_run_says_the_verdict_and_moves_no_alias(
    stage: ModuleType, store: str, tmp_path: Path
) -> None:
    """What CI runs on a pull request: the verdict and the exit code, the aliases untouched."""
    client = MlflowClient(store, registry_uri=store)
    champion = make_gan(tmp_path / "champion", seed=0)
    v1 = register(client, champion, GOOD)
    res = promote(stage, champion, store, tmp_path, 0.02, "--dry-run")
    assert res.exit_code == 0 and f"version {v1} would be promoted" in res.output
    assert aliases(client) == {}
    assert promote(stage, champion, store, tmp_path).exit_code == 0
    for seed, fid, code, verdict in ((1, 3.5, 3, f"refused; the champion stays version {v1}"),
                                     (2, 2.0, 0, "promoted")):  # fmt: skip
        gan = make_gan(tmp_path / f"gan{seed}", seed=seed)
        version = register(client, gan, {**GOOD, "fid": fid})
        res = promote(stage, gan, store, tmp_path, 0.02, "--dry-run")
        assert res.exit_code == code, res.output
        assert f"dry run: {NAME} version {version} would be {verdict}" in res.output
        assert "fid " in res.output  # the table, as without --dry-run
        assert aliases(client) == {"champion": v1, "challenger": v1}


def test_a_dead_tracking_server_is_one_line_at_once(tmp_path: Path) -> None:
    """The script against a port nothing listens on: exit 1 and one line naming the server,
    without MLflow's default retries (minutes) and without a traceback."""
    gan = make_gan(tmp_path / "gan", seed=0)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"promote": {"fid_margin": 0.02}}))
    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    cmd = [sys.executable, str(ROOT / "pipeline" / "promote.py"), "--gan", str(gan),
           "--params", str(params)]  # fmt: skip
    res = subprocess.run(cmd, env={**env, "MLFLOW_TRACKING_URI": dead}, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"error: cannot reach the MLflow tracking server at {dead} (")
    assert "Connection refused" in lines[0] and res.stdout == ""


def test_scoring_differences_name_what_changes_the_scores(stage: ModuleType) -> None:
    tags = {
        "classifier_sha256": "c0ffee",
        "base.seed": "0",
        "evaluate.num_samples": "10000",
        "evaluate.k": "5",
        "evaluate.is_splits": "10",
        "evaluate.batch_size": "1000",
    }
    assert stage.scoring_differences(tags, {**tags, "evaluate.batch_size": "500"}) == []
    assert stage.scoring_differences(
        tags, {**tags, "classifier_sha256": "beef", "evaluate.k": "3"}
    ) == [
        "another evaluator classifier",
        "evaluate.k 5 vs 3",
    ]
    older = {"classifier_sha256": "c0ffee"}  # scored before evaluate tagged its settings
    assert stage.scoring_differences(older, tags) == [
        "the champion does not record how it was scored"
    ]
