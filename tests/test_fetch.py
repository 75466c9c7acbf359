"""The fetch stage: mirrors, checksums, timeouts, retries and clean failure.

HTTP tests use real ``http.server`` instances on 127.0.0.1 (free ports, stopped by the fixtures)
serving tiny synthetic IDX files; their checksums are injected. The flipped-byte tests use a copy
of the real local mirror with the real checksums.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import shutil
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import load_stage

from mnist_gan.fetch import MNIST_SHA256, FetchError, fetch_mnist

ROOT = Path(__file__).resolve().parents[1]
NAMES = list(MNIST_SHA256)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours proxy variables; loopback servers must be reached directly.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


# --- synthetic data -------------------------------------------------------------------------


def idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 2051, *images.shape) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


class Synthetic:
    """Tiny IDX files under the real names, as plain files and gzipped, with their digests."""

    def __init__(self, root: Path) -> None:
        rng = np.random.default_rng(0)
        self.content = {
            "train-images-idx3-ubyte": idx_images(rng.integers(0, 256, (5, 28, 28))),
            "train-labels-idx1-ubyte": idx_labels(np.arange(5)),
            "t10k-images-idx3-ubyte": idx_images(rng.integers(0, 256, (3, 28, 28))),
            "t10k-labels-idx1-ubyte": idx_labels(np.array([7, 8, 9])),
        }
        self.expected = {n: hashlib.sha256(b).hexdigest() for n, b in self.content.items()}
        self.plain = root / "plain"
        self.gz = root / "gz"
        self.plain.mkdir(parents=True)
        self.gz.mkdir(parents=True)
        for name, data in self.content.items():
            (self.plain / name).write_bytes(data)
            (self.gz / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))

    def corrupted(self, dest: Path, name: str) -> Path:
        """A gz mirror like ``self.gz`` but with one flipped byte in ``name``'s content."""
        shutil.copytree(self.gz, dest)
        data = bytearray(self.content[name])
        data[-1] ^= 0xFF
        (dest / f"{name}.gz").write_bytes(gzip.compress(bytes(data), mtime=0))
        return dest


@pytest.fixture
def synth(tmp_path: Path) -> Synthetic:
    return Synthetic(tmp_path / "mirrors")


def assert_fetched(out: Path, synth: Synthetic) -> None:
    """The folder holds exactly the four verified files and nothing else (no temp files)."""
    assert sorted(p.name for p in out.iterdir()) == sorted(NAMES)
    for name, data in synth.content.items():
        assert (out / name).read_bytes() == data


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --- servers --------------------------------------------------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """Start HTTP servers on 127.0.0.1 (free ports); all are shut down after the test."""
    servers: list[tuple[ThreadingHTTPServer, threading.Thread]] = []

    def start(directory: Path, handler: type[SimpleHTTPRequestHandler] = QuietHandler) -> str:
        server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
        )
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class Stalled(str):
    """The URL of a server that accepts connections but never answers; counts them."""

    connections: list[socket.socket]


