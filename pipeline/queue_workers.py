"""Wait until none of this project's DVC queue workers runs (``make sweep`` calls it).

Not a DVC stage. ``dvc queue start`` spawns each worker through dvc-task's ``ManagedProcess``,
which writes ``.dvc/tmp/exps/celery/dvc-exp-worker-<n>.json`` with the worker's pid, and its
return code once the worker has exited. A worker shuts itself down about 10 s after its queue
runs empty; an experiment queued in that window can be taken by the worker that is shutting
down and never run: DVC then lists it as Running, with no worker, for good (seen in this
project's CI; the shutdown is treeverse/dvc#10562's). ``make sweep`` waits for the queue to
empty, so it would wait forever. It therefore queues its grid only once the workers of an
earlier sweep have exited, and returns only once its own have. (``dvc queue status``'s worker
count comes from a one-second celery ping, which a busy worker misses, so it cannot tell.)

Exit codes: 0 no worker runs (any more), 1 workers still ran at the timeout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import psutil

WORKER_FILES = ".dvc/tmp/exps/celery/dvc-exp-worker-*.json"
# Seconds a process start time may lie after the worker file's time and still be its
# worker's (psutil derives start times from the boot time, to about a second).
CLOCK_SLACK = 2.0


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


@click.command()
@click.option("--project", type=click.Path(file_okay=False, path_type=Path), default=".",
              show_default=True, help="The DVC project's root.")  # fmt: skip
@click.option("--timeout", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Seconds to wait at most.")  # fmt: skip
def main(project: Path, timeout: float) -> None:
    """Wait until no DVC queue worker of the project runs."""
    pids = wait_for_workers(project, timeout)
    if pids:
        listed = ", ".join(map(str, pids))
        click.echo(
            f"DVC queue workers still running after {timeout:.0f} s (pid {listed}; see "
            f"{project / WORKER_FILES}): stop them with `dvc queue stop`, or wait",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
