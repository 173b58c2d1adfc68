"""``edgebento rollout NAME VERSION ...``, ``rollout status ID``, ``rollout resume ID``,
``rollout list``."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from edgebento.cli.registry import add_store_args
from modelpack.errors import ConfigError

USAGE = """\
edgebento rollout NAME VERSION --store URL --broker URL (--devices a,b | --group G) [options]
edgebento rollout status ID --store URL [--json]
edgebento rollout resume ID --store URL --broker URL [--wait] [--timeout S]
edgebento rollout list --store URL"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "rollout",
        help="roll a published pack out to devices in waves, or show a rollout",
        usage=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", nargs="+", help="NAME VERSION | status ID | resume ID | list")
    add_store_args(p)
    p.add_argument("--broker", help="mqtt://[user:pass@]host:port")
    p.add_argument("--prefix", default="edgebento", help="topic prefix (default edgebento)")
    p.add_argument("--devices", help="comma-separated device ids")
    p.add_argument("--group", help="every device whose retained status lists this group")
    p.add_argument("--canary", type=float, default=10.0, help="percent in the canary (10)")
    p.add_argument("--waves", type=int, default=2, help="waves after the canary (2)")
    p.add_argument(
        "--abort-failure-rate",
        type=float,
        default=5.0,
        help="abort when more than this percent of devices or inferences fail (5)",
    )
    p.add_argument(
        "--abort-p99-ratio",
        type=float,
        default=1.5,
        help="abort when p99 on the new version exceeds this times the old one (1.5)",
    )
    p.add_argument(
        "--min-inferences",
        type=int,
        default=50,
        help="inferences on the new version before error rate and p99 count (50)",
    )
    p.add_argument(
        "--bake",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to watch each wave's telemetry (p99, errors) before the next wave (60)",
    )
    p.add_argument(
        "--wait", action="store_true", help="exit 0 only when every target runs the version"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole rollout")
    p.add_argument("--json", action="store_true", help="print the rollout state as JSON")
    p.set_defaults(func=cmd_rollout)


def cmd_rollout(args: argparse.Namespace) -> int:
    verb, rest = args.target[0], args.target[1:]
    if verb == "status" and len(rest) == 1:
        return _status(args, rest[0])
    if verb == "list" and not rest:
        return _list(args)
    if verb == "resume" and len(rest) == 1:
        return _run(args, resume=rest[0])
    if len(args.target) == 2 and args.target[1].isdigit():
        return _run(args, resume=None)
    raise ConfigError(f"expected NAME VERSION, status ID, resume ID or list; got {args.target}")


def _store(args: argparse.Namespace) -> Any:
    from cloud_sync.store import open_store

    return open_store(args.store, endpoint_url=args.endpoint_url)


def _targets(args: argparse.Namespace, watch: Any) -> list[str]:
    if bool(args.devices) == bool(args.group):
        raise ConfigError("give either --devices a,b,c or --group G")
    if args.devices:
        return [d.strip() for d in args.devices.split(",") if d.strip()]
    members = [
        device
        for device, status in watch.statuses.items()
        if args.group in ((status.model_extra or {}).get("groups") or [])
    ]
    if not members:
        raise ConfigError(f"no device reports group {args.group!r} in its retained status")
    return members


def _run(args: argparse.Namespace, resume: str | None) -> int:
    from cloud_sync.protocol import Topics
    from cloud_sync.registry import Registry
    from cloud_sync.rollout import Rollout, start_rollout
    from cloud_sync.rollout_state import Thresholds, load_state
    from cloud_sync.watch import FleetWatch

    if not args.broker:
        raise ConfigError("--broker is needed to run a rollout")
    store = _store(args)
    prior = load_state(store, resume) if resume else None
    prefix = prior.prefix if prior else args.prefix
    with FleetWatch(args.broker, Topics(prefix)) as watch:
        if prior is None:
            version = int(args.target[1])
            Registry(store).entry(args.target[0], version)  # refuse an unpublished version
            thresholds = Thresholds(
                canary_pct=args.canary,
                waves=args.waves,
                abort_failure_rate=args.abort_failure_rate,
                abort_p99_ratio=args.abort_p99_ratio,
                min_inferences=args.min_inferences,
                bake_s=args.bake,
            )
            state = start_rollout(
                store, watch, args.target[0], version, _targets(args, watch), thresholds
            )
        else:
            state = prior
            if state.phase in ("completed", "timed_out"):
                state.phase = "running"  # check again on devices that were offline
        console = Console(stderr=True)
        logging.getLogger("edgebento.rollout").info(
            f"rollout {state.id}: {state.name} v{state.version} to {len(state.devices)} devices"
        )
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,  # off a terminal, stderr carries only log records
        ) as bar:
            task = bar.add_task("devices on the new version", total=len(state.devices))

            def progress(s: Any) -> None:
                bar.update(
                    task,
                    completed=sum(1 for d in s.devices if d.state == "done"),
                    description=f"wave {min(s.current_wave + 1, s.wave_count)}/{s.wave_count}",
                )

            state = Rollout(
                store,
                watch,
                state,
                timeout_s=args.timeout,
                wait_all=args.wait,
                on_progress=progress,
            ).run()
    _show(state, args.json)
    if state.phase == "completed":
        return 0 if not args.wait or all(d.state == "done" for d in state.devices) else 1
    return 1


def _status(args: argparse.Namespace, rollout_id: str) -> int:
    from cloud_sync.rollout_state import load_state

    _show(load_state(_store(args), rollout_id), args.json)
    return 0


def _list(args: argparse.Namespace) -> int:
    from cloud_sync.rollout_state import list_states

    table = Table(title="rollouts")
    for col in ("id", "pack", "phase", "devices", "reason"):
        table.add_column(col)
    for s in list_states(_store(args)):
        counts = ", ".join(f"{n} {k}" for k, n in sorted(s.counts().items()))
        table.add_row(s.id, f"{s.name} v{s.version}", s.phase, counts, escape(s.reason or ""))
    Console().print(table)
    return 0


def _show(state: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(state.model_dump(mode="json"), indent=2))
        return
    table = Table(title=f"rollout {state.id}: {state.name} v{state.version} — {state.phase}")
    for col in ("device", "wave", "previous", "state", "detail"):
        table.add_column(col)
    for d in state.devices:
        wave = "canary" if d.wave == 0 else str(d.wave)
        prev = f"v{d.previous.version}" if d.previous else "-"
        table.add_row(escape(d.device), wave, prev, d.state, escape(d.detail or ""))
    console = Console()
    console.print(table)
    if state.reason:
        console.print(f"{state.phase}: {escape(state.reason)}")
