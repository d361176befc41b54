"""Storage: the one module that touches fsspec. Local folders and s3:// prefixes alike.

Reads and listings retried on transient failures, writes all-or-nothing (a rename locally, one
PUT on an object store) and retried, and the one-line errors a storage failure becomes. Data,
checkpoints, teacher weights, maps and results all go through here (docs/design.md §6); the
listing of images with versions for bulk scoring is its neighbour `storage_listing`, the only
other module that touches fsspec. No Ray here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import posixpath
import random
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import fsspec
from fsspec.core import url_to_fs

from dskd_ray.errors import ConfigError, DSKDError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")


# --- file systems and URIs -------------------------------------------------------------------


# The S3 client's own retries nest under `with_retries`: botocore's (5 attempts in its legacy
# mode, each with its backoff) times s3fs's (5, for dropped connections) times ours (5) made
# an endpoint that refuses connections take 34–46 s to report, and one that drops them 200 s.
# botocore's are turned off unless the user configures them (AWS_MAX_ATTEMPTS,
# AWS_RETRY_MODE); s3fs's quick ones stay (≤ 2 s of waits), and ours are bounded in time.
S3_CLIENT_CONFIG = {"retries": {"max_attempts": 1}}


def filesystem(uri: str, **options: object) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, path without protocol and trailing slash) for a local path or URI."""
    if "://" not in uri:
        uri = os.path.abspath(os.path.expanduser(uri))
    elif uri_scheme(uri) in ("s3", "s3a") and not _botocore_retries_configured():
        options = {"config_kwargs": S3_CLIENT_CONFIG, **options}
    fs, path = url_to_fs(uri, **options)
    return fs, path.rstrip("/") or path


def _botocore_retries_configured() -> bool:
    return any(k in os.environ for k in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"))


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path as users write it: s3://bucket/key remotely, an absolute path locally."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def canonical_uri(uri: str) -> str:
    """`uri` as listings spell it: absolute locally, s3://bucket/key without a trailing slash."""
    return to_uri(*filesystem(uri))


# What INPUT and a manifest's rows may name without asking: local paths, file:// and s3://.
# Any other fsspec scheme (gs, az, http…) is read only when a run names it (--allow-scheme):
# a manifest is data, and its rows must not make the driver and every worker fetch URLs.
SUPPORTED_SCHEMES = ("s3", "file")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def uri_scheme(uri: str) -> str:
    """ "s3", "file", "gs", …; "" for a local path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else ""


def check_schemes(schemes: set[str], allowed: tuple[str, ...], where: str) -> None:
    """Refuse a scheme that is neither supported nor allowed, or allowed without a filesystem."""
    for scheme in sorted(schemes - {"", *SUPPORTED_SCHEMES}):
        if scheme not in allowed:
            raise ConfigError(
                f"{where} names a {scheme}:// URI: only local paths, file:// and s3:// are read "
                f"unless the run allows more (--allow-scheme {scheme})"
            )
    for scheme in allowed:
        check_filesystem(scheme)


def check_filesystem(scheme: str) -> None:
    """ConfigError unless fsspec has an installed filesystem for `scheme`."""
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"--allow-scheme {scheme}: {' '.join(str(e).split())}") from None


def join_uri(root: str, *parts: str) -> str:
    return posixpath.join(root.rstrip("/"), *parts)


# --- retries -----------------------------------------------------------------------------------

# Errors that say the object is not there or not ours to read: retrying cannot help.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# The S3 client's errors that no retry can change: no or bad credentials, no such bucket or
# key, access denied, a malformed request (by exception name, or by the service's error code).
_PERMANENT_CLIENT_ERRORS = frozenset({
    "NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
    "NoRegionError", "ParamValidationError", "InvalidConfigError", "UnknownServiceError",
})  # fmt: skip
_PERMANENT_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "ExpiredToken", "InvalidToken", "AccountProblem", "NoSuchBucket", "NoSuchKey",
    "InvalidBucketName", "InvalidRequest", "MethodNotAllowed", "NotImplemented",
})  # fmt: skip


def is_transient(error: BaseException) -> bool:
    """A network or server hiccup worth retrying (throttling, 5xx, timeouts, resets)."""
    if isinstance(error, _PERMANENT):
        return False
    if type(error).__name__ in _PERMANENT_CLIENT_ERRORS:
        return False
    code = (getattr(error, "response", None) or {}).get("Error", {}).get("Code")
    if code in _PERMANENT_CODES:
        return False
    if isinstance(error, OSError | TimeoutError | ConnectionError):
        return True
    return _from_storage_client(error)


def _from_storage_client(error: BaseException) -> bool:
    # botocore / aiohttp errors do not all derive from OSError.
    module = type(error).__module__ or ""
    return module.startswith(("botocore", "aiobotocore", "aiohttp", "urllib3"))


RETRY_BUDGET_S = 30.0  # the most one call spends retrying, whatever it is


def with_retries(
    fn: Callable[[], T],
    what: str,
    attempts: int = 5,
    base_delay_s: float = 0.2,
    max_delay_s: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
    budget_s: float = RETRY_BUDGET_S,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call fn, retrying transient errors with exponential backoff and full jitter, for at
    most `attempts` tries and `budget_s` seconds in all (a retry that would start later is not
    made: the last error is raised)."""
    start = clock()
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - sorted into transient / permanent below
            if attempt == attempts or not is_transient(e):
                raise
            delay = random.uniform(0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1)))
            if clock() + delay - start > budget_s:
                raise
            log.info(
                "%s failed (%s: %s); retry %d in %.2f s", what, type(e).__name__, e, attempt, delay
            )
            sleep(delay)
    raise AssertionError("unreachable")


