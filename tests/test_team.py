"""A team shares one DVC remote and one MLflow tracking server: proven with real servers.

Clone A runs the pipeline (tiny params) with a real ``mlflow server`` as its tracking store and
pushes its outputs and run cache to two remotes: a plain folder and an S3-compatible server
(moto, with IAM checks on). Clone B, a fresh ``git clone`` with an empty cache, pulls from each
and has nothing to rerun; then one ``train`` param change reruns only ``train`` and
``evaluate``. Both clones' runs are in the one tracking server. Bad credentials, an
unreachable remote and an unreachable tracking server fail clearly and lose nothing.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, copy_project, run
from servers import S3Server, free_port, mlflow_server, moto_s3
from teamkit import (
    SMALL_PARAMS,
    commit_all,
    digest,
    init_repo,
    set_params,
    stages_run,
    timed,
)

OUTPUTS = ("data/raw", "data/normalized", "data/reference", "models")  # the cached outputs
UP_TO_DATE = "Data and pipelines are up to date"


@dataclass
class Team:
    """The shared infrastructure, and clone A after it ran the pipeline and pushed."""

    work: Path
    origin: Path  # the team's git remote (bare)
    clone_a: Path
    s3: S3Server
    tracking_uri: str
    env: dict[str, str]  # what every member sets: the mirror and the tracking server
    seconds: dict[str, float] = field(default_factory=dict)

    def clone(self, name: str) -> Path:
        """A fresh ``git clone`` of the team's repository: no outputs, an empty DVC cache."""
        dest = self.work / name
        run(["git", "clone", "-q", str(self.origin), str(dest)], cwd=self.work)
        assert not (dest / ".dvc" / "cache").exists()
        assert not (dest / "models" / "gan").exists()
        return dest


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory, shared_mirror: Path) -> Iterator[Team]:
    """Start the servers, publish the project with both remotes, run and push from clone A."""
    work = tmp_path_factory.mktemp("team")
    with ExitStack() as stack:
        tracking = stack.enter_context(mlflow_server(work / "mlflow-server", wait=False))
        uri = tracking.uri
        s3 = stack.enter_context(moto_s3(work / "moto"))
        # Credentials reach DVC only through the environment here (clone B uses config.local).
        env = {"MNIST_MIRROR": str(shared_mirror), "MLFLOW_TRACKING_URI": uri, **s3.env}

        seed = copy_project(work / "seed")
        set_params(seed, SMALL_PARAMS)
        # The remotes' addresses are shared through git (.dvc/config); secrets never are.
        run(["dvc", "remote", "add", "folder", str(work / "folder-remote")], cwd=seed)
        run(["dvc", "remote", "add", "-d", "s3", f"s3://{s3.bucket}/cache"], cwd=seed)
        run(["dvc", "remote", "modify", "s3", "endpointurl", s3.endpoint], cwd=seed)
        init_repo(seed)
        origin = work / "origin.git"
        run(["git", "clone", "-q", "--bare", str(seed), str(origin)], cwd=work)

        t = Team(work, origin, work / "clone-a", s3, uri, env)
        run(["git", "clone", "-q", str(origin), str(t.clone_a)], cwd=work)
        tracking.wait_ready()
        out, t.seconds["a_repro"] = timed(["dvc", "repro"], cwd=t.clone_a, env=env)
        assert stages_run(out) == [
            "fetch", "normalize", "classifier", "reference", "train", "evaluate"
        ]  # fmt: skip
        commit_all(t.clone_a, "pipeline run by A")
        run(["git", "push", "-q", "origin", "main"], cwd=t.clone_a)
        for remote in ("folder", "s3"):
            _, t.seconds[f"a_push_{remote}"] = timed(
                ["dvc", "push", "-r", remote, "--run-cache"], cwd=t.clone_a, env=env
            )
        yield t
        # Seconds of each step, for the README's numbers (printed with -s; kept in the tmp dir).
        (work / "timings.json").write_text(json.dumps(t.seconds, indent=1))
        print(f"\nteam timings (s): {json.dumps(t.seconds)}")


