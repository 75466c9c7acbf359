"""The train stage script: outputs, the MLflow run, divergence, kill-and-resume, dvc repro."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import CPU_AUTO, ROOT, load_stage, run
from ddpkit import blobs
from packaging.version import Version
from PIL import Image
from safetensors.torch import load_file
from servers import free_port, mlflow_server

from mnist_gan.checkpoint import CheckpointStore, fingerprint
from mnist_gan.data import save_normalized
from mnist_gan.models import load_generator
from mnist_gan.params import TrainParams, load_params
from mnist_gan.strategy import Strategy
from mnist_gan.training import METRICS, GANTrainer
from mnist_gan.utils import set_threads, sha256_file
from mnist_gan_cli import main as cli_main

SCRIPT = ROOT / "pipeline" / "train.py"
STRATEGY = str(CPU_AUTO)  # what the stage's trainer runs here: part of the fingerprint
SMALL = {
    "hidden": [32],
    "d_hidden": None,
    "batch_size": 64,
    "epochs": 2,
    "ema": 0.9,
    "checkpoint_every": 1,
    "sample_every": 1,
}


def make_project(root: Path, train: dict, n: int = 320) -> Path:
    """A folder with params.yaml and data/normalized/train.safetensors; returns it."""
    (root / "data" / "normalized").mkdir(parents=True)  # root too, if it is new
    save_normalized(root / "data/normalized/train.safetensors", blobs(n), torch.zeros(n).long())
    params = {"base": {"seed": 0, "device": "cpu"}, "train": train}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def args(root: Path) -> list[str]:
    return [
        "--data",
        str(root / "data/normalized"),
        "--out",
        str(root / "models/gan"),
        "--metrics",
        str(root / "metrics/train.json"),
        "--plots",
        str(root / "plots/train"),
        "--checkpoints",
        str(root / "checkpoints/train"),
        "--run-id-file",
        str(root / ".mlflow_run_id"),
        "--params",
        str(root / "params.yaml"),
    ]


def reference(root: Path) -> GANTrainer:
    """The same training as the stage, through the library in this process."""
    params = load_params(root / "params.yaml")
    set_threads(params.base.threads)  # the stage's thread count (the autouse fixture restores it)
    images = blobs(load_file(str(root / "data/normalized/train.safetensors"))["images"].shape[0])
    seed = params.base.seed if params.train.seed is None else params.train.seed
    trainer = GANTrainer(params.train, images, seed=seed, progress=False, strategy=CPU_AUTO)
    trainer.fit()
    return trainer


def assert_weights_equal(model_dir: Path, trainer: GANTrainer) -> None:
    for name, net in (
        ("generator", trainer.generator),
        ("discriminator", trainer.discriminator),
        ("generator_ema", trainer.sampling_generator()),  # with its standing statistics
    ):
        saved = load_file(str(model_dir / f"{name}.safetensors"))
        live = net.state_dict()
        assert saved.keys() == live.keys()
        for k in saved:
            assert torch.equal(saved[k], live[k]), f"{name}.{k}"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite tracking store for the module's in-process runs (its set-up takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def stage() -> ModuleType:
    """``pipeline/train.py`` imported as a module."""
    return load_stage("train")


def invoke(stage: object, root: Path, store: str, **env: str) -> object:
    """Run the stage in this process; restore the SIGTERM handler it installs."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return CliRunner().invoke(stage.main, args(root), env={"MLFLOW_TRACKING_URI": store, **env})
    finally:
        signal.signal(signal.SIGTERM, handler)
        mlflow.end_run()  # in case a failure left one active


