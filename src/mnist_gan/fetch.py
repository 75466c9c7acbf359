"""Download the four MNIST files from a list of mirrors, verified by SHA-256.

A mirror is an http(s) URL, a ``file://`` URL or a local folder. It may hold each file gzipped
(``<name>.gz``, tried first) or plain (``<name>``). Every file is stored decompressed and is
accepted only when the SHA-256 of its decompressed bytes matches the expected digest, so where
a file came from never changes what the pipeline sees.

Writes are atomic: a download goes to a hidden temporary file in the output folder and is renamed
into place only once its checksum passes. A file already present with the right checksum is
kept. When no mirror yields a file, :class:`FetchError` lists every mirror and what went wrong
there; the output folder keeps the good files it had, and no temporary file is left behind.

This module uses only the standard library (``tqdm`` only when a progress bar is shown).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import secrets
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

__all__ = ["MNIST_SHA256", "FetchError", "fetch_mnist"]

# SHA-256 of the decompressed canonical files (as listed in the shared mirror's README).
MNIST_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

_CHUNK = 1 << 16
_USER_AGENT = "mnist-gan-fetch/0.1"
_PART = ".part"  # suffix of our temporary files, so stale ones from a killed run can be removed


class FetchError(RuntimeError):
    """No mirror yielded one or more files.

    Attributes:
        problems: One line per file and mirror: ``<file> from <mirror>: <what went wrong>``.
    """

    def __init__(self, summary: str, problems: Sequence[str]) -> None:
        self.summary = summary
        self.problems = list(problems)
        super().__init__("\n".join([summary, *(f"  {p}" for p in self.problems)]))


class _Transient(Exception):
    """A failure worth retrying on the same mirror (timeout, dropped connection, HTTP 5xx)."""


class _Unreachable(_Transient):
    """The mirror itself did not answer; later files skip it instead of waiting again."""


class _NotFound(Exception):
    """The mirror does not hold this file name (HTTP 404/410, missing local file)."""


class _Failed(Exception):
    """A definitive failure for this file on this mirror (bad checksum, bad gzip, HTTP 403)."""


def _tmp_file(out_dir: Path, name: str) -> Path:
    """Create a fresh hidden temporary file in ``out_dir``.

    Not ``tempfile.mkstemp``: its files are mode 0600, and the renamed file should get the
    usual permissions (0666 less the umask) like any other output.
    """
    while True:
        tmp = out_dir / f".{name}.{secrets.token_hex(4)}{_PART}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:  # pragma: no cover - a 32-bit random collision
            continue
        return tmp


def _describe_url_error(exc: BaseException, timeout: float) -> str:
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    if isinstance(reason, TimeoutError):  # socket.timeout is an alias
        return f"timed out (no data for {timeout:g} s)"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason) or type(reason).__name__


def _download(url: str, dest: Path, timeout: float, progress: bool, label: str) -> None:
    """Stream ``url`` into ``dest``.

    Raises:
        _NotFound: HTTP 404 or 410.
        _Unreachable: The server could not be reached or did not answer in time.
        _Transient: The transfer broke off, or the server answered 5xx or 429.
        _Failed: Any other HTTP error status.
    """
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        # ``timeout`` is a socket timeout: it bounds the connection and every read, so a server
        # that stalls is abandoned after ``timeout`` seconds without data.
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        status = f"HTTP {exc.code} {exc.reason}".rstrip()
        exc.close()
        if exc.code in (404, 410):
            raise _NotFound(status) from None
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(status) from None
        raise _Failed(status) from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
        raise _Unreachable(_describe_url_error(exc, timeout)) from None

    received = 0
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    bar = None
    if progress:
        from tqdm import tqdm  # imported only for a terminal: the library needs no tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False)
    try:
        with response, open(dest, "wb") as f:
            while block := response.read(_CHUNK):
                f.write(block)
                received += len(block)
                if bar is not None:
                    bar.update(len(block))
    except TimeoutError:
        raise _Transient(f"timed out after {received} bytes (no data for {timeout:g} s)") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(f"transfer broke off after {received} bytes: {exc}") from None
    finally:
        if bar is not None:
            bar.close()
    if total is not None and received < total:
        raise _Transient(f"connection closed after {received} of {total} bytes")


def _verify_copy(src: Path, gz: bool, dest: Path, expected: str, shown: str) -> None:
    """Decompress (or copy) ``src`` into ``dest`` and check the SHA-256 of what was written.

    Args:
        src: The downloaded or local file.
        gz: Whether ``src`` is gzipped.
        dest: The temporary file to fill.
        expected: The SHA-256 the decompressed bytes must have.
        shown: How the source is named in an error (the file name on the mirror).

    Raises:
        _Failed: ``src`` is not valid gzip data, or the checksum does not match.
    """
    digest = hashlib.sha256()
    try:
        with open(src, "rb") as raw, open(dest, "wb") as out:
            reader: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
            while block := reader.read(_CHUNK):
                digest.update(block)
                out.write(block)
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise _Failed(f"{shown} is not valid gzip data ({exc})") from None
    actual = digest.hexdigest()
    if actual != expected:
        raise _Failed(
            f"checksum mismatch for {shown}: decompressed SHA-256 is {actual[:16]}..., "
            f"expected {expected[:16]}..."
        )


def _mirror_kind(mirror: str) -> tuple[str, str | Path]:
    """Classify a mirror: ``("http", base_url)`` or ``("local", folder)``.

    Raises:
        _Failed: An unsupported URL scheme or a ``file://`` URL naming another host.
    """
    parsed = urllib.parse.urlparse(mirror)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return "http", mirror if mirror.endswith("/") else mirror + "/"
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise _Failed(
                f"file:// URL names host {parsed.netloc!r}; only local files are supported"
            )
        return "local", Path(urllib.request.url2pathname(parsed.path))
    # A Windows drive letter parses as a one-letter scheme; anything longer is a real scheme.
    if len(scheme) > 1 and "://" in mirror:
        raise _Failed(f"unsupported mirror scheme {scheme!r} (use http(s)://, file:// or a folder)")
    return "local", Path(mirror).expanduser()


def _from_local(folder: Path, name: str, tmp: Path, expected: str) -> None:
    """Verify a file from a local folder into ``tmp`` (``<name>.gz`` first, then ``<name>``)."""
    if not folder.is_dir():
        raise _Failed(f"no such folder {folder}")
    for candidate, gz in ((f"{name}.gz", True), (name, False)):
        src = folder / candidate
        if src.is_file():
            try:
                _verify_copy(src, gz, tmp, expected, candidate)
            except OSError as exc:
                raise _Failed(f"cannot read {candidate}: {exc.strerror or exc}") from None
            return
    raise _NotFound(f"not found (looked for {name}.gz and {name})")


def _from_http(
    base: str,
    name: str,
    tmp: Path,
    expected: str,
    *,
    timeout: float,
    retries: int,
    backoff: float,
    progress: bool,
    sleep: Callable[[float], None],
) -> None:
    """Download and verify ``<name>.gz`` (or, when the mirror lacks it, ``<name>``) into ``tmp``."""
    not_found: list[str] = []
    for candidate, gz in ((f"{name}.gz", True), (name, False)):
        url = urllib.parse.urljoin(base, candidate)
        raw = _tmp_file(tmp.parent, name)
        try:
            delay = backoff
            for attempt in range(1, retries + 1):
                try:
                    _download(url, raw, timeout, progress, candidate)
                    break
                except _Transient as exc:
                    if attempt == retries:
                        noun = "attempt" if retries == 1 else "attempts"
                        raise type(exc)(f"{exc} ({retries} {noun})") from None
                    # Exponential backoff: a struggling server gets more room each time.
                    sleep(delay)
                    delay *= 2
            _verify_copy(raw, gz, tmp, expected, candidate)
            return
        except _NotFound as exc:
            not_found.append(f"{candidate}: {exc}")
        finally:
            raw.unlink(missing_ok=True)
    raise _NotFound("; ".join(not_found))


def _remove_stale_parts(out_dir: Path, names: Sequence[str]) -> None:
    """Remove temporary files a killed earlier run left behind (only our own pattern)."""
    for name in names:
        for stale in out_dir.glob(f".{name}.*{_PART}"):
            stale.unlink(missing_ok=True)


def fetch_mnist(
    out_dir: str | Path,
    mirrors: Sequence[str],
    *,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    expected: Mapping[str, str] | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, str]:
    """Fetch the MNIST files into ``out_dir``, decompressed and verified.

    Args:
        out_dir: The folder for the decompressed files (created if missing).
        mirrors: Mirrors in the order to try them: http(s) URLs, ``file://`` URLs or folders.
        timeout: Seconds without data after which a connection or download is abandoned.
        retries: Attempts per file on an http mirror before the next mirror is tried; only
            transient failures (timeouts, broken transfers, HTTP 5xx) are retried.
        backoff: Seconds before the first retry; doubled after each further failure.
        expected: File name -> SHA-256 of its decompressed bytes. Its keys are the files
            fetched. Defaults to :data:`MNIST_SHA256`; tests pass digests of synthetic files.
        progress: Show a tqdm progress bar for downloads. ``None``: only when stderr is a
            terminal.
        log: Called with one line per file saying where it came from.
        sleep: The function that waits between retries (tests replace it).

    Returns:
        File name -> where it came from: the mirror, or ``"already present"``.

    Raises:
        FetchError: Some file could be fetched from no mirror. Its ``problems`` list each
            file and mirror and what went wrong; files fetched meanwhile are kept.
    """
    expected = dict(MNIST_SHA256 if expected is None else expected)
    if progress is None:
        progress = sys.stderr.isatty()
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_parts(out_dir, list(expected))

    sources: dict[str, str] = {}
    problems: list[str] = []
    missing: list[str] = []
    dead: dict[str, str] = {}  # mirror -> why it was unreachable, so later files skip it
    for name, digest in expected.items():
        target = out_dir / name
        if target.is_file() and _sha256(target) == digest:
            sources[name] = "already present"
            if log:
                log(f"{name}: already present, checksum ok")
            continue
        here: list[str] = []
        for mirror in mirrors:
            if mirror in dead:
                here.append(f"{name} from {mirror}: skipped, unreachable earlier ({dead[mirror]})")
                continue
            tmp = _tmp_file(out_dir, name)
            try:
                kind, where = _mirror_kind(mirror)
                if kind == "http":
                    _from_http(
                        str(where),
                        name,
                        tmp,
                        digest,
                        timeout=timeout,
                        retries=retries,
                        backoff=backoff,
                        progress=progress,
                        sleep=sleep,
                    )
                else:
                    _from_local(Path(where), name, tmp, digest)
                os.replace(tmp, target)
            except _Unreachable as exc:
                dead[mirror] = str(exc)
                here.append(f"{name} from {mirror}: {exc}")
            except (_Transient, _NotFound, _Failed) as exc:
                here.append(f"{name} from {mirror}: {exc}")
            except OSError as exc:  # writing the output folder failed: no mirror can help
                here.append(f"{name} from {mirror}: cannot write {out_dir}: {exc}")
            else:
                sources[name] = mirror
                if log:
                    log(f"{name}: fetched from {mirror}")
                break
            finally:
                tmp.unlink(missing_ok=True)
        else:
            missing.append(name)
            problems.extend(here or [f"{name}: no mirrors given (MNIST_MIRROR, fetch.mirrors)"])

    if missing:
        if created:
            with suppress(OSError):
                out_dir.rmdir()  # only if empty: nothing that was there before is removed
        raise FetchError(
            f"could not fetch {len(missing)} of {len(expected)} MNIST files into {out_dir} "
            f"({', '.join(missing)}) from {len(mirrors)} mirror(s):",
            problems,
        )
    return sources


def _sha256(path: Path) -> str:
    # Not utils.sha256_file: that module imports torch, which the fetch stage does not need.
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
