"""Output archival: download each completed job's outputs before the provider's URLs expire.

A sidecar (`Archiver`) follows the journaled stream from its saved position, picks
`ai.streamd.job.completed` events with outputs, and streams every output to disk:

    <archive>/objects/ab/abcdef….png          content-addressed by sha256, one copy per content
    <archive>/jobs/<provider>/<job>/<n>-<name> a hard link (or a relative symlink) to the object
    <archive>/jobs/<provider>/<job>/.streamd-job.json  what was done for the job (exactly-once marker)
    <archive>/tmp/                             partial downloads; emptied at start-up

It reports what happened as observations on the same stream: `job.archived` (the local paths),
`job.expired` (the provider answered 404/410: the output is gone) and `job.diagnostic` (wrong
content type, too large, refused, gave up after retries). The quota and age limit evict the
oldest objects first, after each job and every `sweep_every` seconds. See docs/archive.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mimetypes
import os
import secrets
import shutil
import stat
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import httpx
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from streamd import filters
from streamd.bus import GapNotice, LiveNotice
from streamd.config import ArchiveFile, Config
from streamd.events import TYPE_PREFIX, CloudEvent, Kind, Observation, Origin
from streamd.sidecar import Host
from streamd.transport.backoff import backoff, retry_after

log = logging.getLogger("streamd.archive")

POSITION_KEY = "archive.position"  # "<epoch>:<seq>": every completed job up to seq is handled
MANIFEST = ".streamd-job.json"
QUEUE = 64  # completed jobs waiting for a download slot; when full, the stream reader waits
MAX_OUTPUTS = 64  # outputs archived per job; more are reported in a diagnostic and skipped
CHUNK = 64 * 1024
MIB = 1024 * 1024
ATTEMPTS = 5  # per output, for transient failures (connection errors, 5xx, 429, truncated bodies)
RETRY_AFTER_CAP = 300.0  # the longest Retry-After honoured, seconds
FILE_TIMEOUT = 1800.0  # one attempt at one file, start to end; a trickle slower than that is retried
SWEEP_EVERY = 600.0  # seconds between periodic quota/age sweeps
BACKFILL = 3600.0  # on the very first run, completions older than this are not fetched
COMPLETED = TYPE_PREFIX + "job.completed"
COMPLETED_FILTER = filters.parse("kind:state status:completed")
GENERIC_TYPES = frozenset({"", "application/octet-stream", "binary/octet-stream", "application/binary"})
TYPE_KEYS = ("contenttype", "content_type", "contentType", "mimetype", "mimeType", "mime_type")
EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/avif": ".avif",
    "image/heic": ".heic",
    "image/heif": ".heif",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
    "image/svg+xml": ".svg",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
}
SAFE_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
MAX_NAME = 96


class ArchiveError(Exception):
    """Something a person can act on (a bad setting, a file no longer in the archive)."""


# -- names -------------------------------------------------------------------------------------------
def safe_name(name: str, *, fallback: str = "output") -> str:
    """A file name that stays where it is put, whatever a provider sent.

    Only the last path component counts (`/` and `\\` both separate); NULs, control characters and
    anything outside `[A-Za-z0-9._-]` become `_`; leading dots, dashes and underscores go (no hidden
    files, no option-like names); `.`/`..`/empty give `fallback`. At most MAX_NAME characters,
    keeping the extension.
    """
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    out: list[str] = []
    for ch in base:
        c = ch if ch in SAFE_CHARS else "_"
        if not (c == "_" and out and out[-1] == "_"):
            out.append(c)
    text = "".join(out).lstrip("._-")
    if not text:
        return fallback
    if len(text) > MAX_NAME:
        stem, dot, ext = text.rpartition(".")
        ext = ext[:12] if dot and stem else ""
        text = text[: MAX_NAME - len(ext) - 1].rstrip(".") + "." + ext if ext else text[:MAX_NAME]
    return text


def safe_component(value: str) -> str:
    """A folder name for a provider or job id. Ids that needed changing get a short hash of the
    original, so two different ids never share a folder."""
    name = safe_name(value, fallback="")
    if name == value and name:
        return name
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{name[: MAX_NAME - 11]}-{digest}" if name else f"id-{digest}"


def display_url(url: str) -> str:
    """A URL fit for logs and messages: host and path, no userinfo, no query (presigned
    signatures live there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unreadable URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _major(ctype: str) -> str:
    return ctype.split("/", 1)[0]


def media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def declared_type(url: str, raw: Any, *, budget: int = 4096) -> str | None:
    """The content type the provider gave for `url` in its payload (Wiro's `contenttype`), if any."""
    stack: list[Any] = [raw]
    seen = 0
    while stack and seen < budget:
        node = stack.pop()
        seen += 1
        if isinstance(node, Mapping):
            if any(v == url for v in node.values() if isinstance(v, str)):
                for key in TYPE_KEYS:
                    value = node.get(key)
                    if isinstance(value, str) and "/" in value:
                        return media_type(value)
            stack.extend(v for v in node.values() if isinstance(v, Mapping | list))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, Mapping | list))
    return None