@pytest.mark.slow
@pytest.mark.parametrize("remote", ["folder", "s3"])
def test_clone_b_pulls_instead_of_training(team: Team, remote: str) -> None:
    """B pulls A's outputs, reruns nothing, and a train param change reruns train and evaluate."""
    b = team.clone(f"clone-b-{remote}")
    env = dict(team.env)
    if remote == "s3":
        # B keeps its credentials in the git-ignored .dvc/config.local, not in its environment.
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.pop(key)
        run(["dvc", "remote", "modify", "--local", "s3", "access_key_id", team.s3.access_key], b)
        run(
            ["dvc", "remote", "modify", "--local", "s3", "secret_access_key", team.s3.secret_key], b
        )
        assert "config.local" in (b / ".dvc" / ".gitignore").read_text()
        assert team.s3.secret_key not in run(["git", "status", "--porcelain"], b).stdout

    start = time.perf_counter()
    run(["dvc", "pull", "-r", remote, "--run-cache"], cwd=b, env=env)
    status = run(["dvc", "status"], cwd=b, env=env).stdout
    repro = run(["dvc", "repro"], cwd=b, env=env)
    team.seconds[f"b_pull_status_repro_{remote}"] = time.perf_counter() - start

    assert UP_TO_DATE in status, status
    assert stages_run(repro.stdout) == [], repro.stdout
    assert UP_TO_DATE in repro.stdout
    mine, theirs = digest(b, OUTPUTS), digest(team.clone_a, OUTPUTS)
    assert "models/gan/generator.safetensors" in mine
    assert "models/classifier/classifier.safetensors" in mine
    assert mine == theirs  # byte-identical models and data
    assert (b / "metrics" / "evaluate.json").read_text() == (
        team.clone_a / "metrics" / "evaluate.json"
    ).read_text()

    set_params(b, {"train": {"lr_g": 0.0001}})
    out, team.seconds[f"b_rerun_{remote}"] = timed(["dvc", "repro"], cwd=b, env=env)
    assert stages_run(out) == ["train", "evaluate"], out
    assert digest(b, ["models/classifier"]) == digest(team.clone_a, ["models/classifier"])
    assert digest(b, ["models/gan"]) != digest(team.clone_a, ["models/gan"])

    # Both members' runs are on the one tracking server, with metrics, images and models.
    run_a = (team.clone_a / ".mlflow_run_id").read_text().strip()
    run_b = (b / ".mlflow_run_id").read_text().strip()
    assert run_a != run_b
    for run_id, lr_g in ((run_a, "0.0004"), (run_b, "0.0001")):
        check_tracked_run(
            team.tracking_uri, run_id, {"train.lr_g": lr_g}, team.work / f"downloads-{remote}"
        )


