"""Stage `fetch`: the four MNIST files, decompressed and checksum-verified, into one folder.

Mirrors are tried in order: the entries of $MNIST_MIRROR (comma-separated), then
`fetch.mirrors` from the params file. A file already present with the right checksum is kept.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from common import PARAMS_OPTION, folder_option, load_or_exit

from mnist_gan.fetch import FetchError, fetch_mnist


def env_mirrors() -> list[str]:
    """The mirrors named in $MNIST_MIRROR, in order (empty entries ignored)."""
    return [m.strip() for m in os.environ.get("MNIST_MIRROR", "").split(",") if m.strip()]


@click.command(help=__doc__)
@folder_option(
    "--out",
    "Folder for the decompressed IDX files (e.g. data/raw).",
)
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a download progress bar [default: only when stderr is a terminal].",
)
@PARAMS_OPTION
def main(out: Path, progress: bool | None, params_file: Path) -> None:
    """Fetch MNIST into OUT."""
    params = load_or_exit(params_file).fetch
    mirrors = env_mirrors() + list(params.mirrors)
    try:
        fetch_mnist(
            out,
            mirrors,
            timeout=params.timeout,
            retries=params.retries,
            backoff=params.backoff,
            progress=progress,
            log=lambda line: click.echo(line, err=True),
        )
    except FetchError as exc:
        click.echo(f"error: {exc.summary}", err=True)
        for problem in exc.problems:
            click.echo(f"  {problem}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
