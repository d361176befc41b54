"""The listing of images for bulk scoring: every image under a local folder or an object-store
prefix, with the version that changes when its content does, one folder or page at a time; what
the listing met besides images is counted. With `storage`, the only module that touches fsspec.
No Ray here.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import fsspec

from dskd_ray.errors import ConfigError, DataError
from dskd_ray.io.images import is_image_path
from dskd_ray.io.storage import (
    filesystem,
    is_local,
    printable,
    printable_name,
    resolved_place,
    storage_errors,
    to_uri,
    with_retries,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class ListedObject:
    uri: str
    version: str  # ETag remotely; size and mtime locally
    size: int
    error: str | None = None  # listed, but not to be read (a name that is not UTF-8)


@dataclass
class ListingStats:
    """What a listing met besides images: counted so that nothing is left out unsaid."""

    other_files: int = 0  # files without an image extension
    symlinks: int = 0  # symbolic links met under the input (local folders only)
    symlinks_skipped: int = 0  # of those, not listed (see `_walk_local`)
    pages: int = 0  # object-store listing pages with files in them
    chains: int = 0  # object-store listings (chains of pages) run, in parallel


NOT_UTF8 = "file name is not valid UTF-8 (shown here with \\x escapes): rename it to have it scored"


def object_version(fs: fsspec.AbstractFileSystem, info: dict) -> str:
    """What changes when the object's content does: its ETag, or size + mtime on local disk."""
    if not is_local(fs):
        etag = info.get("ETag") or info.get("etag") or info.get("md5")
        if etag:
            version_id = info.get("VersionId")
            etag = str(etag).strip('"')
            return f"{etag}@{version_id}" if version_id else etag
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"size={info.get('size')};mtime={mtime}"


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def check_output(input_uri: str, output: str) -> None:
    """Refuse an output that is the input itself, whatever its spelling.

    Its maps would be listed as images (and every run would add more), and its results would
    mix with the images. An output inside the input is allowed: the listing leaves it out.
    """
    in_type, in_path = resolved_place(input_uri)
    out_type, out_path = resolved_place(output)
    if in_type is out_type and in_path == out_path:
        raise ConfigError(
            f"--out {output} is INPUT itself ({in_path}): choose a folder outside INPUT, "
            "or a subfolder of it (which the listing leaves out)"
        )


def iter_images(
    root: str, exclude: str | None = None, stats: ListingStats | None = None
) -> Iterator[ListedObject | None]:
    """Walk `root` one folder at a time, yielding each image (and None for each other file).

    The listing holds one folder's entries at a time, not the whole tree's. Objects under
    `exclude` (the scoring output, when it lies inside the input) are left out, however either
    is spelled. `stats` counts the symlinks met. A name that is not UTF-8 is yielded escaped,
    with an error: listing never stops on a name.
    """
    with storage_errors(root):
        yield from _iter_images(root, exclude, stats if stats is not None else ListingStats())


def _iter_images(
    root: str, exclude: str | None, stats: ListingStats
) -> Iterator[ListedObject | None]:
    fs, path = filesystem(root, use_listings_cache=False, skip_instance_cache=True)
    if not with_retries(lambda: fs.exists(path), f"list {root}"):
        raise DataError(f"{root} does not exist")
    excluded = None
    if exclude is not None:
        in_type, in_path = resolved_place(root)
        ex_type, ex_path = resolved_place(exclude)
        if ex_type is in_type and _inside(ex_path, in_path):
            excluded = ex_path
    if fs.isfile(path):
        info = fs.info(path)
        if is_image_path(path):
            size = int(info.get("size") or 0)
            yield _listed(to_uri(fs, path), object_version(fs, info), size)
        else:
            yield None
        return
    local = is_local(fs)
    found = _walk_local(path, excluded, stats) if local else _walk_remote(fs, path, excluded, stats)
    for full, info in found:
        if not is_image_path(full):
            yield None
            continue
        yield _listed(to_uri(fs, full), object_version(fs, info), int(info.get("size") or 0))


def _listed(uri: str, version: str, size: int) -> ListedObject:
    shown = printable_name(uri)
    return ListedObject(shown, version, size, None if shown == uri else NOT_UTF8)


