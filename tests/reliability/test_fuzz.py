"""Bad input: every normaliser, fed arbitrary and mutated frames, never raises, produces only
events the pipeline can journal and serve, keeps credentials out of them, and turns each frame it
cannot read into exactly one diagnostic event.

Seeds are the recorded frames in tests/frames/; mutations drop keys, retype values, swap in other
providers' status words, add unknown keys, and (as text) truncate, splice and corrupt the JSON. The
JSON decode boundary (`events.loads`, used by every client and normaliser) is fuzzed with what
msgspec refuses but JSON allows: lone UTF-16 surrogate escapes, NaN, numbers out of range, and
nesting too deep to decode. Two end-to-end tests run the same through a daemon: garbage on Oxen's
SSE stream and Wiro's socket, and a provider record carrying a lone surrogate.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamd.config import ProviderSettings, Secret
from streamd.emulators.apiframe import ApiframeEmulator
from streamd.emulators.oxen import OxenEmulator
from streamd.emulators.wiro import WiroEmulator
from streamd.events import REDACTED, SECRET_KEYS, CloudEvent, Health, Kind, Observation, Origin, envelope, loads
from streamd.feed.client import FeedClient
from streamd.lifecycle import Tracker
from streamd.providers.apiframe import normalise as apiframe
from streamd.providers.apiframe.client import ApiframeClient
from streamd.providers.base import ProviderError
from streamd.providers.oxen import normalise as oxen
from streamd.providers.oxen.client import OxenClient
from streamd.providers.runware.client import RestClient
from streamd.providers.runware.normalise import Normaliser
from streamd.providers.wiro import normalise as wiro
from streamd.providers.wiro.client import WiroClient
from tests.reliability.harness import FAST, POLL, in_process

FRAMES = Path(__file__).parent.parent / "frames"
SECRETISH = SECRET_KEYS | {"accesskey"}
WORDS = (
    "queued",
    "processing",
    "succeeded",
    "failed",
    "cancelled",
    "QUEUED",
    "PROCESSING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "Completed",
    "task_queue",
    "task_start",
    "task_postprocess_end",
    "task_cancel",
    "task_error",
    "task_output",
    "success",
    "error",
    "pending",
    "getResponse",
    "imageInference",
    "authentication",
    "media_generation_completed",
    "",
    " ",
    "0",
    "1",
    "-1",
    "9" * 40,
)
#: Examples per property; STREAMD_FUZZ_EXAMPLES=3000 for a deeper run (docs/reliability.md).
FUZZ = settings(
    max_examples=int(os.environ.get("STREAMD_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Text from the wire is decoded UTF-8 (websockets strictly, the SSE parser with replacement, bodies by
#: `events.loads`), so a str never holds a lone surrogate; JSON's escape of one is fuzzed at the decode
#: boundary below.
WIRE_CHARACTERS = st.characters(exclude_categories=["Cs"])
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=24)
    | st.sampled_from(WORDS)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=24,
)


# -- seeds ------------------------------------------------------------------------------------------
def _payload(provider: str, name: str, raw: Any) -> Any:
    if provider == "oxen" and isinstance(raw, dict) and "source" in raw:
        if "payload" in raw:
            return raw["payload"]
        data = raw.get("data", "")
        try:
            return json.loads(data)
        except (TypeError, ValueError):
            return data
    return raw


@cache
def seeds(provider: str) -> tuple[Any, ...]:
    out = []
    for path in sorted((FRAMES / provider).glob("*.json")):
        text = path.read_text()
        try:
            raw = json.loads(text)
        except ValueError:
            out.append(text)
            continue
        out.append(_payload(provider, path.stem, raw))
        if provider == "wiro" and isinstance(raw, dict) and isinstance(raw.get("tasklist"), list):
            out.extend(raw["tasklist"])
    return tuple(out)


def secrets_in(value: Any, *, under_secret: bool = False) -> Iterator[str]:
    """Credential values in a seed frame: strings under secret-looking keys."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from secrets_in(v, under_secret=under_secret or str(k).lower() in SECRETISH)
    elif isinstance(value, list):
        for v in value:
            yield from secrets_in(v, under_secret=under_secret)
    elif isinstance(value, str) and under_secret and len(value) >= 8:
        yield value


# -- mutation ---------------------------------------------------------------------------------------
def _paths(value: Any, here: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield here
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*here, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*here, i))


def _set(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _set(value[head], rest, new)}
    copy = list(value)
    copy[head] = _set(copy[head], rest, new)
    return copy


