"""`pipeline/queue_workers.py`: `make sweep` queues only once no DVC queue worker runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from click.testing import CliRunner
from conftest import load_stage

queue_workers = load_stage("queue_workers")


def _worker_file(project: Path, n: int, **data: object) -> None:
    celery = project / ".dvc" / "tmp" / "exps" / "celery"
    celery.mkdir(parents=True, exist_ok=True)
    (celery / f"dvc-exp-worker-{n}.json").write_text(json.dumps(data))


def _exited_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def test_only_workers_that_still_run_count(tmp_path: Path) -> None:
    assert queue_workers.running_workers(tmp_path) == []  # no queue ever started
    _worker_file(tmp_path, 1, pid=os.getpid(), returncode=None)  # running
    _worker_file(tmp_path, 2, pid=os.getpid(), returncode=0)  # exited, its code written
    _worker_file(tmp_path, 3, pid=_exited_pid(), returncode=None)  # killed: no code written
    (tmp_path / ".dvc/tmp/exps/celery/dvc-exp-worker-4.json").write_text('{"pid": ')  # half
    assert queue_workers.running_workers(tmp_path) == [os.getpid()]


def test_a_pid_reused_after_its_worker_was_killed_does_not_count(tmp_path: Path) -> None:
    # A file left by a worker killed before this process started, naming this process's pid.
    _worker_file(tmp_path, 1, pid=os.getpid(), returncode=None)
    before = psutil.Process().create_time() - 600
    worker_file = next(tmp_path.glob(queue_workers.WORKER_FILES))
    os.utime(worker_file, (before, before))
    assert queue_workers.running_workers(tmp_path) == []
    now = time.time()
    os.utime(worker_file, (now, now))  # written after this process started: its worker
    assert queue_workers.running_workers(tmp_path) == [os.getpid()]


def test_waits_until_the_last_worker_has_exited(tmp_path: Path) -> None:
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    reaper = threading.Thread(target=worker.wait)  # as the worker's own parent would
    reaper.start()
    _worker_file(tmp_path, 1, pid=worker.pid, returncode=None)
    start = time.monotonic()
    assert queue_workers.wait_for_workers(tmp_path, timeout=60, poll=0.1) == []
    waited = time.monotonic() - start
    reaper.join()
    assert worker.returncode == 0
    assert 1.0 <= waited < 30  # not before the worker's 1.5 s were over


def test_the_command_fails_naming_the_workers_that_outlast_its_timeout(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(queue_workers.main, ["--project", str(tmp_path), "--timeout", "0"])
    assert ok.exit_code == 0, ok.output
    _worker_file(tmp_path, 1, pid=os.getpid(), returncode=None)
    late = runner.invoke(queue_workers.main, ["--project", str(tmp_path), "--timeout", "0"])
    assert late.exit_code == 1
    assert f"pid {os.getpid()}" in late.output
    assert "dvc-exp-worker-*.json" in late.output