def _walk_local(path: str, excluded: str | None, stats: ListingStats) -> Iterator[tuple[str, dict]]:
    """(path, info) of every file under a local folder, one folder at a time.

    Symlinks are counted. A link to a file inside the input (its real path) is listed under
    the link's own name; a link that points outside the input, into the excluded output, or
    nowhere is skipped. A link to a folder is skipped too: when the folder is inside the input
    its files are listed once, under their real path (following the link would list them
    twice, or forever in a loop); when it is outside, it is not the input.
    """
    root_real = os.path.realpath(path)
    stack = [(path, root_real)]
    while stack:
        folder, real_folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:  # an unreadable folder: said, and the rest is still listed
            log.warning("cannot list %s: %s", printable(folder), e)
            continue
        subfolders = []
        for entry in entries:
            full = os.path.join(folder, entry.name)
            try:
                if entry.is_symlink():
                    stats.symlinks += 1
                    target = os.path.realpath(full)
                    if (
                        not os.path.isfile(target)
                        or not _inside(target, root_real)
                        or (excluded is not None and _inside(target, excluded))
                    ):
                        stats.symlinks_skipped += 1
                        continue
                    st = os.stat(full)
                elif entry.is_dir(follow_symlinks=False):
                    real = os.path.join(real_folder, entry.name)
                    if excluded is None or not _inside(real, excluded):
                        subfolders.append((full, real))
                    continue
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                else:
                    continue  # a socket or a pipe: not a file to read
            except OSError as e:  # gone between the listing and the stat
                log.warning("cannot stat %s: %s", printable(full), e)
                continue
            yield full, {"size": st.st_size, "mtime": st.st_mtime}
        stack.extend(reversed(subfolders))


def _walk_remote(
    fs: fsspec.AbstractFileSystem, path: str, excluded: str | None, stats: ListingStats
) -> Iterator[tuple[str, dict]]:
    """(path, info) of every object under an object-store prefix, page by page as listed.

    No whole-prefix structure is built: each ListObjectsV2 page (1000 keys) is handed on as it
    arrives, and the prefix is listed over parallel chains of pages (`_list_pages`). Keys come
    in the order pages arrive, not sorted.
    """
    for page in _list_pages(fs, path, stats):
        stats.pages += 1
        for key, info in page:
            if excluded is not None and _inside("/".join(p for p in key.split("/") if p), excluded):
                continue
            yield key, info


LISTING_CHAINS = 32  # chains of pages listed at once, at most
_PAGES_IN_FLIGHT = 64  # pages listed ahead of the consumer: the driver's memory bound


def _list_pages(
    fs: fsspec.AbstractFileSystem, path: str, stats: ListingStats, chains: int = LISTING_CHAINS
) -> Iterator[list[tuple[str, dict]]]:
    """Pages of (bucket/key, info) under `path`, from up to `chains` parallel listings.

    One chain of pages is sequential (each page's token asks for the next), so a big prefix
    is split on its "folders": each level is listed with a delimiter, all of its prefixes at
    once, until there are `chains` of them (or three levels down); the prefixes left are then
    listed flat, in parallel. A key with an empty segment (a//b.png) sits under the common
    prefix "a//", so every key is listed exactly once. Pages wait in a bounded queue.
    """
    bucket, _, key = path.partition("/")
    prefix = key.rstrip("/") + "/" if key else ""
    pages: queue.Queue = queue.Queue(maxsize=_PAGES_IN_FLIGHT)
    stop = threading.Event()
    counting = threading.Lock()
    done = object()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                pages.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def chain(p: str, delimiter: str) -> list[str]:
        with counting:
            stats.chains += 1
        return _list_chain(fs, bucket, p, delimiter, put, stop)

    def produce() -> None:
        try:
            with ThreadPoolExecutor(chains, thread_name_prefix="dskd-listing") as pool:
                level = [prefix]
                for _ in range(3):
                    if len(level) >= chains:
                        break
                    found = pool.map(lambda p: chain(p, "/"), level)
                    level = [child for children in found for child in children]
                for future in [pool.submit(chain, p, "") for p in level]:
                    future.result()
            put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            put(e)

    producer = threading.Thread(target=produce, name="dskd-listing", daemon=True)
    producer.start()
    try:
        while True:
            item = pages.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # a consumer that stops early frees the listing threads
        producer.join(timeout=5)


def _list_chain(
    fs: fsspec.AbstractFileSystem,
    bucket: str,
    prefix: str,
    delimiter: str,
    put: Callable[[object], None],
    stop: threading.Event | None,
) -> list[str]:
    """List `prefix` page after page (each page retried), handing each page's files to `put`;
    return the common prefixes (only with a delimiter)."""
    kwargs: dict = {"Bucket": bucket, "Prefix": prefix}
    if delimiter:
        kwargs["Delimiter"] = delimiter
    common: list[str] = []
    while stop is None or not stop.is_set():
        page = with_retries(
            lambda: fs.call_s3("list_objects_v2", **kwargs), f"list s3://{bucket}/{prefix}"
        )
        common += [c["Prefix"] for c in page.get("CommonPrefixes", [])]
        files = [
            (f"{bucket}/{c['Key']}", {"size": c.get("Size", 0), "ETag": c.get("ETag")})
            for c in page.get("Contents", [])
            if not c["Key"].endswith("/")  # a "folder" marker, not an object to score
        ]
        if files:
            put(files)
        if not page.get("IsTruncated"):
            break
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
    return common
