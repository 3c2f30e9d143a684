from __future__ import annotations

import pytest

from streamd.events import EventData, Job, Kind, Origin, State
from streamd.filters import FilterError, parse


def ev(
    provider: str = "oxen",
    job: str = "abc123",
    status: State | None = State.RUNNING,
    model: str = "seedream-4",
    prompt: str | None = "a red fox in snow",
) -> EventData:
    return EventData(
        provider=provider,
        job=job,
        kind=Kind.STATE,
        status=status,
        previous=None,
        upstream="x",
        origin=Origin.PUSH,
        model=model,
        prompt=prompt,
    )


@pytest.mark.parametrize(
    ("expr", "item", "hit"),
    [
        ("", ev(), True),
        ("provider:oxen", ev(), True),
        ("provider:wiro", ev(), False),
        ("p:wiro,oxen", ev(), True),
        ("-provider:oxen", ev(), False),
        ("!provider:oxen", ev(provider="wiro"), True),
        ("status:running,queued", ev(), True),
        ("-status:failed", ev(status=State.FAILED), False),
        ("model:seedream*", ev(), True),
        ("model:SEEDREAM-4", ev(), True),
        ("model:seed", ev(), False),
        ("fox", ev(), True),
        ("FOX -status:running", ev(), False),
        ("wolf", ev(), False),
        ("job:abc*", ev(), True),
        ("provider:oxen status:completed", ev(), False),
        ("'red fox'", ev(), True),
        ("status:running", ev(status=None), False),
        ("provider=oxen", ev(), True),
    ],
)
def test_filter_language(expr: str, item: EventData, hit: bool) -> None:
    assert parse(expr)(item) is hit


def test_same_filter_applies_to_jobs() -> None:
    job = Job(provider="wiro", job="77", status=State.QUEUED, model="bytedance/seedream-v4", prompt="a cat")
    assert parse("provider:wiro status:queued cat")(job)
    assert not parse("-provider:wiro")(job)


@pytest.mark.parametrize(
    ("expr", "needle"),
    [("colour:red", "unknown field 'colour'"), ("status:", "no value"), ("'open", "No closing quotation")],
)
def test_bad_filters_say_what_is_wrong(expr: str, needle: str) -> None:
    with pytest.raises(FilterError, match=needle):
        parse(expr)


def test_status_terms_also_match_a_job_leaving_the_state() -> None:
    """A view filtered on `status:running` must hear that a running job completed."""
    leaving = EventData(
        provider="oxen",
        job="a",
        kind=Kind.STATE,
        status=State.COMPLETED,
        previous=State.RUNNING,
        upstream="x",
        origin=Origin.POLL,
    )
    assert parse("status:running")(leaving)
    assert parse("status:completed")(leaving)
    assert not parse("status:queued")(leaving)
    assert parse("-status:running")(leaving)  # negation looks at the new state only
    assert not parse("-status:completed")(leaving)
