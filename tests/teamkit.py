"""Helpers for the team and experiment tests: project copies with tiny params, and DVC output.

The conftest's ``project_copy`` fixture is function-scoped; the team tests share one pipeline run
between several tests (it is the slow part), so they build their copy here the same way.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import yaml
from conftest import BIN, GIT_ENV, load_stage, run

QUEUE_WORKERS = load_stage("queue_workers")

# The smallest pipeline that still exercises every stage: a few hundred images, one epoch of
# everything, narrow networks, a few hundred generated samples.
SMALL_PARAMS = {
    "normalize": {"train_limit": 512},
    "classifier": {"epochs": 1, "batch_size": 128},
    "train": {
        "hidden": [32, 32],
        "d_hidden": None,
        "latent_dim": 16,
        "batch_size": 64,
        "epochs": 1,
        "checkpoint_every": 0,
        "sample_every": 1,
    },
    "evaluate": {"num_samples": 200, "batch_size": 1000, "is_splits": 2, "k": 3},
}


def set_params(project: Path, changes: dict[str, dict]) -> None:
    """Overwrite keys of ``project/params.yaml``, section by section."""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    for section, values in changes.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def init_repo(project: Path, message: str = "project with small params") -> str:
    """Make ``project`` a git repository with one commit; return the commit."""
    run(["git", "init", "-q", "-b", "main"], cwd=project)
    return commit_all(project, message)


def commit_all(project: Path, message: str) -> str:
    """Commit everything git sees in ``project``; return the new HEAD."""
    run(["git", "add", "-A"], cwd=project)
    run(["git", "commit", "-q", "-m", message], cwd=project)
    return head(project)


def head(project: Path) -> str:
    """The commit ``project`` is at."""
    return run(["git", "rev-parse", "HEAD"], cwd=project).stdout.strip()


def stages_run(output: str) -> list[str]:
    """The stages that ``dvc repro`` really ran (not skipped, not restored from the run cache)."""
    return re.findall(r"Running stage '([\w-]+)'", output)


def digest(root: Path, folders: Iterable[str]) -> dict[str, str]:
    """SHA-256 of every file under ``folders`` of ``root``, by relative path."""
    out: dict[str, str] = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, **kw) -> tuple[str, float]:
    """Run a command that must succeed; return its stdout + stderr and its wall time in seconds."""
    start = time.perf_counter()
    res = run(cmd, cwd=cwd, env=env, **kw)
    return res.stdout + res.stderr, time.perf_counter() - start


def wait_for_workers_to_exit(project: Path, timeout: float = 120) -> None:
    """Wait until no queue worker of ``project`` runs (``pipeline/queue_workers.py``, as
    ``make sweep`` does): experiments are only queued, and a queue only started, then."""
    pids = QUEUE_WORKERS.wait_for_workers(project, timeout)
    assert not pids, f"DVC queue workers {pids} still running after {timeout:.0f} s"


def start_queue(project: Path, env: dict[str, str], jobs: int = 1) -> None:
    """``dvc queue start``: its worker outlives it, so no pipe of ours is handed to it.

    With captured output, waiting for the command would mean waiting for the worker too.
    """
    wait_for_workers_to_exit(project)
    full_env = {**os.environ, **GIT_ENV, **env}
    full_env["PATH"] = f"{BIN}{os.pathsep}{full_env.get('PATH', '')}"
    log = project / ".dvc" / "tmp" / "queue-start.log"
    with log.open("w") as out:
        subprocess.run(
            ["dvc", "queue", "start", "-j", str(jobs)],
            cwd=project,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=120,
        )


def wait_for_queue(project: Path, env: dict[str, str], names: list[str], timeout: float) -> str:
    """Wait until the queued experiments ``names`` are done and the worker has exited; return
    ``dvc queue status``.

    A finished experiment gets a git ref, which is cheap to poll; ``dvc queue status`` costs a
    second or two of the CPU the experiments need, so it is asked every 30 s (it also shows a
    failed experiment, which gets no ref) and once all refs are there. The worker's exit is
    waited for so that the next experiments queued go to a new worker
    (:func:`wait_for_workers_to_exit`).
    """
    deadline = time.monotonic() + timeout
    status, ask_at = "", 0.0
    while time.monotonic() < deadline:
        refs = run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], project).stdout
        finished = all(any(r.endswith(f"/{n}") for r in refs.split()) for n in names)
        if finished or time.monotonic() >= ask_at:
            status = run(["dvc", "queue", "status"], project, env).stdout
            if not re.search(r"\b(Queued|Running)\b", status):
                wait_for_workers_to_exit(project)
                return status
            ask_at = time.monotonic() + 30
        time.sleep(2)
    raise AssertionError(f"queued experiments not done after {timeout:.0f} s:\n{status}")
