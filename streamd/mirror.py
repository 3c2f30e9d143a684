"""The Redis Streams mirror: every journaled event appended to one shared Redis Stream, and read back.

Writing (`RedisMirror`, a sidecar): reads the journal from the position it last confirmed, appends
events with `XADD … MAXLEN ~ N` in MULTI/EXEC pipelines of at most `batch` entries, and records the
newest mirrored seq in the journal (`mirror.redis.position`) after each pipeline. A Redis outage
only makes it fall behind: the local feed never waits for it; it reconnects with backoff, logs one
line when an outage starts and one when it ends, and catches up from the journal. Delivery is at
least once and in seq order per daemon; each entry carries the daemon's id and the seq, so readers
drop the rare duplicate.

Reading (`tail_redis`, for `streamd tail --redis`): XREAD from a position, or XREADGROUP + XACK in
a consumer group (created when missing), claiming entries that crashed consumers left pending with
XAUTOCLAIM; duplicates are dropped by (daemon, seq), and the usual filter language applies.

The entry format, the guarantees and a redis-cli recipe are in docs/mirror.md. The `redis` package
is the optional extra `streamd[redis]`: this module imports without it and says so when used.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from streamd.bus import GapNotice, LiveNotice
from streamd.config import RedisMirrorFile
from streamd.events import CloudEvent, cloud_decoder, json_encoder
from streamd.filters import MATCH_ALL, Filter
from streamd.transport.backoff import Reconnector

try:
    from redis.asyncio import Redis
    from redis.asyncio.connection import parse_url
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisError, ResponseError

    _HAVE_REDIS = True
except ImportError:  # pragma: no cover - the optional extra is not installed
    _HAVE_REDIS = False

if TYPE_CHECKING:
    from redis.typing import EncodableT, FieldT

    from streamd.sidecar import Batch, Host

log = logging.getLogger("streamd.mirror")

POSITION_KEY = "mirror.redis.position"
DEFAULT_STREAM = "streamd:events"
DEFAULT_MAXLEN = 1_000_000
BATCH = 500  # most XADDs in one pipeline (one MULTI/EXEC), and so between two saved positions
QUEUE = 8  # batches read from the journal but not yet written; beyond that the mirror lags (reads later)
TIMEOUT = 10.0  # seconds for one Redis round trip, unless the URL says otherwise (?socket_timeout=)
CLOSE_TIMEOUT = 2.0
SEEN = 16_384  # (daemon, seq) pairs a reader remembers, to drop re-sent entries that arrive out of order
_ENTRY_ID = re.compile(r"\d+(-\d+)?")


class MirrorError(Exception):
    """A mistake or refusal a person can act on: one line, no password in it."""


def _require_redis() -> None:
    if not _HAVE_REDIS:
        raise MirrorError("the Redis mirror needs the redis package: pip install 'streamd[redis]'")


# -- URLs and messages without passwords ------------------------------------------------------------
def redact(url: str) -> str:
    """`url` fit for a log line: the password (in the user part or `?password=`) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unreadable redis URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _ = userinfo.partition(":")
        # user:password@host hides the password; a lone word before @ may be a password too: hide it
        netloc = f"{user}:***@{hostport}" if sep else f"***@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
    text = f"{parts.scheme}://{netloc}{parts.path}"  # urlunsplit would turn unix:///path into unix:/path
    return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def _passwords(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = []
    if parts.password:
        found.append(parts.password)
    elif parts.username and "@" in parts.netloc:
        found.append(parts.username)  # redis://secret@host: a bare password
    found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    return sorted({form for secret in found for form in (secret, unquote(secret))}, key=len, reverse=True)


def describe(exc: BaseException, url: str = "") -> str:
    """One line for a person about a Redis failure, with any password from `url` blanked out."""
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    if isinstance(exc, TimeoutError) and "time" not in text.lower():
        text = f"timed out ({text})"
    for secret in _passwords(url):
        text = text.replace(secret, "***")
    return text


def _client(url: str, timeout: float) -> Redis:
    """A client that does not retry behind our back (one immediate retry on a fresh connection)."""
    _require_redis()
    try:
        return Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
            decode_responses=False,
        )
    except (ValueError, TypeError) as exc:
        raise MirrorError(f"redis URL {redact(url)}: {describe(exc, url)}") from None


