"""Secrets never leave: a full run of `streamd run` as a process with all four providers, then a
search for every credential's bytes in everything it left behind or said.

The credentials: each provider's API key (random, distinctive), Wiro's signing secret, every Wiro
task's socket token (including one submitted by another program and tracked by its token), and the
access keys on Wiro's output files. The run: jobs that succeed and fail on every provider, a batch,
a job tracked by token, refused requests (bad model, unknown token, cancel unsupported), a SIGKILL
and restart in the middle (so the resume paths run: Wiro re-registers its tokens, Runware resumes
its session), then a clean stop, all at log level debug.

Searched: every file in the state directory, byte for byte (the journal, its WAL and shared memory);
the daemon's whole stderr; every feed line (all events replayed from the oldest, every reply, every
error); `streamd status --json` and `streamd jobs --json`. A Wiro task token is kept in the job store
while its job runs, since a restarted daemon needs it to resume the task; once the job has ended it
is dropped, so after a run whose jobs have all ended no file holds one.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from streamd.emulators.wiro import WiroEmulator
from streamd.feed.client import FeedClient, FeedError
from streamd.feed.unixsock import connect
from streamd.providers.wiro.client import WiroClient
from tests.reliability.harness import MODELS, PROVIDERS, DaemonProcess, fleet, mismatches, settle, write_config

pytestmark = pytest.mark.anyio


async def feed_lines(socket: Path, head: int) -> list[bytes]:
    """Every event from the oldest kept, as the bytes a subscriber reads."""
    stream = await connect(socket)
    reader = BufferedByteReceiveStream(stream)
    lines = [await reader.receive_until(b"\n", 1 << 24)]
    await stream.send(b'{"op":"subscribe","since":"oldest","id":1}\n')
    with anyio.fail_after(60):
        while True:
            line = await reader.receive_until(b"\n", 1 << 24)
            lines.append(line)
            if json.loads(line).get("seq") == head and b'"specversion"' in line:
                break
    await stream.aclose()
    return lines


async def cli(socket: Path, *args: str) -> bytes:
    with anyio.fail_after(30):
        done = await anyio.run_process([sys.executable, "-m", "streamd.cli", *args, "--socket", str(socket)])
    return bytes(done.stdout) + bytes(done.stderr)


async def test_no_credential_in_the_state_dir_the_log_the_feed_or_status(short_tmp: Path) -> None:
    keys = {name: {"key": f"{name}-key-{secrets.token_hex(12)}"} for name in PROVIDERS}
    keys["wiro"]["secret"] = f"wiro-secret-{secrets.token_hex(12)}"
    said: list[bytes] = []  # replies and refusals, as the feed client got them
    async with fleet(proxied=False, speed=12.0, keys=keys) as f:
        wiro: WiroEmulator = f.emulators["wiro"]  # type: ignore[assignment]
        daemon = DaemonProcess(short_tmp, write_config(short_tmp, f.settings, log_level="debug"))
        await daemon.start()
        try:
            acked: list[tuple[str, str]] = []
            async with FeedClient.connect(daemon.socket) as client:
                for name in PROVIDERS:
                    for prompt in ("a lighthouse [slow]", "a fox [fail]", "a bakery"):
                        options = {"num": 2} if name in ("runware", "wiro") and "fox" in prompt else {}
                        answer = await client.submit(name, MODELS[name], prompt, options=options)
                        said.append(json.dumps(answer).encode())
                        acked += [(name, j) for j in answer["jobs"]]
                # Another program submits a Wiro task; streamd follows it by its socket token.
                other = WiroClient(f.settings["wiro"])
                try:
                    run = await other.run("bytedance", "seedream-v4", {"prompt": "elsewhere [slow]"})
                finally:
                    await other.aclose()
                said.append(json.dumps(await client.track("wiro", run.token)).encode())
                acked.append(("wiro", run.taskid))
                refused = [
                    client.submit("oxen", "no-such-model", "x"),
                    client.submit("wiro", "nobody/nothing", "x"),
                    client.track("wiro", "Z" * 30),
                    client.cancel("runware", next(j for p, j in acked if p == "runware")),
                    client.track("apiframe", "00000000-0000-4000-8000-000000000000"),
                ]
                for call in refused:
                    with pytest.raises(FeedError) as err:
                        await call
                    said.append(f"{err.value.code}: {err.value.message}".encode())
            await anyio.sleep(0.5)
            await daemon.kill()  # mid-run: the restart resumes tokens and sessions from the state dir
            await daemon.start()
            async with FeedClient.connect(daemon.socket) as client:
                jobs = await settle(lambda: client.jobs(limit=1000), f.emulators, acked, within=90)
                status = await client.status()
            said += [await cli(daemon.socket, "status", "--json"), await cli(daemon.socket, "jobs", "--json")]
            said += [await cli(daemon.socket, "status")]
            lines = await feed_lines(daemon.socket, status["daemon"]["seq"])
            assert await daemon.stop() == 0
        finally:
            if daemon.proc is not None and daemon.proc.returncode is None:
                await daemon.kill()
        tokens = [t.token for t in wiro.tasks.values()]
        access = [o["accesskey"] for t in wiro.tasks.values() for o in t.outputs]
    credentials = [*(k for d in keys.values() for k in d.values()), *tokens, *access]
    stderr = daemon.stderr_path.read_bytes()
    files = {p: p.read_bytes() for p in (short_tmp / "state").rglob("*") if p.is_file()}
    places = {"stderr": stderr, "feed": b"\n".join(lines), "replies, refusals and the CLI": b"\n".join(said)}
    places |= {f"state file {p.name}": data for p, data in files.items()}
    leaks = [(where, c[:10]) for where, data in places.items() for c in credentials if c.encode() in data]
    assert not leaks, f"credentials found: {leaks}"
    # The search looked at real material: a long debug log, every event, a journal, and credentials
    # that went everywhere they legitimately go (Wiro got its tokens registered, outputs had keys).
    assert len(stderr.splitlines()) > 50 and stderr.count(b"<7>") > 10, "a debug log"
    assert len(lines) > 40 and any(p.name == "journal.sqlite3" for p in files)  # 13 jobs: 26 states at least
    assert len(tokens) == 4 and access and wiro.registrations >= len(tokens)
    assert not mismatches(jobs, f.emulators) and len(status["providers"]) == 4