def expected_type(url: str, raw: Any) -> str:
    """What the output must be: the provider's word, else the URL's extension, else an image
    (every provider here generates images; video models give `.mp4` URLs)."""
    declared = declared_type(url, raw)
    if declared:
        return declared
    try:
        guessed, _ = mimetypes.guess_type(urlsplit(url).path, strict=False)
    except ValueError:
        guessed = None
    if guessed and _major(guessed) in ("image", "video", "audio"):
        return guessed
    return "image/*"


def sniff(head: bytes) -> str | None:
    """The media type from a file's first bytes, for servers that say `application/octet-stream`."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "image/avif"
        if brand in (b"heic", b"heix", b"mif1", b"msf1"):
            return "image/heic"
        return "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    return None


def type_matches(expected: str, actual: str) -> bool:
    """Same major type: an image job must give `image/*` (a PNG announced as JPEG is still fine)."""
    return bool(actual) and _major(expected) == _major(actual)


def extension_for(ctype: str, name: str) -> str:
    ext = EXTENSIONS.get(ctype) or mimetypes.guess_extension(ctype, strict=False) or ""
    if not ext:
        suffix = Path(name).suffix
        ext = suffix if 1 < len(suffix) <= 10 else ""
    ext = "".join(c for c in ext.lower() if c.isascii() and c.isalnum())
    return f".{ext}" if ext else ""


def filename_of(response: httpx.Response, url: str) -> str:
    """The provider's name for the file: Content-Disposition, else the URL's last path segment."""
    disposition = response.headers.get("content-disposition")
    if disposition:
        msg = Message()
        msg["content-disposition"] = disposition
        with contextlib.suppress(Exception):
            name = msg.get_filename()
            if name:
                return name
    try:
        return unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    except ValueError:
        return ""


def archive_dir(config: Config) -> Path:
    """Where the archive lives: `[archive] dir`, else `<state dir>/archive` (as `status` reports it)."""
    if config.archive.dir:
        return Path(config.archive.dir).expanduser().absolute()
    return (config.state_dir / "archive").absolute()


# -- the store: objects, links, quota (synchronous; called from worker threads) ------------------------
@dataclass
class _Object:
    size: int
    mtime: float
    links: set[Path] = field(default_factory=set)


@dataclass(frozen=True)
class Evicted:
    key: str
    size: int
    links: int


class Store:
    """The archive folder. Thread-safe; every method does blocking I/O, so call it via a thread."""

    def __init__(self, root: Path, *, quota: int, max_age: float) -> None:
        self.root = root
        self.objects = root / "objects"
        self.jobs = root / "jobs"
        self.tmp = root / "tmp"
        self.quota = quota
        self.max_age = max_age
        self.total = 0
        self._index: dict[str, _Object] = {}
        self._link_of: dict[Path, str] = {}
        self._lock = threading.Lock()

    def open(self) -> None:
        """Create the layout, drop partial downloads left by a crash, index what is there."""
        for folder in (self.root, self.objects, self.jobs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            for entry in self.tmp.iterdir():
                if entry.is_symlink() or entry.is_file():
                    entry.unlink(missing_ok=True)
            for job in self._job_dirs():  # half-made links and manifests from a crash
                for entry in job.glob(".*.tmp"):
                    entry.unlink(missing_ok=True)
            self._scan()

    def _scan(self) -> None:
        self._index.clear()
        self._link_of.clear()
        self.total = 0
        inodes: dict[tuple[int, int], str] = {}
        for sub in sorted(self.objects.iterdir()):
            if not sub.is_dir() or sub.is_symlink():
                continue
            for entry in sub.iterdir():
                st = entry.lstat()
                if not stat.S_ISREG(st.st_mode):
                    continue
                name = f"{sub.name}/{entry.name}"
                self._index[name] = _Object(st.st_size, st.st_mtime)
                self.total += st.st_size
                inodes[(st.st_dev, st.st_ino)] = name
        objects = self.objects.resolve()
        for link in self._links_on_disk():
            st = link.lstat()
            key: str | None = None
            if stat.S_ISLNK(st.st_mode):
                with contextlib.suppress(OSError, ValueError):
                    key = (link.parent / os.readlink(link)).resolve().relative_to(objects).as_posix()
            elif stat.S_ISREG(st.st_mode):
                key = inodes.get((st.st_dev, st.st_ino))
            if key is not None and key in self._index:
                self._index[key].links.add(link)
                self._link_of[link] = key

    def _job_dirs(self) -> Iterator[Path]:
        for prov in self.jobs.iterdir():
            if prov.is_dir() and not prov.is_symlink():
                for job in prov.iterdir():
                    if job.is_dir() and not job.is_symlink():
                        yield job

    def _links_on_disk(self) -> Iterator[Path]:
        for job in self._job_dirs():
            for entry in job.iterdir():
                if not entry.name.startswith("."):
                    yield entry

    # -- reading -------------------------------------------------------------------------------
    def job_dir(self, provider: str, job: str) -> Path:
        return self.jobs / safe_component(provider) / safe_component(job)

    def temp_path(self) -> Path:
        return self.tmp / f"{secrets.token_hex(8)}.part"

    def existing(self, job_dir: Path, index: int) -> tuple[Path, str, int] | None:
        """Output `index` of a job, if it is already archived: (link, object key, size)."""
        with self._lock:
            if not job_dir.is_dir():
                return None
            for link in job_dir.glob(f"{index}-*"):
                key = self._link_of.get(link)
                if key is not None and key in self._index and os.path.lexists(link):
                    return link, key, self._index[key].size
        return None

    def read_manifest(self, job_dir: Path) -> dict[str, Any] | None:
        try:
            data = json.loads((job_dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def write_manifest(self, job_dir: Path, data: dict[str, Any]) -> None:
        with self._lock:
            job_dir.mkdir(parents=True, exist_ok=True)
            tmp = job_dir / f".{secrets.token_hex(6)}.tmp"
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, job_dir / MANIFEST)

    def usage(self) -> tuple[int, int]:
        """(objects, bytes)."""
        with self._lock:
            return len(self._index), self.total

    # -- writing -------------------------------------------------------------------------------
    def commit(self, temp: Path, digest: str, ext: str, job_dir: Path, index: int, name: str) -> tuple[Path, str]:
        """Move a finished download into the object store (or drop it, if that content is already
        there) and link it as output `index` of the job. Returns (link, object key)."""
        key = f"{digest[:2]}/{digest}{ext}"
        obj = self.objects / key
        link = job_dir / f"{index}-{name}"
        with self._lock:
            entry = self._index.get(key)
            if entry is not None and obj.exists():
                temp.unlink(missing_ok=True)
                os.utime(obj)  # archived again: young again
                entry.mtime = obj.stat().st_mtime
            else:
                if entry is not None:  # the file went missing behind our back
                    self.total -= entry.size
                obj.parent.mkdir(exist_ok=True)
                os.replace(temp, obj)
                st = obj.stat()
                entry = _Object(st.st_size, st.st_mtime, entry.links if entry else set())
                self._index[key] = entry
                self.total += st.st_size
            job_dir.mkdir(parents=True, exist_ok=True)
            for old in job_dir.glob(f"{index}-*"):
                if old != link:
                    self._drop_link(old)
            tmp_link = job_dir / f".{secrets.token_hex(6)}.tmp"
            try:
                os.link(obj, tmp_link)
            except OSError:  # a file system without hard links
                os.symlink(os.path.relpath(obj, job_dir), tmp_link)
            os.replace(tmp_link, link)
            previous = self._link_of.get(link)
            if previous is not None and previous != key and previous in self._index:
                self._index[previous].links.discard(link)
            entry.links.add(link)
            self._link_of[link] = key
        return link, key

    def _drop_link(self, link: Path) -> None:
        link.unlink(missing_ok=True)
        key = self._link_of.pop(link, None)
        if key is not None and key in self._index:
            self._index[key].links.discard(link)

    def enforce(self, now: float | None = None, keep: frozenset[str] = frozenset()) -> list[Evicted]:
        """Evict the oldest objects (and their job links) while over quota, and every object
        older than the age limit. Objects in `keep` (the job being archived) stay."""
        now = time.time() if now is None else now
        cutoff = now - self.max_age
        out: list[Evicted] = []
        with self._lock:
            for key, entry in sorted(self._index.items(), key=lambda kv: kv[1].mtime):
                if self.total <= self.quota and entry.mtime >= cutoff:
                    break
                if key in keep:
                    continue
                out.append(Evicted(key, entry.size, len(entry.links)))
                self._evict(key)
        return out

    def _evict(self, key: str) -> None:
        entry = self._index.pop(key)
        for link in entry.links:
            link.unlink(missing_ok=True)
            self._link_of.pop(link, None)
        (self.objects / key).unlink(missing_ok=True)
        self.total -= entry.size

    def sweep(self, now: float | None = None, keep: frozenset[str] = frozenset()) -> list[Evicted]:
        """`enforce`, then remove job folders with nothing left in them once they are older than
        the age limit (their manifest kept them from being fetched again until then)."""
        now = time.time() if now is None else now
        out = self.enforce(now, keep)
        cutoff = now - self.max_age
        with self._lock:
            for job in list(self._job_dirs()):
                entries = list(job.iterdir())
                if any(not e.name.startswith(".") for e in entries):
                    continue
                marker = job / MANIFEST
                try:
                    age_from = marker.stat().st_mtime if marker.exists() else job.stat().st_mtime
                except OSError:
                    continue
                if age_from >= cutoff:
                    continue
                for e in entries:
                    e.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    job.rmdir()
                with contextlib.suppress(OSError):
                    job.parent.rmdir()  # only succeeds once the provider folder is empty
        return out


# -- one download -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stored:
    index: int
    path: Path
    key: str
    size: int
    content_type: str
    fetched: bool  # False: it was already in the archive


@dataclass(frozen=True)
class Problem:
    index: int
    kind: Kind  # EXPIRED or DIAGNOSTIC
    upstream: str
    message: str
    status: int | None = None


class _Permanent(Exception):
    def __init__(self, upstream: str, message: str, *, status: int | None = None, kind: Kind = Kind.DIAGNOSTIC):
        super().__init__(message)
        self.upstream = upstream
        self.message = message
        self.status = status
        self.kind = kind


class _Transient(Exception):
    def __init__(self, message: str, *, wait: float = 0.0) -> None:
        super().__init__(message)
        self.message = message
        self.wait = wait


@dataclass(frozen=True)
class _Work:
    seq: int
    provider: str
    job: str
    outputs: tuple[str, ...]
    raw: Any


class _Position:
    """Where the stream reader is, and which read jobs are not handled yet. The saved position never
    passes an unhandled job."""

    def __init__(self, seq: int) -> None:
        self.read = seq
        self.saved = seq
        self.pending: set[int] = set()

    def value(self) -> int:
        return min(self.pending) - 1 if self.pending else self.read


# -- the sidecar ------------------------------------------------------------------------------------
class Archiver:
    """The `archive` sidecar. `Daemon(config, sidecars=[Archiver.from_config(config)])`."""

    name = "archive"

    def __init__(
        self,
        directory: Path,
        settings: ArchiveFile | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        attempts: int = ATTEMPTS,
        retry_initial: float = 1.0,
        retry_max: float = 60.0,
        file_timeout: float = FILE_TIMEOUT,
        sweep_every: float = SWEEP_EVERY,
        backfill: float = BACKFILL,
        queue: int = QUEUE,
    ) -> None:
        s = settings or ArchiveFile(enabled=True)
        if s.concurrency < 1:
            raise ArchiveError(f"archive.concurrency must be at least 1 (got {s.concurrency})")
        for what, value in (("quota_mb", s.quota_mb), ("max_age_days", s.max_age_days), ("max_file_mb", s.max_file_mb)):
            if not value > 0:
                raise ArchiveError(f"archive.{what} must be more than 0 (got {value})")
        self.directory = Path(directory).expanduser().absolute()
        self.settings = s
        self.quota = int(s.quota_mb * MIB)
        self.max_age = s.max_age_days * 86400.0
        self.max_file = min(int(s.max_file_mb * MIB), self.quota)
        self.concurrency = s.concurrency
        self._transport = transport
        self.attempts = max(1, attempts)
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.file_timeout = file_timeout
        self.sweep_every = sweep_every
        self.backfill = backfill
        self.queue = max(1, queue)
        self.store = Store(self.directory, quota=self.quota, max_age=self.max_age)
        self._busy: Counter[str] = Counter()  # objects of jobs being archived: never evicted under them

    @classmethod
    def from_config(cls, config: Config, **kw: Any) -> Archiver | None:
        """The archiver `config` asks for, or None when `[archive] enabled` is false."""
        if not config.archive.enabled:
            return None
        return cls(archive_dir(config), config.archive, **kw)

    # -- running -------------------------------------------------------------------------------
    async def run(self, host: Host, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            await anyio.to_thread.run_sync(self.store.open)
        except OSError as exc:
            raise ArchiveError(f"archive folder {self.directory}: {exc.strerror or exc}") from None
        cursor, horizon = await self._start_position(host)
        pos = _Position(cursor)
        save_lock = anyio.Lock()
        limiter = anyio.CapacityLimiter(self.concurrency)
        send, recv = anyio.create_memory_object_stream[_Work](self.queue)
        objects, used = self.store.usage()
        log.info(
            "archive: %s (%d objects, %.1f of %.0f MiB), from seq %d, %d downloads at a time",
            self.directory,
            objects,
            used / MIB,
            self.quota / MIB,
            cursor,
            self.concurrency,
        )
        async with self._client() as http, send, recv, anyio.create_task_group() as tg:
            for _ in range(self.concurrency):
                tg.start_soon(self._worker, host, http, recv.clone(), limiter, pos, save_lock)
            tg.start_soon(self._sweeper)
            task_status.started()
            await self._read(host, send, pos, save_lock, horizon)

    def _client(self) -> httpx.AsyncClient:
        # Output URLs are public or presigned: no credentials are ever sent. Loopback hosts (the
        # emulators) never go through a proxy from the environment.
        direct = {f"all://{h}": httpx.AsyncHTTPTransport() for h in ("127.0.0.1", "localhost", "[::1]")}
        return httpx.AsyncClient(
            transport=self._transport,
            mounts=None if self._transport is not None else direct,
            follow_redirects=True,
            max_redirects=5,
            timeout=httpx.Timeout(30.0, connect=10.0),
            headers={"User-Agent": "streamd-archive"},
            limits=httpx.Limits(max_connections=max(4, self.concurrency * 2), max_keepalive_connections=8),
        )

    async def _start_position(self, host: Host) -> tuple[int, float | None]:
        """(cursor, horizon): the saved position; on a first run (or a new journal) the start of
        the journal, skipping completions older than `backfill` seconds."""
        saved = await host.get_meta(POSITION_KEY)
        if saved:
            epoch, _, seq = saved.rpartition(":")
            if epoch == host.epoch and seq.isdigit():
                return int(seq), None
            log.info("archive: the journal changed (new epoch); reading it from its start")
        return 0, time.time() - self.backfill

    async def _read(
        self,
        host: Host,
        send: MemoryObjectSendStream[_Work],
        pos: _Position,
        save_lock: anyio.Lock,
        horizon: float | None,
    ) -> None:
        async for batch in host.stream(pos.read, COMPLETED_FILTER):
            if isinstance(batch, GapNotice):
                log.warning(
                    "archive: events %d..%d were trimmed from the journal before they were read; "
                    "jobs completed in them are not archived",
                    batch.first,
                    batch.last,
                )
                pos.read = max(pos.read, batch.last)
            elif isinstance(batch, LiveNotice):
                pos.read = max(pos.read, batch.seq)
            else:
                for event in batch:
                    pos.read = max(pos.read, event.seq)
                    work = self._work_for(event, horizon)
                    if work is None:
                        continue
                    pos.pending.add(work.seq)
                    await send.send(work)  # full queue: wait; the bus catches us up from the journal
            await self._save(host, pos, save_lock)

    def _work_for(self, event: CloudEvent, horizon: float | None) -> _Work | None:
        data = event.data
        if event.type != COMPLETED or data.job is None or not data.outputs:
            return None
        if horizon is not None and _event_time(event) < horizon:
            return None
        return _Work(event.seq, data.provider, data.job, tuple(data.outputs), data.raw)

    async def _save(self, host: Host, pos: _Position, lock: anyio.Lock) -> None:
        async with lock:
            value = pos.value()
            if value > pos.saved:
                await host.set_meta(POSITION_KEY, f"{host.epoch}:{value}")
                pos.saved = value

    async def _worker(
        self,
        host: Host,
        http: httpx.AsyncClient,
        recv: MemoryObjectReceiveStream[_Work],
        limiter: anyio.CapacityLimiter,
        pos: _Position,
        save_lock: anyio.Lock,
    ) -> None:
        async with recv:
            async for work in recv:
                # An unexpected error (a full disk) propagates: the daemon restarts the sidecar with
                # backoff, and the job is read again because the position was not moved past it.
                await self._archive_job(host, http, work, limiter)
                pos.pending.discard(work.seq)
                await self._save(host, pos, save_lock)

    async def _sweeper(self) -> None:
        while True:
            await self._enforce(sweep=True)
            await anyio.sleep(self.sweep_every)

    async def _enforce(self, *, sweep: bool = False) -> None:
        keep = frozenset(self._busy)
        if sweep:
            evicted = await anyio.to_thread.run_sync(lambda: self.store.sweep(keep=keep))
        else:
            evicted = await anyio.to_thread.run_sync(lambda: self.store.enforce(keep=keep))
        if evicted:
            objects, used = self.store.usage()
            log.info(
                "archive: evicted %d object(s), %.1f MiB (quota %.0f MiB, age limit %.1f days); now %d, %.1f MiB",
                len(evicted),
                sum(e.size for e in evicted) / MIB,
                self.quota / MIB,
                self.max_age / 86400,
                objects,
                used / MIB,
            )

    # -- one job ---------------------------------------------------------------------------------
    async def _archive_job(
        self, host: Host, http: httpx.AsyncClient, work: _Work, limiter: anyio.CapacityLimiter
    ) -> None:
        """Archive every output of one completed job and report it; exactly once per job."""
        job_dir = self.store.job_dir(work.provider, work.job)
        if await anyio.to_thread.run_sync(self.store.read_manifest, job_dir) is not None:
            return  # handled before (this run or an earlier one)
        outputs = work.outputs[:MAX_OUTPUTS]
        results: list[Stored | Problem | None] = [None] * len(outputs)

        async def one(index: int, url: str) -> None:
            result = await self._output(http, work, job_dir, index, url, limiter)
            if isinstance(result, Stored):
                self._busy[result.key] += 1
            results[index] = result

        try:
            async with anyio.create_task_group() as tg:
                for index, url in enumerate(outputs):
                    tg.start_soon(one, index, url)
            stored = [r for r in results if isinstance(r, Stored)]
            problems = [r for r in results if isinstance(r, Problem)]
            if stored:
                await self._enforce()
            await host.emit(*self._observations(work, stored, problems))
        finally:
            for r in results:
                if isinstance(r, Stored):
                    self._busy[r.key] -= 1
                    if self._busy[r.key] <= 0:
                        del self._busy[r.key]
        manifest = {
            "provider": work.provider,
            "job": work.job,
            "seq": work.seq,
            "archived_at": time.time(),
            "files": [
                {"index": s.index, "name": s.path.name, "object": s.key, "size": s.size, "content_type": s.content_type}
                for s in stored
            ],
            "problems": [{"index": p.index, "kind": p.kind.value, "message": p.message} for p in problems],
        }
        await anyio.to_thread.run_sync(self.store.write_manifest, job_dir, manifest)
        fetched = sum(1 for s in stored if s.fetched)
        log.info(
            "archive: %s/%s: %d of %d output(s) archived (%d downloaded), %d problem(s)",
            work.provider,
            work.job,
            len(stored),
            len(work.outputs),
            fetched,
            len(problems),
        )

    def _observations(self, work: _Work, stored: list[Stored], problems: list[Problem]) -> list[Observation]:
        common: dict[str, Any] = {"provider": work.provider, "job": work.job, "origin": Origin.DAEMON}
        out: list[Observation] = []
        if stored:
            files = [
                {
                    "index": s.index,
                    "path": str(s.path),
                    "sha256": s.key.rsplit("/", 1)[-1].split(".", 1)[0],
                    "size": s.size,
                    "content_type": s.content_type,
                }
                for s in stored
            ]
            out.append(
                Observation(
                    kind=Kind.ARCHIVED,
                    upstream="streamd.archived",
                    outputs=tuple(str(s.path) for s in stored),
                    message=f"{len(stored)} of {len(work.outputs)} output(s) archived in {self.directory}",
                    raw={"files": files},
                    **common,
                )
            )
        for p in problems:
            out.append(
                Observation(
                    kind=p.kind,
                    upstream=p.upstream,
                    message=p.message,
                    raw={"index": p.index, "status": p.status},
                    **common,
                )
            )
        if len(work.outputs) > MAX_OUTPUTS:
            out.append(
                Observation(
                    kind=Kind.DIAGNOSTIC,
                    upstream="streamd.archive.too_many",
                    message=f"only the first {MAX_OUTPUTS} of {len(work.outputs)} outputs were archived",
                    **common,
                )
            )
        return out

    async def _output(
        self,
        http: httpx.AsyncClient,
        work: _Work,
        job_dir: Path,
        index: int,
        url: str,
        limiter: anyio.CapacityLimiter,
    ) -> Stored | Problem:
        found = await anyio.to_thread.run_sync(self.store.existing, job_dir, index)
        if found is not None:
            link, key, size = found
            ctype = mimetypes.guess_type(key, strict=False)[0] or "application/octet-stream"
            return Stored(index, link, key, size, ctype, fetched=False)
        where = f"output {index} of {work.provider}/{work.job} ({display_url(url)})"
        try:
            scheme = urlsplit(url).scheme.lower()
        except ValueError:
            scheme = ""
        if scheme not in ("http", "https"):
            return Problem(index, Kind.DIAGNOSTIC, "streamd.archive.bad_url", f"{where}: not an http(s) URL; not kept")
        expected = expected_type(url, work.raw)
        delays = backoff(self.retry_initial, self.retry_max)
        last = ""
        for attempt in range(1, self.attempts + 1):
            try:
                async with limiter:
                    return await self._attempt(http, url, expected, job_dir, index)
            except _Permanent as exc:
                return Problem(index, exc.kind, exc.upstream, f"{where}: {exc.message}", exc.status)
            except _Transient as exc:
                last = exc.message
                if attempt == self.attempts:
                    break
                delay = max(next(delays), exc.wait)
                log.info("archive: %s: %s; attempt %d in %.1fs", where, last, attempt + 1, delay)
                await anyio.sleep(delay)
        message = f"{where}: gave up after {self.attempts} attempts: {last}; not kept"
        log.warning("archive: %s", message)
        return Problem(index, Kind.DIAGNOSTIC, "streamd.archive.failed", message)

    async def _attempt(self, http: httpx.AsyncClient, url: str, expected: str, job_dir: Path, index: int) -> Stored:
        temp = self.store.temp_path()
        committed = False
        try:
            with anyio.fail_after(self.file_timeout):
                async with http.stream("GET", url) as response:
                    ctype = _check_response(response, expected, self.max_file)
                    name = filename_of(response, url)
                    digest, size, ctype = await self._receive(response, temp, ctype, expected)
            ext = extension_for(ctype, name)
            base = safe_name(name)
            if ext and not base.lower().endswith(ext):
                base = safe_name(base.rsplit(".", 1)[0] if "." in base else base) + ext
            link, key = await anyio.to_thread.run_sync(self.store.commit, temp, digest, ext, job_dir, index, base)
            committed = True
            return Stored(index, link, key, size, ctype, fetched=True)
        except TimeoutError:
            raise _Transient(f"not finished within {self.file_timeout:.0f}s") from None
        except httpx.UnsupportedProtocol:
            raise _Permanent("streamd.archive.bad_url", "not an http(s) URL; not kept") from None
        except httpx.TooManyRedirects:
            raise _Permanent("streamd.archive.refused", "too many redirects; not kept") from None
        except httpx.DecodingError as exc:
            raise _Transient(f"undecodable body ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise _Transient(_transport_message(exc)) from None
        finally:
            if not committed:
                with anyio.move_on_after(5, shield=True):
                    await anyio.to_thread.run_sync(lambda: temp.unlink(missing_ok=True))

    async def _receive(self, response: httpx.Response, temp: Path, ctype: str, expected: str) -> tuple[str, int, str]:
        """Stream the body into `temp`: sha256 and size as it goes, the size limit enforced on
        the decoded bytes. Returns (sha256, size, content type)."""
        hasher = hashlib.sha256()
        size = 0
        head = b""
        async with await anyio.open_file(temp, "xb") as f:
            async for chunk in response.aiter_bytes(CHUNK):
                size += len(chunk)
                if size > self.max_file:
                    raise _Permanent(
                        "streamd.archive.too_large",
                        f"larger than the {self.max_file / MIB:g} MiB limit per file (archive.max_file_mb); not kept",
                    )
                if len(head) < 32:
                    head += chunk[: 32 - len(head)]
                hasher.update(chunk)
                await f.write(chunk)
            await f.flush()
            await anyio.to_thread.run_sync(os.fsync, f.wrapped.fileno())
        declared = response.headers.get("content-length")
        identity = not response.headers.get("content-encoding")
        if declared and declared.isdigit() and identity and int(declared) != size:
            raise _Transient(f"truncated body: {size} of {declared} bytes")
        if size == 0:
            raise _Permanent("streamd.archive.empty", "the server sent an empty file; not kept")
        if ctype in GENERIC_TYPES:
            sniffed = sniff(head)
            if sniffed is None or not type_matches(expected, sniffed):
                said = ctype or "no content type"
                raise _Permanent(
                    "streamd.archive.content_type",
                    f"expected {expected}, got {said} and content that is not recognisably {expected}; not kept",
                )
            ctype = sniffed
        return hasher.hexdigest(), size, ctype


def _check_response(response: httpx.Response, expected: str, max_file: int) -> str:
    """Classify the status and check the headers before reading a byte of the body."""
    status = response.status_code
    if status in (404, 410):
        raise _Permanent(
            "streamd.archive.expired",
            f"the output is gone (HTTP {status}): the provider's URL expired or the file was purged",
            status=status,
            kind=Kind.EXPIRED,
        )
    if status == 429 or status == 408 or status >= 500:
        wait = retry_after(response.headers.get("retry-after"), default=0.0, cap=RETRY_AFTER_CAP)
        raise _Transient(f"HTTP {status}", wait=wait)
    if status != 200:
        hint = " (an expired presigned URL answers 403)" if status == 403 else ""
        raise _Permanent("streamd.archive.refused", f"refused with HTTP {status}{hint}; not kept", status=status)
    ctype = media_type(response.headers.get("content-type"))
    if ctype not in GENERIC_TYPES and not type_matches(expected, ctype):
        raise _Permanent("streamd.archive.content_type", f"expected {expected}, got {ctype}; not kept")
    length = response.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_file and not response.headers.get("content-encoding"):
        raise _Permanent(
            "streamd.archive.too_large",
            f"{int(length) / MIB:.1f} MiB is over the {max_file / MIB:g} MiB limit per file (archive.max_file_mb);"
            " not kept",
        )
    return ctype


def _transport_message(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the connection ended mid-transfer"
    return f"connection failed ({type(exc).__name__})"


def _event_time(event: CloudEvent) -> float:
    try:
        return datetime.fromisoformat(event.time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return time.time()


# -- for the CLI --------------------------------------------------------------------------------------
def copy_out(archive_dir: Path, paths: Sequence[str], to: Path) -> list[Path]:
    """Copy archived files (a job's `paths`) into the folder `to`, keeping their names.

    Every path must be a file inside `archive_dir`. A file already in `to` with the same content
    is kept as it is; one with other content is not overwritten: the copy gets a `-1`, `-2`...
    suffix. Raises ArchiveError, with a message for a person, when a path is outside the archive
    or no longer in it (evicted for quota or age); nothing is copied then.
    """
    root = Path(archive_dir).expanduser().resolve()
    sources: list[tuple[str, Path]] = []
    missing: list[str] = []
    for text in paths:
        src = Path(text).expanduser()
        if not src.is_absolute():
            src = root / src
        try:
            real = src.resolve(strict=True)
        except (OSError, RuntimeError):
            missing.append(text)
            continue
        if not real.is_relative_to(root) or not real.is_file():
            raise ArchiveError(f"{text} is not a file in the archive {root}")
        sources.append((safe_name(src.name), real))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ArchiveError(
            f"{len(missing)} of {len(paths)} archived file(s) are no longer in the archive "
            f"(evicted for quota or age): {shown}"
        )
    try:
        to.mkdir(parents=True, exist_ok=True)
        out: list[Path] = []
        for name, real in sources:
            out.append(_copy_one(real, to, name))
    except OSError as exc:
        raise ArchiveError(f"cannot copy into {to}: {exc.strerror or exc}") from None
    return out


def _copy_one(src: Path, to: Path, name: str) -> Path:
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    n = 0
    while True:
        dest = to / (name if n == 0 else f"{stem}-{n}{'.' + ext if ext else ''}")
        if not dest.exists():
            break
        if dest.is_file() and _same_file_content(src, dest):
            return dest
        n += 1
    tmp = to / f".{name}.{secrets.token_hex(4)}.part"
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _same_file_content(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    ha, hb = hashlib.sha256(), hashlib.sha256()
    with a.open("rb") as fa, b.open("rb") as fb:
        for chunk in iter(lambda: fa.read(CHUNK), b""):
            ha.update(chunk)
        for chunk in iter(lambda: fb.read(CHUNK), b""):
            hb.update(chunk)
    return ha.digest() == hb.digest()
