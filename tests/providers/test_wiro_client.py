"""The signed Wiro REST client, against the emulator and against canned responses."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from streamd.config import ProviderSettings, Secret
from streamd.emulators.wiro import WiroEmulator
from streamd.providers.base import ProviderError
from streamd.providers.wiro.client import WiroClient, auth_headers, read_upload, sign

FRAMES = Path(__file__).parent.parent / "frames" / "wiro"


def test_signature_known_vector() -> None:
    # echo -n "${SECRET}${NONCE}" | openssl dgst -sha256 -hmac "${KEY}"  (the seed page's recipe)
    assert sign("wiro-demo-key", "wiro-demo-secret", "1734513807") == (
        "e3b86abe45effc688475fbd9b815a73ddd4e4ffe48a7c5cdde8830f8c667e3ea"
    )
    assert sign("k3y", "s3cr3t", "1700000000123") == "0bab5ae6800d5f0d6c8386d672ab018069d8a46741fd55e05444622ca405e9a4"


def test_signature_is_keyed_by_the_key_over_secret_then_nonce() -> None:
    expected = hmac.new(b"KEY", b"SECRET42", hashlib.sha256).hexdigest()
    assert sign("KEY", "SECRET", "42") == expected
    assert sign("KEY", "SECRET", "42") != hmac.new(b"SECRET", b"KEY42", hashlib.sha256).hexdigest()


def test_headers_signed_and_key_only() -> None:
    signed = ProviderSettings(name="wiro", key=Secret("K"), secret=Secret("S"), base_url="http://x/v1")
    first, second = auth_headers(signed), auth_headers(signed)
    assert set(first) == {"x-api-key", "x-nonce", "x-signature"}
    assert first["x-signature"] == sign("K", "S", first["x-nonce"])
    assert int(second["x-nonce"]) > int(first["x-nonce"])  # never reused, even within a millisecond
    key_only = dataclasses.replace(signed, secret=None)
    assert auth_headers(key_only) == {"x-api-key": "K"}


@pytest.fixture
async def emulator() -> AsyncIterator[WiroEmulator]:
    emu = WiroEmulator(speed=50, seed=3)
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        yield emu
        tg.cancel_scope.cancel()


@pytest.fixture
async def client(emulator: WiroEmulator) -> AsyncIterator[WiroClient]:
    c = WiroClient(emulator.settings())
    yield c
    await c.aclose()


@pytest.mark.anyio
async def test_run_json_then_detail_by_id_and_token(emulator: WiroEmulator, client: WiroClient) -> None:
    result = await client.run("bytedance", "seedream-v4", {"prompt": "a fox", "inputImage": "https://e.x/a.png"})
    assert emulator.calls[-1] == ("/v1/Run/bytedance/seedream-v4", "application/json")
    assert emulator.tasks[result.taskid].params["inputImage"] == "https://e.x/a.png"
    by_id = await client.detail(taskid=result.taskid)
    by_token = await client.detail(token=result.token)
    assert by_id["id"] == by_token["id"] == result.taskid
    assert by_id["socketaccesstoken"] == result.token


@pytest.mark.anyio
async def test_local_file_goes_as_multipart(emulator: WiroEmulator, client: WiroClient, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    content = bytes(range(256)) * 4 + b"\r\n--boundary-lookalike\r\n"
    photo.write_bytes(content)
    upload = await read_upload("inputImage", str(photo))
    params = {"prompt": "make it dusk", "inputImage": ["https://e.x/b.png"], "watermark": False, "maxImages": 2}
    result = await client.run("bytedance", "seedream-v4", params, [upload])
    _, ctype = emulator.calls[-1]
    assert ctype.startswith("multipart/form-data")
    assert emulator.uploads == [(result.taskid, "inputImage", "photo.png", content)]  # byte-exact
    task_params = emulator.tasks[result.taskid].params
    assert task_params["watermark"] == "false" and task_params["maxImages"] == "2"
    urls = task_params["inputImage"]
    assert urls[0] == "https://e.x/b.png" and "/v1/File/" in urls[1]


@pytest.mark.anyio
async def test_missing_local_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProviderError) as info:
        await read_upload("inputImage", str(tmp_path / "nope.png"))
    assert info.value.code == "bad_request" and "no such file" in info.value.message


@pytest.mark.anyio
async def test_wrong_signature_is_auth_without_secrets(emulator: WiroEmulator) -> None:
    settings = dataclasses.replace(emulator.settings(), secret=Secret("not-the-secret"))
    bad = WiroClient(settings)
    try:
        with pytest.raises(ProviderError) as info:
            await bad.detail(taskid="1")
    finally:
        await bad.aclose()
    assert info.value.code == "auth"
    assert "not valid" in info.value.message
    for secret in ("not-the-secret", emulator.key, emulator.secret):
        assert secret not in info.value.message and secret not in repr(info.value)


@pytest.mark.anyio
async def test_signed_project_rejects_unsigned_requests(emulator: WiroEmulator) -> None:
    unsigned = WiroClient(dataclasses.replace(emulator.settings(), secret=None))
    try:
        with pytest.raises(ProviderError) as info:
            await unsigned.detail(taskid="1")
    finally:
        await unsigned.aclose()
    assert info.value.code == "auth" and "signature" in info.value.message


@pytest.mark.anyio
async def test_key_only_project() -> None:
    emu = WiroEmulator(speed=50, signed=False)
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        settings = emu.settings()
        assert settings.secret is None
        c = WiroClient(settings)
        result = await c.run("bytedance", "seedream-v4", {"prompt": "x"})
        assert (await c.detail(taskid=result.taskid))["id"] == result.taskid
        await c.aclose()
        tg.cancel_scope.cancel()


@pytest.mark.anyio
async def test_codes_96_and_97(emulator: WiroEmulator, client: WiroClient) -> None:
    emulator.concurrency_limit = 1
    await client.run("bytedance", "seedream-v4", {"prompt": "one [hang]"})
    with pytest.raises(ProviderError) as busy:
        await client.run("bytedance", "seedream-v4", {"prompt": "two"})
    assert busy.value.code == "concurrency" and "96" in busy.value.message
    emulator.concurrency_limit, emulator.balance = None, 0.0
    with pytest.raises(ProviderError) as broke:
        await client.run("bytedance", "seedream-v4", {"prompt": "three"})
    assert broke.value.code == "balance" and "balance" in broke.value.message


@pytest.mark.anyio
async def test_bad_token_and_validation(client: WiroClient) -> None:
    with pytest.raises(ProviderError) as missing:
        await client.detail(token="NoSuchTokenAtAll0000000000000x")
    assert missing.value.code == "not_found"
    assert "NoSuchTokenAtAll" not in missing.value.message
    with pytest.raises(ProviderError) as invalid:
        await client.run("bytedance", "seedream-v4", {"size": "1024x1024"})
    assert invalid.value.code == "bad_request" and "[prompt]" in invalid.value.message
    with pytest.raises(ProviderError) as model:
        await client.run("nobody", "nothing", {"prompt": "x"})
    assert model.value.code == "not_found"


@pytest.mark.anyio
async def test_cancel_and_kill(emulator: WiroEmulator, client: WiroClient) -> None:
    emulator.faults.paused = True  # stays queued
    queued = await client.run("bytedance", "seedream-v4", {"prompt": "wait"})
    with pytest.raises(ProviderError) as early:
        await client.kill(queued.taskid)
    assert early.value.code == "cannot_cancel"
    record = await client.cancel(queued.taskid)
    assert record is not None and record["status"] == "task_cancel"
    with pytest.raises(ProviderError) as again:
        await client.cancel(queued.taskid)
    assert again.value.code == "cannot_cancel" and "cancellable" in again.value.message


@pytest.mark.anyio
async def test_http_faults(emulator: WiroEmulator, client: WiroClient) -> None:
    emulator.faults.error_status, emulator.faults.error_count, emulator.faults.retry_after = 429, 1, 7
    with pytest.raises(ProviderError) as limited:
        await client.detail(taskid="1")
    assert limited.value.code == "rate_limited" and limited.value.retry_after == 7
    emulator.faults.error_status, emulator.faults.error_count = 503, 1
    with pytest.raises(ProviderError) as down:
        await client.detail(taskid="1")
    assert down.value.code == "unavailable" and "503" in down.value.message


def canned(status: int, body: Any) -> WiroClient:
    def handler(request: httpx.Request) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers={"content-type": "application/json"})

    settings = ProviderSettings(name="wiro", key=Secret("K"), secret=Secret("S"), base_url="http://wiro.test/v1")
    return WiroClient(settings, transport=httpx.MockTransport(handler))


def frame(name: str) -> Any:
    return json.loads((FRAMES / f"{name}.json").read_text())


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (200, frame("error_96"), "concurrency"),  # documented: all responses are HTTP 200...
        (429, frame("error_96"), "rate_limited"),  # ...but rate limits are 429
        (200, frame("error_97"), "balance"),
        (200, frame("error_auth"), "auth"),  # an auth error with HTTP 200 is still an auth error
        (401, frame("error_auth"), "auth"),
        (401, b"", "auth"),
        (200, frame("error_not_found"), "not_found"),
        (200, frame("error_not_cancellable"), "cannot_cancel"),
        (200, {"result": False, "errors": []}, "bad_request"),  # result false without a reason
        (200, {"result": True, "errors": [{"code": 0, "message": "odd"}]}, "bad_request"),
        (400, {"result": True, "errors": []}, "bad_request"),  # an error status wins over result
        (200, b"<html>gateway</html>", "unavailable"),
        (502, b"", "unavailable"),
    ],
)
async def test_envelope_and_status_both_checked(status: int, body: Any, code: str) -> None:
    c = canned(status, body)
    try:
        with pytest.raises(ProviderError) as info:
            await c.detail(taskid="1")
    finally:
        await c.aclose()
    assert info.value.code == code
    assert "\n" not in info.value.message


@pytest.mark.anyio
async def test_run_response_at_top_level() -> None:
    c = canned(200, frame("run_response"))
    try:
        result = await c.run("bytedance", "seedream-v4", {"prompt": "x"})
    finally:
        await c.aclose()
    assert (result.taskid, result.token) == ("2221", "eDcCm5yyUfIvMFspTwww49OUfgXkQt")
    assert result.token not in repr(result)  # a stray log line must not leak it


@pytest.mark.anyio
async def test_unreachable_is_unavailable() -> None:
    with anyio.fail_after(20):
        c = WiroClient(ProviderSettings(name="wiro", key=Secret("K"), base_url="http://127.0.0.1:9/v1"))
        try:
            with pytest.raises(ProviderError) as info:
                await c.detail(taskid="1")
        finally:
            await c.aclose()
    assert info.value.code == "unavailable"
