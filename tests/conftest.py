"""Fixtures shared by the test suite: the local MNIST mirror and throwaway project copies."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from mnist_gan.params import TrainParams
from mnist_gan.strategy import choose_strategy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's scripts: dvc, mlflow, ...
# What train.amp/compile/cuda_graph: auto run on this CPU (bf16 where the CPU has it natively):
# the strategy of every stage and benchmark run in the tests, and part of its fingerprint.
CPU_AUTO = choose_strategy(TrainParams(), "cpu")

# Deterministic identity for the throwaway git repositories the tests create.
GIT_ENV = {
    "GIT_AUTHOR_NAME": "mnist-gan tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "mnist-gan tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
}


@pytest.fixture(scope="session")
def shared_mirror() -> Path:
    """The local MNIST mirror: ``$MNIST_MIRROR`` (first entry) or ``../shared/mnist``."""
    env = os.environ.get("MNIST_MIRROR", "").split(",")[0].strip()
    path = Path(env) if env else ROOT.parent / "shared" / "mnist"
    assert (path / "train-images-idx3-ubyte.gz").exists() or (
        path / "train-images-idx3-ubyte"
    ).exists(), f"no MNIST mirror at {path}: set MNIST_MIRROR to a folder holding the MNIST files"
    return path.resolve()


def run(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 900,
) -> subprocess.CompletedProcess[str]:
    """Run a command, returning its result; on an unexpected failure show its output."""
    full_env = {**os.environ, **GIT_ENV, **(env or {})}
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    res = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {res.returncode}\n--- stdout\n{res.stdout}\n"
            f"--- stderr\n{res.stderr}"
        )
    return res


def copy_project(dest: Path) -> Path:
    """Copy the project's files, as git sees them (tracked or not ignored), without dvc.lock."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if not src.is_file() or name == "dvc.lock":
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def load_stage(name: str) -> ModuleType:
    """Import ``pipeline/<name>.py`` as a module (it imports ``common`` from its own folder)."""
    if str(ROOT / "pipeline") not in sys.path:
        sys.path.insert(0, str(ROOT / "pipeline"))
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "pipeline" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Run in-process torch on one thread: faster on a shared 2-core machine. A test that compares
    a stage's weights with training in this process sets the stage's ``base.threads`` here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# What MLflow writes into os.environ when code sets its URIs or experiment, so that subprocesses
# inherit them.
_MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID")


@pytest.fixture(autouse=True)
def _mlflow_isolated() -> Iterator[None]:
    """Each test starts with no MLflow URI set, and ends with them as the suite found them.

    A test never talks to the store of the shell that runs the suite (a team server, say).

    ``mlflow.set_tracking_uri``, ``set_registry_uri`` and ``set_experiment`` also write
    ``MLFLOW_TRACKING_URI``, ``MLFLOW_REGISTRY_URI`` and ``MLFLOW_EXPERIMENT_ID`` into
    ``os.environ``. A stage run in-process (CliRunner) sets them to its throwaway store, and
    without this every later subprocess (``mlflow models serve``, dvc) would inherit the store
    of a test that has finished.
    """
    saved = {name: os.environ.pop(name, None) for name in _MLFLOW_URI_VARS}
    yield
    if "mlflow" in sys.modules:  # the library and most tests run without importing it
        import mlflow

        mlflow.end_run()  # none should be active; a failed test may have left one
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
        mlflow.tracking.fluent._active_experiment_id = None  # set_experiment's, in-process
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A fresh git repository holding the project's files (as git sees them), no outputs.

    Tests that run ``dvc repro`` work here, so the real workspace is never touched.
    """
    dest = copy_project(tmp_path / "project")
    run(["git", "init", "-q", "-b", "main"], cwd=dest)
    run(["git", "add", "-A"], cwd=dest)
    run(["git", "commit", "-q", "-m", "project copy"], cwd=dest)
    return dest