def explain_read_failure(uri: str, error: BaseException) -> tuple[str, bool]:
    """(why an image could not be read, whether the next run should try again).

    Not again what depends on the URI alone: a folder rather than a file, a scheme whose
    filesystem is not installed or not known. A missing file, a refusal or a network failure
    may pass another night (restored, permitted, reachable)."""
    text = describe_failure(error)
    if isinstance(error, IsADirectoryError | NotADirectoryError):
        return f"not a file: {text}", False
    if isinstance(error, ImportError | ValueError):
        return f"no filesystem for this URI: {text}", False
    if isinstance(error, FileNotFoundError) and (uri.endswith("/") or _is_folder(uri)):
        return "not a file: a folder (a prefix on object storage)", False
    return text, True


def _is_folder(uri: str) -> bool:
    try:
        return is_dir(uri)
    except Exception:  # noqa: BLE001 - only asked to explain a failure that already happened
        return False


def is_storage_failure(error: BaseException) -> bool:
    """An error from reaching or asking the storage: OS errors, and the S3 client's own."""
    return isinstance(error, OSError) or _from_storage_client(error)


def describe_failure(error: BaseException) -> str:
    """One line: the error's message and, when it differs, its root cause's.

    S3 client errors arrive chained four or five deep (s3fs, aiobotocore, aiohttp, the
    socket); the outermost says what was asked, the innermost why it failed.
    """
    root, seen = error, {id(error)}
    while (nxt := root.__cause__ or root.__context__) is not None and id(nxt) not in seen:
        root = nxt
        seen.add(id(root))
    text = " ".join((str(error) or type(error).__name__).split())
    if root is not error:
        cause = " ".join(str(root).split())
        if cause and cause not in text:
            text += f" ({type(root).__name__}: {cause})"
    return text


