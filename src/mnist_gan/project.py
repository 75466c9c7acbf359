"""Where the project is: its root, also seen from a DVC temporary copy, and its tracking store.

The one place that resolves the MLflow tracking URI, for the stages (``pipeline/tracking.py``)
and the ``mnist-gan`` command alike, so that both always use the same store. It reads only the
environment and the file system; MLflow itself is never imported here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["STORE_FILE", "project_root", "tracking_uri"]

STORE_FILE = "mlflow.db"  # the default tracking store, a SQLite file at the project root


def project_root(start: Path | None = None) -> Path:
    """The project's own root, also when DVC runs a stage in a temporary copy of the repository.

    ``dvc repro`` runs stages from the project root, but queued and ``--temp`` experiments run
    in a copy under ``<root>/.dvc/tmp/exps/<tmpdir>/`` that is deleted afterwards. In order:

    1. ``DVC_ROOT``, which DVC passes to every stage: the original root, also in a copy.
    2. The folder holding the innermost ``.dvc/tmp/exps`` above ``start`` (an older DVC, or a
       stage run by hand inside such a copy).
    3. The nearest folder up from ``start`` that holds ``dvc.yaml`` (the command run from a
       subfolder).
    4. ``start`` itself (outside any project).

    Args:
        start: Where to look from; default the current folder.

    Returns:
        The root, as an absolute path.
    """
    here = (start or Path.cwd()).resolve()
    env = os.environ.get("DVC_ROOT", "").strip()
    if env and Path(env).is_dir():
        return Path(env).resolve()
    parts = here.parts
    for i in range(len(parts) - 3, 0, -1):  # the innermost .dvc/tmp/exps/<tmpdir>
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return next((p for p in (here, *here.parents) if (p / "dvc.yaml").is_file()), here)


def tracking_uri(start: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set; else the SQLite store at :func:`project_root`.

    The SQLite path is absolute, so that queued DVC experiments, which run in temporary
    copies of the repository, log into the project's store and not into one that vanishes
    with the copy.

    Args:
        start: Where to look for the project from; default the current folder.

    Returns:
        The tracking URI, e.g. ``sqlite:////home/me/mnist-gan/mlflow.db``.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    return uri or f"sqlite:///{project_root(start) / STORE_FILE}"
