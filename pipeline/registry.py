"""The registered model ``mnist-gan-generator``: its versions, their metrics and aliases.

The train stage logs and registers each generator it makes (:func:`log_generator_model`). The
evaluate stage logs its metrics linked to the logged model behind each version of those weights
(:func:`log_model_metrics`), and copies the headline ones onto the version as tags, for the UI
(:func:`tag_model_versions`). The promotion gate (``promote.py``) reads the logged model's
metrics, never the tags, which anyone with edit rights can change (:func:`version_metrics`), and
moves the aliases ``champion`` and ``challenger``. A version is always found by content: the
SHA-256 of its generator's weights. Everything runs in the stages' store
(``tracking.client_for_store``), registry and runs both.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
import urllib.parse
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tracking

REGISTERED_MODEL = "mnist-gan-generator"
# What the pyfunc model imports, pinned in its requirements (MLflow adds itself).
PYFUNC_PACKAGES = ("torch", "numpy", "safetensors", "pyyaml")
# evaluate's headline metrics, copied onto the registered version as tags (for the UI) once known.
HEADLINE_METRICS = (
    "fid",
    "is_mean",
    "precision",
    "recall",
    "coverage",
    "modes",
    "memorized_fraction",
    "real_memorized_fraction",
    "label_accuracy",
)
# What the promotion gate judges: a version without one of these cannot be compared.
GATE_METRICS = ("fid", "modes", "memorized_fraction", "real_memorized_fraction")


def log_generator_model(
    model_dir: Path,
    latent_dim: int,
    conditional: bool,
    example: Any,
    generator_sha256: str,
    params_sha256: str,
) -> str:
    """Log the generator into the active run as a pyfunc model and register it as a new version.

    The version of ``mnist-gan-generator`` is tagged with the git commit, the DVC experiment,
    the weights' SHA-256 and a hash of the train params (evaluate adds its headline metrics
    later). ``gan_pyfunc.py`` goes as code and ``model_dir`` as an artifact; nothing is
    pickled. MLflow also stores the ``mnist_gan`` package, so the model loads where the project
    is not installed, and pip requirements pinned to the versions installed here, which
    trained it.

    Args:
        model_dir: The GAN folder the train stage wrote.
        latent_dim: Width of the generator's noise input.
        conditional: Whether the generator also takes the digit asked for.
        example: Input rows for the model's example, (N, latent_dim [+ 1]).
        generator_sha256: SHA-256 of the generator's weights file.
        params_sha256: Hash of the train params that made it.

    Returns:
        The new version's number.
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec
    from packaging.version import Version

    import mnist_gan

    width = latent_dim + int(conditional)  # z, and the digit asked for when conditional
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, width))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),  # images
    )
    # The public version: a local one such as 2.11.0+cu128 is not on PyPI for the serving env.
    pins = [f"{p}=={Version(importlib.metadata.version(p)).public}" for p in PYFUNC_PACKAGES]
    # Quiet logs: no progress bar for the validation's artifact download, and no advice to
    # type-hint predict (the signature above is the schema).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hints? .*predict", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="generator",
            python_model=str(Path(__file__).with_name("gan_pyfunc.py")),
            artifacts={"gan": str(model_dir)},
            code_paths=[str(Path(mnist_gan.__file__).parent)],
            signature=signature,
            input_example=example,
            pip_requirements=pins,
            registered_model_name=REGISTERED_MODEL,
        )
    version = str(info.registered_model_version)
    tags = {k: v for k, v in tracking.run_tags("train").items()
            if k in ("git_commit", *tracking.DVC_TAGS)}  # fmt: skip
    tags.update({tracking.GENERATOR_TAG: generator_sha256, "params_sha256": params_sha256})
    client = tracking.client_for_store()
    for key, value in tags.items():
        client.set_model_version_tag(REGISTERED_MODEL, version, key, value)
    return version


def _versions_of(client: Any, generator_sha256: str) -> list[Any]:
    """Every registered version that holds the generator with this SHA-256."""
    return client.search_model_versions(
        f"name = '{REGISTERED_MODEL}' and tags.{tracking.GENERATOR_TAG} = '{generator_sha256}'"
    )