def _drop(value: Any, path: tuple[Any, ...]) -> Any:
    if len(path) == 1:
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if k != path[0]}
        return [v for i, v in enumerate(value) if i != path[0]]
    return _set(value, path[:-1], _drop(_get(value, path[:-1]), path[-1:]))


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


@st.composite
def mutated(draw: st.DrawFn, provider: str) -> Any:
    value = draw(st.sampled_from(seeds(provider)))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(value))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(("drop", "replace", "word", "retype", "add", "wrap")))
        here = _get(value, path)
        if op == "drop" and path:
            value = _drop(value, path)
        elif op == "replace":
            value = _set(value, path, draw(json_values))
        elif op == "word":
            value = _set(value, path, draw(st.sampled_from(WORDS)))
        elif op == "retype" and not isinstance(here, dict | list):  # a number sent as a string, and so on
            retyped = str(here) if not isinstance(here, str) else (int(here) if here.isdigit() else [here])
            value = _set(value, path, retyped)
        elif op == "add" and isinstance(here, dict):
            value = _set(value, path, {**here, draw(st.text(max_size=10)): draw(json_values)})
        elif op == "wrap":
            value = _set(value, path, draw(st.sampled_from(([here], {"data": here}, {"tasklist": [here]}))))
    return value


@st.composite
def corrupted_text(draw: st.DrawFn, provider: str) -> tuple[str, str]:
    """A seed's JSON text cut short (what a dropped connection leaves), or spliced or with a character
    replaced (what a buggy server sends). Returns (operation, text)."""
    seed = draw(st.sampled_from(seeds(provider)))
    text = seed if isinstance(seed, str) else json.dumps(seed)
    at = draw(st.integers(0, max(len(text) - 1, 0)))
    op = draw(st.sampled_from(("truncate", "splice", "replace")))
    if op == "truncate":
        return op, text[:at]
    if op == "splice":
        return op, text[:at] + draw(st.text(max_size=8)) + text[at:]
    return op, text[:at] + draw(WIRE_CHARACTERS) + text[at + 1 :]


# -- the normalisers, every entry point -------------------------------------------------------------
def oxen_all(value: Any) -> list[list[Observation]]:
    text = value if isinstance(value, str) else json.dumps(value)
    return [
        oxen.from_sse(oxen.COMPLETED_EVENT, text),
        oxen.from_sse("deployment_status_changed", text),
        oxen.from_item(value),
        oxen.from_item(text),
        oxen.from_list(value),
        oxen.from_enqueue(value, model="m", prompt="p"),
        oxen.from_sync("sync-1", value, model="m"),
    ]


def wiro_all(value: Any) -> list[list[Observation]]:
    frame = wiro.decode(value) if isinstance(value, str) else value
    return [
        wiro.frame_observations(frame),
        wiro.frame_observations(frame, job="534574", task=value),
        wiro.detail_observations(value),
        wiro.detail_observations(value, history=False),
    ]


def runware_all(value: Any) -> list[list[Observation]]:
    out = []
    for origin in (Origin.PUSH, Origin.POLL):
        norm = Normaliser()
        for task in ("d0e27e41-af62-43be-926c-8211a3a92adb", "f9b9414a-9ebb-4f93-9bb9-d4b16d312a36"):
            norm.expect(task, number_results=2, model="m", prompt="p")
        out.append(norm.feed(value, origin).observations)
        out.append(norm.feed(value if isinstance(value, str) else json.dumps(value), origin).observations)
    return out


def apiframe_all(value: Any) -> list[list[Observation]]:
    apiframe.job_page(value)
    apiframe.fingerprint(value)
    return [
        apiframe.normalise_job(value, origin=Origin.POLL, job="b2c3d4e5-f6a7-8901-bcde-f23456789012"),
        apiframe.normalise_job(value),
        apiframe.normalise_accepted(value, model="seedream-4", prompt="p"),
        apiframe.normalise_webhook(value),
    ]


NORMALISERS: dict[str, Callable[[Any], list[list[Observation]]]] = {
    "oxen": oxen_all,
    "wiro": wiro_all,
    "runware": runware_all,
    "apiframe": apiframe_all,
}


def _raw_is_scrubbed(raw: Any) -> bool:
    if isinstance(raw, dict):
        return all((v == REDACTED if str(k).lower() in SECRETISH else _raw_is_scrubbed(v)) for k, v in raw.items())
    if isinstance(raw, list):
        return all(_raw_is_scrubbed(v) for v in raw)
    return True