def _check_url(url: str) -> None:
    _require_redis()
    if not url or not url.strip():
        raise MirrorError("mirror.redis.url is empty: expected e.g. redis://localhost:6379/0")
    try:
        parse_url(url)
    except (ValueError, TypeError) as exc:
        raise MirrorError(f"redis URL {redact(url)}: {describe(exc, url)}") from None


# -- the writing side: a sidecar ------------------------------------------------------------------------
@dataclass
class MirrorStats:
    """What `streamd status` could show about the mirror."""

    position: int = 0  # the newest seq confirmed in Redis (and saved in the journal)
    mirrored: int = 0  # entries appended since start
    pipelines: int = 0
    failures: int = 0  # failed attempts since start (each outage counts its retries)
    outages: int = 0
    down_since: float | None = None  # unix time the current outage began
    error: str | None = None  # the current outage's cause, password-free
    skipped: int = 0  # events the journal no longer held when the mirror got to them


class RedisMirror:
    """`sidecar.Sidecar` appending every event to a Redis Stream, at least once, in order per daemon."""

    name = "mirror.redis"

    def __init__(
        self,
        url: str,
        stream: str = DEFAULT_STREAM,
        maxlen: int = DEFAULT_MAXLEN,
        *,
        batch: int = BATCH,
        timeout: float = TIMEOUT,
        backoff: tuple[float, float] = (1.0, 30.0),
    ) -> None:
        _check_url(url)
        if not stream:
            raise MirrorError("mirror.redis.stream is empty: expected a key such as 'streamd:events'")
        if maxlen < 1:
            raise MirrorError(f"mirror.redis.maxlen {maxlen}: expected a positive number of entries")
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.batch = max(1, batch)
        self.timeout = timeout
        self.backoff = backoff
        self.stats = MirrorStats()

    @classmethod
    def from_config(cls, settings: RedisMirrorFile) -> RedisMirror:
        """From `config.RedisMirrorFile` (`[mirror.redis]`: url, stream, maxlen)."""
        return cls(settings.url, settings.stream, settings.maxlen)

    def __repr__(self) -> str:
        return f"RedisMirror({redact(self.url)!r}, stream={self.stream!r}, maxlen={self.maxlen})"

    async def run(self, host: Host, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        position = await self._load_position(host)
        self.stats.position = position
        client = _client(self.url, self.timeout)
        send, recv = anyio.create_memory_object_stream[list[CloudEvent] | GapNotice](QUEUE)
        log.info(
            "mirror.redis: appending to stream %r at %s (maxlen ~%d) from seq %d",
            self.stream,
            redact(self.url),
            self.maxlen,
            position + 1,
        )
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._read, host, position, send)
                task_status.started()
                await self._write(host, client, position, recv)
        finally:
            with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                await client.aclose()

    async def _load_position(self, host: Host) -> int:
        raw = await host.get_meta(POSITION_KEY)
        if raw is None:
            return 0  # first run: mirror everything the journal keeps
        try:
            position = int(raw)
        except ValueError:
            position = -1
        if position < 0:
            log.warning("mirror.redis: saved position %r is not a seq; mirroring from the oldest kept event", raw)
            return 0
        return position

    async def _read(self, host: Host, cursor: int, send: MemoryObjectSendStream[list[CloudEvent] | GapNotice]) -> None:
        """Journal → bounded queue. When the writer is stuck the queue fills, this waits, and the
        bus marks us lagging: we read from the journal later, and nobody else is slowed."""
        source: AsyncIterator[Batch] = host.stream(cursor)
        try:
            async with send:
                async for batch in source:
                    if isinstance(batch, LiveNotice):
                        continue
                    await send.send(batch)
        finally:
            aclose = getattr(source, "aclose", None)
            if aclose is not None:
                with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
                    await aclose()

    async def _write(
        self, host: Host, client: Redis, position: int, recv: MemoryObjectReceiveStream[list[CloudEvent] | GapNotice]
    ) -> None:
        daemon = host.daemon_id
        policy = Reconnector(initial=self.backoff[0], maximum=self.backoff[1], healthy_after=60.0)
        policy.connected(time.monotonic())
        async with recv:
            async for first in recv:
                items = [first]
                size = _size(first)
                while size < self.batch:  # coalesce what is already waiting into fuller pipelines
                    try:
                        more = recv.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                    items.append(more)
                    size += _size(more)
                pending: list[CloudEvent] = []
                for item in items:
                    if isinstance(item, GapNotice):
                        position = await self._flush(host, client, daemon, pending, position, policy)
                        pending = []
                        position = await self._skip(host, item, position)
                    else:
                        pending.extend(ev for ev in item if ev.seq > position)
                position = await self._flush(host, client, daemon, pending, position, policy)

    async def _flush(
        self, host: Host, client: Redis, daemon: str, events: list[CloudEvent], position: int, policy: Reconnector
    ) -> int:
        for start in range(0, len(events), self.batch):
            chunk = events[start : start + self.batch]
            await self._append(client, daemon, chunk, policy)
            position = chunk[-1].seq
            await host.set_meta(POSITION_KEY, str(position))
            self.stats.position = position
        return position

    async def _skip(self, host: Host, gap: GapNotice, position: int) -> int:
        if gap.last <= position:
            return position
        first = max(gap.first, position + 1)
        self.stats.skipped += gap.last - first + 1
        log.warning(
            "mirror.redis: events %d..%d left the journal (retention) before they reached Redis; "
            "they are missing from stream %r",
            first,
            gap.last,
            self.stream,
        )
        await host.set_meta(POSITION_KEY, str(gap.last))
        self.stats.position = gap.last
        return gap.last

    async def _append(self, client: Redis, daemon: str, events: Sequence[CloudEvent], policy: Reconnector) -> None:
        """One MULTI/EXEC of XADDs, retried with backoff until Redis takes it. All or nothing, so a
        retry re-sends only when Redis applied a pipeline whose reply was lost."""
        entries: list[dict[FieldT, EncodableT]] = [
            {b"daemon": daemon.encode(), b"seq": str(ev.seq).encode(), b"event": json_encoder.encode(ev)}
            for ev in events
        ]
        while True:
            try:
                with anyio.fail_after(self.timeout * 3):
                    async with client.pipeline(transaction=True) as pipe:
                        for fields in entries:
                            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
                        await pipe.execute()
            except (RedisError, OSError) as exc:  # OSError covers TimeoutError from fail_after
                self._failed(exc, events[0].seq)
                await anyio.sleep(policy.delay(time.monotonic()))
                continue
            self._succeeded(len(entries), events[0].seq, policy)
            return

    def _failed(self, exc: BaseException, seq: int) -> None:
        st = self.stats
        st.failures += 1
        reason = describe(exc, self.url)
        if st.down_since is None:
            st.down_since = time.time()
            st.outages += 1
            st.error = reason
            log.warning(
                "mirror.redis: cannot append to stream %r at %s: %s; retrying with backoff, the local feed is "
                "unaffected and mirroring resumes at seq %d",
                self.stream,
                redact(self.url),
                reason,
                seq,
            )
        else:
            log.debug("mirror.redis: still failing: %s", reason)

    def _succeeded(self, count: int, first: int, policy: Reconnector) -> None:
        st = self.stats
        st.mirrored += count
        st.pipelines += 1
        if st.down_since is not None:
            log.info(
                "mirror.redis: %s is back after %.0fs; appending again from seq %d",
                redact(self.url),
                max(0.0, time.time() - st.down_since),
                first,
            )
            st.down_since = None
            st.error = None
            policy.connected(time.monotonic())


