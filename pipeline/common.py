"""What every stage script shares: reading params once, and failing cleanly on bad ones.

Stage scripts run as ``python pipeline/<stage>.py``, so this folder is on ``sys.path`` and they
import this module as ``common``. It holds no MLflow code (see ``tracking.py``), so the data
stages start quickly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from mnist_gan.params import Params, ParamsError, load_params

F = TypeVar("F", bound=Callable[..., Any])

PARAMS_OPTION = click.option(
    "--params",
    "params_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default="params.yaml",
    show_default=True,
    help="The params file; the stage reads only its own sections of it.",
)


def folder_option(flag: str, help_text: str) -> Callable[[F], F]:
    """A required option naming a folder (paths are named once, in dvc.yaml)."""
    return click.option(
        flag, type=click.Path(file_okay=False, path_type=Path), required=True, help=help_text
    )


def file_option(flag: str, help_text: str) -> Callable[[F], F]:
    """A required option naming a file."""
    return click.option(
        flag, type=click.Path(dir_okay=False, path_type=Path), required=True, help=help_text
    )


def load_or_exit(path: Path) -> Params:
    """Read and validate ``path``; on a bad file print why and exit with code 2, writing nothing."""
    try:
        return load_params(path)
    except ParamsError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