@contextlib.contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turn a failure to reach `uri` into one StorageError naming it and the cause."""
    try:
        yield
    except DSKDError:
        raise
    except Exception as e:
        if not is_storage_failure(e):
            raise
        raise StorageError(f"storage error on {uri}: {describe_failure(e)}") from e


def names_storage_failures(fn: Callable[..., T]) -> Callable[..., T]:
    """`storage_errors` around a function whose first argument is the URI it reads."""

    @functools.wraps(fn)
    def wrapper(uri: str, *args: object, **kwargs: object) -> T:
        with storage_errors(str(uri)):
            return fn(uri, *args, **kwargs)

    return wrapper


def printable_name(name: str) -> str:
    """`name` as valid UTF-8: bytes of a file name that are not UTF-8 become \\xNN escapes.

    Linux file names are bytes; Python hands undecodable ones over as lone surrogates, which
    Parquet, JSON and a terminal all refuse.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        try:
            raw = name.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = name.encode("utf-8", "surrogatepass")
        return raw.decode("utf-8", "backslashreplace")


# C0 and C1 controls, DEL, and the Unicode controls that reorder or break a line on screen
# (bidirectional overrides and isolates, line and paragraph separators).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` safe to print on a terminal: `printable_name`, and control characters (an ESC
    sequence that recolours or rewrites the screen, a newline that splits a table row) as
    \\xNN or \\uNNNN escapes. For what is shown; what is stored stays exact."""
    return _CONTROLS.sub(_escape, printable_name(text))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def read_object(uri: str) -> bytes:
    """The bytes of one object, transient errors retried."""
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path), f"read {uri}")


@contextlib.contextmanager
def open_object(uri: str) -> Iterator[fsspec.spec.AbstractBufferedFile]:
    """A file object for reading `uri` in pieces (a large manifest is never read whole)."""
    fs, path = filesystem(uri)
    f = with_retries(lambda: fs.open(path, "rb"), f"open {uri}")
    with f:
        yield f


@contextlib.contextmanager
def reader_source(uri: str) -> Iterator[str | fsspec.spec.AbstractBufferedFile]:
    """What a native reader (pyarrow's Parquet reader) opens: a local path, which it reads with
    its own file system, without a Python copy of every range it reads; or, remotely, a file
    object read by range."""
    fs, path = filesystem(uri)
    if is_local(fs):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{uri} does not exist")
        yield path
        return
    with open_object(uri) as f:
        yield f


def write_object(uri: str, data: bytes, durable: bool = False) -> None:
    """Write one object all-or-nothing, transient errors retried: a temp file renamed locally
    (fsync'd first when `durable`), a single PUT remotely.

    Readers see the old object or the new one, never half of one.
    """
    fs, path = filesystem(uri)
    if is_local(fs):
        with_retries(lambda: _write_local(Path(path), data, durable), f"write {uri}")
    else:
        with_retries(lambda: fs.pipe_file(path, data), f"write {uri}")


def _process_umask() -> int:
    """This process's umask, read without changing it where Linux says it (setting it to read
    it back would race any thread creating a file meanwhile)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What a new file's mode would be (0644 under the usual umask): a temp file is made 0600, and
# renamed into place it kept that, so checkpoints, graphs and maps were private to their writer.
NEW_FILE_MODE = 0o666 & ~_process_umask()


def _write_local(target: Path, data: bytes, durable: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, NEW_FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


WRITE_PROBE = "_dskd-write-probe-"  # the marker object's name under an output, then a token


def check_writable(uri: str) -> None:
    """Write a small marker object under `uri` and remove it, or raise StorageError naming
    `uri` and the cause: an output that cannot be written (a folder the process may not write,
    a bucket that does not exist, a key pair denied s3:PutObject) is found before a night of
    scoring, not after it. Folders the marker needed locally are removed with it, so a dry run
    leaves nothing behind. A marker that cannot be removed (a key allowed to put but not to
    delete) is left, with a warning: writing is what the run needs."""
    fs, path = filesystem(uri)
    created: list[str] = []  # local folders that did not exist, deepest first
    if is_local(fs):
        folder = path
        while folder and not os.path.lexists(folder) and folder != os.path.dirname(folder):
            created.append(folder)
            folder = os.path.dirname(folder)
    marker = join_uri(to_uri(fs, path), f"{WRITE_PROBE}{secrets.token_hex(6)}")
    try:
        write_object(marker, b"dskd_ray: can this output be written?\n")
    except Exception as e:
        _remove_folders(created)
        if isinstance(e, DSKDError) or not is_storage_failure(e):
            raise
        cause = describe_failure(e)
        if isinstance(e, OSError) and e.strerror and is_local(fs):  # not the chain of mkdirs
            cause = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        raise StorageError(f"cannot write to the output {uri}: {cause}") from e
    try:
        with_retries(lambda: fs.rm_file(filesystem(marker)[1]), f"remove {marker}")
    except Exception as e:  # noqa: BLE001 - the output is writable: that is what was asked
        log.warning("could not remove the write probe %s: %s", marker, describe_failure(e))
    _remove_folders(created)


def _remove_folders(folders: list[str]) -> None:
    for folder in folders:  # deepest first; each empty unless someone else wrote there
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@contextlib.contextmanager
def local_copy_to(uri: str) -> Iterator[str]:
    """A local file path to write `uri`'s new content to, however large; when the block ends
    well it replaces `uri` all-or-nothing (a rename locally, one upload remotely), else it is
    removed. For files written in pieces (the run index), where `write_object` wants bytes."""
    fs, path = filesystem(uri)
    local = is_local(fs)
    if local:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{posixpath.basename(path)}.",
        suffix=".tmp",
        dir=os.path.dirname(path) if local else None,
    )
    if local:
        os.fchmod(fd, NEW_FILE_MODE)
    os.close(fd)
    try:
        yield tmp
        if local:
            os.replace(tmp, path)
        else:
            with_retries(lambda: fs.put_file(tmp, path), f"write {uri}")
    finally:
        Path(tmp).unlink(missing_ok=True)


def remove_object(uri: str) -> None:
    """Remove one object or file (FileNotFoundError if it is not there)."""
    fs, path = filesystem(uri)
    with_retries(lambda: fs.rm_file(path), f"remove {uri}")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.exists(path), f"look up {uri}")


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.isdir(path), f"look up {uri}")