def _size(item: list[CloudEvent] | GapNotice) -> int:
    return 1 if isinstance(item, GapNotice) else len(item)


# -- the reading side: `streamd tail --redis` ---------------------------------------------------------------
Entry = tuple[str, dict[bytes, bytes] | None]  # (entry id, fields); fields None for a trimmed pending entry


class _Seen:
    """Which (daemon, seq) a reader already handed out.

    Entries read in stream order (XREAD, XREADGROUP `>`) use the per-daemon high-water mark: the
    mirror only re-sends what it sent before, so an entry whose seq is not above the highest seen
    for its daemon is a duplicate. Entries from the pending list (claimed or our own) are older
    than that mark by nature and are checked against a bounded set of recent pairs instead.
    """

    def __init__(self, limit: int = SEEN) -> None:
        self.high: dict[str, int] = {}
        self.recent: OrderedDict[tuple[str, int], None] = OrderedDict()
        self.limit = limit

    def first_time(self, daemon: str, seq: int, *, in_order: bool) -> bool:
        key = (daemon, seq)
        if key in self.recent or (in_order and seq <= self.high.get(daemon, 0)):
            return False
        self.recent[key] = None
        if len(self.recent) > self.limit:
            self.recent.popitem(last=False)
        if seq > self.high.get(daemon, 0):
            self.high[daemon] = seq
        return True


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(raw: Any) -> Entry:
    entry_id, fields = _text(raw[0]), raw[1]
    if fields is None:
        return entry_id, None
    if isinstance(fields, list | tuple):  # a flat [k, v, k, v] reply
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    return entry_id, {(k if isinstance(k, bytes) else str(k).encode()): v for k, v in fields.items()}


