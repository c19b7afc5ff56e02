"""One download cache for remote images (https:// ISOs, disks, SIF files), shared by every backend.

The factory asks :meth:`ImageCache.get` on every pass; it never blocks on the network. A missing
copy is downloaded by one background thread per URL (every LM of the image shares it), a copy
older than ``revalidate_seconds`` is revalidated with a conditional GET while it stays in use, and
a failed refresh leaves the last good copy in use. Layout and rules: docs/images.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from dataclasses import replace as replaced
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

import requests

from lmrunner.config import FactoryConfig
from lmrunner.fetch import FetchError, ca_verify, open_stream, url_problem
from lmrunner.yamlsrc import one_line

LOG = logging.getLogger(__name__)

#: Each entry folder's metadata file (a dot name: no image file name can be one).
META_NAME = ".meta.json"
#: Temporary files (downloads, metadata) start so; any other dot file is a leftover too.
TEMP_PREFIX = ".part-"
CHUNK_BYTES = 1 << 20
#: Back-off after a failed download or revalidation: doubling from the first to the last.
RETRY_FIRST_SECONDS = 30.0
RETRY_MAX_SECONDS = 3600.0
#: get() writes last_used to disk at most this often per URL (it only matters to prune).
LAST_USED_SAVE_SECONDS = 600.0
#: Image file names are cut to this many characters (the end, which holds the extension).
MAX_NAME = 128
FILE_MODE = 0o644  # QEMU or Apptainer may run as another account and must read the image
DIR_MODE = 0o755
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
HEX64 = re.compile(r"[0-9a-f]{64}")
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
#: The note of a revalidation that found the copy unchanged.
NOT_MODIFIED = "cached copy, not modified on the server"


@dataclass(frozen=True, slots=True)
class DownloadSettings:
    """How images are downloaded and kept (from the factory configuration)."""

    #: PEM bundle or folder of hashed CA certificates; None: the grid's folder if it exists,
    #: else requests' own CAs.
    ca_path: Path | None
    #: http:// only when True; https:// always.
    allow_http: bool
    #: Largest image accepted, in bytes.
    max_bytes: int
    #: Connect and read timeout, seconds.
    timeout: float
    #: Entries no one asked for in this long (and not in use) are pruned.
    keep_seconds: float
    #: How often a cached copy is revalidated with a conditional GET.
    revalidate_seconds: float = 300.0

    @classmethod
    def of(cls, factory: FactoryConfig) -> DownloadSettings:
        """The settings the factory's configuration asks for."""
        return cls(
            ca_path=factory.ca_path,
            allow_http=factory.allow_http,
            max_bytes=round(factory.image_max_gb * 10**9),
            timeout=factory.download_timeout_seconds,
            keep_seconds=factory.image_cache_days * 86400,
        )


@dataclass(frozen=True, slots=True)
class ImageState:
    """What :meth:`ImageCache.get` knows about an image now."""

    #: "ready" (``path`` usable), "downloading" (nothing usable yet) or "failed" (nothing usable).
    status: str
    #: The local file to give the engine, when usable.
    path: Path | None
    #: One line for logs and the CLI.
    detail: str


def is_remote(reference: str) -> bool:
    """Whether an image reference is a URL the cache downloads (http:// or https://)."""
    return reference[:8].lower().startswith(("http://", "https://"))


def size_text(size: int) -> str:
    """``size`` bytes for a person: "12.3 MB" (decimal units, as image_max_gb)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def entry_key(url: str) -> str:
    """The entry folder's name for ``url``."""
    return hashlib.sha256(url.encode()).hexdigest()


def file_name(url: str) -> str:
    """The image's file name: the URL's basename, sanitised (engines and humans see
    ``cernvm4.iso``); never a dot name, so it cannot be the metadata or a temporary file."""
    try:
        name = PurePosixPath(unquote(urlsplit(url).path)).name
    except ValueError:
        name = ""
    return UNSAFE.sub("_", name)[-MAX_NAME:].lstrip(".-") or "image"


@dataclass(frozen=True, slots=True)
class _Copy:
    """A good copy on disk, as its metadata records it."""

    file: str
    sha256: str
    size: int
    etag: str | None
    last_modified: str | None
    fetched_at: float  # last download or successful revalidation
    mtime_ns: int  # of the image file: a copy replaced behind the metadata's back is no copy


