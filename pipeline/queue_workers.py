"""Wait for this project's DVC queue workers to exit, or run the queue with them (``make sweep``).

Not a DVC stage. ``dvc queue start`` spawns each worker through dvc-task's ``ManagedProcess``,
which writes ``.dvc/tmp/exps/celery/dvc-exp-worker-<n>.json`` with the worker's pid, and its
return code once the worker has exited: that tells which workers run without a message to them.
(``dvc queue status``'s worker count comes from a one-second celery ping, which a busy worker
misses, so it cannot tell.)

``python pipeline/queue_workers.py`` waits until no worker runs. A worker shuts itself down about
10 s after its queue runs empty; an experiment queued in that window can be taken by the worker
that is shutting down and never run: DVC then lists it as Running, with no worker, for good
(seen in this project's CI; the shutdown is treeverse/dvc#10562's). ``make sweep`` therefore
queues its grid only once the workers of an earlier sweep have exited.

``python pipeline/queue_workers.py --run-queue JOBS`` runs ``dvc queue start --jobs JOBS``, waits
until its workers have exited, and only then reads ``dvc queue status``, once. Polling the status
instead can wait forever: a worker can die with ``Unrecoverable error: JSONDecodeError`` (kombu's
filesystem transport reading a half-written message; celery/kombu#1551, treeverse/dvc-task#73),
leaving the rest of the queue Queued with no worker; and each status call pings the workers
through that broker, which is when this project saw them die. If experiments are still Queued
once no worker runs, it starts the workers again, ``--restarts`` times at most.

Exit codes: 0 no worker runs (any more), and with ``--run-queue`` none of its experiments is left
Queued or Running; 1 workers still ran at the timeout, or a dvc command failed; 3 experiments still
Queued after the last restart; 4 an experiment listed Running with no worker to run it.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import psutil

WORKER_FILES = ".dvc/tmp/exps/celery/dvc-exp-worker-*.json"
# Seconds a process start time may lie after the worker file's time and still be its
# worker's (psutil derives start times from the boot time, to about a second).
CLOCK_SLACK = 2.0
EXIT_QUEUED, EXIT_STUCK = 3, 4


def running_workers(project: Path) -> list[int]:
    """The PIDs of ``project``'s DVC queue workers that still run.

    A worker killed with its parent leaves its file without a return code, and the files
    outlive reboots, so its pid may belong to another process by now: dvc-task writes the
    file once the worker has started, and a process that started after the file was written
    is not the worker.
    """
    alive = []
    for info in sorted(project.glob(WORKER_FILES)):
        try:
            data = json.loads(info.read_text())
            written = info.stat().st_mtime
        except (OSError, ValueError):
            continue  # removed, or not (yet) a whole file: no worker to wait for
        pid = data.get("pid")
        if data.get("returncode") is not None or not isinstance(pid, int):
            continue
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                continue  # exited, only not yet reaped by its parent
            if process.create_time() > written + CLOCK_SLACK:
                continue  # the pid of a worker gone without its return code, reused
        except psutil.NoSuchProcess:
            continue  # gone without its return code written (killed)
        except psutil.AccessDenied:
            pass  # runs, as another user
        alive.append(pid)
    return alive


def wait_for_workers(project: Path, timeout: float, poll: float = 1.0) -> list[int]:
    """Wait until no queue worker of ``project`` runs, at most ``timeout`` seconds; returns
    the PIDs of those still running then (empty: none runs)."""
    deadline = time.monotonic() + timeout
    while (pids := running_workers(project)) and time.monotonic() < deadline:
        time.sleep(poll)
    return pids


def run_dvc(args: list[str], project: Path) -> str:
    """Run ``dvc ARGS`` in ``project`` (the dvc of this Python's venv, else the one on PATH)
    and return what it printed on stdout; its stderr goes to ours. ``dvc queue start`` prints
    to ours too: the workers it spawns inherit its stdout, and a pipe of ours would stay open
    until they exit."""
    venv_dvc = Path(sys.executable).with_name("dvc")
    cmd = [str(venv_dvc) if venv_dvc.exists() else "dvc", *args]
    capture = subprocess.PIPE if args[:2] != ["queue", "start"] else None
    proc = subprocess.run(cmd, cwd=project, stdout=capture, text=True)
    if proc.returncode:
        raise click.ClickException(f"`dvc {' '.join(args)}` failed (exit code {proc.returncode})")
    return proc.stdout or ""


def queue_status(text: str) -> list[tuple[str, str]]:
    """The (name, status) of each experiment in ``dvc queue status``'s output, ``text``; an
    experiment without a name goes by its task's rev.

    DVC prints a plain table, ``Task  Name  Created  Status`` (older releases add ``Message``),
    whose left-aligned columns start where their headers do; a name or message may be empty
    and a date holds spaces, so each row is cut at its header's offsets, not split on spaces.
    """
    lines = text.splitlines()
    header = next((line for line in lines if line.split()[:1] == ["Task"] and "Status" in line), "")
    if not header:
        if "No experiment tasks in the queue" in text:
            return []
        raise click.ClickException(f"cannot read `dvc queue status`'s output:\n{text}")
    names = header.split()
    starts = [match.start() for match in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    experiments = []
    for row in itertools.takewhile(str.strip, lines[lines.index(header) + 1 :]):
        cell = {name: row[a:b].strip() for name, a, b in zip(names, starts, ends, strict=True)}
        experiments.append((cell["Name"] or cell["Task"], cell["Status"]))
    return experiments


def start_and_wait(
    project: Path, jobs: int, timeout: float, start_timeout: float, poll: float
) -> list[int]:
    """``dvc queue start --jobs JOBS``, then wait until no worker runs (``wait_for_workers``).

    The command returns before its workers have written their files, so this first waits, at
    most ``start_timeout`` seconds, for a worker file written since it began.
    """
    started = time.time()
    run_dvc(["queue", "start", "--jobs", str(jobs)], project)
    deadline = time.monotonic() + start_timeout
    while not _written_since(project, started):
        if time.monotonic() >= deadline:
            click.echo(f"no DVC queue worker started in {start_timeout:.0f} s", err=True)
            break
        time.sleep(poll)
    return wait_for_workers(project, timeout, poll)


def _written_since(project: Path, since: float) -> bool:
    for info in project.glob(WORKER_FILES):
        try:
            if info.stat().st_mtime > since:
                return True
        except OSError:
            continue  # removed meanwhile
    return False


def run_queue(
    project: Path, jobs: int, restarts: int, timeout: float, start_timeout: float, poll: float
) -> int:
    """Run the queue with ``jobs`` workers, restarting them while experiments are left Queued;
    the exit code (see the module's docstring)."""
    restart = 0
    while True:
        if pids := start_and_wait(project, jobs, timeout, start_timeout, poll):
            return _still_running(project, pids, timeout)
        # No worker runs now, so the pings of this status call can reach none.
        experiments = queue_status(run_dvc(["queue", "status"], project))
        queued = [name for name, status in experiments if status == "Queued"]
        stuck = [name for name, status in experiments if status == "Running"]
        if not queued or restart == restarts:
            break
        restart += 1
        click.echo(
            f"{len(queued)} experiment(s) still queued, but the DVC queue worker exited early: "
            f"starting workers again (restart {restart} of {restarts})",
            err=True,
        )
    if stuck:
        names = " ".join(stuck)
        click.echo(
            f"{names}: listed Running, but no DVC queue worker runs (one that shut down took it, "
            f"treeverse/dvc#10562): mark it failed with `dvc queue kill {names}`, drop it with "
            f"`dvc queue remove {names}`, and queue it again",
            err=True,
        )
    if queued:
        click.echo(
            f"{len(queued)} experiment(s) still queued after {restarts} restart(s) of the DVC "
            f"queue workers: see why in {project / WORKER_FILES.replace('.json', '.out')} and "
            f"`dvc queue logs NAME`, then run them with `dvc queue start --jobs {jobs}`",
            err=True,
        )
    return EXIT_STUCK if stuck else EXIT_QUEUED if queued else 0


def _still_running(project: Path, pids: list[int], timeout: float) -> int:
    listed = ", ".join(map(str, pids))
    click.echo(
        f"DVC queue workers still running after {timeout:.0f} s (pid {listed}; see "
        f"{project / WORKER_FILES}): stop them with `dvc queue stop`, or wait",
        err=True,
    )
    return 1


@click.command()
@click.option("--project", type=click.Path(file_okay=False, path_type=Path), default=".",
              show_default=True, help="The DVC project's root.")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0), show_default="120; none with --run-queue",
              help="Seconds to wait at most for the workers to exit (each time, with "
              "--run-queue).")  # fmt: skip
@click.option("--run-queue", "jobs", type=click.IntRange(min=1), metavar="JOBS",
              help="Run the queue: `dvc queue start --jobs JOBS`, wait until no worker runs, "
              "then check `dvc queue status`.")  # fmt: skip
@click.option("--restarts", type=click.IntRange(min=0), default=3, show_default=True,
              help="With --run-queue: how often to start workers again while experiments are "
              "left Queued.")  # fmt: skip
@click.option("--start-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="With --run-queue: seconds to wait for a started worker to appear.")  # fmt: skip
@click.option("--poll", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Seconds between two looks at the worker files.")  # fmt: skip
def main(
    project: Path,
    timeout: float | None,
    jobs: int | None,
    restarts: int,
    start_timeout: float,
    poll: float,
) -> None:
    """Wait until no DVC queue worker of the project runs, or run its queue (--run-queue)."""
    if jobs is not None:
        timeout = math.inf if timeout is None else timeout
        sys.exit(run_queue(project, jobs, restarts, timeout, start_timeout, poll))
    timeout = 120.0 if timeout is None else timeout
    if pids := wait_for_workers(project, timeout, poll):
        sys.exit(_still_running(project, pids, timeout))


if __name__ == "__main__":
    main()