def is_file(uri: str) -> bool:
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.isfile(path), f"look up {uri}")


def path_name(uri: str) -> str:
    """The last segment of a local path or URI, as resolved ("." is the current folder's name)."""
    return posixpath.basename(filesystem(uri)[1])


def list_folder(uri: str) -> tuple[list[str], list[str]]:
    """(files, folders) directly under a folder or prefix, each sorted, as URIs."""
    fs, path = filesystem(uri)
    entries = with_retries(lambda: fs.ls(path, detail=True, refresh=True), f"list {uri}")
    files, folders = [], []
    for entry in entries:
        name = entry["name"].rstrip("/")
        if name == path:
            continue  # some stores list the prefix itself
        (folders if entry.get("type") == "directory" else files).append(to_uri(fs, name))
    return sorted(files), sorted(folders)


def find_files(uri: str) -> list[str]:
    """Every file under a folder or prefix, at any depth, sorted, as URIs."""
    fs, path = filesystem(uri)
    found = with_retries(lambda: fs.find(path), f"list {uri}")
    return sorted(to_uri(fs, p) for p in found)


def resolved_place(uri: str) -> tuple[type, str]:
    """(file system type, path) with every spelling of one place made equal.

    Locally the real path (symlinks, "..", "//" resolved); on object stores the key with empty
    segments and trailing slashes dropped, since a prefix is all a key has.
    """
    fs, path = filesystem(uri)
    if is_local(fs):
        return type(fs), os.path.realpath(path)
    return type(fs), "/".join(p for p in path.split("/") if p)


def same_place(a: str, b: str) -> bool:
    """`a` and `b` name one file or object, however each is spelled (symlinks, "..", "//")."""
    return resolved_place(a) == resolved_place(b)


def read_head(uri: str, size: int) -> bytes:
    """The first `size` bytes of an object (fewer if it is shorter), transient errors retried."""
    fs, path = filesystem(uri)
    return with_retries(lambda: fs.cat_file(path, start=0, end=size), f"read {uri}")