def tag_model_versions(generator_sha256: str, tags: Mapping[str, Any]) -> list[str]:
    """Set ``tags`` on every registered version that holds the generator with this SHA-256.

    Found by content, like the run (a run that resumed after a lost server, or two runs that
    made the same weights, may have registered more than one version of them).

    Returns:
        The versions tagged (none when no version holds these weights).
    """
    client = tracking.client_for_store()
    versions = _versions_of(client, generator_sha256)
    for v in versions:
        for key, value in tags.items():
            client.set_model_version_tag(REGISTERED_MODEL, v.version, key, str(value))
    return [v.version for v in versions]


def find_model_version(generator_sha256: str) -> Any:
    """The registered version of ``mnist-gan-generator`` that holds these generator weights.

    Raises:
        ValueError: No version does (they were trained with another tracking store, or not
            registered): one line saying so.
    """
    found = _versions_of(tracking.client_for_store(), generator_sha256)
    if not found:
        raise ValueError(
            f"no version of {REGISTERED_MODEL} in {tracking.tracking_uri()} holds the generator "
            f"with SHA-256 {generator_sha256[:12]}...: train it with this tracking store "
            "(dvc repro)"
        )
    return max(found, key=lambda v: int(v.version))


def logged_model_id(version: Any) -> str | None:
    """The id of the logged model a registered version was made from (None: it was registered
    from a run's or a folder's artifacts, not from a logged model).

    MLflow 3's SQL registry leaves ``version.model_id`` empty and records the logged model in
    the version's source, ``models:/<model_id>``, which no API call can change.
    """
    if getattr(version, "model_id", None):
        return version.model_id
    source = urllib.parse.urlparse(version.source or "")
    parts = source.path.strip("/").split("/")
    if source.scheme == "models" and len(parts) == 1 and parts[0].startswith("m-"):
        return parts[0]
    return None


def model_ids(generator_sha256: str) -> list[str]:
    """The logged models behind the registered versions that hold these generator weights."""
    versions = _versions_of(tracking.client_for_store(), generator_sha256)
    return [m for m in map(logged_model_id, versions) if m is not None]


def log_model_metrics(run_id: str, metrics: Mapping[str, float], models: list[str]) -> None:
    """Log ``metrics`` (step 0) into a run, each linked to every logged model in ``models``.

    Linked explicitly, not through MLflow's own rule (a run's step-0 metrics go to the models
    that run logged): evaluate may log into a run of its own, when the run that trained these
    weights is not in the store.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, 0, model_id=model, run_id=run_id)
             for model in models or [None] for key, value in metrics.items()]  # fmt: skip
    client = tracking.client_for_store()
    for start in range(0, len(batch), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=batch[start : start + 1000])


def version_metrics(version: Any) -> dict[str, float]:
    """The headline metrics of a registered version, from its logged model (the latest value of
    each, as evaluate logged them); the version's tags are not read.

    Raises:
        ValueError: the version has no logged model, or evaluate has not scored it yet.
    """
    model_id = logged_model_id(version)
    if model_id is None:
        raise ValueError(
            f"{REGISTERED_MODEL} version {version.version} was registered from {version.source}, "
            "not from a logged model: the gate reads metrics from logged models (MLflow 3); "
            "train it again (dvc repro -f train)"
        )
    logged = tracking.client_for_store().get_logged_model(model_id).metrics or []
    latest = {m.key: m.value for m in sorted(logged, key=lambda m: (m.timestamp, m.step))}
    missing = [k for k in GATE_METRICS if k not in latest]
    if missing:
        raise ValueError(
            f"{REGISTERED_MODEL} version {version.version} (logged model {model_id}) has no "
            f"{', '.join(missing)} yet: run the evaluate stage on it (dvc repro evaluate)"
        )
    return {k: float(latest[k]) for k in HEADLINE_METRICS if k in latest}


def alias_version(alias: str) -> Any | None:
    """The version under ``alias`` (e.g. ``champion``), or None when the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return tracking.client_for_store().get_model_version_by_alias(REGISTERED_MODEL, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def set_alias(alias: str, version: str) -> None:
    """Point ``alias`` of ``mnist-gan-generator`` at ``version``."""
    tracking.client_for_store().set_registered_model_alias(REGISTERED_MODEL, alias, version)