@pytest.fixture
def stalled_url() -> Iterator[Stalled]:
    """A server that accepts connections but never answers a byte."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    url = Stalled(f"http://127.0.0.1:{sock.getsockname()[1]}/")
    url.connections = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # the socket closed at the end of the test
            while True:
                url.connections.append(sock.accept()[0])  # held open, never answered

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield url
    sock.close()
    for conn in url.connections:
        conn.close()


FAST = {"timeout": 2.0, "retries": 2, "backoff": 0.0}


# --- the library ----------------------------------------------------------------------------


def test_good_http_mirror_gz(tmp_path: Path, synth: Synthetic, serve) -> None:
    url = serve(synth.gz)
    out = tmp_path / "raw"
    sources = fetch_mnist(out, [url], expected=synth.expected, **FAST)
    assert sources == dict.fromkeys(NAMES, url)
    assert_fetched(out, synth)


def test_http_mirror_with_plain_files_and_no_trailing_slash(
    tmp_path: Path, synth: Synthetic, serve
) -> None:
    shutil.copytree(synth.plain, tmp_path / "site" / "mnist")
    url = serve(tmp_path / "site") + "mnist"  # no trailing slash: still a folder
    out = tmp_path / "raw"
    sources = fetch_mnist(out, [url], expected=synth.expected, **FAST)
    assert set(sources.values()) == {url}
    assert_fetched(out, synth)


def test_corrupted_file_falls_through_to_next_mirror(
    tmp_path: Path, synth: Synthetic, serve
) -> None:
    bad = serve(synth.corrupted(tmp_path / "bad", "train-images-idx3-ubyte"))
    good = serve(synth.plain)
    out = tmp_path / "raw"
    sources = fetch_mnist(out, [bad, good], expected=synth.expected, **FAST)
    assert sources["train-images-idx3-ubyte"] == good
    assert sources["t10k-labels-idx1-ubyte"] == bad  # the mirror's other files were fine
    assert_fetched(out, synth)


def test_404_is_reported_and_next_mirror_used(tmp_path: Path, synth: Synthetic, serve) -> None:
    (tmp_path / "empty").mkdir()
    empty = serve(tmp_path / "empty")
    good = serve(synth.gz)
    out = tmp_path / "raw"
    assert set(fetch_mnist(out, [empty, good], expected=synth.expected, **FAST).values()) == {good}
    assert_fetched(out, synth)

    with pytest.raises(FetchError) as err:
        fetch_mnist(tmp_path / "raw2", [empty], expected=synth.expected, **FAST)
    assert len(err.value.problems) == 4
    for name, problem in zip(NAMES, err.value.problems, strict=True):
        assert problem.startswith(f"{name} from {empty}: ")
        assert "HTTP 404" in problem and f"{name}.gz" in problem
    assert not (tmp_path / "raw2").exists()  # it created the folder, so it removes it again


@pytest.mark.timeout(60)
def test_stalled_server_is_abandoned_after_timeout(
    tmp_path: Path, synth: Synthetic, stalled_url: Stalled, serve
) -> None:
    good = serve(synth.gz)
    out = tmp_path / "raw"
    sources = fetch_mnist(
        out, [stalled_url, good], expected=synth.expected, timeout=0.5, retries=2, backoff=0.0
    )
    assert set(sources.values()) == {good}
    assert_fetched(out, synth)
    # Two attempts on the first file, each abandoned after 0.5 s without data (the message
    # below); the three later files skip the dead mirror. The pytest timeout above catches a
    # fetch that waits forever.
    assert len(stalled_url.connections) == 2

    with pytest.raises(FetchError) as err:
        fetch_mnist(
            tmp_path / "raw2",
            [stalled_url],
            expected=synth.expected,
            timeout=0.5,
            retries=1,
            backoff=0.0,
        )
    first, *rest = err.value.problems
    assert "timed out (no data for 0.5 s)" in first and stalled_url in first
    assert all("skipped, unreachable earlier" in p for p in rest)


def test_transient_errors_are_retried_with_exponential_backoff(
    tmp_path: Path, synth: Synthetic, serve
) -> None:
    hits: list[str] = []

    class Failing(QuietHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_error(503)

    url = serve(synth.gz, Failing)
    waits: list[float] = []
    with pytest.raises(FetchError) as err:
        fetch_mnist(
            tmp_path / "raw",
            [url],
            expected=synth.expected,
            timeout=2.0,
            retries=3,
            backoff=0.25,
            sleep=waits.append,
        )
    # Three attempts per file on the .gz (a server error is not "not found": no plain try).
    assert hits == [f"/{n}.gz" for n in NAMES for _ in range(3)]
    assert waits == [0.25, 0.5] * 4
    assert all("HTTP 503" in p and "(3 attempts)" in p for p in err.value.problems)


def test_truncated_transfer_is_retried(tmp_path: Path, synth: Synthetic, serve) -> None:
    served: dict[str, int] = {}

    class CutOnce(QuietHandler):
        def do_GET(self) -> None:
            served[self.path] = served.get(self.path, 0) + 1
            if served[self.path] > 1:
                return super().do_GET()
            body = (synth.gz / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])  # then the connection closes

    url = serve(synth.gz, CutOnce)
    waits: list[float] = []
    out = tmp_path / "raw"
    fetch_mnist(
        out, [url], expected=synth.expected, timeout=2.0, retries=2, backoff=0.1, sleep=waits.append
    )
    assert served == {f"/{n}.gz": 2 for n in NAMES}
    assert waits == [0.1] * 4
    assert_fetched(out, synth)


def test_file_url_and_plain_folder_mirrors(tmp_path: Path, synth: Synthetic) -> None:
    out = tmp_path / "a"
    sources = fetch_mnist(out, [synth.gz.as_uri()], expected=synth.expected, **FAST)
    assert set(sources.values()) == {synth.gz.as_uri()}
    assert_fetched(out, synth)

    out = tmp_path / "b"
    sources = fetch_mnist(out, [str(synth.plain)], expected=synth.expected, **FAST)
    assert set(sources.values()) == {str(synth.plain)}
    assert_fetched(out, synth)


def test_present_good_file_is_kept_and_bad_one_replaced(tmp_path: Path, synth: Synthetic) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    keep = out / "train-labels-idx1-ubyte"
    keep.write_bytes(synth.content[keep.name])
    stat = keep.stat()
    (out / "t10k-labels-idx1-ubyte").write_bytes(b"junk")  # wrong checksum: fetched again
    sources = fetch_mnist(out, [str(synth.gz)], expected=synth.expected, **FAST)
    assert sources[keep.name] == "already present"
    assert sources["t10k-labels-idx1-ubyte"] == str(synth.gz)
    assert keep.stat().st_ino == stat.st_ino and keep.stat().st_mtime_ns == stat.st_mtime_ns
    assert_fetched(out, synth)
    # Everything present: no mirror is needed at all.
    assert fetch_mnist(out, [], expected=synth.expected) == dict.fromkeys(NAMES, "already present")


def test_every_mirror_bad_names_each_and_keeps_output(
    tmp_path: Path, synth: Synthetic, serve, stalled_url: str
) -> None:
    (tmp_path / "empty").mkdir()
    not_found = serve(tmp_path / "empty")
    corrupt = synth.corrupted(tmp_path / "bad", "train-images-idx3-ubyte")
    (corrupt / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    (corrupt / "train-labels-idx1-ubyte.gz").unlink()
    mirrors = [not_found, str(corrupt), stalled_url, "ftp://example.invalid/mnist/"]
    out = tmp_path / "raw"
    out.mkdir()
    (out / "train-labels-idx1-ubyte").write_bytes(b"an old, wrong file: left alone")
    (out / "notes.txt").write_text("not ours")
    before = listing(out)
    with pytest.raises(FetchError) as err:
        fetch_mnist(out, mirrors, expected=synth.expected, timeout=0.5, retries=1, backoff=0.0)
    text = str(err.value)
    assert "could not fetch 3 of 4 MNIST files" in text
    problems = [p for p in err.value.problems if p.startswith("train-images-idx3-ubyte")]
    assert len(problems) == len(mirrors)
    for mirror, problem in zip(mirrors, problems, strict=True):
        assert problem.startswith(f"train-images-idx3-ubyte from {mirror}: ")
    assert "HTTP 404" in problems[0]
    assert "checksum mismatch for train-images-idx3-ubyte.gz" in problems[1]
    assert "timed out" in problems[2]
    assert "unsupported mirror scheme 'ftp'" in problems[3]
    assert any("t10k-images-idx3-ubyte.gz is not valid gzip data" in p for p in err.value.problems)
    # The files the corrupt mirror held intact were fetched; the rest is as it was.
    assert (out / "t10k-labels-idx1-ubyte").read_bytes() == synth.content["t10k-labels-idx1-ubyte"]
    after = listing(out)
    after.pop("t10k-labels-idx1-ubyte")
    assert after == before


def test_no_mirrors_at_all(tmp_path: Path, synth: Synthetic) -> None:
    with pytest.raises(FetchError, match="no mirrors given"):
        fetch_mnist(tmp_path / "raw", [], expected=synth.expected)


def test_progress_bar_only_when_asked(
    tmp_path: Path, synth: Synthetic, serve, capsys: pytest.CaptureFixture[str]
) -> None:
    url = serve(synth.gz)
    fetch_mnist(tmp_path / "a", [url], expected=synth.expected, **FAST)  # stderr: not a tty
    assert capsys.readouterr().err == ""
    fetch_mnist(tmp_path / "b", [url], expected=synth.expected, progress=True, **FAST)
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err


# --- the stage script -----------------------------------------------------------------------


def write_params(path: Path, **fetch: object) -> Path:
    body = "\n".join(f"  {k}: {v}" for k, v in fetch.items())
    path.write_text(f"fetch:\n{body}\n")
    return path


def test_stage_every_mirror_bad_exits_1_naming_each_mirror(
    tmp_path: Path, synth: Synthetic, serve, shared_mirror: Path
) -> None:
    (tmp_path / "empty").mkdir()
    not_found = serve(tmp_path / "empty")
    corrupt = str(synth.plain)  # real names, synthetic content: every checksum fails
    missing = (tmp_path / "nowhere").as_uri()
    params = write_params(tmp_path / "params.yaml", mirrors="[]", timeout=1, retries=1, backoff=0)
    out = tmp_path / "raw"
    out.mkdir()
    good = out / "t10k-labels-idx1-ubyte"  # a real, verified file: kept, not fetched
    good.write_bytes(gzip.decompress((shared_mirror / f"{good.name}.gz").read_bytes()))
    before = listing(out)
    stage = load_stage("fetch")
    result = CliRunner().invoke(
        stage.main,
        ["--out", str(out), "--params", str(params)],
        env={"MNIST_MIRROR": f"{not_found}, {corrupt},{missing}"},
    )
    assert result.exit_code == 1, result.output
    assert "error: could not fetch 3 of 4 MNIST files" in result.stderr
    for name in NAMES[:3]:
        for mirror, why in [
            (not_found, "HTTP 404"),
            (corrupt, "checksum mismatch"),
            (missing, "no such folder"),
        ]:
            line = next(x for x in result.stderr.splitlines() if f"{name} from {mirror}:" in x)
            assert why in line
    assert f"{good.name}: already present" in result.stderr
    assert listing(out) == before


@pytest.mark.parametrize("where", ["decompressed", "gzip stream"])
def test_real_mirror_with_flipped_byte_is_rejected(
    tmp_path: Path, shared_mirror: Path, where: str
) -> None:
    mirror = tmp_path / "mirror"
    shutil.copytree(shared_mirror, mirror)
    name = "t10k-labels-idx1-ubyte"
    gz = mirror / f"{name}.gz"
    if where == "decompressed":
        data = bytearray(gzip.decompress(gz.read_bytes()))
        data[100] ^= 0x01  # one label changes: a valid file, just not MNIST
        gz.unlink()
        (mirror / name).write_bytes(bytes(data))
        why = f"checksum mismatch for {name}: decompressed SHA-256"
    else:
        data = bytearray(gz.read_bytes())
        data[len(data) // 2] ^= 0x01
        gz.write_bytes(bytes(data))
        why = f"{name}.gz is not valid gzip data"
    params = write_params(tmp_path / "params.yaml", mirrors="[]", retries=1, backoff=0)
    out = tmp_path / "raw"
    stage = load_stage("fetch")
    result = CliRunner().invoke(
        stage.main, ["--out", str(out), "--params", str(params)], env={"MNIST_MIRROR": str(mirror)}
    )
    assert result.exit_code == 1, result.output
    problems = [x.strip() for x in result.stderr.splitlines() if x.startswith("  ")]
    assert len(problems) == 1
    assert problems[0].startswith(f"{name} from {mirror}: {why}")
    # The three good files are in place, the bad one is absent, and no temporary file is left.
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n in NAMES if n != name)
