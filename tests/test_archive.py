"""Output archival, end to end: an in-process daemon with the archive sidecar, a scripted provider
whose completed jobs point at a loopback HTTP server, and a feed subscriber."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from streamd.archive import POSITION_KEY, ArchiveError, Archiver, Store, copy_out, safe_component, safe_name
from streamd.config import ArchiveFile, Config
from streamd.daemon import Daemon
from streamd.emulators.http import Drop, HttpServer, Request, Response, StreamResponse
from streamd.events import CloudEvent, EventData, Kind, State
from streamd.feed.client import FeedClient
from streamd.journal import Journal
from tests.support import ScriptedProvider

Route = Callable[[Request], Awaitable[Response | StreamResponse]]
PNG = [("content-type", "image/png")]


def png(seed: str, size: int = 5000) -> bytes:
    """PNG magic, then deterministic filler: distinct content per seed."""
    head = b"\x89PNG\r\n\x1a\n"
    block = hashlib.sha256(seed.encode()).digest()
    return (head + block * (size // len(block) + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Files:
    """The loopback file server's routes, by raw request path, with a hit count per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.server = HttpServer(self.handle)

    def url(self, path: str) -> str:
        return self.server.url + path

    def serve(self, path: str, body: bytes, headers: list[tuple[str, str]] | None = None) -> str:
        async def route(_: Request) -> Response:
            return Response(200, body, list(PNG if headers is None else headers))

        self.routes[path] = route
        return self.url(path)

    def add(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.url(path)

    async def handle(self, request: Request) -> Response | StreamResponse:
        path = request.target.split("?", 1)[0]
        self.hits[path] += 1
        route = self.routes.get(path)
        if route is None:
            return Response(404, b"no such file")
        return await route(request)


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Files]:
    files = Files()
    async with anyio.create_task_group() as tg:
        await tg.start(files.server.serve)
        yield files
        tg.cancel_scope.cancel()


