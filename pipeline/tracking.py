"""MLflow glue for the stages: the store, runs and what they log (the library never imports MLflow).

The tracking URI comes from ``mnist_gan.project`` (the one resolver, shared with the
``mnist-gan`` command). The registered model and its versions are in ``registry.py``.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mnist_gan.project import tracking_uri as tracking_uri  # the one resolver, re-exported

EXPERIMENT = "mnist-gan"
# MLflow 3's UI shows an experiment of this kind as model training (runs, charts), not GenAI.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
GENERATOR_TAG = "generator_sha256"  # the SHA-256 of models/gan/generator.safetensors


class TrackingUnreachable(RuntimeError):
    """The tracking store that the URI names cannot be used; the message says which and why."""


PROBE_TIMEOUT = 10  # seconds for the probe's request (MLflow's default timeout is minutes)


@contextlib.contextmanager
def _one_try(timeout: float | None) -> Iterator[None]:
    """MLflow's own HTTP settings for one probe: no retries, and a short timeout.

    ``timeout`` wins; else an ``MLFLOW_HTTP_REQUEST_TIMEOUT`` the user set; else
    :data:`PROBE_TIMEOUT` (MLflow's default is minutes). The settings are put back afterwards,
    so the run's later calls retry as MLflow (or the user) would have them.
    """
    seconds = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT") or str(PROBE_TIMEOUT)
    if timeout is not None:
        seconds = str(max(1, math.ceil(timeout)))
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": seconds}
    saved = {key: os.environ.get(key) for key in probe}
    os.environ.update(probe)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# What in MLflow's message on a failed request says why the connection failed.
_CONNECTION = re.compile(r"\[Errno -?\d+\] [^'\"()]+|\[SSL: \w+\][^'\"()]*|\w+ timed out")


def _who() -> str:
    """Whom MLflow's client logs in as, from its own environment variables."""
    if user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
        return f"user {user!r}"
    return "a token" if os.environ.get("MLFLOW_TRACKING_TOKEN") else "no credentials"


def refusal(uri: str, exc: BaseException, need: str = f"READ on the experiment {EXPERIMENT}"
            ) -> str | None:  # fmt: skip
    """One line for a server's 401 (the login failed) or 403 (logged in, but ``need`` is
    missing); None for any other failure."""
    code = getattr(exc, "error_code", None)
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED"):
        return None
    who = _who()
    if code == "UNAUTHENTICATED":
        fix = ("check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" if "user" in who
               else "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD")  # fmt: skip
        return f"the login to the MLflow tracking server at {uri} failed with {who}: {fix}"
    return (f"the MLflow tracking server at {uri} denied {who} ({code}): ask its admin for "
            f"{need} (docs/team.md)")  # fmt: skip


def _unusable(uri: str, exc: BaseException) -> str:
    """One line naming the store and what failed, from what the probe raised."""
    from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

    stop = "stopping before any work"
    if isinstance(exc, UnsupportedModelRegistryStoreURIException):  # before any request
        scheme = uri.split(":", 1)[0] if ":" in uri else ""
        return (f"MLFLOW_TRACKING_URI={uri!r} has the unknown scheme {scheme!r}: give an MLflow "
                "server (http://host:port), a SQLite file (sqlite:////abs/path/mlflow.db) or "
                f"unset it for the project's mlflow.db; {stop}")  # fmt: skip
    if not uri.startswith(("http://", "https://")):
        return f"the MLflow tracking store {uri} cannot be used ({short(exc, 300)}); {stop}"
    if refused := refusal(uri, exc):
        return f"{refused}; {stop}"
    code = getattr(exc, "error_code", None)
    if code == "ENDPOINT_NOT_FOUND":  # a web server, but no MLflow REST API at that path
        return (f"{uri} is not an MLflow tracking server (HTTP 404 from its REST API): fix "
                f"MLFLOW_TRACKING_URI; {stop}")  # fmt: skip
    if found := _CONNECTION.search(str(exc)):
        return (f"cannot reach the MLflow tracking server at {uri} ({found.group().strip()}): "
                f"start it (`make server`) or fix MLFLOW_TRACKING_URI; {stop}")  # fmt: skip
    return f"the MLflow tracking server at {uri} failed ({short(exc)}); {stop}"


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a SQLite or file store; None for a server or another store."""
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme in ("file", ""):
        return Path(urllib.parse.unquote(parts.path))
    return None


def check_reachable(uri: str | None = None, timeout: float | None = None) -> str:
    """Fail fast, before any work, when the tracking store cannot be used.

    A stage's first MLflow call may come after minutes of work (evaluate scores first), and
    MLflow's client retries a dead server for minutes by default. So the stages ask the store
    once, up front, through MLflow's own client (its credentials, TLS settings and stores),
    with MLflow's retries off and a short timeout (:func:`_one_try`).

    Args:
        uri: The tracking URI; default :func:`tracking_uri`.
        timeout: Seconds to wait for a server's answer (default: see :func:`_one_try`).

    Returns:
        The URI that was checked.

    Raises:
        TrackingUnreachable: one line naming the URI and what is wrong.
    """
    import mlflow

    uri = uri or tracking_uri()
    path = local_store_path(uri)
    # MLflow creates a local store's missing folders, so a mistyped path would quietly get a
    # store of its own, away from the project's runs: refuse it instead.
    if path is not None and not path.parent.is_dir():
        raise TrackingUnreachable(
            f"the MLflow tracking store {uri} is in a folder that does not exist "
            f"({path.parent}): create it or fix MLFLOW_TRACKING_URI; stopping before any work"
        )
    with _one_try(timeout):
        try:
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.get_experiment_by_name(EXPERIMENT)  # None (a new store) will do
        except Exception as exc:  # whatever the store raises: one line, not a traceback
            raise TrackingUnreachable(_unusable(uri, exc)) from None
    return uri


def client_for_store() -> Any:
    """An ``MlflowClient`` on the stages' store (:func:`tracking_uri`), runs and registry both.

    Never MLflow's defaults: those follow the current folder (a queued experiment's temporary
    copy) or whatever registry URI was set last in the process.
    """
    import mlflow

    uri = tracking_uri()
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


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


DVC_TAGS = ("dvc_exp_name", "dvc_exp_baseline_rev")  # from DVC_EXP_NAME, DVC_EXP_BASELINE_REV


def run_tags(stage: str) -> dict[str, str]:
    """Tags that tie a run to its code and DVC experiment: stage, git commit, experiment names."""
    tags = {"stage": stage}
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit  # shown by the MLflow UI
    for env, tag in zip(("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"), DVC_TAGS, strict=True):
        value = os.environ.get(env, "").strip()
        if value:
            tags[tag] = value
    return tags


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, ``mlruns/`` beside the database file; else the server's default.

    MLflow's default is ``./mlruns`` under the current folder, which for a DVC experiment run
    in a temporary copy would vanish with the copy.
    """
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlruns").as_uri()


