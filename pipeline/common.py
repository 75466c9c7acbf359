"""What every stage script shares: reading params once, and failing cleanly on bad ones.

Stage scripts run as ``python pipeline/<stage>.py``, so this folder is on ``sys.path`` and they
import this module as ``common``. It holds no MLflow code (see ``tracking.py``), so the data
stages start quickly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from mnist_gan.params import Params, ParamsError, load_params

PARAMS_OPTION = click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="The params file; the stage reads only its own sections of it.",
)


def load_or_exit(path: Path) -> Params:
    """Read and validate ``path``; on a bad file print why and exit with code 2, writing nothing."""
    try:
        return load_params(path)
    except ParamsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