class Run:
    """A daemon with the archiver, and every event it journals (from seq 0) as they come."""

    def __init__(self, daemon: Daemon, provider: ScriptedProvider, archiver: Archiver) -> None:
        self.daemon = daemon
        self.provider = provider
        self.archiver = archiver
        self.events: list[EventData] = []
        self.completed: dict[str, int] = {}  # job -> seq of its completed event
        self._changed = anyio.Event()

    @property
    def archive(self) -> Path:
        return self.archiver.directory

    async def follow(self) -> None:
        async for batch in self.daemon.stream(0):
            if isinstance(batch, list):
                self.events.extend(e.data for e in batch)
                self.completed.update({e.data.job or "": e.seq for e in batch if e.type == "ai.streamd.job.completed"})
                self._changed.set()
                self._changed = anyio.Event()

    async def complete(self, job: str, *urls: str, raw: Any = None) -> None:
        await self.provider.push(job, State.COMPLETED, outputs=tuple(urls), raw=raw)

    def of(self, kind: Kind, job: str | None = None) -> list[EventData]:
        return [e for e in self.events if e.kind is kind and (job is None or e.job == job)]

    def done(self, job: str) -> list[EventData]:
        """What the archiver said about `job`."""
        return [e for e in self.events if e.job == job and e.upstream.startswith("streamd.")]

    async def wait_for(self, predicate: Callable[[], object], within: float = 20.0) -> None:
        with anyio.fail_after(within):
            while not predicate():
                await self._changed.wait()

    async def settled(self, job: str, within: float = 20.0) -> None:
        """Wait until the archiver has saved its position past `job` (manifest written, all done)."""
        await self.wait_for(lambda: job in self.completed, within)
        with anyio.fail_after(within):
            while True:
                saved = await self.daemon.get_meta(POSITION_KEY) or ":0"
                if int(saved.rpartition(":")[2]) >= self.completed[job]:
                    return
                await anyio.sleep(0.01)

    def objects(self) -> list[Path]:
        return sorted(p for p in (self.archive / "objects").rglob("*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return list((self.archive / "tmp").iterdir())


def config(tmp: Path, **settings: Any) -> Config:
    return Config(
        socket=tmp / "feed.sock",
        state_dir=tmp / "state",
        providers={},
        archive=ArchiveFile(enabled=True, **settings),
    )


@contextlib.asynccontextmanager
async def running(tmp: Path, **settings: Any) -> AsyncIterator[Run]:
    """`running_daemon` from tests/support.py, plus the archive sidecar (fast retries for tests)."""
    cfg = config(tmp, **settings)
    archiver = Archiver.from_config(cfg, retry_initial=0.01, retry_max=0.05)
    assert archiver is not None
    provider = ScriptedProvider()
    daemon = Daemon(cfg, providers={"oxen": provider}, sidecars=[archiver])
    async with anyio.create_task_group() as tg:
        await tg.start(daemon.run)
        run = Run(daemon, provider, archiver)
        tg.start_soon(run.follow)
        yield run
        tg.cancel_scope.cancel()


def archived(run: Run, job: str) -> Callable[[], object]:
    return lambda: run.of(Kind.ARCHIVED, job)


def inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


# blocking file look-ups, kept out of the async test bodies
def content(path: str | Path) -> bytes:
    return Path(path).read_bytes()


def exists(path: str | Path) -> bool:
    return Path(path).exists()


def size(path: Path) -> int:
    return path.stat().st_size


def same_file(a: Path, b: Path) -> bool:
    return os.path.samefile(a, b)


def remove(path: Path) -> None:
    path.unlink()


def visible(folder: Path) -> list[str]:
    """A folder's entries without the dot files (the manifest, and its temporary name while written)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# -- end to end ---------------------------------------------------------------------------------------
@pytest.mark.anyio
async def test_download_is_content_addressed_linked_and_announced_to_subscribers(short_tmp: Path) -> None:
    body = png("first", 70_000)  # more than one read chunk
    async with serving() as files, running(short_tmp) as run:
        url = files.serve("/out/gen-1/0.png", body)
        async with FeedClient.connect(run.daemon.config.socket) as client:
            await run.complete("j1", url)
            event: CloudEvent | None = None
            with anyio.fail_after(20):
                async for item in client.subscribe(since=0, filter="kind:archived"):
                    if isinstance(item, CloudEvent):
                        event = item
                        break
            assert event is not None and event.type == "ai.streamd.job.archived"
            data = event.data
            assert data.provider == "oxen" and data.job == "j1" and data.status is State.COMPLETED
            assert data.kind is Kind.ARCHIVED and len(data.paths) == 1 and data.outputs == data.paths
            link = Path(data.paths[0])
            assert link == run.archive / "jobs" / "oxen" / "j1" / "0-0.png"
            assert content(link) == body
            digest = sha(body)
            obj = run.archive / "objects" / digest[:2] / f"{digest}.png"
            assert size(obj) == len(body) and same_file(link, obj)
            assert data.raw["files"] == [
                {"index": 0, "path": str(link), "sha256": digest, "size": len(body), "content_type": "image/png"}
            ]
            (job,) = await client.jobs(filter="job:j1")
            assert job.paths == (str(link),) and job.outputs == (url,)
    assert files.hits["/out/gen-1/0.png"] == 1
    assert run.temp_files() == []


@pytest.mark.anyio
async def test_gone_output_is_an_expired_event_and_leaves_no_file(short_tmp: Path) -> None:
    async with serving() as files, running(short_tmp) as run:
        ok = files.serve("/ok.png", png("kept"))
        gone = files.url("/gone.png")  # no route: 404
        purged = files.add("/purged.png", lambda _: _async(Response(410, b"purged")))
        await run.complete("j1", ok, gone, purged)
        await run.wait_for(lambda: len(run.done("j1")) == 3)
        (archived,) = run.of(Kind.ARCHIVED, "j1")
        assert [Path(p).name for p in archived.paths] == ["0-ok.png"]
        expired = run.of(Kind.EXPIRED, "j1")
        assert sorted(e.raw["index"] for e in expired) == [1, 2]
        assert {e.raw["status"] for e in expired} == {404, 410}
        assert all("gone" in (e.message or "") for e in expired)
        assert len(run.objects()) == 1 and run.temp_files() == []
        assert visible(run.archive / "jobs" / "oxen" / "j1") == ["0-ok.png"]
        # the job keeps all its provider URLs; only the archived one has a path
        job = run.daemon.tracker.get("oxen", "j1")
        assert job is not None and job.outputs == (ok, gone, purged) and len(job.paths) == 1
    assert files.hits["/gone.png"] == 1  # permanent: not retried


@pytest.mark.anyio
async def test_slow_download_completes_and_does_not_block_others(short_tmp: Path) -> None:
    slow_body = png("slow", 40_000)
    started, release = anyio.Event(), anyio.Event()

    async def trickle() -> AsyncIterator[bytes]:
        for i in range(0, len(slow_body), 1000):
            yield slow_body[i : i + 1000]
            if i == 0:
                started.set()
                await release.wait()  # hold the transfer open until the other job is archived
            await anyio.lowlevel.checkpoint()

    async def slow(_: Request) -> StreamResponse:
        return StreamResponse(trickle(), headers=list(PNG))

    async with serving() as files, running(short_tmp, concurrency=2) as run:
        await run.complete("slow", files.add("/slow.png", slow))
        with anyio.fail_after(20):
            await started.wait()
        await run.complete("fast", files.serve("/fast.png", png("fast")))
        await run.wait_for(lambda: run.of(Kind.ARCHIVED, "fast"))
        assert not run.done("slow")
        release.set()
        await run.wait_for(lambda: run.of(Kind.ARCHIVED, "slow"))
        (event,) = run.of(Kind.ARCHIVED, "slow")
        assert event.raw["files"][0]["sha256"] == sha(slow_body)
        assert content(event.paths[0]) == slow_body
        assert run.temp_files() == []
    assert files.hits["/slow.png"] == 1


@pytest.mark.anyio
async def test_transient_failures_and_a_truncated_body_are_retried_without_leftovers(short_tmp: Path) -> None:
    body = png("flaky", 30_000)
    hits = 0

    async def cut_short() -> AsyncIterator[bytes]:
        yield body[: len(body) // 2]
        raise Drop  # the server closes the connection mid-body

    async def flaky(_: Request) -> Response | StreamResponse:
        nonlocal hits
        hits += 1
        if hits == 1:
            return Response(503, b"busy")
        if hits == 2:
            return Response(429, b"slow down", [("retry-after", "0")])
        if hits == 3:
            return StreamResponse(cut_short(), headers=list(PNG))
        return Response(200, body, list(PNG))

    async with serving() as files, running(short_tmp) as run:
        await run.complete("j1", files.add("/flaky.png", flaky))
        await run.wait_for(lambda: run.done("j1"))
        (event,) = run.done("j1")
        assert event.kind is Kind.ARCHIVED
        assert content(event.paths[0]) == body
        assert [p.name for p in run.objects()] == [f"{sha(body)}.png"]
        assert run.temp_files() == []
    assert hits == 4


@pytest.mark.anyio
async def test_persistent_failure_gives_up_with_a_diagnostic(short_tmp: Path) -> None:
    async with serving() as files, running(short_tmp) as run:
        url = files.add("/down.png", lambda _: _async(Response(502, b"bad gateway")))
        await run.complete("j1", url)
        await run.wait_for(lambda: run.done("j1"))
        (event,) = run.done("j1")
        assert event.kind is Kind.DIAGNOSTIC and event.upstream == "streamd.archive.failed"
        assert "gave up after 5 attempts" in (event.message or "") and "HTTP 502" in (event.message or "")
        assert run.objects() == [] and run.temp_files() == []
    assert files.hits["/down.png"] == 5


@pytest.mark.anyio
async def test_oversized_files_are_aborted_and_cleaned_up(short_tmp: Path) -> None:
    big = png("big", 200_000)

    async def stream_big(_: Request) -> StreamResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 8192):
                yield big[i : i + 8192]

        return StreamResponse(chunks(), headers=list(PNG))  # chunked: no length to check up front

    async with serving() as files, running(short_tmp, max_file_mb=0.05) as run:
        declared = files.serve("/declared.png", big)  # Content-Length says it all
        streamed = files.add("/streamed.png", stream_big)
        small = files.serve("/small.png", png("small", 10_000))
        await run.complete("j1", declared, streamed, small)
        await run.wait_for(lambda: len(run.done("j1")) == 3)
        too_large = [e for e in run.done("j1") if e.upstream == "streamd.archive.too_large"]
        assert sorted(e.raw["index"] for e in too_large) == [0, 1]
        assert all(e.kind is Kind.DIAGNOSTIC and "limit" in (e.message or "") for e in too_large)
        (archived,) = run.of(Kind.ARCHIVED, "j1")
        assert [Path(p).name for p in archived.paths] == ["2-small.png"]
        assert len(run.objects()) == 1 and run.temp_files() == []
    assert files.hits["/declared.png"] == 1 and files.hits["/streamed.png"] == 1  # permanent: no retry


@pytest.mark.anyio
async def test_content_type_must_match_what_the_provider_said_or_implied(short_tmp: Path) -> None:
    async with serving() as files, running(short_tmp) as run:
        html = files.serve("/page.png", b"<html>sign in</html>", [("content-type", "text/html; charset=utf-8")])
        octet_png = files.serve("/blob", png("octet"), [("content-type", "application/octet-stream")])
        octet_junk = files.serve("/junk", b"not an image at all", [("content-type", "application/octet-stream")])
        # Wiro says what each output is: a video where an image would be implied
        video = files.serve("/clip", b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 100, [("content-type", "video/mp4")])
        raw = {"outputs": [{"name": "clip.mp4", "contenttype": "video/mp4", "url": video}]}
        await run.complete("j1", html, octet_png, octet_junk, video, raw=raw)
        await run.wait_for(lambda: len(run.done("j1")) == 3)
        wrong = [e for e in run.done("j1") if e.upstream == "streamd.archive.content_type"]
        assert sorted(e.raw["index"] for e in wrong) == [0, 2]
        assert all(e.kind is Kind.DIAGNOSTIC for e in wrong)
        assert any("text/html" in (e.message or "") for e in wrong)
        (archived,) = run.of(Kind.ARCHIVED, "j1")
        assert [Path(p).name for p in archived.paths] == ["1-blob.png", "3-clip.mp4"]
        assert [f["content_type"] for f in archived.raw["files"]] == ["image/png", "video/mp4"]
        assert len(run.objects()) == 2 and run.temp_files() == []


@pytest.mark.anyio
async def test_hostile_file_names_stay_inside_the_archive(short_tmp: Path) -> None:
    body = png("hostile")
    async with serving() as files, running(short_tmp) as run:
        urls = [
            files.serve("/h/1", body, [*PNG, ("content-disposition", 'attachment; filename="../../etc/passwd"')]),
            files.serve("/h/2", body, [*PNG, ("content-disposition", 'attachment; filename="/abs"')]),
            files.serve("/h/a%00b.png", body),
            files.serve("/h/..%2F..%2F..%2Fescape.png", body),
            files.serve("/h/%2E%2E", body),
        ]
        await run.complete("../../../evil", *urls)
        await run.wait_for(lambda: run.of(Kind.ARCHIVED, "../../../evil"))
        (event,) = run.of(Kind.ARCHIVED, "../../../evil")
        paths = [Path(p) for p in event.paths]
        assert [p.name for p in paths] == ["0-passwd.png", "1-abs.png", "2-a_b.png", "3-escape.png", "4-output.png"]
        job_dir = run.archive / "jobs" / "oxen" / safe_component("../../../evil")
        assert job_dir.name.startswith("evil-")
        for p in paths:
            assert p.parent == job_dir and inside(p, run.archive) and content(p) == body
        assert len(run.objects()) == 1  # one content, five links
    assert names(short_tmp) <= {"feed.sock", "state"}  # nothing landed beside the state dir
    assert not exists("/abs")


@pytest.mark.anyio
async def test_quota_evicts_the_oldest_objects_first(short_tmp: Path) -> None:
    quota = 15_000  # bytes: two 6 kB files fit, three do not
    async with serving() as files, running(short_tmp, quota_mb=quota / (1024 * 1024)) as run:
        bodies = {job: png(job, 6000) for job in ("q1", "q2", "q3")}
        for job, body in bodies.items():
            await run.complete(job, files.serve(f"/{job}.png", body))
            await run.wait_for(archived(run, job))
        assert [p.name for p in run.objects()] == sorted(f"{sha(bodies[j])}.png" for j in ("q2", "q3"))
        assert not exists(run.of(Kind.ARCHIVED, "q1")[0].paths[0])
        for job in ("q2", "q3"):
            assert content(run.of(Kind.ARCHIVED, job)[0].paths[0]) == bodies[job]
        assert run.archiver.store.usage() == (2, 12_000)
        # one job bigger than the quota: its own files are never evicted while it is archived
        many = [png(f"q4-{i}", 6000) for i in range(3)]
        await run.complete("q4", *(files.serve(f"/q4-{i}.png", body) for i, body in enumerate(many)))
        await run.wait_for(archived(run, "q4"))
        (event,) = run.of(Kind.ARCHIVED, "q4")
        assert [content(p) for p in event.paths] == many
        assert run.archiver.store.usage() == (3, 18_000)


def test_age_limit_evicts_old_objects_then_empty_job_folders(tmp_path: Path) -> None:
    store = Store(tmp_path / "archive", quota=10**9, max_age=3600)
    store.open()
    links = {}
    for job in ("old", "new"):
        temp = store.temp_path()
        temp.write_bytes(png(job))
        links[job], _ = store.commit(temp, sha(png(job)), ".png", store.job_dir("oxen", job), 0, "0.png")
    long_ago = time.time() - 7200
    os.utime(links["old"], (long_ago, long_ago))  # a hard link: the object's time too
    reopened = Store(tmp_path / "archive", quota=10**9, max_age=3600)
    reopened.open()
    evicted = reopened.sweep()
    assert [e.key for e in evicted] == [f"{sha(png('old'))[:2]}/{sha(png('old'))}.png"]
    assert not links["old"].exists() and links["new"].exists()
    old_dir = links["old"].parent
    assert old_dir.exists()  # empty, but young: kept (its manifest stops a second download)
    os.utime(old_dir, (long_ago, long_ago))
    reopened.sweep()
    assert not old_dir.exists() and links["new"].parent.exists()
    assert reopened.usage() == (1, len(png("new")))


@pytest.mark.anyio
async def test_restart_does_not_download_again(short_tmp: Path) -> None:
    async with serving() as files:
        urls = {job: files.serve(f"/{job}.png", png(job)) for job in ("r1", "r2", "r3")}
        async with running(short_tmp, concurrency=1) as run:
            await run.complete("r1", urls["r1"])
            await run.settled("r1")
        async with running(short_tmp, concurrency=1) as run:
            await run.complete("r2", urls["r2"])
            await run.settled("r2")
            assert len(run.of(Kind.ARCHIVED, "r1")) == 1  # the whole journal, both runs
        # lose the saved position: every completion is read again, and none is fetched again
        journal = Journal(short_tmp / "state" / "journal.sqlite3")
        assert (journal.get_meta(POSITION_KEY) or "").startswith(f"{journal.epoch}:")
        journal.set_meta(POSITION_KEY, "")
        journal.close()
        # and r2 as if the daemon died after its download but before its manifest was written
        remove(short_tmp / "state" / "archive" / "jobs" / "oxen" / "r2" / ".streamd-job.json")
        async with running(short_tmp, concurrency=1) as run:
            await run.complete("r3", urls["r3"])
            await run.wait_for(lambda: run.of(Kind.ARCHIVED, "r3"))  # one worker: r1, r2 were handled first
            assert len(run.of(Kind.ARCHIVED, "r1")) == 1
            assert len(run.of(Kind.ARCHIVED, "r2")) == 2  # announced again, from the files already there
            assert run.of(Kind.ARCHIVED, "r2")[0].paths == run.of(Kind.ARCHIVED, "r2")[1].paths
            assert len(run.objects()) == 3
    assert [files.hits[f"/{job}.png"] for job in ("r1", "r2", "r3")] == [1, 1, 1]


# -- pieces --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("0.png", "0.png"),
        ("../../etc/passwd", "passwd"),
        ("/abs", "abs"),
        ("a\x00b", "a_b"),
        ("..", "output"),
        (".", "output"),
        ("", "output"),
        ("..\\..\\windows\\system.ini", "system.ini"),
        (".hidden", "hidden"),
        ("-rf", "rf"),
        ("bell\x07\n\ttab.png", "bell_tab.png"),
        ("über image (1).png", "ber_image_1_.png"),
        ("x" * 300 + ".png", "x" * 92 + ".png"),
    ],
)
def test_safe_name(given: str, expected: str) -> None:
    assert safe_name(given) == expected


def test_safe_component_keeps_distinct_ids_apart() -> None:
    assert safe_component("gen_123") == "gen_123"
    assert safe_component("a/b") != safe_component("a_b")
    assert safe_component("..").startswith("id-") and "/" not in safe_component("../x")


def test_copy_out(tmp_path: Path) -> None:
    store = Store(tmp_path / "archive", quota=10**9, max_age=3600)
    store.open()
    temp = store.temp_path()
    temp.write_bytes(png("out"))
    link, _ = store.commit(temp, sha(png("out")), ".png", store.job_dir("oxen", "j1"), 0, "0.png")
    dest = tmp_path / "dest"
    (copied,) = copy_out(store.root, [str(link)], dest)
    assert copied == dest / "0-0.png" and copied.read_bytes() == png("out")
    assert copy_out(store.root, [str(link)], dest) == [copied]  # same content: nothing new
    copied.write_bytes(b"someone else's file")
    (second,) = copy_out(store.root, [str(link)], dest)
    assert second == dest / "0-0-1.png" and copied.read_bytes() == b"someone else's file"
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    with pytest.raises(ArchiveError, match="not a file in the archive"):
        copy_out(store.root, [str(outside)], dest)
    with pytest.raises(ArchiveError, match="not a file in the archive"):
        copy_out(store.root, [str(store.root / "jobs" / ".." / ".." / "secret.txt")], dest)
    link.unlink()
    with pytest.raises(ArchiveError, match="no longer in the archive"):
        copy_out(store.root, [str(link)], tmp_path / "dest2")
    assert not (tmp_path / "dest2").exists()


def test_disabled_archive_makes_no_sidecar(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert Archiver.from_config(Config(socket=cfg.socket, state_dir=cfg.state_dir, providers={})) is None
    with pytest.raises(ArchiveError, match="concurrency"):
        Archiver(tmp_path, ArchiveFile(enabled=True, concurrency=0))


async def _async(value: Response) -> Response:
    return value
