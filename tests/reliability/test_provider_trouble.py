"""Provider trouble: wrong or revoked keys, 429 with Retry-After, 5xx bursts, a provider down for
"minutes". Every timer is compressed (harness.FAST: reconnect caps of 0.5 s instead of 60 s, poll
intervals of 0.1-0.5 s), so minutes of backoff play out in seconds. Request counts are upper bounds
(a loaded machine only makes fewer requests), never timings.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import pytest

from streamd.config import Secret
from streamd.daemon import Daemon
from streamd.emulators.base import Emulator, Faults
from streamd.events import CloudEvent, Health, Kind
from streamd.feed.client import FeedClient, FeedError
from tests.reliability.harness import (
    FAST,
    MODELS,
    POLL,
    PROVIDERS,
    Fleet,
    Recorder,
    fleet,
    in_process,
    mismatches,
    settle,
)

pytestmark = pytest.mark.anyio


class TimedFaults(Faults):
    """Faults that note when each armed error was served."""

    def __init__(self) -> None:
        super().__init__()
        self.served_at: list[float] = []

    def take_error(self) -> int | None:
        status = super().take_error()
        if status is not None:
            self.served_at.append(anyio.current_time())
        return status


def http_requests(emu: Emulator) -> int:
    server: Any = getattr(emu, "server", None) or getattr(emu, "http", None) or emu._http  # type: ignore[attr-defined]
    return int(server.requests)


async def health_of(client: FeedClient) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in (await client.status())["providers"]}


async def until_health(client: FeedClient, names: Iterable[str], wanted: set[str], within: float = 30.0) -> None:
    names = list(names)
    with anyio.fail_after(within):
        while True:
            status = await health_of(client)
            if all(status[n]["health"] in wanted for n in names):
                return
            await anyio.sleep(0.05)


def health_events(recorder: Recorder, provider: str, since: int = 0) -> list[CloudEvent]:
    return [e for e in recorder.events if e.seq > since and e.data.kind is Kind.HEALTH and e.data.provider == provider]


# -- wrong keys -------------------------------------------------------------------------------------
KEY_WINDOW = 3.0  # six of Wiro's poll intervals, thirty of Apiframe's


async def test_wrong_keys_are_reported_and_not_retried_in_a_storm(short_tmp: Path) -> None:
    """Every provider started with a wrong key (and Wiro with a wrong secret): each says so in its
    health and in `status`, no message holds a key, a submit is refused with `auth` at once, and over
    three seconds (six poll intervals or more) none sends more than a few requests."""
    async with fleet(proxied=False) as f:
        keys = {n: s.key.reveal() for n, s in f.settings.items()}
        wrong = {
            n: dataclasses.replace(
                s,
                key=Secret("wrong-" + keys[n][::-1]),
                secret=Secret("wrong-secret-0123456789") if s.secret is not None else None,
            )
            for n, s in f.settings.items()
        }
        async with in_process(short_tmp, wrong) as daemon, FeedClient.connect(daemon.config.socket) as client:
            await until_health(client, PROVIDERS, {Health.AUTH_FAILED.value})
            before = {n: http_requests(e) for n, e in f.emulators.items()}
            ws_before = f.emulators["runware"].ws_connections  # type: ignore[attr-defined]
            await anyio.sleep(KEY_WINDOW)
            sent = {n: http_requests(e) - before[n] for n, e in f.emulators.items()}
            ws_after = f.emulators["runware"].ws_connections  # type: ignore[attr-defined]
            status = await health_of(client)
            refusals = {}
            for name in PROVIDERS:
                with pytest.raises(FeedError) as err:
                    await client.submit(name, MODELS[name], "a lighthouse")
                refusals[name] = err.value
            restarts = sum(p["restarts"] for p in status.values())
    secrets = [*keys.values(), *(w.key.reveal() for w in wrong.values()), "wrong-secret-0123456789"]
    for name, p in status.items():
        assert p["health"] == "auth_failed" and p["message"] and "reject" in p["message"].lower(), p
        assert not any(s in p["message"] for s in secrets)
        assert refusals[name].code == "auth" and not any(s in refusals[name].message for s in secrets)
    print(
        f"\nwrong keys: requests in {KEY_WINDOW:g} s after auth_failed: {sent}, Runware sockets +{ws_after - ws_before}"
    )
    assert all(n <= 4 for n in sent.values()), f"requests in {KEY_WINDOW} s with a wrong key: {sent}"
    assert ws_after == ws_before, "Runware does not reconnect with a key it was told is wrong"
    assert restarts == 0


async def test_a_key_revoked_with_jobs_in_flight_stops_the_polling(short_tmp: Path) -> None:
    """Five jobs per provider in flight, then the key stops working (and every connection drops, so
    the push channels must authenticate again). Each provider reports auth_failed, and then sends a
    few probes at most, not a poll per job per interval: Wiro used to send a 401-bound poll for every
    task every `quiet` seconds, for as long as it ran."""
    async with (
        fleet(proxied=False) as f,
        in_process(short_tmp, f.settings) as daemon,
        FeedClient.connect(daemon.config.socket) as client,
    ):
        await until_health(client, PROVIDERS, {Health.CONNECTED.value, Health.POLLING.value})
        for emu in f.emulators.values():
            emu.faults.paused = True
        for name in PROVIDERS:
            for i in range(5):
                await client.submit(name, MODELS[name], f"a lighthouse #{i} [slow]")
        for emu in f.emulators.values():
            emu.faults.reject_auth = True
            await emu.restart()
        await until_health(client, PROVIDERS, {Health.AUTH_FAILED.value})
        before = {n: http_requests(e) for n, e in f.emulators.items()}
        await anyio.sleep(KEY_WINDOW)
        sent = {n: http_requests(e) - before[n] for n, e in f.emulators.items()}
        status = await health_of(client)
        active = len(await client.jobs(active=True))
    assert all(p["health"] == "auth_failed" for p in status.values())
    print(f"\nrevoked key, 5 jobs each in flight: requests in {KEY_WINDOW:g} s after auth_failed: {sent}")
    assert all(n <= 4 for n in sent.values()), f"requests in {KEY_WINDOW} s after the key was revoked: {sent}"
    assert active == 20, "the jobs are still followed (they resume when a key works again)"


# -- 429 and 5xx ------------------------------------------------------------------------------------
RETRY_AFTER = 1.5
WINDOW = 3.0


async def test_rate_limits_are_honoured_and_5xx_bursts_are_ridden_out(short_tmp: Path) -> None:
    """Every REST answer is a 429 with `Retry-After: 1.5` for three seconds, with two jobs per provider
    in flight (Runware's socket down, so it polls over REST). Each provider says rate_limited with the
    server's delay, and sends at most one round of requests per Retry-After. Then bursts of 503s while
    the jobs run: every job still ends as the emulators say, and no provider crashed."""
    async with fleet() as f:
        for emu in f.emulators.values():
            emu.faults = TimedFaults()
        async with in_process(short_tmp, f.settings) as daemon:
            recorder = Recorder(daemon.config.socket)
            async with anyio.create_task_group() as tg, FeedClient.connect(daemon.config.socket) as client:
                await tg.start(recorder.run)
                await until_health(client, PROVIDERS, {Health.CONNECTED.value, Health.POLLING.value})
                acked: list[tuple[str, str]] = []
                for emu in f.emulators.values():
                    emu.faults.paused = True
                for name in PROVIDERS:
                    for i in range(2):
                        jobs = (await client.submit(name, MODELS[name], f"a fox #{i} [slow]"))["jobs"]
                        acked += [(name, j) for j in jobs]
                runware_ws = f.proxies["runware"][1]
                runware_ws.down = True
                runware_ws.cut_all()
                head = daemon.bus.head
                for emu in f.emulators.values():
                    emu.faults.retry_after = RETRY_AFTER
                    emu.faults.error_status, emu.faults.error_count = 429, -1
                await anyio.sleep(WINDOW)
                for emu in f.emulators.values():
                    emu.faults.error_status, emu.faults.error_count = None, 0
                served = {n: list(e.faults.served_at) for n, e in f.emulators.items()}  # type: ignore[attr-defined]
                rate_limited = {n: e.faults.errors_served for n, e in f.emulators.items()}
                limited = {n: health_events(recorder, n, head) for n in PROVIDERS}

                # 5xx bursts while the jobs run.
                runware_ws.down = False
                for emu in f.emulators.values():
                    emu.faults.paused = False
                for _ in range(4):
                    for emu in f.emulators.values():
                        emu.faults.error_status, emu.faults.error_count = 503, 5
                    await anyio.sleep(0.5)
                for emu in f.emulators.values():
                    emu.faults.error_status, emu.faults.error_count = None, 0
                jobs = await settle(lambda: client.jobs(limit=1000), f.emulators, acked, within=60)
                restarts = sum(p["restarts"] for p in (await health_of(client)).values())
                tg.cancel_scope.cancel()
    rounds = WINDOW / RETRY_AFTER + 1
    counts = {n: len(v) for n, v in served.items()}
    print(f"\n429 for {WINDOW:g} s, Retry-After {RETRY_AFTER:g} s: requests {counts}")
    for name in PROVIDERS:
        assert served[name], f"{name} asked nothing while rate limited"
        delays = [e.data.delay for e in limited[name] if e.data.health is Health.RATE_LIMITED]
        assert delays and max(d or 0 for d in delays) >= RETRY_AFTER * 0.99, (name, delays)
        assert len(served[name]) <= rounds * 3, f"{name}: {len(served[name])} requests in {WINDOW}s of 429s"
    assert not mismatches(jobs, f.emulators) and {j.key for j in jobs} >= set(acked)
    bursts = {n: e.faults.errors_served - rate_limited[n] for n, e in f.emulators.items()}
    assert all(bursts[n] for n in ("oxen", "wiro", "apiframe")), f"503s served to the REST pollers: {bursts}"
    assert restarts == 0


# -- a provider down for minutes ----------------------------------------------------------------------
CAPS = {  # the longest reconnect delay each provider's policy allows, at the compressed scale
    "oxen": FAST["oxen"]["reconnect_max"],
    "wiro": FAST["wiro"]["reconnect_max"],
    "runware": FAST["runware"]["reconnect_max"],
    "apiframe": 60.0 * POLL["apiframe"] / 2.5,  # Timing.for_interval: outage_max scales with the interval
}
OUTAGE = 3.0  # six reconnect caps: at the real 60 s cap, six minutes


async def _outage(f: Fleet, daemon: Daemon, client: FeedClient, recorder: Recorder, down: set[str]) -> dict[str, Any]:
    up = set(PROVIDERS) - down
    await until_health(client, PROVIDERS, {Health.CONNECTED.value, Health.POLLING.value})  # the last outage is over
    acked: list[tuple[str, str]] = []
    for name in PROVIDERS:
        jobs = (await client.submit(name, MODELS[name], f"a harbour at dawn {sorted(down)} [slow]"))["jobs"]
        acked += [(name, j) for j in jobs]
    await daemon.pipeline.sync()
    head = daemon.bus.head
    refused0 = {n: sum(px.stats.refused for px in f.proxies[n]) for n in down}
    for name in down:
        for proxy in f.proxies[name]:
            proxy.down = True
            proxy.cut_all()
    # Meanwhile the others take new work and finish it.
    during: list[tuple[str, str]] = []
    for name in sorted(up):
        jobs = (await client.submit(name, MODELS[name], f"a quick one while {sorted(down)} are down [fast]"))["jobs"]
        during += [(name, j) for j in jobs]
    finished_up = await settle(
        lambda: client.jobs(filter=" ".join(f"-provider:{n}" for n in down), limit=1000),
        f.emulators,
        [*during, *[a for a in acked if a[0] in up]],
        within=60,
    )
    await anyio.sleep(max(0.0, OUTAGE - 0.1))  # the outage lasts at least OUTAGE seconds
    refused = {n: sum(px.stats.refused for px in f.proxies[n]) - refused0[n] for n in down}
    # `status` first, then everything journaled so far reaches the recorder: the health event that
    # status reflects is then among the recorded ones (another attempt may already have followed it).
    status = await health_of(client)
    await anyio.sleep(0.05)
    await daemon.pipeline.sync()
    target = daemon.bus.head
    with anyio.fail_after(30):
        while recorder.cursor < target:  # noqa: ASYNC110  (the recorder has no event for a seq)
            await anyio.sleep(0.01)
    down_health = {n: health_events(recorder, n, head) for n in down}
    up_health = {n: health_events(recorder, n, head) for n in up}
    for name in down:
        for proxy in f.proxies[name]:
            proxy.heal()
    return {
        "acked": acked + during,
        "refused": refused,
        "down_health": down_health,
        "up_health": up_health,
        "finished_up": finished_up,
        "status": {n: status[n] for n in down},
    }


async def test_providers_down_for_minutes_back_off_to_their_caps_and_the_others_carry_on(short_tmp: Path) -> None:
    async with fleet() as f, in_process(short_tmp, f.settings) as daemon:
        recorder = Recorder(daemon.config.socket)
        async with anyio.create_task_group() as tg, FeedClient.connect(daemon.config.socket) as client:
            await tg.start(recorder.run)
            await until_health(client, PROVIDERS, {Health.CONNECTED.value, Health.POLLING.value})
            rounds = [
                await _outage(f, daemon, client, recorder, {"oxen", "wiro"}),
                await _outage(f, daemon, client, recorder, {"runware", "apiframe"}),
            ]
            acked = [a for r in rounds for a in r["acked"]]
            jobs = await settle(lambda: client.jobs(limit=1000), f.emulators, acked, within=60)
            # Healthy again, all of them. (Waited for, not read once: a stream may be between two
            # connections at any moment, e.g. Oxen's 1 s read timeout firing on a loaded machine.)
            with contextlib.suppress(TimeoutError):
                await until_health(client, PROVIDERS, {Health.CONNECTED.value, Health.POLLING.value}, within=20)
            status = await health_of(client)
            tg.cancel_scope.cancel()
    for r in rounds:
        print(
            f"\ndown {OUTAGE:g} s: connection attempts {r['refused']}, largest delay "
            f"{dict((n, max((e.data.delay or 0) for e in ev)) for n, ev in r['down_health'].items())}"
        )
        for name, events in r["down_health"].items():
            delays = [e.data.delay for e in events if e.data.delay is not None]
            assert events and events[-1].data.health in (Health.RECONNECTING, Health.DOWN), (name, events[-1:])
            assert delays and max(delays) <= CAPS[name] * 1.001, f"{name}: a delay above its cap: {max(delays)}"
            # Each attempt's delay is reported (a repeated `down` used to be dropped, delay and all, so
            # Apiframe's feed and status stopped at its third attempt's 0.1 s while it backed off to 2.4 s).
            assert max(delays) >= CAPS[name] * 0.25, f"{name}: backed off towards its cap: {delays}"
            assert r["status"][name]["health"] in ("reconnecting", "down")
            assert r["status"][name]["delay"] in delays, "status shows a delay the daemon reported"
            assert r["status"][name]["delay"] >= min(delays[-3:]), "status is not stuck at an early delay"
            # Reconnects at no less than half the cap apart (full jitter), plus polls of its jobs: no storm.
            bound = 3 * (OUTAGE / (CAPS[name] * 0.5) + 6)
            assert r["refused"][name] <= bound, f"{name}: {r['refused'][name]} connection attempts in {OUTAGE}s"
            assert r["refused"][name] >= 2, f"{name} kept trying"
        for name, events in r["up_health"].items():
            assert not events, f"{name} was unaffected, yet its health changed: {[e.data.health for e in events]}"
        assert r["finished_up"], "the others finished work during the outage"
    assert not mismatches(jobs, f.emulators)
    assert all(p["health"] in ("connected", "polling") for p in status.values()), status
    assert all(p["restarts"] == 0 for p in status.values()), status  # no provider task crashed