def check_tracked_run(uri: str, run_id: str, params: dict[str, str], tmp: Path) -> None:
    """The run on the server holds the params, train and evaluate metrics, images and a model."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    for key, value in params.items():
        assert float(got.data.params[key]) == float(value), key
    for key in ("loss_d", "loss_g", "fid", "precision", "coverage"):
        assert np.isfinite(got.data.metrics[key]), key
    assert len(client.get_metric_history(run_id, "loss_d")) == SMALL_PARAMS["train"]["epochs"]
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert [p for p in images if p.endswith(".png")], images
    # The generator, logged by this run, comes back through the server's artifact proxy.
    models = client.search_logged_models(
        [got.info.experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    assert [m.name for m in models] == ["generator"]
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=models[0].artifact_location, tracking_uri=uri, dst_path=str(tmp / run_id)
    )
    generator = mlflow.pyfunc.load_model(local)
    latent = SMALL_PARAMS["train"]["latent_dim"]
    samples = np.asarray(generator.predict(np.zeros((2, latent), dtype=np.float32)))
    assert samples.shape == (2, 1, 28, 28)
    assert samples.min() >= -1.0 and samples.max() <= 1.0
    # ...and registered on the server as a version of mnist-gan-generator, with evaluate's
    # metrics on it.
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = registry.search_model_versions(
        f"name = 'mnist-gan-generator' and run_id = '{run_id}'"
    )
    assert version.tags["generator_sha256"] == got.data.tags["generator_sha256"]
    assert float(version.tags["fid"]) == pytest.approx(got.data.metrics["fid"])


def workspace_state(project: Path) -> dict[str, str]:
    """SHA-256 of every file of the workspace and DVC cache (not .git, not DVC's own .dvc/tmp)."""
    skip = (project / ".git", project / ".dvc" / "tmp")
    return {
        str(p.relative_to(project)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(project.rglob("*"))
        if p.is_file() and not any(p.is_relative_to(s) for s in skip)
    }


@pytest.mark.slow
def test_bad_credentials_and_unreachable_remotes_fail_clearly_and_keep_local_data(
    team: Team,
) -> None:
    """Wrong keys and a dead endpoint give clear errors; no output or cached object is lost."""
    c = team.clone("clone-c")
    run(["dvc", "pull", "-r", "folder"], cwd=c, env=team.env)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run(["dvc", "remote", "add", "--local", "dead", f"s3://{team.s3.bucket}/cache"], cwd=c)
    run(["dvc", "remote", "modify", "--local", "dead", "endpointurl", dead], cwd=c)
    before = workspace_state(c)
    assert any(k.startswith(".dvc/cache/") for k in before)

    wrong_key = {**team.env, "AWS_ACCESS_KEY_ID": "AKIANOTAREALKEY00000"}
    wrong_secret = {**team.env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    refused = "Could not connect to the endpoint"
    attempts = [  # S3 answers a HEAD request with bad keys with a bare 403 Forbidden
        (["dvc", "push", "-r", "s3"], wrong_key, "Forbidden"),
        (["dvc", "pull", "-r", "s3"], wrong_secret, "Forbidden"),
        (["dvc", "push", "-r", "dead", "--run-cache"], team.env, refused),
        (["dvc", "pull", "-r", "dead"], team.env, refused),
    ]
    for cmd, env, why in attempts:
        res = run(cmd, cwd=c, env={**env, "AWS_MAX_ATTEMPTS": "2"}, check=False, timeout=300)
        text = res.stdout + res.stderr
        assert res.returncode != 0, f"{' '.join(cmd)} succeeded:\n{text}"
        assert "ERROR" in text and why in text, text
        assert "dead" not in cmd or dead in text, text  # the error names the endpoint
        assert workspace_state(c) == before, f"{' '.join(cmd)} changed local files"
    assert UP_TO_DATE in run(["dvc", "status"], cwd=c, env=team.env).stdout

    # A fresh clone whose remote is unreachable: an error, and its checkout stays as it was.
    d = team.clone("clone-d")
    run(["dvc", "remote", "add", "--local", "-d", "dead", f"s3://{team.s3.bucket}/cache"], cwd=d)
    run(["dvc", "remote", "modify", "--local", "dead", "endpointurl", dead], cwd=d)
    res = run(["dvc", "pull"], cwd=d, env={**team.env, "AWS_MAX_ATTEMPTS": "2"}, check=False)
    assert res.returncode != 0 and dead in res.stdout + res.stderr, res.stdout + res.stderr
    assert run(["git", "status", "--porcelain"], cwd=d).stdout == ""


@pytest.mark.slow
def test_unreachable_tracking_server_stops_train_before_training(team: Team) -> None:
    """A bad MLFLOW_TRACKING_URI fails at the start of train, naming the URI; no model is made."""
    e = team.clone("clone-e")
    run(["dvc", "pull", "-r", "folder"], cwd=e, env=team.env)
    set_params(e, {"train": {"epochs": 50}})  # would take minutes if it started training
    dead = f"http://127.0.0.1:{free_port()}"
    before = digest(e, ["models"])
    res = run(
        ["dvc", "repro", "train"], cwd=e, env={**team.env, "MLFLOW_TRACKING_URI": dead}, check=False
    )
    text = res.stdout + res.stderr
    assert res.returncode != 0, text
    assert dead in text and "tracking server" in text, text
    assert "epoch 1/" not in text  # the trainer never started: it checks before any work
    assert not (e / ".mlflow_run_id").exists()  # no run was started either
    # DVC clears a stage's outputs before running it: git still has the uncached metrics and
    # plots, the DVC cache the models, untouched.
    run(["git", "checkout", "--", "."], cwd=e)
    run(["dvc", "checkout"], cwd=e, env=team.env)
    assert digest(e, ["models"]) == before
    assert UP_TO_DATE in run(["dvc", "status"], cwd=e, env=team.env).stdout


# Fast checks of the helpers the stages rely on (no pipeline run, no MLflow server).


@pytest.fixture
def tracking_module() -> Iterator[object]:
    """``pipeline/tracking.py``, imported as the stage scripts import it."""
    sys.path.insert(0, str(ROOT / "pipeline"))
    try:
        import tracking

        yield tracking
    finally:
        sys.path.remove(str(ROOT / "pipeline"))


def test_project_root_inside_a_queued_experiment_is_the_original_root(
    tracking_module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a temp copy under .dvc/tmp/exps, the default store is still the project's mlflow.db."""
    from mnist_gan.project import project_root, tracking_uri

    assert tracking_module.tracking_uri is tracking_uri  # the stages' resolver is the library's
    root = tmp_path / "project"
    copy = root / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    copy.mkdir(parents=True)
    (copy / "dvc.yaml").write_text("stages: {}\n")  # the copy is a whole project too
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))  # what DVC passes to a queued run
    assert tracking_module.tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.delenv("DVC_ROOT")  # an older DVC, or the script run by hand in the copy
    assert project_root() == root
    assert tracking_uri() == f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.chdir(root)
    assert project_root() == root
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "src").mkdir()
    assert project_root(root / "src") == root  # from a subfolder: the nearest dvc.yaml up
    monkeypatch.setenv("MLFLOW_TRACKING_URI", " http://127.0.0.1:5000 ")
    assert tracking_uri() == "http://127.0.0.1:5000"


@contextmanager
def http_status_server(status: int, body: bytes = b"") -> Iterator[str]:
    """A loopback HTTP server that answers every GET with ``status`` and ``body``; yields its
    URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def silent_server() -> Iterator[str]:
    """A loopback port that accepts connections and never answers; yields its URL."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)  # the kernel completes the handshake; nobody reads or writes
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


# What an MLflow server answers for an experiment that does not exist yet (a new store).
NO_EXPERIMENT = json.dumps({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"}).encode()


def test_check_reachable_names_the_server_and_the_reason(
    tracking_module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead server, a silent one or no MLflow API fail at once, in one line; an MLflow
    server's answer passes. MLflow's retry settings are the user's again afterwards."""
    unreachable = tracking_module.TrackingUnreachable
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # minutes, if the probe retried
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(unreachable, match="cannot reach") as err:
        tracking_module.check_reachable(dead)
    assert time.perf_counter() - start < 5
    assert dead in str(err.value) and "Connection refused" in str(err.value)
    assert "MLFLOW_TRACKING_URI" in str(err.value) and "\n" not in str(err.value)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    with silent_server() as url, pytest.raises(unreachable, match="timed out") as err:
        start = time.perf_counter()
        tracking_module.check_reachable(url, timeout=1)
    assert time.perf_counter() - start < 5 and url in str(err.value)
    # A refused login (401) and a missing permission (403): a real auth-enabled server in
    # test_team_server.py.
    with http_status_server(404) as url, pytest.raises(unreachable, match="not an MLflow"):
        tracking_module.check_reachable(url)  # a web server, but no MLflow API there
    with http_status_server(404, NO_EXPERIMENT) as url:  # MLflow: a store without the experiment
        assert tracking_module.check_reachable(url) == url


def test_check_reachable_refuses_a_scheme_mlflow_has_no_store_for(tracking_module) -> None:
    unknown = tracking_module.TrackingUnreachable
    for uri in ("mlfow://localhost:5000", "s3://bucket/mlruns", "localhost:5000"):
        with pytest.raises(unknown, match="unknown scheme") as err:
            tracking_module.check_reachable(uri)
        assert repr(uri) in str(err.value) and "\n" not in str(err.value)


def test_check_reachable_refuses_a_store_in_a_missing_folder(
    tracking_module, tmp_path: Path
) -> None:
    """MLflow would make the folders of a mistyped path; the check stops instead, and a SQLite
    store in a folder that exists is created and passes."""
    missing = f"sqlite:///{tmp_path / 'no-such-folder' / 'mlflow.db'}"
    with pytest.raises(tracking_module.TrackingUnreachable, match="does not exist"):
        tracking_module.check_reachable(missing)
    assert not (tmp_path / "no-such-folder").exists()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking_module.check_reachable(store) == store