def _entries(resp: Any) -> list[Entry]:
    """XREAD/XREADGROUP replies as a flat list, whichever shape the client's protocol gives."""
    if not resp:
        return []
    chunks = list(resp.values()) if isinstance(resp, dict) else [item[1] for item in resp]
    out: list[Entry] = []
    for chunk in chunks:
        if (
            chunk
            and len(chunk) == 1
            and isinstance(chunk[0], list)
            and (not chunk[0] or isinstance(chunk[0][0], list | tuple))
        ):
            chunk = chunk[0]  # RESP3: {stream: [[entries]]}
        out.extend(_entry(raw) for raw in chunk)
    return out


def decode_entry(fields: dict[bytes, bytes]) -> tuple[str, int, CloudEvent]:
    """(daemon, seq, event) from a mirror entry's fields; ValueError says what is wrong."""
    missing = [name for name in ("daemon", "event") if name.encode() not in fields]
    if missing:
        raise ValueError(f"not a streamd entry (no {' or '.join(missing)} field)")
    try:
        event = cloud_decoder.decode(fields[b"event"])
    except msgspec.DecodeError as exc:
        raise ValueError(f"its event is not a streamd CloudEvent: {exc}") from None
    try:
        seq = int(fields[b"seq"]) if b"seq" in fields else event.seq
    except ValueError:
        raise ValueError(f"its seq {fields[b'seq']!r} is not a number") from None
    return _text(fields[b"daemon"]), seq, event