def journal_and_serve(provider: str, observations: list[Observation], tracker: Tracker) -> list[bytes]:
    """What the pipeline does with observations: the tracker, the envelope, the journal's encoding;
    and what a subscriber does: decode the line. Everything must survive the round trip."""
    assert isinstance(observations, list)
    lines: list[bytes] = []
    for obs in observations:
        assert isinstance(obs, Observation) and obs.provider == provider
        assert obs.kind is not Kind.HEALTH, "health is the daemon's to report"
        assert obs.kind is not Kind.STATE or obs.state is not None
        assert _raw_is_scrubbed(obs.raw), obs.raw
        for data in tracker.apply(obs, 1.0):
            body = msgspec.json.encode(envelope(data, seq=len(lines) + 1, epoch="e", source="urn:streamd:test"))
            assert msgspec.json.decode(body, type=CloudEvent).data.kind is data.kind
            if data.job is not None and (job := tracker.get(provider, data.job)) is not None:
                lines.append(msgspec.json.encode(job))
            lines.append(body)
    return lines


def check(provider: str, value: Any, secrets: list[str]) -> None:
    tracker = Tracker()
    for observations in NORMALISERS[provider](value):
        lines = journal_and_serve(provider, observations, tracker)
        text = b"\n".join(lines).decode()
        for secret in secrets:  # not the credential, nor any 8-character piece of it
            assert not any(secret[i : i + 8] in text for i in range(len(secret) - 7)), f"{secret[:4]}… leaked"


@pytest.mark.parametrize("provider", NORMALISERS)
def test_seed_frames_are_there(provider: str) -> None:
    assert len(seeds(provider)) >= 10


@pytest.mark.parametrize("provider", NORMALISERS)
@FUZZ
@given(data=st.data())
def test_mutated_frames(provider: str, data: st.DataObject) -> None:
    value = data.draw(mutated(provider))
    check(provider, value, [s for seed in seeds(provider) for s in secrets_in(seed) if s in json.dumps(value)])


@pytest.mark.parametrize("provider", NORMALISERS)
@FUZZ
@given(data=st.data())
def test_frames_cut_or_garbled(provider: str, data: st.DataObject) -> None:
    """A frame cut short may end inside a credential: not even a prefix of it may reach an event.
    (A garbled one may have renamed the field, which then holds no credential: only totality counts.)"""
    op, text = data.draw(corrupted_text(provider))
    secrets = [s for seed in seeds(provider) for s in secrets_in(seed)] if op == "truncate" else []
    check(provider, text, [s for s in secrets if s[:8] in text])


@pytest.mark.parametrize("provider", NORMALISERS)
@FUZZ
@given(value=json_values)
def test_arbitrary_json(provider: str, value: Any) -> None:
    check(provider, value, [])


# -- each bad frame: one diagnostic event -----------------------------------------------------------
def one_frame(provider: str, value: Any) -> list[list[Observation]]:
    """Each entry point that reads one whole frame, given `value` as the wire would carry it."""
    text = value if isinstance(value, str) else json.dumps(value)
    if provider == "oxen":
        return [
            oxen.from_sse(oxen.COMPLETED_EVENT, text),
            oxen.from_item(text),
            oxen.from_list(text),
            oxen.from_enqueue(text),
        ]
    if provider == "wiro":
        return [wiro.frame_observations(wiro.decode(text)), wiro.detail_observations(wiro.decode(text))]
    if provider == "runware":
        return [Normaliser().feed(text, origin).observations for origin in (Origin.PUSH, Origin.POLL)]
    return [apiframe.normalise_job(_decoded(text)), apiframe.normalise_job(text)]


def _decoded(text: str) -> Any:
    """What the Apiframe client hands on: the decoded body, or its text when it is not JSON."""
    try:
        return loads(text)
    except ValueError:
        return text


def assert_one_diagnostic_event(provider: str, value: Any) -> None:
    for observations in one_frame(provider, value):
        assert [o.kind for o in observations] == [Kind.DIAGNOSTIC], (provider, value, observations)
        events = Tracker().apply(observations[0], 1.0)
        assert [e.kind for e in events] == [Kind.DIAGNOSTIC]
        assert events[0].message, "a diagnostic says what was wrong"


def _not_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("provider", NORMALISERS)
@FUZZ
@given(text=st.text(min_size=1, max_size=60).filter(_not_json))
def test_text_that_is_not_json_is_one_diagnostic_event(provider: str, text: str) -> None:
    assert_one_diagnostic_event(provider, text)


