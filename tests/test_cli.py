"""The command line as a user meets it: real processes, one clear line per mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

STREAMD = [sys.executable, "-m", "streamd.cli"]
CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "STREAMD_CONFIG"}


def streamd(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STREAMD, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or CLEAN_ENV,
        stdin=subprocess.DEVNULL,
    )


def one_error_line(proc: subprocess.CompletedProcess[str], needle: str, code: int = 1) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # one line, never a traceback
    assert lines[0].startswith("streamd: ") and needle in lines[0], lines[0]


def test_no_daemon(short_tmp: Path) -> None:
    for cmd in (["tail"], ["jobs"], ["status", "--json"], ["cancel", "oxen", "x"], ["track", "wiro", "t"]):
        one_error_line(streamd(*cmd, "--socket", str(short_tmp / "none.sock")), "no streamd daemon at")


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[providers.oxen]\ncolour = 'red'\n", "unknown key providers.oxen.colour"),
        ("[daemon]\nsocket_mode = 'rw'\n", "daemon.socket_mode: 'rw' is not an octal mode"),
        ("[providers.oxen\n", "not valid TOML"),
        ("[daemon]\nstalled_after = 'soon'\n", "Expected `float`, got `str` at daemon.stalled_after"),
        ("[providers.oxen]\napi_key_file = '/nonexistent/key'\n", "providers.oxen.api_key_file: cannot read"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, toml: str, needle: str) -> None:
    cfg = tmp_path / "streamd.toml"
    cfg.write_text(toml)
    proc = streamd(
        "run", "--config", str(cfg), "--state-dir", str(tmp_path / "s"), "--socket", str(tmp_path / "s.sock")
    )
    one_error_line(proc, needle)
    if "api_key_file" not in toml:
        assert str(cfg) in proc.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    one_error_line(streamd("run", "--config", str(tmp_path / "nope.toml")), "not found")


@pytest.mark.parametrize(
    ("args", "needle", "code"),
    [
        (["tail", "--filter", "colour:red"], "unknown field 'colour'", 1),
        (["tail", "--since", "yesterday"], "expected a seq number", 1),
        (["submit", "oxen", "--prompt", "x"], "the following arguments are required: --model", 2),
        (["frobnicate"], "invalid choice", 2),
        (["demo", "--providers", "oxen,midjourney"], "unknown midjourney", 1),
        (["tail", "--redis", "redis://127.0.0.1:9/0", "--count", "1"], "Connect call failed", 1),
        (["tail", "--group", "g"], "--group, --consumer and --stream go with --redis URL", 1),
    ],
)
def test_usage_mistakes(short_tmp: Path, args: list[str], needle: str, code: int) -> None:
    one_error_line(streamd(*args, "--socket", str(short_tmp / "x.sock")), needle, code)


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Path]:
    sock = short_tmp / "d.sock"
    proc = subprocess.Popen(
        [*STREAMD, "run", "--socket", str(sock), "--state-dir", str(short_tmp / "state")],
        env=CLEAN_ENV | {"XDG_CONFIG_HOME": str(short_tmp / "cfg")},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "daemon did not start"
        time.sleep(0.05)
    try:
        yield sock
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0  # SIGTERM is a clean stop
        assert not sock.exists()  # and the socket is removed


def test_daemon_without_providers_answers_and_refuses_clearly(daemon: Path) -> None:
    status = streamd("status", "--json", "--socket", str(daemon))
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["providers"] == [] and body["daemon"]["socket"] == str(daemon)
    human = streamd("status", "--socket", str(daemon))
    assert "no providers enabled" in human.stdout
    one_error_line(
        streamd("submit", "oxen", "--model", "m", "--prompt", "p", "--socket", str(daemon)),
        "provider 'oxen' is not enabled (no API key configured)",
    )
    one_error_line(
        streamd("submit", "openai", "--model", "m", "--prompt", "p", "--socket", str(daemon)),
        "unknown provider 'openai'",
    )
    one_error_line(
        streamd("submit", "oxen", "--model", "m", "--prompt", "p", "--image", "/no/such.png", "--socket", str(daemon)),
        "--image /no/such.png: no such file",
    )
    one_error_line(streamd("outputs", "nope", "--socket", str(daemon)), "no job 'nope' known to the daemon")
    jobs = streamd("jobs", "--json", "--socket", str(daemon))
    assert jobs.returncode == 0 and json.loads(jobs.stdout) == []


def test_second_daemon_on_the_same_socket_is_refused(daemon: Path, short_tmp: Path) -> None:
    proc = streamd("run", "--socket", str(daemon), "--state-dir", str(short_tmp / "state2"))
    one_error_line(proc, "another streamd is already listening")