def start_run(
    stage: str,
    resume_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    system_metrics: bool = False,
) -> tuple[Any, bool]:
    """Start a run in the ``mnist-gan`` experiment, or reopen ``resume_run_id`` when it exists.

    The experiment is created on first use, tagged as a model-training one so that the MLflow
    UI opens on its training runs (not on the GenAI traces view).

    Args:
        stage: The stage name (run name unless ``DVC_EXP_NAME`` is set, and tag ``stage``).
        resume_run_id: A run to continue (e.g. from a training checkpoint).
        tags: More tags for a new run.
        system_metrics: Log CPU, memory (and GPU, with pynvml) use while the run is active.

    Returns:
        The active run and whether it was resumed.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # the registered models live in the same store
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        with contextlib.suppress(MlflowException):  # created meanwhile by a parallel run
            mlflow.create_experiment(
                EXPERIMENT, artifact_location=artifact_location(uri), tags=EXPERIMENT_TAGS
            )
    elif any(experiment.tags.get(k) != v for k, v in EXPERIMENT_TAGS.items()):
        for key, value in EXPERIMENT_TAGS.items():  # an experiment made before the tag existed
            client_for_store().set_experiment_tag(experiment.experiment_id, key, value)
    mlflow.set_experiment(EXPERIMENT)
    if resume_run_id:
        try:
            run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)
            return run, True
        except MlflowException:  # the run is not in this store (it moved or was deleted)
            pass
    run_name = os.environ.get("DVC_EXP_NAME") or stage
    run = mlflow.start_run(
        run_name=run_name,
        tags={**run_tags(stage), **(tags or {})},
        log_system_metrics=system_metrics,
    )
    return run, False


def find_generator_run(sha256: str, hint: str | None = None) -> str | None:
    """The run, in the current tracking store, that trained the generator with this SHA-256.

    The train stage tags its run with the hash of the weights it wrote; this is the only link
    from a model to a run that is trusted. When several runs wrote the same weights, ``hint``
    (the id the train stage last recorded) wins if it is one of them, else the newest.

    Returns:
        The run id, or None when no run of this store holds these weights (they came from
        another store, through DVC's cache).
    """
    client = client_for_store()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        f"tags.{GENERATOR_TAG} = '{sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    ids = [r.info.run_id for r in runs]
    if hint in ids:
        return hint
    return ids[0] if ids else None


def dvc_hash(folder: Path) -> str:
    """The hash DVC gives a folder (``<md5>.dir``, as in dvc.lock), computed by DVC's own code."""
    import hashlib

    from dvc_data.hashfile.tree import Tree

    entries = []
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        md5 = hashlib.md5()  # noqa: S324 - DVC's content hash, not a security measure
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                md5.update(block)
        entries.append({"relpath": path.relative_to(folder).as_posix(), "md5": md5.hexdigest()})
    tree = Tree.from_list(entries)
    tree.digest()
    return tree.hash_info.value


def log_training_data(folder: Path, images: Any) -> str:
    """Record ``folder`` as the run's training dataset; returns its DVC hash.

    The run page's Datasets section then names the data by the hash that ``dvc.lock`` gives
    ``data/normalized``, which is how DVC finds it again (``dvc get``, ``dvc checkout``).
    """
    import mlflow
    import numpy as np
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.types import Schema, TensorSpec

    digest = dvc_hash(folder)
    schema = Schema([TensorSpec(np.dtype(np.float32), (-1, *images.shape[1:]), "images")])
    dataset = MetaDataset(
        LocalArtifactDatasetSource(str(folder)), name=folder.as_posix(), digest=digest,
        schema=schema,
    )  # fmt: skip
    mlflow.log_input(dataset, context="training", tags={"dvc_hash": digest})
    return digest


def tracking_failures() -> tuple[type[BaseException], ...]:
    """What MLflow raises when its store fails or stops answering (to catch around logging calls).

    Not OSError: a full disk while writing a checkpoint is not the tracking store's failure.
    """
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException)


def short(exc: BaseException, limit: int = 160) -> str:
    """An exception in one short line (MLflow's messages span many)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def give_up_quickly() -> None:
    """Make later MLflow calls to a lost server fail at once (MLflow's exit hook ends the run).

    Without this, the hook would retry the dead server for minutes before the process exits.
    """
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"


def last_logged_step(run_id: str, key: str) -> int:
    """The highest step at which metric ``key`` was logged in ``run_id`` (0 when never)."""
    history = client_for_store().get_metric_history(run_id, key)
    return max((m.step for m in history), default=0)


def log_image_grid(images: Any, key: str, step: int, nrow: int = 8) -> None:
    """Log images (B, 1, H, W) in [-1, 1] as one grid under ``key`` at ``step`` (a UI slider)."""
    import mlflow
    from torchvision.utils import make_grid

    grid = make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1))  # (3, H', W')
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")  # (H', W', 3)
    mlflow.log_image(array, key=key, step=step)