@pytest.mark.parametrize("provider", NORMALISERS)
@FUZZ
@given(
    value=scalars
    | st.lists(json_values, max_size=3)
    | st.dictionaries(st.text(max_size=8).map(lambda k: "x-" + k), json_values, max_size=4)
)
def test_json_that_is_not_a_frame_is_one_diagnostic_event(provider: str, value: Any) -> None:
    """Not an object, or an object with none of the provider's fields: one diagnostic, never silence."""
    assert_one_diagnostic_event(provider, value)


# -- the decode boundary ----------------------------------------------------------------------------
SURROGATE_JSON = st.builds(
    lambda before, code, after: json.dumps(before)[:-1] + f"\\u{code:04x}" + json.dumps(after)[1:],
    st.text(max_size=10),
    st.integers(0xD800, 0xDFFF),
    st.text(max_size=10),
)


@FUZZ
@given(text=SURROGATE_JSON)
def test_lone_surrogates_decode_to_text_that_can_be_journaled(text: str) -> None:
    value = loads(text)
    assert isinstance(value, str) and "\ufffd" in value
    msgspec.json.encode(value)
    item = {"generation_id": "g1", "status": "processing", "prompt": json.loads(text)}
    assert [o.kind for o in oxen.from_item(json.dumps(item))] == [Kind.STATE]
    journal_and_serve("oxen", oxen.from_item(json.dumps(item)), Tracker())


def test_the_decode_boundary_keeps_what_json_allows_and_refuses_the_rest() -> None:
    assert loads(b'{"a": [1, 2.5, "x", null, true]}') == {"a": [1, 2.5, "x", None, True]}
    assert loads("[NaN, 1e400, 123456789012345678901234567890]")[2] == 123456789012345678901234567890
    assert loads('"\\ud83d\\ude00"') == "\U0001f600"  # a proper pair stays one character
    for bad in (b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b"{", b"\xff", b""):
        with pytest.raises(ValueError):
            loads(bad)


def _mock(body: bytes) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(200, content=body))


DEEP = b"[" * 50_000 + b"]" * 50_000
HALF_EMOJI = b'{"id": "b2c3d4e5-f6a7-8901-bcde-f23456789012", "status": "QUEUED", "prompt": "a fox \\ud83d"}'


@pytest.mark.anyio
@pytest.mark.parametrize("body", [DEEP, HALF_EMOJI], ids=["nested-too-deep", "lone-surrogate"])
async def test_every_client_reads_a_pathological_body_as_an_error_or_as_data_that_can_be_journaled(
    body: bytes,
) -> None:
    """Nesting too deep to decode raised RecursionError (not a ValueError) out of every client, so the
    poller that asked crashed the provider, and did again after each restart; a lone surrogate decoded
    into data no event could carry. Now: a ProviderError, or data the pipeline can encode."""
    key = Secret("k" * 16)
    transport = _mock(body)
    ox = OxenClient(ProviderSettings(name="oxen", key=key, base_url="http://oxen.test"), transport=transport)
    wi = WiroClient(ProviderSettings(name="wiro", key=key, base_url="http://wiro.test/v1"), transport=transport)
    af = ApiframeClient("http://apiframe.test", key, transport=transport)
    rw = RestClient("http://runware.test/v1", key)
    await rw._http.aclose()
    rw._http = httpx.AsyncClient(transport=transport)
    calls: list[Callable[[], Any]] = [
        lambda: ox.status("g1"),
        lambda: wi.detail(taskid="1"),
        lambda: af.job("b2c3d4e5-f6a7-8901-bcde-f23456789012"),
        lambda: rw.post([{"taskType": "ping"}]),
    ]
    outcomes = []
    try:
        for call in calls:
            try:
                result = await call()
            except ProviderError as exc:
                outcomes.append("error")
                msgspec.json.encode(exc.message)
            else:
                outcomes.append("data")
                msgspec.json.encode(result)
    finally:
        for client in (ox, wi, af, rw):
            await client.aclose()
    if body is DEEP:
        assert outcomes[:2] == ["error", "error"] and outcomes[3] == "error"  # Apiframe hands on the text
    else:
        assert outcomes == ["data", "error", "data", "data"]  # Wiro wants its {result: true} envelope


# -- end to end: garbage on the push channels -------------------------------------------------------
GARBAGE_SSE = (
    b"event: media_generation_completed\ndata: {not json\n\n",
    b"event: media_generation_completed\ndata: []\n\n",
    b'event: media_generation_completed\ndata: {"status": "succeeded"}\n\n',
    b'event: media_generation_completed\ndata: {"generation_id": "zz", "status": "exploded"}\n\n',
    b"event: media_generation_completed\ndata: \xff\xfe\n\n",
)