class _Reader:
    """The Redis side of `tail_redis`: which command to send next, and where it left off."""

    def __init__(
        self,
        client: Redis,
        stream: str,
        group: str | None,
        consumer: str,
        batch: int,
        claim_after: float,
        block_ms: int,
    ) -> None:
        self.client = client
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.batch = batch
        self.claim_after = claim_after
        self.block_ms = block_ms
        self.last_id = "0-0"  # XREAD: the last entry read
        self.phase = "pending"  # groups: pending (ours, from 0) → claim (XAUTOCLAIM) → new (`>`) → claim …
        self.pending_id = "0-0"
        self.claim_id = "0-0"
        self.next_claim = 0.0
        self.lost_group = False  # NOGROUP seen: create the group again before the next read

    async def start(self, since: str) -> None:
        """Check the server and the key, and set the starting point (or create the group)."""
        await self.client.ping()
        kind = _text(await self.client.type(self.stream))
        if kind not in ("none", "stream"):
            raise MirrorError(f"redis key {self.stream!r} holds a {kind}, not a stream")
        if self.group is None:
            if since == "now":
                last = await self.client.xrevrange(self.stream, "+", "-", count=1)
                self.last_id = _text(last[0][0]) if last else "0-0"
            else:
                self.last_id = "0-0" if since == "oldest" else since
            return
        start = {"now": "$", "oldest": "0"}.get(since, since)
        try:
            await self.client.xgroup_create(self.stream, self.group, id=start, mkstream=True)
            log.info("created consumer group %r on stream %r at %s", self.group, self.stream, start)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _recreate_group(self, group: str) -> None:
        """The group vanished (XGROUP DESTROY, or Redis restarted without persistence): create it again
        at the start of the stream; what this reader already handed out is dropped as a duplicate."""
        try:
            await self.client.xgroup_create(self.stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.lost_group = False
        self.restart()

    def restart(self) -> None:
        """After a reconnect: acks may have been lost, so re-read our own pending entries first."""
        if self.group is not None:
            self.phase, self.pending_id = "pending", "0-0"

    async def read(self, follow: bool) -> list[tuple[Entry, bool]] | None:
        """The next entries, each with whether it came in stream order; None once caught up
        (only when not following); [] when a blocking read timed out empty."""
        if self.group is None:
            resp: Any = await self.client.xread(
                {self.stream: self.last_id}, count=self.batch, block=self.block_ms if follow else None
            )
            entries = _entries(resp)
            if entries:
                self.last_id = entries[-1][0]
                return [(e, True) for e in entries]
            return [] if follow else None
        group = self.group
        if self.lost_group:
            await self._recreate_group(group)
        while True:
            if self.phase == "pending":
                resp = await self.client.xreadgroup(
                    group, self.consumer, {self.stream: self.pending_id}, count=self.batch
                )
                entries = _entries(resp)
                if entries:
                    self.pending_id = entries[-1][0]
                    return [(e, False) for e in entries]
                self.phase, self.claim_id = "claim", "0-0"
            if self.phase == "claim":
                reply = await self.client.xautoclaim(
                    self.stream,
                    group,
                    self.consumer,
                    int(self.claim_after * 1000),
                    self.claim_id,
                    count=self.batch,
                )
                self.claim_id = _text(reply[0])
                claimed = [_entry(raw) for raw in reply[1]]
                if self.claim_id in ("0-0", "0"):
                    self.phase = "new"
                    self.next_claim = anyio.current_time() + max(self.claim_after, 1.0)
                if claimed:
                    log.info(
                        "claimed %d entries of stream %r (%s..%s) left pending by stalled consumers",
                        len(claimed),
                        self.stream,
                        claimed[0][0],
                        claimed[-1][0],
                    )
                    return [(e, False) for e in claimed]
                continue
            if anyio.current_time() >= self.next_claim:
                self.phase, self.claim_id = "claim", "0-0"
                continue
            resp = await self.client.xreadgroup(
                group, self.consumer, {self.stream: ">"}, count=self.batch, block=self.block_ms if follow else None
            )
            entries = _entries(resp)
            if entries:
                return [(e, True) for e in entries]
            return [] if follow else None

    async def ack(self, ids: list[str]) -> None:
        if self.group is not None and ids:
            await self.client.xack(self.stream, self.group, *ids)


def _check_since(since: str) -> str:
    since = since.strip()
    if since in ("now", "oldest") or _ENTRY_ID.fullmatch(since):
        return since
    raise MirrorError(
        f"--since {since!r}: with --redis, expected 'now', 'oldest' or a stream entry id such as 1700000000000-0"
    )


def default_consumer() -> str:
    return f"{socket.gethostname() or 'localhost'}-{os.getpid()}"


async def tail_redis(
    url: str,
    stream: str = DEFAULT_STREAM,
    *,
    group: str | None = None,
    consumer: str | None = None,
    filter: Filter = MATCH_ALL,
    since: str = "now",
    follow: bool = True,
    claim_after: float = 60.0,
    batch: int = 100,
) -> AsyncGenerator[CloudEvent, None]:
    """Events from the shared Redis Stream, each (daemon, seq) once, those that match `filter`.

    Without `group`: XREAD from `since` ('now', 'oldest' or an entry id). With `group`: the group's
    share for `consumer` (default host-pid), the group created at `since` when missing; first this
    consumer's own pending entries, then entries idle for `claim_after` seconds in other consumers'
    pending lists (XAUTOCLAIM; again every `claim_after` seconds), then new ones. An entry is
    acknowledged once the caller asks for the next one, so the entry in hand when the caller stops
    stays pending and is delivered again (at least once), as do the ones read ahead with it (at
    most `batch`). Entries the filter rejects, duplicates and unreadable entries are acknowledged
    and skipped. Close it with `contextlib.aclosing` so the last acknowledgements are sent.

    `follow=False` ends once caught up. A first connection that fails raises MirrorError; later
    outages are retried with backoff (one log line each) and reading resumes where it stopped.
    """
    _require_redis()
    _check_url(url)
    since = _check_since(since)
    if consumer is not None and group is None:
        raise MirrorError("a consumer name needs a consumer group (--group)")
    if group is not None and not group.strip():
        raise MirrorError("--group: the consumer group needs a name")
    client = _client(url, TIMEOUT)
    timeout = client.connection_pool.connection_kwargs.get("socket_timeout") or TIMEOUT
    block_ms = max(10, int(min(2.0, float(timeout) / 2) * 1000))
    reader = _Reader(client, stream, group, consumer or default_consumer(), max(1, batch), claim_after, block_ms)
    seen = _Seen()
    acks: list[str] = []
    try:
        try:
            await reader.start(since)
        except (RedisError, OSError) as exc:
            raise MirrorError(f"redis {redact(url)}: {describe(exc, url)}") from None
        policy = Reconnector(initial=0.5, maximum=10.0, healthy_after=30.0)
        down_since: float | None = None
        while True:
            try:
                await reader.ack(acks)
                acks.clear()
                got = await reader.read(follow)
            except ResponseError as exc:
                if group is not None and str(exc).startswith("NOGROUP") and not reader.lost_group:
                    log.warning("consumer group %r of stream %r is gone; creating it again", group, stream)
                    reader.lost_group = True
                    continue
                raise MirrorError(f"redis {redact(url)}, stream {stream!r}: {describe(exc, url)}") from None
            except (RedisError, OSError) as exc:
                if down_since is None:
                    down_since = time.time()
                    log.warning("redis %s: %s; reconnecting with backoff", redact(url), describe(exc, url))
                reader.restart()
                await anyio.sleep(policy.delay(time.monotonic()))
                continue
            if down_since is not None:
                log.info("redis %s: reading again after %.0fs", redact(url), max(0.0, time.time() - down_since))
                down_since = None
                policy.connected(time.monotonic())
            if got is None:
                return
            for (entry_id, fields), in_order in got:
                event = _accept(entry_id, fields, stream, seen, in_order, filter)
                if event is not None:
                    yield event
                acks.append(entry_id)
    finally:
        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True):
            try:
                await reader.ack(acks)
            except (RedisError, OSError) as exc:
                log.warning(
                    "redis %s: could not acknowledge %d entries: %s", redact(url), len(acks), describe(exc, url)
                )
            await client.aclose()


def _accept(
    entry_id: str, fields: dict[bytes, bytes] | None, stream: str, seen: _Seen, in_order: bool, flt: Filter
) -> CloudEvent | None:
    if fields is None:
        return None  # pending, but MAXLEN trimmed it from the stream: nothing to deliver
    try:
        daemon, seq, event = decode_entry(fields)
    except ValueError as exc:
        log.warning("skipping entry %s of stream %r: %s", entry_id, stream, exc)
        return None
    if not seen.first_time(daemon, seq, in_order=in_order):
        return None
    if flt and not flt(event.data):
        return None
    return event
