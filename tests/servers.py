"""Real servers for the team tests: an S3-compatible store (moto) and an MLflow tracking server.

Each one runs as a subprocess bound to 127.0.0.1 on a free port, its output goes to a log file
(shown when it fails to start), readiness is polled with a bounded wait, and leaving the
``with`` block stops it (SIGTERM, then SIGKILL). Nothing here reaches beyond the loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's scripts: moto_server, mlflow
ROOT = Path(__file__).resolve().parents[1]

BUCKET = "mnist-gan-cache"
USER = "team-member"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this process has not
    handed out before: a server started without waiting may not have bound its port yet, and
    the OS can offer that port again (seen: moto got the port of an MLflow server still
    starting on a busy machine)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (OSError, urllib.error.URLError):
        return False


@dataclass
class ServerProcess:
    """A server started by :func:`server_process`."""

    proc: subprocess.Popen
    cmd: list[str]
    ready_url: str
    log: Path
    deadline: float  # time.monotonic() by which it must be ready

    def wait_ready(self) -> None:
        """Block until ``ready_url`` answers 2xx; fail with the server's log if it never does."""
        while not _http_ok(self.ready_url):
            if self.proc.poll() is not None or time.monotonic() > self.deadline:
                state = "exited" if self.proc.poll() is not None else "not ready in time"
                raise RuntimeError(
                    f"{' '.join(self.cmd)}: {state}\n{self.log.read_text(errors='replace')[-4000:]}"
                )
            time.sleep(0.3)


@contextmanager
def server_process(
    cmd: list[str],
    ready_url: str,
    log: Path,
    timeout: float = 90.0,
    env: dict | None = None,
    wait: bool = True,
) -> Iterator[ServerProcess]:
    """Run ``cmd`` until the ``with`` block ends.

    Args:
        cmd: the server's command line.
        ready_url: answers 2xx once the server is ready.
        log: file that receives the server's stdout and stderr.
        timeout: seconds from the start by which it must be ready.
        env: extra environment variables for the server.
        wait: wait for readiness before entering the block; else call ``wait_ready()`` later,
            so that other set-up work overlaps a slow start.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        # Own session, so stopping it also stops the workers it forks (mlflow's uvicorn).
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
    server = ServerProcess(proc, cmd, ready_url, log, time.monotonic() + timeout)
    try:
        if wait:
            server.wait_ready()
        yield server
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)  # mlflow's uvicorn can take longer; its SQLite store is safe to kill
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class S3Server:
    """A running moto server with one bucket and one IAM user whose keys may use it."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    aws_config: Path  # an empty AWS config, so that no ~/.aws profile of the machine applies

    @property
    def env(self) -> dict[str, str]:
        """The environment that gives DVC (boto) this user's credentials and no others."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_CONFIG_FILE": str(self.aws_config),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.aws_config),
        }


@contextmanager
def moto_s3(workdir: Path) -> Iterator[S3Server]:
    """An S3-compatible server that, like a real one, refuses unknown credentials.

    moto authenticates nothing until told to: the bucket, the user, its policy and its keys are
    made first, then ``/moto-api/reset-auth`` switches IAM checks on for every later request.
    """
    import boto3

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with server_process(cmd, f"{endpoint}/moto-api/", workdir / "moto.log"):
        admin = {
            "endpoint_url": endpoint,
            "region_name": "us-east-1",
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
        }
        boto3.client("s3", **admin).create_bucket(Bucket=BUCKET)
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName=USER)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName=USER, PolicyName="cache", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=USER)["AccessKey"]
        req = urllib.request.Request(
            f"{endpoint}/moto-api/reset-auth",
            data=b"0",  # authenticate every request from now on
            headers={"Content-Type": "text/plain"},  # a form type would hide the body
            method="POST",
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        aws_config = workdir / "aws-config"
        aws_config.write_text("")
        yield S3Server(endpoint, BUCKET, key["AccessKeyId"], key["SecretAccessKey"], aws_config)


@dataclass(frozen=True)
class TrackingServer:
    """A running (or starting) MLflow tracking server."""

    uri: str
    process: ServerProcess

    def wait_ready(self) -> None:
        """Block until the server answers its health check."""
        self.process.wait_ready()


@contextmanager
def mlflow_server(
    workdir: Path,
    wait: bool = True,
    port: int | None = None,
    options: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[TrackingServer]:
    """A tracking server as ``make server`` starts it (``pipeline/server.py serve``): by default
    a SQLite backend store and proxied artifacts under ``workdir``, no login.

    It takes seconds to start (tens on a busy machine): with ``wait=False`` the caller does
    other set-up first and calls ``wait_ready()`` before the first run. ``port``: a port to
    reuse (to restart a server where clients expect it), else a free one. ``options``: more
    ``serve`` options (``--auth basic``, ``--db postgresql``); ``env``: for the server (the
    admin's first password).
    """
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN / "python"),
        str(ROOT / "pipeline" / "server.py"),
        "serve",
        "--dir",
        str(workdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *options,
        "--",
        "--workers",
        "1",
    ]
    log = workdir / "mlflow.log"
    with server_process(cmd, f"{uri}/health", log, timeout=180, env=env, wait=wait) as proc:
        yield TrackingServer(uri, proc)