@pytest.mark.anyio
async def test_garbage_on_the_push_channels_is_one_diagnostic_each_and_the_streams_survive(short_tmp: Path) -> None:
    """Malformed SSE events and socket frames, sent down the real channels: each becomes exactly one
    diagnostic event on the feed; the connections stay up (no reconnect), nothing else is emitted, and
    a Wiro frame that cannot be parsed does not carry its task token to the feed."""
    ox, wi = OxenEmulator(seed=5, keepalive=0.25), WiroEmulator(seed=5, ping_interval=0.5)
    async with anyio.create_task_group() as tg:
        await tg.start(ox.serve)
        await tg.start(wi.serve)
        calm = {"read_timeout": 30.0, "ping_interval": 10.0, "ping_timeout": 30.0}  # no reconnect on a slow machine
        settings = {
            "oxen": _fast("oxen", ox.settings(), **calm),
            "wiro": _fast("wiro", wi.settings(), **calm),
        }
        async with in_process(short_tmp, settings) as daemon, FeedClient.connect(daemon.config.socket) as client:
            with anyio.fail_after(30):
                while ox.subscribers < 1 or wi.connections < 1 or not await _all_connected(client):  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            await daemon.pipeline.sync()
            token = "Tok3nT0k3nT0k3nT0k3nT0k3nT0k3n"
            garbage_ws = [
                "not json at all",
                "[1, 2, 3]",
                '{"no": "type"}',
                '{"type": "task_start", "id": "99", "tasktoken": "' + token + '", "message": {"cut": ',
                '{"type": "task_start", "id": "99", "tasktoken": "' + token[:20],
                '{"type": "task_from_the_future", "id": "99"}',
            ]
            head = daemon.bus.head
            for frame in GARBAGE_SSE:
                assert ox.send_raw(frame) == 1
            for text in garbage_ws:
                assert wi.send_raw(text) == 1
            expected = len(GARBAGE_SSE) + len(garbage_ws)
            got: list[CloudEvent] = []
            with anyio.fail_after(30):
                async for item in client.subscribe(since=head):
                    if isinstance(item, CloudEvent):
                        got.append(item)
                        if len(got) == expected:
                            break
            await anyio.sleep(0.5)  # anything else would arrive by now
            status = await client.status()
            after = daemon.bus.head
        tg.cancel_scope.cancel()
    assert [e.data.kind for e in got] == [Kind.DIAGNOSTIC] * expected
    assert after == head + expected, "nothing but the diagnostics was emitted (no reconnect, no health change)"
    assert {e.data.provider for e in got} == {"oxen", "wiro"}
    assert all(e.data.message for e in got)
    assert token[:8] not in msgspec.json.encode(got).decode()
    assert all(p["health"] == Health.CONNECTED for p in status["providers"])


async def _all_connected(client: FeedClient) -> bool:
    status = await client.status()
    return all(p["health"] == Health.CONNECTED for p in status["providers"])


def _fast(name: str, s: ProviderSettings, **options: Any) -> ProviderSettings:
    return dataclasses.replace(s, poll_interval=POLL[name], options={**s.options, **FAST[name], **options})


@pytest.mark.anyio
async def test_a_provider_record_with_a_lone_surrogate_is_journaled_and_followed_to_its_end(short_tmp: Path) -> None:
    """Apiframe's record of a job whose prompt ends in half an emoji. Before the decode boundary mended
    lone surrogates, the event could not be encoded: the track request failed with an internal error
    and every poll of the job crashed the provider, so the job was never followed to its end."""
    emu = ApiframeEmulator(seed=3, speed=20.0, fail_rate=0.0)
    async with anyio.create_task_group() as tg:
        await tg.start(emu.serve)
        job = emu.inject("a fox in the snow \ud83d")
        settings = {"apiframe": _fast("apiframe", emu.settings())}
        async with in_process(short_tmp, settings) as daemon, FeedClient.connect(daemon.config.socket) as client:
            assert await client.track("apiframe", job) == {"job": job}
            with anyio.fail_after(30):
                while True:
                    (seen,) = await client.jobs(filter=f"job:{job}")
                    if seen.status.terminal:
                        break
                    await anyio.sleep(0.05)
            restarts = (await client.status())["providers"][0]["restarts"]
        tg.cancel_scope.cancel()
    assert seen.status.value == emu.truth[job].state == "completed"
    assert seen.prompt == "a fox in the snow \ufffd"
    assert list(seen.outputs) == emu.truth[job].outputs
    assert restarts == 0
