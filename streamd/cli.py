"""The `streamd` command. User mistakes end in one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import anyio
import msgspec

from streamd import __version__
from streamd.config import ConfigError, default_socket, find_config, parse_file
from streamd.errors import first_leaf
from streamd.events import CloudEvent, Job, Kind, State, cost_text, json_encoder
from streamd.feed import protocol as p
from streamd.feed.client import FeedClient, FeedError
from streamd.filters import FilterError, parse
from streamd.mirror import MirrorError

EXIT_USER = 1  # a mistake or refusal the user can act on
EXIT_USAGE = 2


class UserError(Exception):
    pass


# -- output helpers ----------------------------------------------------------------------------------
COLOURS = {
    "queued": "\033[37m",
    "accepted": "\033[36m",
    "preprocessing": "\033[36m",
    "running": "\033[34m",
    "postprocessing": "\033[35m",
    "completed": "\033[32m",
    "failed": "\033[31m",
    "cancelled": "\033[33m",
}
RESET = "\033[0m"


def _colour(text: str, state: str | None, enabled: bool) -> str:
    if not enabled or state not in COLOURS:
        return text
    return f"{COLOURS[state]}{text}{RESET}"


def _short(job: str | None, width: int = 12) -> str:
    if job is None:
        return "-"
    return job if len(job) <= width else job[: width - 1] + "…"


def format_event(ev: CloudEvent, *, colour: bool = False) -> str:
    """One human line per event: time, seq, provider, job, what happened, and why we know."""
    d = ev.data
    clock = ev.time[11:23]
    head = f"{clock}  #{ev.seq:<6} {d.provider:<8} {_short(d.job):<13}"
    if d.kind is Kind.HEALTH:
        what = f"connection {d.health.value if d.health else '?'}"
        if d.delay:
            what += f" (retry in {d.delay:.1f}s)"
        if d.message:
            what += f": {d.message}"
        return f"{head}{what}"
    if d.kind is Kind.STATE and d.status is not None:
        arrow = f"{d.previous.value if d.previous else '·'} → {d.status.value}"
        what = _colour(f"{arrow:<28}", d.status.value, colour)
    else:
        what = f"{d.kind.value:<28}"
    extra = []
    if d.progress is not None and d.progress.percent is not None:
        extra.append(f"{d.progress.percent:.0f}%")
    if d.kind is Kind.STATE and d.status is State.COMPLETED and d.outputs:
        extra.append(f"{len(d.outputs)} output{'s' if len(d.outputs) != 1 else ''}")
    if d.cost is not None and d.kind is Kind.STATE:
        extra.append(cost_text(d.provider, d.cost))
    if d.error:
        extra.append(f"error: {_one_line(d.error)}")
    if d.message and d.kind is not Kind.STATE:
        extra.append(_one_line(d.message))
    if d.model and d.kind is Kind.STATE and d.previous is None:
        extra.append(d.model)
    return f"{head}{what} [{d.upstream}, {d.origin.value}] {' '.join(extra)}".rstrip()


def _one_line(text: str, width: int = 100) -> str:
    text = " ⏎ ".join(line.strip() for line in text.splitlines() if line.strip())
    return text if len(text) <= width else text[: width - 1] + "…"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def format_jobs(jobs: Sequence[Job], *, colour: bool = False) -> str:
    if not jobs:
        return "no jobs"
    now = time.time()
    rows = [f"{'PROVIDER':<9}{'JOB':<38}{'STATUS':<16}{'IN STATE':>9}{'TOTAL':>8}  {'COST':>8}  MODEL / PROMPT"]
    for j in jobs:
        cost = cost_text(j.provider, j.cost)
        prompt = (j.prompt or "").replace("\n", " ")
        desc = f"{j.model or '-'}  {prompt[:40]}"
        status = _colour(f"{j.status.value:<16}", j.status.value, colour)
        rows.append(
            f"{j.provider:<9}{_short(j.job, 37):<38}{status}{_age(now - j.since):>9}{_age(now - j.created):>8}"
            f"  {cost:>8}  {desc}"
        )
        if j.error:
            rows.append(f"{'':<9}  error: {j.error}")
        if j.paths:
            rows.extend(f"{'':<9}  archived: {path}" for path in j.paths)
    return "\n".join(rows)


def format_status(status: dict[str, Any]) -> str:
    d = status["daemon"]
    lines = [
        f"streamd {d['version']} (pid {d['pid']}), up {_age(d['uptime'])}",
        f"  socket   {d['socket']}  ({d['subscribers']} subscribers, {d['connections']} connections)",
        f"  journal  {d['state_dir']}  epoch {d['epoch']}, seq {d['oldest']}..{d['seq']}",
        f"  jobs     {d['jobs_active']} active",
    ]
    if d.get("journal_error"):
        lines.append(f"  JOURNAL ERROR: {d['journal_error']}")
    if not status["providers"]:
        lines.append("  no providers enabled (set OXEN_API_KEY, WIRO_API_KEY, RUNWARE_API_KEY or APIFRAME_API_KEY)")
    for prov in status["providers"]:
        line = f"  {prov['name']:<9}{prov['health']:<14}{prov['jobs_active']:>4} active {prov['events']:>8} events"
        if prov.get("delay"):
            line += f"  retry in {prov['delay']:.1f}s"
        if prov.get("message"):
            line += f"  {prov['message']}"
        lines.append(line)
    return "\n".join(lines)


# -- socket resolution ---------------------------------------------------------------------------------
def resolve_socket(arg: str | None, config: str | None = None) -> Path:
    if arg:
        return Path(arg).expanduser()
    if os.environ.get("STREAMD_SOCKET"):
        return Path(os.environ["STREAMD_SOCKET"]).expanduser()
    path = find_config(config)
    if path is not None:
        cfg = parse_file(path.read_text(), str(path))
        if cfg.daemon.socket:
            return Path(cfg.daemon.socket).expanduser()
    return default_socket()


# -- client commands -------------------------------------------------------------------------------------
def _cursor(value: str | None) -> int | str:
    if value is None or value in ("now", "oldest"):
        return value or "now"
    try:
        seq = int(value)
    except ValueError:
        raise UserError(f"--since {value!r}: expected a seq number, 'now' or 'oldest'") from None
    if seq < 0:
        raise UserError(f"--since {value}: a seq is never negative")
    return seq


def _emit_event(ev: CloudEvent, *, as_json: bool, colour: bool) -> None:
    out = sys.stdout.buffer
    out.write(json_encoder.encode(ev) + b"\n" if as_json else format_event(ev, colour=colour).encode() + b"\n")
    out.flush()


async def _tail_redis(args: argparse.Namespace, colour: bool) -> int:
    from contextlib import aclosing

    from streamd.mirror import DEFAULT_STREAM, tail_redis

    events = tail_redis(
        args.redis,
        args.stream or DEFAULT_STREAM,
        group=args.group,
        consumer=args.consumer,
        filter=parse(args.filter),
        since=args.since or "now",
        follow=not args.no_follow,
        batch=min(args.count, 100) if args.count else 100,
    )
    count = 0
    async with aclosing(events):
        async for ev in events:
            _emit_event(ev, as_json=args.json, colour=colour)
            count += 1
            if args.count and count >= args.count:
                break
    return 0


async def cmd_tail(args: argparse.Namespace) -> int:
    colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    if args.redis:
        return await _tail_redis(args, colour)
    if args.group or args.consumer or args.stream:
        raise UserError("--group, --consumer and --stream go with --redis URL")
    since = _cursor(args.since)
    parse(args.filter)  # fail here, clearly, before connecting
    count = 0
    async with FeedClient.connect(resolve_socket(args.socket, args.config)) as client:
        async for item in client.subscribe(since=since, filter=args.filter or ""):
            if isinstance(item, CloudEvent):
                _emit_event(item, as_json=args.json, colour=colour)
                count += 1
                if args.count and count >= args.count:
                    return 0
            elif isinstance(item, p.Gap):
                msg = f"gap: events {item.first}..{item.last} are no longer kept ({item.reason})"
                print(f"streamd: {msg}", file=sys.stderr, flush=True)
            elif isinstance(item, p.Live) and args.no_follow:
                return 0
    return 0


async def cmd_jobs(args: argparse.Namespace) -> int:
    parse(args.filter)
    async with FeedClient.connect(resolve_socket(args.socket, args.config)) as client:
        jobs = await client.jobs(filter=args.filter or "", active=args.active, limit=args.limit)
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(jobs) + b"\n")
    else:
        print(format_jobs(jobs, colour=sys.stdout.isatty()))
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    async with FeedClient.connect(resolve_socket(args.socket, args.config)) as client:
        status = await client.status()
    if args.json:
        sys.stdout.buffer.write(msgspec.json.encode(status) + b"\n")
    else:
        print(format_status(status))
    return 0


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--option {pair!r}: expected KEY=VALUE")
        try:
            out[key] = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            out[key] = raw
    return out


async def cmd_submit(args: argparse.Namespace) -> int:
    options = _options(args.option or [])
    if args.size:
        try:
            w, h = (int(x) for x in args.size.lower().split("x"))
        except ValueError:
            raise UserError(f"--size {args.size!r}: expected WIDTHxHEIGHT, e.g. 1024x1024") from None
        options.update(width=w, height=h)
    if args.num:
        options["num"] = args.num
    if args.sync:
        options["sync"] = True
    images = []
    for image in args.image or []:
        if "://" not in image:
            path = await anyio.Path(image).expanduser()
            if not await path.is_file():
                raise UserError(f"--image {image}: no such file")
            image = str(await path.resolve())
        images.append(image)
    async with FeedClient.connect(resolve_socket(args.socket, args.config)) as client:
        result = await client.submit(args.provider, args.model, args.prompt, images=images, options=options)
        jobs: list[str] = result.get("jobs", [])
        if args.json and not args.wait:
            sys.stdout.buffer.write(msgspec.json.encode(result) + b"\n")
        elif not args.wait:
            for job in jobs:
                print(job)
        if args.wait:
            return await _wait(client, args.provider, jobs, json_out=args.json)
    return 0


async def _wait(client: FeedClient, provider: str, jobs: list[str], *, json_out: bool) -> int:
    """Follow `jobs` until each ends; exit 0 only if all completed."""
    pending = set(jobs)
    final: dict[str, Job] = {}
    terms = " ".join(f"job:{j}" for j in jobs[:1])  # one job: filter on the daemon; several: filter here
    async for item in client.subscribe(since="now", snapshot=True, filter=f"provider:{provider} {terms}".strip()):
        if isinstance(item, p.Snapshot):
            final.update({s.job: s for s in item.jobs if s.job in pending and s.status.terminal})
        elif (
            isinstance(item, CloudEvent)
            and item.data.job in pending
            and item.data.kind is Kind.STATE
            and item.data.status is not None
            and item.data.status.terminal
        ):
            got = await client.jobs(filter=f"provider:{provider} job:{item.data.job}", limit=1)
            if got:
                final[item.data.job] = got[0]
        pending -= set(final)
        if not pending:
            break
    if json_out:
        sys.stdout.buffer.write(msgspec.json.encode([final[j] for j in jobs]) + b"\n")
    else:
        for jid in jobs:
            job = final[jid]
            print(f"{jid}  {job.status.value}" + (f"  {job.error}" if job.error else ""))
            for url in job.outputs:
                print(f"  {url}")
    return 0 if all(final[jid].status is State.COMPLETED for jid in jobs) else EXIT_USER


async def cmd_outputs(args: argparse.Namespace) -> int:
    """Copy a job's archived outputs out of the daemon's archive."""
    from streamd.archive import ArchiveError, copy_out

    async with FeedClient.connect(resolve_socket(args.socket, args.config)) as client:
        status = await client.status()
        found = [j for j in await client.jobs(filter=f"job:{_glob_safe(args.job)}", limit=100) if j.job == args.job]
    if args.provider:
        found = [j for j in found if j.provider == args.provider]
    if not found:
        raise UserError(f"no job {args.job!r} known to the daemon")
    if len(found) > 1:
        names = ", ".join(j.provider for j in found)
        raise UserError(f"job id {args.job!r} exists at several providers ({names}): add --provider")
    job = found[0]
    archive = status["daemon"].get("archive_dir")
    if not archive:
        raise UserError("output archival is off on this daemon (set [archive] enabled = true)")
    if not job.paths:
        why = "it has not completed" if not job.status.terminal else "its outputs were not archived or expired"
        raise UserError(f"job {job.provider}/{job.job} has no archived outputs: {why}")
    try:
        copied = await anyio.to_thread.run_sync(lambda: copy_out(Path(archive), job.paths, Path(args.to).expanduser()))
    except ArchiveError as exc:
        raise UserError(str(exc)) from None
    for path in copied:
        print(path)
    return 0


def _glob_safe(text: str) -> str:
    """A job id as a filter value: glob and list characters would change its meaning, so the
    filter matches loosely and the caller compares ids exactly."""
    return "".join("?" if c in "*?,[]" else c for c in text)


async def cmd_track(args: argparse.Namespace) -> int:
    async with FeedClient.connect(resolve_socket(args.socket, args.config)) as client:
        result = await client.track(args.provider, args.ref)
    print(result.get("job", ""))
    return 0


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with FeedClient.connect(resolve_socket(args.socket, args.config)) as client:
        result = await client.cancel(args.provider, args.job)
    print(result.get("message", "cancelled"))
    return 0


# -- daemon commands ---------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from streamd.service import run_service

    return run_service(args.config, socket=args.socket, state_dir=args.state_dir, log_level=args.log_level)


def cmd_demo(args: argparse.Namespace) -> int:
    from streamd.demo import run_demo

    return run_demo(
        headless=args.headless,
        duration=args.duration,
        socket=args.socket,
        seed=args.seed,
        speed=args.speed,
        rate=args.rate,
        providers=args.providers.split(",") if args.providers else None,
    )


def cmd_tui(args: argparse.Namespace) -> int:
    try:
        from streamd_tui.app import run as run_tui
    except ImportError as exc:  # pragma: no cover - the dashboard ships with streamd
        raise UserError(f"the dashboard is not installed: {exc}") from None
    code: int = run_tui(resolve_socket(args.socket, args.config))
    return code


# -- parser ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"streamd: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="streamd", description="Follow image-generation jobs on hosted APIs as one event stream.")
    ap.add_argument("--version", action="version", version=f"streamd {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def client(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--socket", help="the daemon's feed socket (default: $STREAMD_SOCKET, config, XDG runtime dir)")
        sp.add_argument("--config", help="config file, to find the socket")
        return sp

    run = sub.add_parser("run", help="run the daemon in the foreground", description="Run the daemon.")
    run.add_argument("--config", help="TOML config (default: $STREAMD_CONFIG, $CONFIGURATION_DIRECTORY, XDG)")
    run.add_argument("--socket", help="feed socket path")
    run.add_argument("--state-dir", help="where the journal lives")
    run.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    run.set_defaults(func=cmd_run, sync=True)

    demo = sub.add_parser("demo", help="emulated providers, a job generator, the daemon and the dashboard")
    demo.add_argument("--headless", action="store_true", help="print event lines instead of the dashboard")
    demo.add_argument("--duration", type=float, default=None, help="stop after SECONDS")
    demo.add_argument("--socket", help="feed socket path (default: a temporary one)")
    demo.add_argument("--seed", type=int, default=None, help="random seed for repeatable runs")
    demo.add_argument("--speed", type=float, default=2.0, help="emulated time speed-up (default 2)")
    demo.add_argument("--rate", type=float, default=40.0, help="jobs per minute (default 40)")
    demo.add_argument("--providers", help="comma-separated subset of oxen,wiro,runware,apiframe")
    demo.set_defaults(func=cmd_demo, sync=True)

    tui = client("tui", "the live dashboard, attached to a running daemon")
    tui.set_defaults(func=cmd_tui, sync=True)

    tail = client("tail", "follow events")
    tail.add_argument("--since", help="a seq, 'now' (default) or 'oldest'")
    tail.add_argument("--filter", default="", help="e.g. 'provider:oxen -status:failed model:seedream*'")
    tail.add_argument("--json", action="store_true", help="one CloudEvent per line")
    tail.add_argument("--count", type=int, default=0, help="exit after N events")
    tail.add_argument("--no-follow", action="store_true", help="exit once caught up")
    tail.add_argument("--redis", metavar="URL", help="read the shared Redis Stream mirror instead of the local feed")
    tail.add_argument("--stream", help="with --redis: the stream key (default streamd:events)")
    tail.add_argument("--group", help="with --redis: read as this consumer group (XREADGROUP/XACK)")
    tail.add_argument("--consumer", help="with --redis --group: this consumer's name (default host-pid)")
    tail.set_defaults(func=cmd_tail)

    jobs = client("jobs", "list jobs")
    jobs.add_argument("--json", action="store_true")
    jobs.add_argument("--filter", default="")
    jobs.add_argument("--active", action="store_true", help="unfinished jobs only")
    jobs.add_argument("--limit", type=int, default=1000)
    jobs.set_defaults(func=cmd_jobs)

    status = client("status", "daemon and provider status")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)

    submit = client("submit", "submit a job")
    submit.add_argument("provider")
    submit.add_argument("--model", required=True)
    submit.add_argument("--prompt", required=True)
    submit.add_argument("--image", action="append", help="reference image URL or local file (repeatable)")
    submit.add_argument("--size", help="WIDTHxHEIGHT")
    submit.add_argument("--num", type=int, help="number of images")
    submit.add_argument("--sync", action="store_true", help="use the provider's synchronous endpoint")
    submit.add_argument("--option", action="append", metavar="KEY=VALUE", help="provider option (repeatable)")
    submit.add_argument("--wait", action="store_true", help="wait for the job(s) to end; exit 0 if completed")
    submit.add_argument("--json", action="store_true")
    submit.set_defaults(func=cmd_submit)

    outputs = client("outputs", "copy a job's archived outputs")
    outputs.add_argument("job", metavar="ID")
    outputs.add_argument("--to", default=".", help="destination folder (default: here)")
    outputs.add_argument("--provider", help="when the id exists at several providers")
    outputs.set_defaults(func=cmd_outputs)

    track = client("track", "follow a job submitted elsewhere")
    track.add_argument("provider")
    track.add_argument("ref", metavar="ID-or-TOKEN")
    track.set_defaults(func=cmd_track)

    cancel = client("cancel", "cancel a job")
    cancel.add_argument("provider")
    cancel.add_argument("job", metavar="ID")
    cancel.set_defaults(func=cmd_cancel)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "sync", False):
            code: int = args.func(args)
            return code
        result: int = anyio.run(args.func, args)
        return result
    except (UserError, ConfigError, FilterError, MirrorError) as exc:
        return _fail(str(exc))
    except FeedError as exc:
        return _fail(exc.message)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except BaseExceptionGroup as group:
        leaf = first_leaf(group)
        if isinstance(leaf, UserError | ConfigError | FilterError | MirrorError):
            return _fail(str(leaf))
        if isinstance(leaf, FeedError):
            return _fail(leaf.message)
        if isinstance(leaf, KeyboardInterrupt | BrokenPipeError):
            return 130 if isinstance(leaf, KeyboardInterrupt) else 0
        raise


def _fail(message: str) -> int:
    print(f"streamd: error: {message}", file=sys.stderr)
    return EXIT_USER


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
