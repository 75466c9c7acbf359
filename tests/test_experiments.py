"""DVC experiments and MLflow runs point at each other, queued or not, in one tracking store.

A project copy with tiny params runs ``dvc repro`` once (the baseline) with the default
tracking store, ``sqlite:///<project>/mlflow.db``. Experiments then run in the workspace
(``dvc exp run -S``) and from the queue (``dvc queue start``), where DVC runs them in temporary
copies under ``.dvc/tmp/exps/``: their runs must still land in the project's store, tagged
with the DVC experiment name and baseline commit that ``dvc exp show`` lists.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_project, run
from teamkit import (
    SMALL_PARAMS,
    commit_all,
    init_repo,
    set_params,
    stages_run,
    start_queue,
    wait_for_queue,
    wait_for_workers_to_exit,
)

pytestmark = pytest.mark.slow

QUEUE_TIMEOUT = 600  # seconds for the whole queued sweep


@dataclass
class Lab:
    """A project whose baseline ran and is committed."""

    project: Path
    baseline: str  # the baseline commit
    baseline_run: str  # the MLflow run of the baseline's `dvc repro`
    env: dict[str, str]

    @property
    def store(self) -> str:
        """The default tracking store: an absolute SQLite path at the project root."""
        return f"sqlite:///{self.project / 'mlflow.db'}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, shared_mirror: Path) -> Iterator[Lab]:
    """The baseline pipeline run of a project copy, committed with its dvc.lock."""
    project = copy_project(tmp_path_factory.mktemp("exps") / "project")
    set_params(project, SMALL_PARAMS)
    init_repo(project)
    # An empty MLFLOW_TRACKING_URI selects the default store, whatever the caller's environment.
    env = {"MNIST_MIRROR": str(shared_mirror), "MLFLOW_TRACKING_URI": ""}
    run(["dvc", "repro"], cwd=project, env=env)
    baseline = commit_all(project, "baseline run")
    baseline_run = (project / ".mlflow_run_id").read_text().strip()
    try:
        yield Lab(project, baseline, baseline_run, env)
    finally:
        # Workers stop by themselves once the queue is empty; make sure none outlives the tests.
        run(["dvc", "queue", "stop", "--kill"], cwd=project, env=env, check=False)


@pytest.fixture
def clean(lab: Lab) -> Iterator[Lab]:
    """The lab, with its workspace put back to the baseline afterwards."""
    yield lab
    run(["git", "reset", "-q", "--hard", lab.baseline], cwd=lab.project)
    run(["dvc", "checkout", "--force"], cwd=lab.project, env=lab.env)


def exp_rows(project: Path, env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """``dvc exp show --json`` as {experiment name: {"params": ..., "metrics": ..., "rev"}}."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], cwd=project, env=env).stdout)
    rows: dict[str, dict[str, Any]] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if node.get("name") and isinstance(data, dict) and "params" in data:
                params = data["params"]["params.yaml"]["data"]
                metrics = {k: v["data"] for k, v in (data.get("metrics") or {}).items()}
                rows[node["name"]] = {"params": params, "metrics": metrics, "rev": node["rev"]}
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(shown)
    return rows


def tracked_runs(lab: Lab) -> list:  # -> list[mlflow.entities.Run]
    """Every run in the project's default store."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=lab.store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, max_results=1000)


def check_linked(lab: Lab, name: str, row: dict[str, Any], runs: list) -> None:
    """Exactly one run carries experiment ``name``; it has the row's params and metrics."""
    mine = [r for r in runs if r.data.tags.get("dvc_exp_name") == name]
    assert len(mine) == 1, f"{name}: {len(mine)} runs tagged with it"
    tags, params, metrics = mine[0].data.tags, mine[0].data.params, mine[0].data.metrics
    assert tags["dvc_exp_baseline_rev"] == lab.baseline
    assert mine[0].info.status == "FINISHED"
    for key in ("loss", "lr_g", "epochs"):
        shown, logged = row["params"]["train"][key], params[f"train.{key}"]
        assert str(shown) == logged or float(shown) == float(logged), (key, shown, logged)
    evaluate = row["metrics"]["metrics/evaluate.json"]
    for key in ("fid", "precision", "coverage", "modes"):
        assert metrics[key] == pytest.approx(evaluate[key], rel=1e-6), key


def test_exp_run_with_set_param_is_tagged_in_mlflow(clean: Lab) -> None:
    """`dvc exp run -S` reruns train and evaluate; its MLflow run carries name and baseline."""
    lab = clean
    res = run(
        ["dvc", "exp", "run", "-n", "slow-g", "-S", "train.lr_g=0.0001"],
        cwd=lab.project,
        env=lab.env,
    )
    assert stages_run(res.stdout) == ["train", "evaluate"], res.stdout
    rows = exp_rows(lab.project, lab.env)
    assert rows["slow-g"]["params"]["train"]["lr_g"] == 0.0001
    check_linked(lab, "slow-g", rows["slow-g"], tracked_runs(lab))

    # The comparison table: params and evaluate metrics side by side, one row per experiment.
    table = run(["dvc", "exp", "show", "--csv"], cwd=lab.project, env=lab.env).stdout
    records = {r["Experiment"]: r for r in csv.DictReader(io.StringIO(table))}
    assert {"train.lr_g", "train.loss", "fid", "precision", "recall"} <= set(records["slow-g"])
    assert float(records["slow-g"]["train.lr_g"]) == 0.0001
    assert float(records["slow-g"]["fid"]) == pytest.approx(
        rows["slow-g"]["metrics"]["metrics/evaluate.json"]["fid"], rel=1e-4
    )


