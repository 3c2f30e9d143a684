"""The feed as other programs use it: socat with one subscribe line, and `streamd tail --json | jq`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from streamd.events import State
from tests.support import ScriptedProvider, running_daemon

pytestmark = pytest.mark.anyio


def require(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed (.ci/run installs it)"
    return path


async def test_socat_subscribe_prints_one_json_object_per_line(short_tmp: Path) -> None:
    socat = require("socat")
    async with running_daemon(short_tmp) as d:
        prov: ScriptedProvider = d.providers["oxen"]  # type: ignore[assignment]
        for state in (State.QUEUED, State.RUNNING, State.COMPLETED):
            await prov.push("j1", state, outputs=("https://example.invalid/1.png",) if state.terminal else ())
        await d.pipeline.sync()
        request = b'{"op":"subscribe","since":"oldest","filter":"kind:state"}\n'
        with anyio.fail_after(30):
            proc = await anyio.run_process(
                ["timeout", "3", socat, "-t", "3", "-", f"UNIX-CONNECT:{d.config.socket}"], input=request, check=False
            )
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["frame"] == "hello" and lines[1]["frame"] == "reply" and lines[1]["ok"] is True
    events = [x for x in lines if "specversion" in x]
    assert [e["data"]["status"] for e in events] == ["queued", "running", "completed"]
    assert events[-1]["data"]["outputs"] == ["https://example.invalid/1.png"]


async def test_tail_json_is_read_by_jq(short_tmp: Path) -> None:
    jq = require("jq")
    async with running_daemon(short_tmp) as d:
        prov: ScriptedProvider = d.providers["oxen"]  # type: ignore[assignment]
        for i, state in enumerate((State.QUEUED, State.RUNNING, State.FAILED)):
            await prov.push(f"j{i}", state)
        await d.pipeline.sync()
        cmd = (
            f"{sys.executable} -m streamd.cli tail --json --since oldest --filter kind:state --count 3 "
            f"--socket {d.config.socket} | {jq} -c '[.seq, .type, .data.job, .data.status]'"
        )
        with anyio.fail_after(60):
            proc = await anyio.run_process(["bash", "-o", "pipefail", "-c", cmd], check=False)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r[1:] for r in rows] == [
        ["ai.streamd.job.queued", "j0", "queued"],
        ["ai.streamd.job.running", "j1", "running"],
        ["ai.streamd.job.failed", "j2", "failed"],
    ]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_readme_commands_exist() -> None:
    """The README's first lines are the two commands a newcomer runs."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = text.split("```sh", 1)[1].split("```", 1)[0]
    assert "streamd demo" in block and "bash .ci/run" in block
    subprocess.run(["bash", "-n", str(Path(__file__).parent.parent / ".ci" / "run")], check=True)
