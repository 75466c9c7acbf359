"""From run to model in use: a conditional GAN registered, promoted, asked for digits, served.

The real pipeline with small params in a throwaway copy of the project, the project's default
tracking store (SQLite at its root), `make promote`'s script, the installed `mnist-gan` command
and a real `mlflow models serve` on loopback.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import BIN, run
from mlflow import MlflowClient
from servers import free_port, server_process
from teamkit import init_repo, set_params

from mnist_gan.classifier import embed, load_classifier

pytestmark = pytest.mark.slow

NAME = "mnist-gan-generator"
# The smallest training measured to draw the digit asked for reliably:
# all 60,000 images, 10 epochs of the default conditional mlp at batch 64, with a weight EMA of
# G. Asked for 200 threes, an evaluator trained for one epoch saw 3s in 96.0-96.5% of them over
# seeds 0-2 (without the EMA 87-95.5%; 20,000 images for 20 epochs 83.5-96%). About 70 s of
# training on two cores. That recipe had no R1 penalty, D's dropout 0.3 and no minibatch
# standard deviation (the defaults since are R1 0.1, dropout 0.1 and groups of 4): pinned, to
# keep the measured recipe and its cost.
PARAMS = {
    "classifier": {"epochs": 1},
    "train": {
        "conditional": True,
        "ema": 0.999,
        "r1_gamma": 0.0,
        "d_dropout": 0.3,
        "d_minibatch_std": 0,
        "batch_size": 64,
        "epochs": 10,
        "checkpoint_every": 0,
        "sample_every": 0,
    },  # fmt: skip
    "evaluate": {"num_samples": 1000, "is_splits": 2, "k": 3},
}


def aliases(store: str) -> dict[str, str]:
    model = MlflowClient(store, registry_uri=store).get_registered_model(NAME)
    return {alias: str(version) for alias, version in model.aliases.items()}


def test_a_conditional_generator_goes_from_run_to_use(
    project_copy: Path, shared_mirror: Path, tmp_path: Path
) -> None:
    project = project_copy
    set_params(project, PARAMS)
    init_repo(project, "small conditional params")
    store = f"sqlite:///{project / 'mlflow.db'}"
    env = {"MNIST_MIRROR": str(shared_mirror), "MLFLOW_TRACKING_URI": "", "OMP_NUM_THREADS": "1"}
    run(["dvc", "repro"], cwd=project, env=env)
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert metrics["modes"] == 10 and metrics["label_accuracy"] > 0.8, metrics

    # The first promotion: there is no champion yet.
    promote = [sys.executable, "pipeline/promote.py", "--gan", "models/gan"]
    res = run(promote, cwd=project, env=env)
    assert "promoted: mnist-gan-generator version 1 is the champion" in res.stdout
    assert aliases(store) == {"champion": "1", "challenger": "1"}

    # Threes on request from the champion, by name, through the installed command.
    out = tmp_path / "threes.npy"
    cmd = [str(BIN / "mnist-gan"), "generate", "--model", f"models:/{NAME}@champion", "-n", "200",
           "--digit", "3", "--seed", "1", "--out", str(out)]  # fmt: skip
    run(cmd, cwd=project, env=env)
    _, logits = embed(
        load_classifier(project / "models/classifier"), torch.from_numpy(np.load(out))
    )
    threes = (logits.argmax(1) == 3).double().mean().item()
    assert threes >= 0.9, threes

    # A worse generator (one epoch) is registered too, but the gate refuses it: exit 3.
    run(["dvc", "exp", "run", "-n", "worse", "-S", "train.epochs=1"], cwd=project, env=env)
    res = run(promote, cwd=project, env=env, check=False)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "refused" in res.stdout and "FAIL" in res.stdout
    assert aliases(store) == {"champion": "1", "challenger": "2"}

    # The champion, served by MLflow: rows of z plus the digit in, images out.
    port = free_port()
    serve = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    serve_env = {"MLFLOW_TRACKING_URI": store, "PATH": f"{BIN}:/usr/bin:/bin"}
    with server_process(serve, f"http://127.0.0.1:{port}/ping", tmp_path / "serve.log",
                        timeout=180, env=serve_env):  # fmt: skip
        rows = np.random.default_rng(0).standard_normal((3, 101)).round(4)
        rows[:, -1] = [3, 3, 7]
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({"inputs": rows.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            images = np.asarray(json.load(answer)["predictions"], dtype=np.float32)
    assert images.shape == (3, 1, 28, 28)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1
    # The champion's own images for those rows, computed here.
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    local = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(rows.astype(np.float32))
    np.testing.assert_allclose(images, local, atol=1e-6)
