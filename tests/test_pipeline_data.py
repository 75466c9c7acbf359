"""End to end: ``dvc repro normalize`` on the real local mirror, in a throwaway project copy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, run

from mnist_gan.data import load_normalized

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.parametrize("stage", ["fetch", "normalize"])
def test_stage_scripts_show_help(stage: str) -> None:
    res = run([sys.executable, f"pipeline/{stage}.py", "--help"], cwd=ROOT)
    assert res.stdout.startswith(f"Usage: {stage}.py [OPTIONS]")
    assert "--params" in res.stdout and "--out" in res.stdout


def outs_md5(lock: dict, stage: str) -> dict[str, str]:
    return {o["path"]: o["md5"] for o in lock["stages"][stage]["outs"]}


@pytest.mark.slow
def test_dvc_repro_normalize_on_the_shared_mirror(project_copy: Path, shared_mirror: Path) -> None:
    env = {"MNIST_MIRROR": str(shared_mirror)}
    res = run(["dvc", "repro", "normalize"], cwd=project_copy, env=env)
    assert "Running stage 'fetch'" in res.stdout and "Running stage 'normalize'" in res.stdout

    norm = project_copy / "data" / "normalized"
    for split, n, counts in [("train", 60_000, TRAIN_COUNTS), ("test", 10_000, TEST_COUNTS)]:
        images, labels = load_normalized(norm / f"{split}.safetensors")
        assert images.shape == (n, 1, 28, 28) and labels.shape == (n,)
        assert torch.bincount(labels, minlength=10).tolist() == counts
        assert images.min().item() == -1.0 and images.max().item() == 1.0
    metrics = json.loads((project_copy / "metrics" / "normalize.json").read_text())
    assert metrics["train_count"] == 60_000 and metrics["test_count"] == 10_000
    assert [metrics[f"train_class_{d}"] for d in range(10)] == TRAIN_COUNTS
    assert [metrics[f"test_class_{d}"] for d in range(10)] == TEST_COUNTS

    lock = yaml.safe_load((project_copy / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == ["fetch", "normalize"]
    # Deterministic: the outputs hash exactly as in the project's committed dvc.lock.
    committed = yaml.safe_load((ROOT / "dvc.lock").read_text())
    for stage in ("fetch", "normalize"):
        assert outs_md5(lock, stage) == outs_md5(committed, stage)

    # Nothing changed: nothing runs.
    again = run(["dvc", "repro", "normalize"], cwd=project_copy, env=env)
    assert "Running stage" not in again.stdout
    assert "Data and pipelines are up to date" in again.stdout
    status = run(["dvc", "status", "--with-deps", "normalize"], cwd=project_copy)
    assert "Data and pipelines are up to date" in status.stdout

    # data/raw persists across a forced rerun: verified files are kept, no mirror is needed
    # (here none is reachable), and the output hash does not change.
    forced = run(["dvc", "repro", "-f", "-s", "fetch"], cwd=project_copy, env={"MNIST_MIRROR": ""})
    assert "already present, checksum ok" in forced.stderr + forced.stdout
    assert outs_md5(yaml.safe_load((project_copy / "dvc.lock").read_text()), "fetch") == (
        outs_md5(lock, "fetch")
    )
    status = run(["dvc", "status", "--with-deps", "normalize"], cwd=project_copy)
    assert "Data and pipelines are up to date" in status.stdout
