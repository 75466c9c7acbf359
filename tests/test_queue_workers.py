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
import pytest
from click.testing import CliRunner, Result
from conftest import load_stage

queue_workers = load_stage("queue_workers")


def _worker_file(project: Path, n: int, **data: object) -> None:
    """Write worker ``n``'s file as dvc-task does: whole, through a renamed temporary file."""
    celery = project / ".dvc" / "tmp" / "exps" / "celery"
    celery.mkdir(parents=True, exist_ok=True)
    tmp = celery / f"dvc-exp-worker-{n}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data))
    tmp.replace(celery / f"dvc-exp-worker-{n}.json")


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


def test_the_command_waits_120_s_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timeouts: list[float] = []

    def wait_for_workers(project: Path, timeout: float, poll: float) -> list[int]:
        timeouts.append(timeout)
        return [4242]

    monkeypatch.setattr(queue_workers, "wait_for_workers", wait_for_workers)
    result = CliRunner().invoke(queue_workers.main, ["--project", str(tmp_path)])
    assert result.exit_code == 1
    assert timeouts == [120.0]
    assert "after 120 s (pid 4242;" in result.output


def _status(*statuses: str) -> str:
    """``dvc queue status``'s output as dvc 3 prints it (a plain table) for experiments with
    these statuses: ``exp-0a2b3``, one without a name (task ``1a2b3c4``), ``exp-2a2b3``, ..."""
    rows = [f"{n:x}a2b3c4  {'' if n == 1 else f'exp-{n}a2b3':9}  Dec 04, 2025  {status}"
            for n, status in enumerate(statuses)]  # fmt: skip
    header = "Task     Name       Created       Status"
    return "\n".join([header, *rows, "", "Worker status: 0 active, 0 idle", ""])


class FakeDvc:
    """Stands in for ``run_dvc``. ``queue start`` starts a worker (a ``sleep`` and its worker
    file) 0.1 s after it returned, as dvc's daemonized spawn does, unless ``starts`` is false;
    ``queue status`` answers the next of ``statuses``, and fails if a worker runs or is due."""

    def __init__(self, statuses: list[str], worker_s: float = 0.3, starts: bool = True) -> None:
        self.statuses, self.worker_s, self.starts = statuses, worker_s, starts
        self.calls: list[str] = []
        self.spawns: list[threading.Timer] = []
        self.workers: list[subprocess.Popen[bytes]] = []  # appended before the worker's file

    def __call__(self, args: list[str], project: Path) -> str:
        command = " ".join(args[:2])
        self.calls.append(command)
        if command == "queue start":
            if self.starts:
                self.spawns.append(threading.Timer(0.1, self._spawn, [project]))
                self.spawns[-1].start()
            return "Started '1' new experiments task queue workers.\n"
        assert command == "queue status"
        assert len(self.workers) == len(self.spawns), "asked before a worker began"
        assert all(worker.poll() is not None for worker in self.workers), "asked while one ran"
        return self.statuses.pop(0)

    def _spawn(self, project: Path) -> None:
        self.workers.append(subprocess.Popen(["sleep", str(self.worker_s)]))
        _worker_file(project, 1, pid=self.workers[-1].pid, returncode=None)


def _run_queue(project: Path, fake: FakeDvc, monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
    monkeypatch.setattr(queue_workers, "run_dvc", fake)
    options = ["--run-queue", "1", "--poll", "0.05", "--start-timeout", "0.5", *args]
    return CliRunner().invoke(queue_workers.main, ["--project", str(project), *options])


def test_reads_dvc_queue_status() -> None:
    table = _status("Success", "Queued", "Running")
    assert queue_workers.queue_status(table) == [
        ("exp-0a2b3", "Success"), ("1a2b3c4", "Queued"), ("exp-2a2b3", "Running")]  # fmt: skip
    older = "Task     Name   Created    Status    Message\n1a2b3c4  exp-1  11:28 PM   Queued\n"
    assert queue_workers.queue_status(older) == [("exp-1", "Queued")]
    empty = "No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n"
    assert queue_workers.queue_status(empty) == []


def test_run_queue_asks_the_status_once_its_worker_exited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDvc([_status("Success", "Failed")])
    start = time.monotonic()
    result = _run_queue(tmp_path, fake, monkeypatch)
    assert result.exit_code == 0, result.output
    assert fake.calls == ["queue start", "queue status"]
    assert time.monotonic() - start >= 0.3  # the worker's 0.3 s


def test_run_queue_starts_a_worker_again_while_experiments_are_left_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDvc([_status("Success", "Queued", "Queued"), _status("Success", "Success")])
    result = _run_queue(tmp_path, fake, monkeypatch)
    assert result.exit_code == 0, result.output
    assert fake.calls == ["queue start", "queue status"] * 2
    assert "2 experiment(s) still queued, but the DVC queue worker exited early" in result.output
    assert "starting workers again (restart 1 of 3)" in result.output


def test_run_queue_gives_up_after_its_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDvc([_status("Success", "Queued")] * 4, worker_s=0.1)
    result = _run_queue(tmp_path, fake, monkeypatch)
    assert result.exit_code == queue_workers.EXIT_QUEUED, result.output
    assert fake.calls == ["queue start", "queue status"] * 4  # the first start and 3 restarts
    assert "1 experiment(s) still queued after 3 restart(s)" in result.output
    assert "`dvc queue logs NAME`" in result.output
    assert "`dvc queue start --jobs 1`" in result.output


def test_run_queue_names_an_experiment_running_without_a_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeDvc([_status("Running", "Success")])
    result = _run_queue(tmp_path, fake, monkeypatch)
    assert result.exit_code == queue_workers.EXIT_STUCK, result.output
    assert fake.calls == ["queue start", "queue status"]  # nothing queued: no restart
    assert "exp-0a2b3: listed Running, but no DVC queue worker runs" in result.output
    assert "`dvc queue kill exp-0a2b3`" in result.output


def test_run_queue_checks_the_status_when_no_worker_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An earlier sweep's worker file, written before this start: not a sign of its worker.
    _worker_file(tmp_path, 1, pid=_exited_pid(), returncode=0)
    fake = FakeDvc([_status("Success")], starts=False)
    start = time.monotonic()
    result = _run_queue(tmp_path, fake, monkeypatch, "--start-timeout", "0.3")
    assert result.exit_code == 0, result.output
    assert "no DVC queue worker started in 0 s" in result.output
    assert time.monotonic() - start >= 0.3
