"""The demo's job generator: realistic jobs submitted through the daemon's own feed.

It opens with a short script per provider (a quick success, a failure, a cancellation) so that
even a 20-second demo shows every ending, then submits jobs at random at `rate` per minute and
cancels some of them a few seconds in.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import anyio

from streamd.feed.client import FeedClient, FeedError

log = logging.getLogger("streamd.demo")

MODELS: dict[str, tuple[str, ...]] = {
    "oxen": ("bytedance-seedream-4", "bytedance-seedream-4-5"),
    "wiro": ("bytedance/seedream-v4",),
    "runware": ("bytedance:5@0",),
    "apiframe": ("seedream-4",),
}
CANCELLABLE = frozenset({"oxen", "wiro"})  # Runware and Apiframe have no cancel API

PROMPTS = (
    "a lighthouse on a basalt cliff at dusk, volumetric fog, 35mm film",
    "isometric cutaway of a tiny bakery, warm morning light",
    "portrait of an old fisherman, Rembrandt lighting, oil on canvas",
    "product shot of a ceramic mug on linen, soft shadows, 4k",
    "a red fox in fresh snow, telephoto, shallow depth of field",
    "retro-futurist train station, 1960s poster style",
    "macro photo of dew on a spider web at sunrise",
    "watercolour map of an imaginary archipelago",
    "add a funny hat to the cat in the reference image",
    "a cosy reading nook with rain on the window, studio ghibli style",
    "brutalist library interior, shafts of light, ultra wide",
    "storyboard frame: astronaut finds a flower on mars",
)


def _prompt(rng: random.Random, tag: str = "") -> str:
    text = rng.choice(PROMPTS)
    return f"{text} [{tag}]" if tag else text


async def generate(
    socket: Path,
    providers: Sequence[str],
    *,
    rate: float = 60.0,
    speed: float = 1.0,
    seed: int | None = None,
    cancel_rate: float = 0.12,
) -> None:
    """Submit jobs until cancelled."""
    rng = random.Random(seed)
    async with FeedClient.connect(socket) as client, anyio.create_task_group() as tg:

        async def submit(provider: str, prompt: str, *, cancel_after: float | None = None) -> None:
            model = rng.choice(MODELS[provider])
            options: dict[str, object] = {}
            if provider in ("runware", "wiro") and rng.random() < 0.3:
                options["num"] = 2
            try:
                result = await client.submit(provider, model, prompt, options=options)
            except FeedError as exc:
                log.warning("demo submit to %s refused: %s", provider, exc.message)
                return
            if cancel_after is not None and provider in CANCELLABLE:
                for job in result.get("jobs", [])[:1]:
                    tg.start_soon(cancel_later, provider, job, cancel_after)

        async def cancel_later(provider: str, job: str, delay: float) -> None:
            await anyio.sleep(delay)
            try:
                await client.cancel(provider, job)
            except FeedError as exc:
                log.info("demo cancel of %s/%s: %s", provider, job, exc.message)

        for provider in providers:  # the opening script: every ending, early
            await submit(provider, _prompt(rng, "ok"))
            await submit(provider, _prompt(rng, "fail"))
            await submit(provider, _prompt(rng, "slow"), cancel_after=rng.uniform(1.0, 2.5) / max(speed, 0.1))
        while True:
            await anyio.sleep(rng.expovariate(rate / 60.0))
            provider = rng.choice(providers)
            cancel_after = rng.uniform(1.0, 6.0) / max(speed, 0.1) if rng.random() < cancel_rate else None
            await submit(provider, _prompt(rng), cancel_after=cancel_after)
