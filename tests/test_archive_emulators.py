"""Output archival end to end: real providers against their emulators, the archiver as the daemon runs it."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import anyio
import httpx
import pytest

from streamd import emulators
from streamd.config import ArchiveFile, Config
from streamd.daemon import Daemon
from streamd.emulators.generator import MODELS
from streamd.events import CloudEvent, Kind
from streamd.feed.client import FeedClient
from streamd.service import sidecars_for

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("provider", ["oxen", "wiro", "runware", "apiframe"])
async def test_completed_outputs_are_archived_byte_for_byte(short_tmp: Path, provider: str) -> None:
    emu = emulators.create(provider, seed=7, speed=40.0, fail_rate=0.0)
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        settings = emu.settings()
        cfg = Config(
            socket=short_tmp / "s.sock",
            state_dir=short_tmp / "state",
            providers={provider: settings},
            archive=ArchiveFile(enabled=True),
        )
        if provider == "apiframe":  # polled: poll fast so the test is quick
            cfg = replace(cfg, providers={provider: replace(settings, poll_interval=0.05)})
        await tg.start(Daemon(cfg, sidecars=sidecars_for(cfg)).run)
        async with FeedClient.connect(cfg.socket) as client:
            jobs = (await client.submit(provider, MODELS[provider][0], "a red fox [ok]"))["jobs"]
            archived: list[str] = []
            with anyio.fail_after(60):
                async for item in client.subscribe(since="oldest", filter=f"kind:archived,expired job:{jobs[0]}"):
                    if isinstance(item, CloudEvent):
                        assert item.data.kind is Kind.ARCHIVED, item.data.message
                        archived = list(item.data.paths)
                        break
            [job] = [j for j in await client.jobs(filter=f"job:{jobs[0]}") if j.job == jobs[0]]
        assert archived and list(job.paths) == archived and len(archived) == len(job.outputs)
        archive = short_tmp / "state" / "archive"
        async with httpx.AsyncClient() as http:
            for path, url in zip(archived, job.outputs, strict=True):
                local = anyio.Path(path)
                assert await local.is_file() and archive in Path(path).parents  # inside the archive
                original = (await http.get(url)).content
                assert hashlib.sha256(await local.read_bytes()).digest() == hashlib.sha256(original).digest()
        tg.cancel_scope.cancel()
