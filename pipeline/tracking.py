"""MLflow glue shared by the train and evaluate stages (the library never imports MLflow)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def project_root() -> Path:
    """The folder the stage runs in: DVC runs every stage from the project root."""
    return Path.cwd().resolve()


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else a SQLite store at the project root (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{project_root() / 'mlflow.db'}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as ``section.key`` pairs; lists become their string form."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = value
    return out


def git_commit() -> str | None:
    """The commit the workspace is at, or None outside git."""
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def write_run_id(path: Path, run_id: str) -> None:
    """Record the train run's id for the evaluate stage (an uncached, git-ignored file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_run_id(path: Path) -> str | None:
    """The run id that train recorded, or None when there is none."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None
