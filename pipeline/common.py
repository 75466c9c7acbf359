"""What every stage script shares: reading params once, and failing cleanly on bad ones.

Stage scripts run as ``python pipeline/<stage>.py``, so this folder is on ``sys.path`` and they
import this module as ``common``. It holds no MLflow code (see ``tracking.py``), so the data
stages start quickly.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

import mnist_gan
from mnist_gan.params import Params, ParamsError, load_params
from mnist_gan.utils import sha256_file

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


def code_files(script: Path) -> dict[str, Path]:
    """The project code that runs in this stage, by the path ``dvc.yaml`` gives it.

    That is the stage script and every module of ``pipeline/`` and of the ``mnist_gan`` library
    that this process has imported; call it once the script's imports are done. A test holds
    ``dvc.yaml`` to the same list, so a checkpoint's code hash and the stage's deps agree.

    Args:
        script: The stage script (its ``__file__``).

    Returns:
        ``{"pipeline/train.py": path, "src/mnist_gan/models.py": path, ...}``, sorted.
    """
    here = Path(__file__).resolve().parent  # pipeline/
    library = Path(mnist_gan.__file__).resolve().parent  # src/mnist_gan/
    found = {f"pipeline/{Path(script).name}": Path(script).resolve()}
    for module in list(sys.modules.values()):
        path = Path(getattr(module, "__file__", None) or "/").resolve()
        if path.parent == here:
            found[f"pipeline/{path.name}"] = path
        elif path.is_relative_to(library):
            found[f"src/mnist_gan/{path.relative_to(library).as_posix()}"] = path
    return dict(sorted(found.items()))


def code_digest(script: Path) -> str:
    """One SHA-256 over the names and contents of :func:`code_files`."""
    h = hashlib.sha256()
    for name, path in code_files(script).items():
        h.update(f"{name}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()