def test_exp_run_with_two_training_processes(clean: Lab) -> None:
    """`dvc exp run -S train.nproc=2`: DDP on the CPU writes models/gan; one run, one point per
    epoch."""
    lab = clean
    before = len(tracked_runs(lab))
    res = run(
        ["dvc", "exp", "run", "-n", "two-ranks", "-S", "train.nproc=2", "-S", "train.epochs=3"],
        cwd=lab.project,
        env=lab.env,
    )
    assert stages_run(res.stdout) == ["train", "evaluate"], res.stdout
    config = json.loads((lab.project / "models/gan/config.json").read_text())
    assert config["train"]["nproc"] == 2
    rows = exp_rows(lab.project, lab.env)
    runs = tracked_runs(lab)
    check_linked(lab, "two-ranks", rows["two-ranks"], runs)
    (mine,) = [r for r in runs if r.data.tags.get("dvc_exp_name") == "two-ranks"]
    assert mine.data.params["train.nproc"] == "2" and mine.data.params["train.world_size"] == "2"
    from mlflow import MlflowClient

    history = MlflowClient(lab.store).get_metric_history(mine.info.run_id, "loss_d")
    assert sorted(m.step for m in history) == [1, 2, 3]  # rank 0 alone logs each epoch once
    assert len(runs) == before + 1  # rank 1 started no run


def test_queued_sweep_lands_in_the_project_store(clean: Lab) -> None:
    """A queued sweep of three losses runs in temp copies, yet logs to the project's store."""
    lab = clean
    res = run(
        [
            "dvc", "exp", "run", "--queue",
            "-S", "train.loss=bce,minimax,hinge",
            "-S", "train.label_smoothing=0.0",  # hinge has no targets to smooth
            "-S", "train.epochs=2",  # so that no experiment equals the baseline
        ],
        cwd=lab.project,
        env=lab.env,
    )  # fmt: skip
    names = re.findall(r"Queued experiment '([\w-]+)'", res.stdout + res.stderr)
    assert len(names) == 3, res.stdout + res.stderr

    # As `make sweep` runs them: start the queue, wait for its worker's process to exit, then
    # read the status once (pipeline/queue_workers.py).
    wait_for_workers_to_exit(lab.project)
    cmd = [sys.executable, "pipeline/queue_workers.py", "--run-queue", "1"]
    run(cmd, lab.project, lab.env, timeout=QUEUE_TIMEOUT)
    status = run(["dvc", "queue", "status"], lab.project, lab.env).stdout
    for name in names:
        assert re.search(rf"{name}\s.*Success", status), status

    rows = exp_rows(lab.project, lab.env)
    assert sorted(rows[n]["params"]["train"]["loss"] for n in names) == ["bce", "hinge", "minimax"]
    runs = tracked_runs(lab)
    for name in names:
        check_linked(lab, name, rows[name], runs)
    # The baseline's `dvc repro` run is in the same store as the queued ones.
    assert lab.baseline_run in {r.info.run_id for r in runs}
    assert not list(lab.project.glob(".dvc/tmp/exps/**/mlflow.db"))


def test_the_report_shows_every_experiment(clean: Lab, tmp_path: Path) -> None:
    """`make report` over the real experiments of this project: a row, a grid and curves each."""
    lab = clean
    res = run(
        ["dvc", "exp", "run", "--queue", "-S", "train.seed=1,2", "-S", "train.epochs=2"],
        cwd=lab.project,
        env=lab.env,
    )
    names = re.findall(r"Queued experiment '([\w-]+)'", res.stdout + res.stderr)
    assert len(names) == 2, res.stdout + res.stderr
    start_queue(lab.project, lab.env)
    wait_for_queue(lab.project, lab.env, names, QUEUE_TIMEOUT)
    rows = exp_rows(lab.project, lab.env)

    out = tmp_path / "report.html"
    run(["python", "pipeline/report.py", "--out", str(out)], cwd=lab.project, env=lab.env)
    page = out.read_text()
    for name in names:
        assert f"<td>{name}</td>" in page
        fid = rows[name]["metrics"]["metrics/evaluate.json"]["fid"]
        assert f"FID {fid:.3g}" in page  # its grid's caption
    # The two seeds of one point (epochs=2, with the other params of the baseline) are one row
    # of the sweep table (with any other experiment of those params: the earlier tests' bce).
    points = re.findall(r"<tr><td>([^<]*train\.epochs=2[^<]*)</td><td>([^<]*)</td>", page)
    assert any({"1", "2"} <= set(seeds.split(", ")) for _, seeds in points), points
    assert page.count("<img class='grid'") >= 3  # the baseline's grid too
    assert "<h2>Training curves" in page and "<b>real data</b>" in page
