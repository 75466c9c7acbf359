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
import os
import sys
import time
from pathlib import Path

import click

WORKER_FILES = ".dvc/tmp/exps/celery/dvc-exp-worker-*.json"


def running_workers(project: Path) -> list[int]:
    """The PIDs of ``project``'s DVC queue workers that still run."""
    alive = []
    for info in sorted(project.glob(WORKER_FILES)):
        try:
            data = json.loads(info.read_text())
        except (OSError, ValueError):
            continue  # removed, or being written: its worker is starting or gone
        if data.get("returncode") is not None or not isinstance(data.get("pid"), int):
            continue
        try:
            os.kill(data["pid"], 0)
        except ProcessLookupError:
            continue  # gone without its return code written (killed)
        except PermissionError:
            pass  # runs, as another user
        alive.append(data["pid"])
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