def test_train_seed_seeds_the_gan_and_base_seed_the_rest(
    tmp_path: Path, stage: object, store: str
) -> None:
    """train.seed: 3 trains the GAN that seed 3 trains, whatever base.seed is."""
    root = make_project(tmp_path, {**SMALL, "seed": 3, "checkpoint_every": 0})
    assert invoke(stage, root, store).exit_code == 0
    params = load_params(root / "params.yaml")
    assert params.base.seed == 0 and params.train.seed == 3
    set_threads(params.base.threads)
    images = blobs(320)
    trainer = GANTrainer(params.train, images, seed=3, progress=False, strategy=CPU_AUTO)
    trainer.fit()
    assert_weights_equal(root / "models/gan", trainer)
    other = GANTrainer(params.train, images, seed=0, progress=False, strategy=CPU_AUTO)
    other.fit()
    with pytest.raises(AssertionError):
        assert_weights_equal(root / "models/gan", other)


def test_stage_writes_every_output_and_logs_the_run(
    tmp_path: Path, stage: object, store: str
) -> None:
    root = make_project(tmp_path, SMALL)
    # A checkpoint made with other params must not be resumed from (it claims to be complete).
    cfg = TrainParams(**{**SMALL, "hidden": (32,), "lr_g": 1e-3})
    foreign = GANTrainer(cfg, blobs(320), seed=5, strategy=CPU_AUTO)
    data_sha = sha256_file(root / "data/normalized/train.safetensors")
    foreign_fp = fingerprint(cfg, 0, data_sha, "cpu", "", strategy=STRATEGY)
    CheckpointStore(root / "checkpoints/train", foreign_fp).save(
        {**foreign.state_dict(), "epoch": 2}, run_id="not-this-run"
    )
    res = invoke(stage, root, store, DVC_EXP_NAME="tiny-exp", DVC_EXP_BASELINE_REV="abc123")
    assert res.exit_code == 0, res.output
    assert "made with other params, code; not resumed from" in res.output

    gan = root / "models/gan"
    assert sorted(p.name for p in gan.iterdir()) == [
        "config.json",
        "discriminator.safetensors",
        "generator.safetensors",
        "generator_ema.safetensors",
    ]
    assert_weights_equal(gan, reference(root))  # trained from scratch, deterministically
    generator, cfg = load_generator(gan)
    assert cfg == load_params(root / "params.yaml").train
    assert not (root / "checkpoints/train").exists()  # removed on success

    metrics = json.loads((root / "metrics/train.json").read_text())
    assert set(metrics) == {
        "loss_d",
        "loss_g",
        "d_real",
        "d_fake",
        "epochs",
        "train_seconds",
        "images_per_sec",
    }
    assert metrics["epochs"] == 2 and all(np.isfinite(v) for v in metrics.values())
    curves = json.loads((root / "plots/train/curves.json").read_text())
    assert [c["epoch"] for c in curves] == [1, 2]
    assert all(set(METRICS) <= set(c) for c in curves)
    assert curves[-1]["loss_d"] == metrics["loss_d"]
    with Image.open(root / "plots/train/samples.png") as png:
        assert png.format == "PNG" and png.size == (8 * 28 + 9 * 2,) * 2  # 8 x 8, 2 px padding

    run_id = (root / ".mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(store)
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == "tiny-exp"
    assert client.get_experiment(r.info.experiment_id).name == "mnist-gan"
    assert r.data.tags["stage"] == "train" and r.data.tags["dvc_exp_name"] == "tiny-exp"
    assert r.data.tags["dvc_exp_baseline_rev"] == "abc123"
    assert r.data.params["train.hidden"] == "32" and r.data.params["train.lr_g"] == "0.0004"
    assert r.data.params["base.seed"] == "0" and r.data.params["train.model"] == "mlp"
    sha = sha256_file(root / "data/normalized/train.safetensors")
    assert r.data.params["data.train_sha256"] == sha
    assert r.data.params["train.strategy"] == STRATEGY
    # The generator's hash links the weights to this run; the data is a dataset input, named
    # and digested as DVC knows it.
    assert r.data.tags["generator_sha256"] == sha256_file(gan / "generator.safetensors")
    (data_input,) = r.inputs.dataset_inputs
    assert data_input.dataset.name == (root / "data/normalized").as_posix()
    assert data_input.dataset.digest == dvc_dir_md5(root / "data/normalized")
    assert {t.key: t.value for t in data_input.tags}["mlflow.data.context"] == "training"
    for key in (*METRICS, "images_per_sec", "epoch_seconds"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    assert r.data.metrics["train_seconds"] == pytest.approx(metrics["train_seconds"])
    loss_d = {m.step: m.value for m in client.get_metric_history(run_id, "loss_d")}
    assert loss_d == {c["epoch"]: pytest.approx(c["loss_d"]) for c in curves}
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert {p.split("+step+")[1].split("+")[0] for p in images if p.endswith(".png")} == {"1", "2"}

    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/generator")
    z = np.random.default_rng(0).standard_normal((5, cfg.latent_dim)).astype(np.float32)
    out = model.predict(z)
    assert out.shape == (5, 1, 28, 28) and out.dtype == np.float32
    assert out.min() >= -1 and out.max() <= 1
    with torch.no_grad():  # the pyfunc model is the EMA generator of models/gan
        np.testing.assert_array_equal(out, generator(torch.from_numpy(z)).numpy())
    assert tuple(model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 100)


def test_a_conditional_run_registers_a_generator_that_draws_digits_on_request(
    tmp_path: Path, stage: object, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_project(tmp_path, {**SMALL, "conditional": True})
    res = invoke(stage, root, store, MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="0.2")
    assert res.exit_code == 0, res.output
    with Image.open(root / "plots/train/samples.png") as png:
        assert png.size == (10 * 28 + 11 * 2,) * 2  # 10 x 10: row r asks for digit r
    run_id = (root / ".mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(store, registry_uri=store)
    run = client.get_run(run_id)
    assert any(k.startswith("system/cpu") for k in run.data.metrics)  # system metrics
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # A new version of the registered model, tagged with what made it.
    (version,) = client.search_model_versions(
        f"name = 'mnist-gan-generator' and run_id = '{run_id}'"
    )
    assert f"registered as mnist-gan-generator version {version.version}" in res.output
    gan = root / "models/gan"
    cfg = load_params(root / "params.yaml").train
    sha = sha256_file(root / "data/normalized/train.safetensors")
    assert version.tags["generator_sha256"] == sha256_file(gan / "generator.safetensors")
    assert (
        version.tags["params_sha256"]
        == fingerprint(cfg, 0, sha, "cpu", "", strategy=STRATEGY)["params"]
    )
    uri = f"models:/mnist-gan-generator/{version.version}"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    pins = (local / "requirements.txt").read_text().split()
    # The installed torch's public version (no +cpu or +cu128: those are not on PyPI).
    assert f"torch=={Version(importlib.metadata.version('torch')).public}" in pins
    assert not any("+" in pin for pin in pins), pins

    # Served rows: z plus the digit; an ndarray or a DataFrame.
    model = mlflow.pyfunc.load_model(uri)
    rows = np.random.default_rng(0).standard_normal((4, cfg.latent_dim + 1)).astype(np.float32)
    rows[:, -1] = [0, 3, 3, 9]
    out = model.predict(rows)
    assert out.shape == (4, 1, 28, 28) and out.min() >= -1 and out.max() <= 1
    np.testing.assert_array_equal(model.predict(pd.DataFrame(rows)), out)
    generator, _ = load_generator(gan)
    with torch.no_grad():
        z, y = torch.from_numpy(rows[:, :-1]), torch.tensor([0, 3, 3, 9])
        np.testing.assert_array_equal(out, generator(z, y).numpy())
    rows[0, -1] = 11
    with pytest.raises(Exception, match="digits 0-9"):
        model.predict(rows)

    # mnist-gan generate finds the same weights by run and by registered version.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    outputs = []
    for source in (str(gan), f"runs:/{run_id}/generator", uri):
        target = tmp_path / f"{len(outputs)}.npy"
        args = ["generate", "--model", source, "-n", "6", "--digit", "3", "--out", str(target)]
        result = CliRunner().invoke(cli_main, args)
        assert result.exit_code == 0, result.output
        outputs.append(np.load(target))
    assert np.array_equal(outputs[0], outputs[1]) and np.array_equal(outputs[0], outputs[2])


def dvc_dir_md5(folder: Path) -> str:
    """DVC's hash of a folder, as dvc.lock writes it: the MD5 of its sorted JSON listing."""
    entries = [
        {
            "md5": hashlib.md5(p.read_bytes()).hexdigest(),
            "relpath": p.relative_to(folder).as_posix(),
        }
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def test_checkpoints_of_other_code_or_that_do_not_fit_are_not_resumed(
    tmp_path: Path, stage: object, store: str
) -> None:
    root = make_project(tmp_path, SMALL)
    cfg = load_params(root / "params.yaml").train
    data_sha = sha256_file(root / "data/normalized/train.safetensors")
    code = stage.code_digest(SCRIPT)  # what the stage computes, in this process
    wide = GANTrainer(
        TrainParams(**{**SMALL, "hidden": (48,)}), blobs(320), seed=5, strategy=CPU_AUTO
    )
    cases = {  # fingerprint, what the stage says
        "made with other code; not resumed from": fingerprint(
            cfg, 0, data_sha, "cpu", "old", strategy=STRATEGY
        ),
        "not resumed from: checkpoint does not fit": fingerprint(
            cfg, 0, data_sha, "cpu", code, strategy=STRATEGY
        ),
        # compile: auto resolved otherwise (a GPU machine, or one where compiling fails)
        "made with other strategy; not resumed from": fingerprint(
            cfg, 0, data_sha, "cpu", code, strategy=str(Strategy(compile=True))
        ),
    }
    for note, fp in cases.items():
        CheckpointStore(root / "checkpoints/train", fp).save(wide.state_dict(), run_id="x")
        res = invoke(stage, root, store)
        assert res.exit_code == 0, res.output
        assert note in res.output and "Traceback" not in res.output
        assert "epoch 1/2" in res.output  # trained from the start
        assert_weights_equal(root / "models/gan", reference(root))


def test_divergence_fails_the_run_and_writes_nothing(
    tmp_path: Path, stage: object, store: str
) -> None:
    root = make_project(tmp_path, {**SMALL, "lr_g": 1e30, "lr_d": 1e30})
    res = invoke(stage, root, store)
    assert res.exit_code == 1
    assert "training diverged: non-finite loss at epoch 1, step 1" in res.output
    run_id = (root / ".mlflow_run_id").read_text().strip()
    assert mlflow.MlflowClient(store).get_run(run_id).info.status == "FAILED"
    for out in ("models/gan", "metrics/train.json", "plots/train/curves.json"):
        assert not (root / out).exists(), out


def test_missing_data_is_a_clear_error(tmp_path: Path, stage: object, store: str) -> None:
    root = make_project(tmp_path, SMALL)
    (root / "data/normalized/train.safetensors").unlink()
    res = invoke(stage, root, store)
    assert res.exit_code == 1
    assert "train.safetensors: file not found" in res.output
    assert sorted(p.name for p in root.iterdir()) == ["data", "params.yaml"]


def test_unreachable_tracking_store_fails_before_training(tmp_path: Path, stage: object) -> None:
    root = make_project(tmp_path, SMALL)
    res = invoke(stage, root, f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}")
    assert res.exit_code == 1
    assert "no-such-folder" in res.output and "does not exist" in res.output
    assert sorted(p.name for p in root.iterdir()) == ["data", "params.yaml"]


def test_bad_params_exit_2(tmp_path: Path, stage: object, store: str) -> None:
    root = make_project(tmp_path, {**SMALL, "loss": "hinge", "label_smoothing": 0.1})
    res = invoke(stage, root, store)
    assert res.exit_code == 2
    assert "train.label_smoothing" in res.output


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"cuda_graph": True}, "train.cuda_graph: true needs a CUDA device"),
        (
            {"compile": True, "epochs": 1, "r1_gamma": 0.0},
            "train.compile: compiling the training step failed",
        ),
    ],
    ids=["graph-on-cpu", "compile-fails"],
)
def test_a_strategy_that_cannot_be_met_is_one_line_and_exit_2(
    tmp_path: Path, stage: object, store: str, monkeypatch, train: dict, message: str
) -> None:
    """Before training (a CUDA graph on the CPU), or at the first step (torch.compile's kernels
    fail to build): one line, exit 2, nothing written, never a silent fallback."""

    def fails_when_run(*args: object, **kwargs: object) -> object:
        raise RuntimeError("inductor: no C++ compiler")

    if train.get("compile"):
        probe = torch.compile  # the strategy's probe compiles and runs a tiny lambda: it works

        def compile_(fn: object, **kwargs: object) -> object:
            return (
                probe(fn, **kwargs) if getattr(fn, "__name__", "") == "<lambda>" else fails_when_run
            )

        monkeypatch.setattr(torch, "compile", compile_)
    root = make_project(tmp_path, {**SMALL, **train})
    res = invoke(stage, root, store)
    assert res.exit_code == 2, res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "set it to" in errors[0]
    for out in ("models/gan", "metrics/train.json", "plots/train/curves.json"):
        assert not (root / out).exists(), out


def _wait_for(cond: object, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.mark.slow
def test_sigterm_and_sigkill_then_resume_give_identical_weights(tmp_path: Path) -> None:
    every = 3  # checkpoints at epochs 3, 6, 9, ...
    train = {**SMALL, "hidden": [64], "epochs": 30, "sample_every": 10, "checkpoint_every": every}
    root = make_project(tmp_path, train, n=1024)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(db)
    env = {**os.environ, "MLFLOW_TRACKING_URI": db, "DVC_EXP_NAME": ""}
    cmd = [sys.executable, str(SCRIPT), *args(root)]
    ckpt = root / "checkpoints/train/checkpoint.pt"

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def last_logged() -> int:
        run_file = root / ".mlflow_run_id"
        if not run_file.exists():
            return 0
        history = client.get_metric_history(run_file.read_text().strip(), "loss_d")
        return max((m.step for m in history), default=0)

    # 1. SIGTERM once the epoch after a checkpoint is logged (it will run again on resume):
    # a clean stop, the run marked KILLED.
    proc = start()
    _wait_for(lambda: (n := last_logged()) > every and n % every == 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "run again to resume" in err, err
    run_id = (root / ".mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    first = torch.load(ckpt, weights_only=True)["epoch"]
    assert last_logged() > first  # epochs after the checkpoint were logged

    # 2. Resume, then SIGKILL after the next checkpoint replaced the first.
    inode = ckpt.stat().st_ino
    proc = start()
    _wait_for(lambda: ckpt.exists() and ckpt.stat().st_ino != inode, proc)
    proc.kill()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert f"resuming from {ckpt} (epoch {first})" in err, err
    second = torch.load(ckpt, weights_only=True)["epoch"]
    assert first < second < 30  # killed mid-run
    assert not (root / "models/gan").exists()

    # 3. Resume to the end: the same run, the same weights as one uninterrupted run.
    proc = start()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert (root / ".mlflow_run_id").read_text().strip() == run_id
    assert_weights_equal(root / "models/gan", reference(root))
    assert client.get_run(run_id).info.status == "FINISHED"
    # Each epoch logged once, although the epochs after the first checkpoint ran twice.
    history = client.get_metric_history(run_id, "loss_d")
    assert sorted(m.step for m in history) == list(range(1, 31))
    curves = json.loads((root / "plots/train/curves.json").read_text())
    assert [c["epoch"] for c in curves] == list(range(1, 31))
    assert not ckpt.parent.exists()


def _children(pid: int) -> dict[int, dict[str, str]]:
    """The child processes of ``pid``: {pid: environment}."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                raw = (proc / "environ").read_bytes().split(b"\0")
                found[int(proc.name)] = dict(
                    e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e
                )
        except (OSError, ValueError, IndexError):
            continue
    return found


@pytest.mark.slow
def test_a_killed_rank_stops_the_stage_and_a_rerun_resumes(tmp_path: Path) -> None:
    """nproc 2: SIGKILL rank 1 mid-run; the stage fails in one line, keeps its checkpoint, and
    a rerun resumes to the weights of an uninterrupted 2-process run."""
    train = {**SMALL, "hidden": [64], "epochs": 120, "sample_every": 60, "checkpoint_every": 5,
             "nproc": 2}  # fmt: skip
    root = make_project(tmp_path / "killed", train, n=1024)
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": db, "DVC_EXP_NAME": ""}
    ckpt = root / "checkpoints/train/checkpoint.pt"

    def start(project: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(SCRIPT), *args(project)], cwd=project,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip

    proc = start(root)
    _wait_for(ckpt.exists, proc)
    (rank1,) = [pid for pid, e in _children(proc.pid).items() if e.get("RANK") == "1"]
    os.kill(rank1, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: training process 1 of 2 was killed by SIGKILL;"), last
    assert "run again with train.nproc 2 to resume" in last
    saved = torch.load(ckpt, weights_only=True)
    assert 5 <= saved["epoch"] < 120 and len(saved["rng_by_rank"]) == 2
    assert saved["fingerprint"]["world_size"] == "2"
    assert not (root / "models/gan").exists()
    run_id = (root / ".mlflow_run_id").read_text().strip()

    proc = start(root)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert f"resuming from {ckpt} (epoch {saved['epoch']})" in err
    assert (root / ".mlflow_run_id").read_text().strip() == run_id  # the same MLflow run
    history = mlflow.MlflowClient(db).get_metric_history(run_id, "loss_d")
    assert sorted(m.step for m in history) == list(range(1, 121))

    whole = make_project(tmp_path / "whole", train, n=1024)
    proc = start(whole)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    for name in ("generator", "discriminator", "generator_ema"):
        a = load_file(str(root / f"models/gan/{name}.safetensors"))
        b = load_file(str(whole / f"models/gan/{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_a_killed_launcher_takes_its_ranks_along(tmp_path: Path) -> None:
    """kill -9 of the stage (the launcher): its training processes stop too, writing nothing."""
    train = {**SMALL, "hidden": [64], "epochs": 500, "checkpoint_every": 5, "nproc": 2}
    root = make_project(tmp_path, train, n=1024)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args(root)], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_for((root / "checkpoints/train/checkpoint.pt").exists, proc)
    ranks = list(_children(proc.pid))
    assert len(ranks) == 2
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)

    def running(pid: int) -> bool:  # a zombie has exited
        stat = Path(f"/proc/{pid}/stat")
        return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"

    assert [pid for pid in ranks if running(pid)] == []
    assert not (root / "models/gan").exists()


@pytest.mark.slow
def test_divergence_on_two_ranks_is_reported_by_rank_0(tmp_path: Path) -> None:
    root = make_project(tmp_path, {**SMALL, "lr_g": 1e30, "lr_d": 1e30, "nproc": 2})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    res = subprocess.run([sys.executable, str(SCRIPT), *args(root)], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "error: training diverged: non-finite loss at epoch 1, step 1" in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last == "error: training process 0 of 2 failed (exit code 1); its error is above"
    assert not (root / "models/gan").exists()


@pytest.mark.slow
def test_a_lost_tracking_server_costs_no_work_and_the_run_continues(tmp_path: Path) -> None:
    """A real ``mlflow server`` dies mid-training: the stage saves the epoch it could not log
    and stops with one line; once the server is back, a rerun continues the same run, one
    point per epoch, to the weights of an uninterrupted run."""
    train = {**SMALL, "hidden": [64], "epochs": 150, "sample_every": 50, "checkpoint_every": 50}
    root = make_project(tmp_path, train, n=1024)
    port, store = free_port(), tmp_path / "server"
    # MLflow retries a dead server for minutes by default; fail at once here.
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "DVC_EXP_NAME": "",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}  # fmt: skip
    cmd = [sys.executable, str(SCRIPT), *args(root)]
    ckpt = root / "checkpoints/train/checkpoint.pt"

    def steps(client: mlflow.MlflowClient, run_id: str) -> list[int]:
        return sorted(m.step for m in client.get_metric_history(run_id, "loss_d"))

    with mlflow_server(store, port=port) as server:
        client = mlflow.MlflowClient(server.uri)
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        run_file = root / ".mlflow_run_id"
        _wait_for(
            lambda: run_file.exists() and len(steps(client, run_file.read_text().strip())) >= 3,
            proc,
        )
        os.killpg(server.process.proc.pid, signal.SIGKILL)  # gone, mid-run, without a goodbye
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("error: the MLflow tracking store http://127.0.0.1:")
        and " failed (" in last
    )
    saved = torch.load(ckpt, weights_only=True)["epoch"]
    assert 3 <= saved < 150 and f"epoch {saved} is saved in {ckpt}" in last
    assert not (root / "models/gan").exists()
    run_id = run_file.read_text().strip()

    with mlflow_server(store, port=port) as server:  # the same store, back where it was
        client = mlflow.MlflowClient(server.uri)
        # The epochs before the saved one are there. The saved epoch's point is missing, unless
        # the server stored it and died before answering (the stage cannot tell; the rerun logs
        # only epochs after the last point, so either way each epoch ends up with one).
        assert steps(client, run_id) in (list(range(1, saved)), list(range(1, saved + 1)))
        res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
        assert f"resuming from {ckpt} (epoch {saved})" in res.stderr
        assert run_file.read_text().strip() == run_id
        assert steps(client, run_id) == list(range(1, 151))  # one point per epoch
        assert client.get_run(run_id).info.status == "FINISHED"
    assert_weights_equal(root / "models/gan", reference(root))


@pytest.mark.slow
def test_base_threads_makes_weights_independent_of_the_machine(tmp_path: Path) -> None:
    """CPU sums are split by thread, so the thread count changes the weights; base.threads pins
    it, so machines with other core counts (here: other OMP_NUM_THREADS) reproduce dvc.lock."""
    # The article's sizes: large enough for PyTorch to split its matrix products by thread.
    train = {"batch_size": 128, "epochs": 1, "checkpoint_every": 0, "sample_every": 0}

    def weights(threads: int, env_threads: int) -> bytes:
        root = make_project(tmp_path / f"t{threads}-omp{env_threads}", train, n=1024)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["base"]["threads"] = threads
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "OMP_NUM_THREADS": str(env_threads), "DVC_EXP_NAME": "",
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # fmt: skip
        run([sys.executable, str(SCRIPT), *args(root)], cwd=root, env=env)
        return (root / "models/gan/generator.safetensors").read_bytes()

    # Unpinned (0: PyTorch's default, which follows OMP_NUM_THREADS), 1 and 3 threads differ...
    assert weights(0, 1) != weights(0, 3)
    # ...pinned, the environment does not matter.
    assert weights(2, 1) == weights(2, 3)


@pytest.mark.slow
def test_dvc_repro_train_end_to_end(project_copy: Path, shared_mirror: Path) -> None:
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["normalize"]["train_limit"] = 256
    params["train"].update(
        {"hidden": [16], "d_hidden": None, "batch_size": 64, "epochs": 2, "sample_every": 1}
    )
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # An empty MLFLOW_TRACKING_URI means the default: mlflow.db at the project root.
    env = {"MNIST_MIRROR": str(shared_mirror), "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}
    run(["dvc", "repro", "train"], cwd=project_copy, env=env)
    for out in (
        "models/gan/generator.safetensors",
        "metrics/train.json",
        "plots/train/curves.json",
        "plots/train/samples.png",
        "mlflow.db",
    ):
        assert (project_copy / out).is_file(), out
    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 2
    again = run(["dvc", "repro", "train"], cwd=project_copy, env=env)
    assert "didn't change" in again.stdout or "up to date" in again.stdout
    shown = run(["dvc", "metrics", "show", "--json"], cwd=project_copy, env=env).stdout
    assert "images_per_sec" in shown
    run_id = (project_copy / ".mlflow_run_id").read_text().strip()
    client = mlflow.MlflowClient(f"sqlite:///{project_copy / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["git_commit"]