@dataclass(slots=True)
class _Entry:
    """One URL: its copy, its job and its failures. Changed under ImageCache._lock only."""

    url: str
    folder: Path
    copy: _Copy | None = None
    last_used: float = 0.0
    saved_last_used: float = 0.0
    job: threading.Thread | None = None
    #: Bytes received and announced by the running download (progress for the CLI).
    received: int = 0
    announced: int | None = None
    #: The last attempt's error (one line, naming the URL); None after a success.
    failure: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    #: What the last success did ("downloaded 12.3 MB").
    note: str = ""
    #: Held while the image file and the metadata are replaced, so a metadata write never
    #: records a copy that is not (or no longer) the file.
    write_lock: threading.Lock = field(default_factory=threading.Lock)


class _Stopped(Exception):
    """close() asked a download to stop."""


class ImageCache:
    """Downloaded images under ``root`` (``<state_dir>/images``), one folder per URL."""

    def __init__(
        self,
        root: Path,
        settings: DownloadSettings,
        *,
        clock: Callable[[], float] = time.time,
        session_factory: Callable[[], requests.Session] = requests.Session,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """``on_done`` is called (from the download's thread) when a download or revalidation
        ended, whatever its result; it must only wake somebody up."""
        self.root = root
        self.on_done = on_done
        self.settings = settings
        self.clock = clock
        self.session_factory = session_factory
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._entries: dict[str, _Entry] = {}
        self._load()

    # --- the caller's side (the factory's event loop, the CLI) ----------------------------

    def get(self, url: str, digest: str | None = None) -> ImageState:
        """The image's state now, starting its download or revalidation when due. Never blocks
        on the network; ``digest`` (``sha256:HEX``) pins the content."""
        refused = self._refusal(url, digest)
        if refused is not None:
            return ImageState("failed", None, refused)
        now = self.clock()
        with self._lock:
            entry = self._entry(url)
            entry.last_used = now
            state = self._state(entry, digest, now, start=not self._stop.is_set())
            save = (
                entry.copy is not None
                and entry.job is None
                and now - entry.saved_last_used >= LAST_USED_SAVE_SECONDS
            )
        if save:
            self._save_last_used(entry)
        return state

    def cached(self, url: str, digest: str | None = None) -> Path | None:
        """The usable local copy of ``url`` now, starting nothing (``lmrunner check``)."""
        if self._refusal(url, digest) is not None:
            return None
        with self._lock:
            entry = self._entries.get(url)
            if entry is None:
                return None
            return self._state(entry, digest, self.clock(), start=False).path

    def wait(self, url: str, timeout: float, digest: str | None = None) -> ImageState:
        """Like :meth:`get`, then block until its download or revalidation has ended (at most
        ``timeout`` seconds): for the CLI and tests, never for the factory."""
        state = self.get(url, digest)
        deadline = time.monotonic() + timeout
        with self._lock:
            entry = self._entries.get(url)
            if entry is None:  # refused
                return state
            while entry.job is not None and (left := deadline - time.monotonic()) > 0:
                self._changed.wait(left)
            return self._state(entry, digest, self.clock(), start=False)

    def prune(self, in_use: Collection[str]) -> list[Path]:
        """Remove the entries whose URL is not in ``in_use`` and that no one asked for in
        ``keep_seconds``, and folders holding no copy anyone can find; return the folders
        removed. A folder with a download running (here or in another process) stays."""
        wanted = set(in_use)
        keys = {entry_key(url) for url in wanted}
        now = self.clock()
        removed: list[Path] = []
        # Under the lock: no get() from another thread may start a download into a folder
        # being removed. Removing is unlinking a few files, quick even for a large image.
        with self._lock:
            for entry in list(self._entries.values()):
                if entry.url in wanted or entry.job is not None:
                    continue
                if now - entry.last_used < self.settings.keep_seconds or _busy(entry.folder):
                    continue
                existed = entry.folder.exists()  # not for a URL that never got a folder
                if _remove(entry.folder):
                    del self._entries[entry.url]
                    if existed:
                        removed.append(entry.folder)
                        LOG.info("image %s: removed from the cache (unused)", entry.url)
            known = {entry.folder.name for entry in self._entries.values()} | keys
            for folder in self._folders():
                if folder.name not in known and not _busy(folder) and _remove(folder):
                    removed.append(folder)
                    LOG.info("image cache: removed %s (no copy anyone can find)", folder)
        return removed

    def entries(self) -> list[dict[str, Any]]:
        """Every known URL with its copy (for a CLI listing): url, path, size, sha256, fetched,
        last_used, status, detail; absent values are None."""
        now = self.clock()
        rows: list[dict[str, Any]] = []
        with self._lock:
            for url in sorted(self._entries):
                entry = self._entries[url]
                state = self._state(entry, None, now, start=False)
                copy = entry.copy
                rows.append(
                    {
                        "url": url,
                        "path": None if copy is None else str(entry.folder / copy.file),
                        "size": None if copy is None else copy.size,
                        "sha256": None if copy is None else copy.sha256,
                        "fetched": None if copy is None else copy.fetched_at,
                        "last_used": entry.last_used,
                        "status": state.status,
                        "detail": state.detail,
                    }
                )
        return rows

    def close(self) -> None:
        """Stop the downloads (each ends at its next chunk, or at its timeout when the server
        is silent), wait for them, and record last_used. No download starts afterwards."""
        self._stop.set()
        with self._lock:
            jobs = [entry.job for entry in self._entries.values() if entry.job is not None]
        for job in jobs:
            job.join()
        with self._lock:
            stale = [
                entry
                for entry in self._entries.values()
                if entry.copy is not None and entry.last_used > entry.saved_last_used
            ]
        for entry in stale:
            self._save_last_used(entry)

    # --- state ------------------------------------------------------------------------------

    def _refusal(self, url: str, digest: str | None) -> str | None:
        if digest is not None and not DIGEST.fullmatch(digest):
            return one_line(f"{url}: image digest {digest!r} is not sha256: and 64 hex digits")
        return url_problem(url, allow_http=self.settings.allow_http)

    def _entry(self, url: str) -> _Entry:
        entry = self._entries.get(url)
        if entry is None:
            entry = self._entries[url] = _Entry(url, self.root / entry_key(url))
        return entry

    def _state(self, entry: _Entry, digest: str | None, now: float, *, start: bool) -> ImageState:
        """``entry``'s state for a caller pinning ``digest``, starting a job when ``start`` and
        one is due. Called under the lock."""
        pinned = None if digest is None else digest.removeprefix("sha256:")
        copy = entry.copy
        usable = copy if copy is not None and pinned in (None, copy.sha256) else None
        path = None if usable is None else entry.folder / usable.file
        if entry.job is None and start and now >= entry.retry_at:
            if usable is None:
                self._start(entry, pinned, None)
            elif pinned is None and now - usable.fetched_at >= self.settings.revalidate_seconds:
                # A copy matching a pinned digest is never revalidated: any change would be a
                # mismatch, and fetching it again (it may be 20 GB) would gain nothing.
                self._start(entry, None, usable)
        if usable is not None:
            if entry.failure is not None:
                return ImageState("ready", path, f"stale copy in use: {entry.failure}")
            busy = "; revalidating" if entry.job is not None else ""
            return ImageState("ready", path, f"{entry.note or 'cached copy'}{busy}")
        if entry.job is not None:
            done = size_text(entry.received)
            of = "" if entry.announced is None else f" of {size_text(entry.announced)}"
            return ImageState("downloading", None, f"downloading {entry.url}: {done}{of}")
        if entry.failure is not None:
            left = max(0.0, entry.retry_at - now)
            return ImageState("failed", None, f"{entry.failure}; next try in {left:.0f} s")
        if copy is not None:  # a copy with another content than pinned, no download (closed)
            return ImageState("failed", None, f"{entry.url}: the cached copy is not {digest}")
        return ImageState("failed", None, f"{entry.url}: no copy (the image cache is closed)")

    def _start(self, entry: _Entry, pinned: str | None, base: _Copy | None) -> None:
        """Start ``entry``'s download (``base``: a conditional one, revalidating that copy).
        Called under the lock."""
        entry.received, entry.announced = 0, None
        job = threading.Thread(
            target=self._run,
            args=(entry, pinned, base),
            name=f"image-{entry.folder.name[:12]}",
            daemon=True,  # close() joins it; a daemon never holds up the interpreter's exit
        )
        entry.job = job
        try:
            job.start()
        except RuntimeError as err:  # no thread can be made now: like a failed download
            entry.job = None
            self._failed(entry, f"{entry.url}: cannot start a download: {err}")

    def _failed(self, entry: _Entry, detail: str) -> float:
        """Record a failed attempt and the back-off before the next; the delay. Under the lock."""
        entry.failures += 1
        # The exponent is capped: a URL failing for months must not overflow the float.
        delay = min(RETRY_FIRST_SECONDS * 2.0 ** min(entry.failures - 1, 30), RETRY_MAX_SECONDS)
        entry.retry_at = self.clock() + delay
        entry.failure = one_line(detail)
        return delay

    # --- the download thread ----------------------------------------------------------------

    def _run(self, entry: _Entry, pinned: str | None, base: _Copy | None) -> None:
        """A job's thread: whatever happens becomes the entry's state, nothing is raised."""
        if base is not None:
            LOG.debug("image %s: revalidating", entry.url)
        else:
            LOG.info("image %s: downloading", entry.url)
        note: str | None = None
        detail = ""
        try:
            note = self._download(entry, pinned, base)
        except _Stopped:
            detail = ""
        except FetchError as err:  # names the URL already
            detail = str(err)
        except requests.RequestException as err:  # before OSError: it is one
            detail = f"{entry.url}: {type(err).__name__}: {err}"
        except OSError as err:  # the cache's disk, or a ca_path that is not there
            detail = f"{entry.url}: {err}"
        except Exception as err:  # a bug must not kill the factory: it becomes the detail
            detail = f"{entry.url}: unexpected {type(err).__name__}: {err}"
            LOG.debug("image %s: unexpected error", entry.url, exc_info=True)
        with self._lock:
            if note is not None:
                entry.failure, entry.failures, entry.retry_at, entry.note = None, 0, 0.0, note
            elif detail:
                delay = self._failed(entry, detail)
                detail = f"{entry.failure}; next try in {delay:.0f} s"
            kept = "; the cached copy is kept" if entry.copy is not None else ""
        # Logged before the job counts as ended (and outside the lock: a slow log handler must
        # not hold up get()), so whoever wait()ed finds the line already written.
        if note is not None:
            # A revalidation every few minutes is no news; a download is.
            LOG.log(logging.DEBUG if note == NOT_MODIFIED else logging.INFO, "image %s: %s",
                    entry.url, note)  # fmt: skip
        elif detail:
            LOG.warning("image %s%s", detail, kept)
        with self._lock:
            entry.job = None
            self._changed.notify_all()
        if self.on_done is not None:
            self.on_done()  # the factory's loop plans again now, not at its next idle wake-up

    def _download(self, entry: _Entry, pinned: str | None, base: _Copy | None) -> str:
        """GET the image into the entry's folder; what was done, in a few words.

        Raises:
            FetchError, OSError, requests.RequestException, _Stopped.
        """
        url, settings = entry.url, self.settings
        if base is not None and not _intact(entry.folder, base):
            LOG.warning("image %s: the cached file changed or went away; downloading it", url)
            base = None
        headers = {"Accept-Encoding": "identity"}  # the bytes as published: sizes and digests
        if base is not None and base.etag:
            headers["If-None-Match"] = base.etag
        if base is not None and base.last_modified:
            headers["If-Modified-Since"] = base.last_modified
        session = self.session_factory()
        try:
            with open_stream(
                session,
                url,
                allow_http=settings.allow_http,
                timeout=settings.timeout,
                headers=headers,
                verify=ca_verify(settings.ca_path),
            ) as reply:
                if reply.status_code == 304 and base is not None:
                    self._keep(entry, base, reply.headers, self.clock())
                    return NOT_MODIFIED
                reply.raise_for_status()
                if reply.status_code != 200:
                    raise FetchError(f"{url}: HTTP {reply.status_code} {reply.reason}")
                return self._receive(entry, pinned, base, reply)
        finally:
            session.close()

    def _receive(
        self, entry: _Entry, pinned: str | None, base: _Copy | None, reply: requests.Response
    ) -> str:
        """Stream ``reply``'s body into a temporary file, check it, and make it the copy."""
        url, cap = entry.url, self.settings.max_bytes
        announced = _content_length(url, reply)
        if announced is not None and announced > cap:
            raise FetchError(f"{url}: Content-Length {announced} is over the {cap}-byte cap")
        _make_dir(self.root)
        _make_dir(entry.folder)
        if announced is not None and shutil.disk_usage(entry.folder).free < announced:
            raise FetchError(f"{url}: {announced} bytes do not fit on {entry.folder}'s disk")
        entry.announced = announced  # progress only: a plain store, read without the lock
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=entry.folder)
        temp = Path(name)
        try:
            with os.fdopen(fd, "wb") as handle:
                # Locked while written: another process's leftover sweep leaves it alone.
                fcntl.flock(handle, fcntl.LOCK_EX)
                os.fchmod(handle.fileno(), FILE_MODE)
                hasher, size = hashlib.sha256(), 0
                for chunk in reply.iter_content(CHUNK_BYTES):
                    if self._stop.is_set():
                        raise _Stopped
                    size += len(chunk)
                    if size > cap:
                        raise FetchError(f"{url}: more than the {cap}-byte cap; download aborted")
                    hasher.update(chunk)
                    handle.write(chunk)
                    entry.received = size
                if announced is not None and size != announced:
                    raise FetchError(f"{url}: got {size} of the {announced} bytes announced")
                got = hasher.hexdigest()
                if pinned is not None and got != pinned:
                    raise FetchError(f"{url}: sha256 mismatch: expected {pinned}, got {got}")
                if base is not None and got == base.sha256:
                    # Same bytes (a server without validators): keep the file, and its inode
                    # that running LMs hold open.
                    self._keep(entry, base, reply.headers, self.clock())
                    return NOT_MODIFIED
                handle.flush()
                os.fsync(handle.fileno())
                self._install(entry, temp, got, size, reply.headers)
        finally:
            temp.unlink(missing_ok=True)
        return f"downloaded {size_text(size)}"

    def _install(
        self, entry: _Entry, temp: Path, sha256: str, size: int, headers: Mapping[str, str]
    ) -> None:
        """Rename the downloaded file over the copy, then record it (metadata, memory)."""
        target = entry.folder / file_name(entry.url)
        with entry.write_lock:
            # Running LMs keep the replaced file open; the rename is atomic for new ones. A
            # crash before the metadata is written leaves a file whose mtime the metadata
            # does not know: no copy, downloaded again.
            temp.replace(target)
            copy = _Copy(
                file=target.name,
                sha256=sha256,
                size=size,
                etag=headers.get("ETag"),
                last_modified=headers.get("Last-Modified"),
                fetched_at=self.clock(),
                mtime_ns=target.stat().st_mtime_ns,
            )
            self._write_meta(entry, copy, durable=True)
            with self._lock:
                entry.copy, entry.saved_last_used = copy, entry.last_used
        _fsync_dir(entry.folder)

    def _keep(self, entry: _Entry, base: _Copy, headers: Mapping[str, str], now: float) -> None:
        """The server's copy has not changed: ``base`` is fresh again (new validators kept)."""
        copy = replaced(
            base,
            etag=headers.get("ETag") or base.etag,
            last_modified=headers.get("Last-Modified") or base.last_modified,
            fetched_at=now,
        )
        with entry.write_lock:
            # Not durable: losing a fresher fetched_at in a crash costs one revalidation.
            self._write_meta(entry, copy, durable=False)
            with self._lock:
                entry.copy, entry.saved_last_used = copy, entry.last_used

    # --- the disk ---------------------------------------------------------------------------

    def _write_meta(self, entry: _Entry, copy: _Copy, *, durable: bool) -> None:
        """Write ``entry``'s metadata for ``copy`` atomically. Under ``entry.write_lock``."""
        document = {
            "url": entry.url,
            "file": copy.file,
            "sha256": copy.sha256,
            "size": copy.size,
            "etag": copy.etag,
            "last_modified": copy.last_modified,
            "fetched_at": copy.fetched_at,
            "last_used": entry.last_used,
            "mtime_ns": copy.mtime_ns,
        }
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=entry.folder)
        try:
            with os.fdopen(fd, "w") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                os.fchmod(handle.fileno(), FILE_MODE)
                json.dump(document, handle, indent=1, sort_keys=True)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
                Path(name).replace(entry.folder / META_NAME)
        finally:
            Path(name).unlink(missing_ok=True)

    def _save_last_used(self, entry: _Entry) -> None:
        """Record last_used (for prune after a restart). Skipped when the entry's files are
        being replaced: the job writes the metadata itself, and get() must not wait."""
        if not entry.write_lock.acquire(blocking=False):
            return
        try:
            with self._lock:
                copy = entry.copy
                # Also when the write fails: no retry on every get().
                entry.saved_last_used = entry.last_used
            if copy is not None:
                self._write_meta(entry, copy, durable=False)
        except OSError as err:
            LOG.warning("image %s: cannot record its last use: %s", entry.url, err)
        finally:
            entry.write_lock.release()

    def _folders(self) -> list[Path]:
        try:
            return sorted(p for p in self.root.iterdir() if HEX64.fullmatch(p.name) and p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as err:
            LOG.warning("image cache %s: cannot list it: %s", self.root, err)
            return []

    def _load(self) -> None:
        """Find the copies a previous run left (restart) and remove its temporary files."""
        try:
            _make_dir(self.root)
        except OSError as err:  # downloads will say so, one by one
            LOG.warning("image cache %s: cannot make it: %s", self.root, err)
        for folder in self._folders():
            _remove_leftovers(folder)
            if not (folder / META_NAME).exists():
                continue  # a first download that never finished; prune removes the folder
            try:
                url, copy, last_used = _read_meta(folder)
            except (OSError, ValueError) as err:
                LOG.warning("image cache %s: %s; treated as no copy", folder, one_line(str(err)))
                continue
            note = f"cached copy ({size_text(copy.size)})"
            self._entries[url] = _Entry(url, folder, copy, last_used, last_used, note=note)


def _content_length(url: str, reply: requests.Response) -> int | None:
    text = reply.headers.get("Content-Length")
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise FetchError(f"{url}: Content-Length {text!r} is no number") from None
    if value < 0:
        raise FetchError(f"{url}: Content-Length {value} is negative")
    return value


def _read_meta(folder: Path) -> tuple[str, _Copy, float]:
    """The URL, copy and last use recorded in ``folder``.

    Raises:
        ValueError: the metadata is no such record, or the file is not the copy it records.
        OSError: either cannot be read.
    """
    data = json.loads((folder / META_NAME).read_bytes())
    if not isinstance(data, dict):
        raise ValueError(f"{META_NAME} is not a JSON object")
    url = _field(data, "url", str)
    if entry_key(url) != folder.name:
        raise ValueError(f"{META_NAME} names {url!r}, which is not this folder's URL")
    name = _field(data, "file", str)
    if UNSAFE.search(name) or name.startswith((".", "-")) or not name:
        raise ValueError(f"{META_NAME} names the file {name!r}")
    sha256 = _field(data, "sha256", str)
    if not HEX64.fullmatch(sha256):
        raise ValueError(f"{META_NAME}: sha256 {sha256!r} is not 64 hex digits")
    copy = _Copy(
        file=name,
        sha256=sha256,
        size=_field(data, "size", int),
        etag=_optional(data, "etag"),
        last_modified=_optional(data, "last_modified"),
        fetched_at=float(_field(data, "fetched_at", (int, float))),
        mtime_ns=_field(data, "mtime_ns", int),
    )
    if not _intact(folder, copy):
        raise ValueError(f"{name} is not the copy {META_NAME} records (changed or half-written)")
    return url, copy, float(_field(data, "last_used", (int, float)))


def _intact(folder: Path, copy: _Copy) -> bool:
    """Whether the file is still the one ``copy`` records (a stat, no hashing of gigabytes)."""
    try:
        found = (folder / copy.file).stat()
    except FileNotFoundError:
        return False
    return (found.st_size, found.st_mtime_ns) == (copy.size, copy.mtime_ns)


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{META_NAME}: {key} is missing or of the wrong type")
    return value


def _optional(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{META_NAME}: {key} is not a string")
    return value


def _make_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    path.chmod(DIR_MODE)  # whatever the umask: engines running as others traverse it


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _locked(path: Path) -> bool:
    """Whether some process (this one included) holds ``path``'s flock: being written."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _temporaries(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.name.startswith(".") and p.name != META_NAME]
    except OSError:
        return []


def _busy(folder: Path) -> bool:
    """Whether a download (of this process or another) is writing into ``folder``."""
    return any(_locked(path) for path in _temporaries(folder))


def _remove_leftovers(folder: Path) -> None:
    for path in _temporaries(folder):
        if path.is_file() and not path.is_symlink() and not _locked(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            LOG.info("image cache: removed the leftover %s", path)


def _remove(folder: Path) -> bool:
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        return True
    except OSError as err:
        LOG.warning("image cache: cannot remove %s: %s", folder, err)
        return False
    return True
