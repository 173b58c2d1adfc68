"""``edgebento rollout NAME VERSION ...``, ``rollout status ID``, ``rollout resume ID``,
``rollout list``: argument parsing and display over ``cloud_sync.rollout_plan``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from edgebento.cli.registry import add_store_args
from modelpack.errors import ConfigError

USAGE = """\
edgebento rollout NAME VERSION --store URL --broker URL --key signing.key (--devices a,b | --group G)
edgebento rollout status ID --store URL [--key signing.key [--state-dir DIR]] [--json]
edgebento rollout resume ID --store URL --broker URL --key signing.key [--wait] [--timeout S]
    [--allow-unverified] [--state-dir DIR]
edgebento rollout list --store URL [--json]"""
_SHOWN_DEVICES = 200
_FLAGS = {  # Thresholds' fields whose flag is not the field's own name
    "canary_pct": "--canary",
    "bake_s": "--bake",
    "wave_timeout_s": "--wave-timeout",
    "rollback_wait_s": "--rollback-wait",
    "drift_gate_psi": "--drift-gate",
}


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
    p.add_argument(
        "--key",
        type=Path,
        help="signing key: signs the rollbacks of an abort and the rollout's documents in the "
        "store; a resume (and status with --key) acts only on documents it signed",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where this controller records each rollout's last save, to refuse an older state "
        "put back in the bucket (default $EDGEBENTO_STATE_DIR, else $XDG_STATE_HOME/edgebento, "
        "else ~/.local/state/edgebento)",
    )
    p.add_argument("--devices", help="comma-separated device ids")
    p.add_argument(
        "--group", help="the devices of this group in the store (edgebento fleet group add)"
    )
    p.add_argument("--canary", type=float, default=10.0, help="percent in the canary (10)")
    p.add_argument("--waves", type=int, default=2, help="waves after the canary (2)")
    p.add_argument(
        "--abort-failure-rate",
        type=float,
        default=5.0,
        help="abort when more than this percent of updated devices fail their update; a device "
        "whose own inference error rate is over it counts as bad (5)",
    )
    p.add_argument(
        "--abort-p99-ratio",
        type=float,
        default=1.5,
        help="a device whose p99 on the new version exceeds this times its old one is bad (1.5)",
    )
    p.add_argument(
        "--min-inferences",
        type=int,
        default=50,
        help="inferences a device reports on the new version before its figures count (50)",
    )
    p.add_argument(
        "--min-devices",
        type=int,
        default=1,
        help="reporting devices needed before a verdict on telemetry (1; capped at the devices "
        "updated so far)",
    )
    p.add_argument(
        "--abort-device-share",
        type=float,
        default=25.0,
        metavar="PCT",
        help="abort when more than this percent of the reporting devices are bad (25)",
    )
    p.add_argument(
        "--max-device-rate",
        type=float,
        default=10_000.0,
        metavar="N",
        help="inferences a second one device can serve; a device reporting more is a suspect "
        "whose figures do not count (10000)",
    )
    p.add_argument(
        "--allow-unverified",
        action="store_true",
        help="go on past a wave whose health could not be judged in its wave timeout + bake "
        "(too few inferences); without it the rollout stops there as unverified, exit code 3",
    )
    p.add_argument(
        "--bake",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to watch each wave's telemetry (p99, errors) before the next wave (60)",
    )
    p.add_argument(
        "--wave-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds for every device of a wave to report before it is judged (300)",
    )
    p.add_argument(
        "--rollback-wait",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for devices to confirm a rollback (60)",
    )
    p.add_argument(
        "--shadow",
        action="store_true",
        help="before switching each wave, run the new version beside the current one on live "
        "inputs (docs/monitoring.md); switch only if agreement, latency and errors pass",
    )
    p.add_argument("--shadow-for", default="10m", metavar="T", help="each wave's shadow (10m)")
    p.add_argument(
        "--agreement",
        type=float,
        default=0.99,
        help="share of rows a device's shadow must agree on, by the pack's own metric"
        " (top-1, cosine, within max-abs; docs/monitoring.md) (0.99)",
    )
    p.add_argument(
        "--shadow-rate", type=float, default=5.0, help="shadow runs a second per device (5)"
    )
    p.add_argument(
        "--shadow-min-devices",
        type=int,
        default=2,
        help="judged devices a shadow verdict needs with any one left out (2: 3 judged)",
    )
    p.add_argument(
        "--drift-gate",
        type=float,
        nargs="?",
        const=0.2,
        metavar="PSI",
        help="after each wave's bake, abort if the class outputs of the devices on the new "
        "version moved from the others' by this PSI (0.2), from the stored drift summaries",
    )
    p.add_argument(
        "--wait", action="store_true", help="exit 0 only when every target runs the version"
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="seconds for this run; a wave that cannot be judged in what is left is not pushed",
    )
    p.add_argument("--lease-ttl", type=float, default=30.0, help="seconds of the fleet lease (30)")
    p.add_argument("--json", action="store_true", help="print the rollout state as JSON")
    p.add_argument(
        "--metrics-port", type=int, help="serve edgebento_rollout_* on 127.0.0.1:PORT/metrics"
    )
    p.add_argument(
        "--metrics-linger",
        type=float,
        default=0.0,
        metavar="S",
        help="after the end, keep serving the final phase (aborted, completed) until Prometheus "
        "has scraped it, at most S seconds, so that the RolloutAborted alert can fire (0)",
    )
    p.set_defaults(func=cmd_rollout)


def cmd_rollout(args: argparse.Namespace) -> int:
    from cloud_sync.broker_url import check_listen_port

    check_listen_port(getattr(args, "metrics_port", None), "--metrics-port")
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


def _request(args: argparse.Namespace, resume: str | None) -> Any:
    from cloud_sync.rollout_plan import RolloutRequest
    from cloud_sync.rollout_state import Thresholds

    if not args.broker:
        raise ConfigError("--broker is needed to run a rollout")
    if args.key is None:
        raise ConfigError("--key is needed: an abort signs each device's rollback with it")
    devices = tuple(d.strip() for d in (args.devices or "").split(",") if d.strip())
    try:
        thresholds = Thresholds(
            canary_pct=args.canary,
            waves=args.waves,
            abort_failure_rate=args.abort_failure_rate,
            abort_p99_ratio=args.abort_p99_ratio,
            min_inferences=args.min_inferences,
            min_devices=args.min_devices,
            abort_device_share=args.abort_device_share,
            max_device_rate=args.max_device_rate,
            allow_unverified=args.allow_unverified,
            bake_s=args.bake,
            wave_timeout_s=args.wave_timeout,
            rollback_wait_s=args.rollback_wait,
            shadow=_shadow(args),
            drift_gate_psi=getattr(args, "drift_gate", None),
        )
    except ValidationError as exc:  # one line naming the flag, before anything connects
        problem = exc.errors()[0]
        field = str(problem["loc"][0]) if problem["loc"] else ""
        flag = _FLAGS.get(field, "--" + field.replace("_", "-"))
        raise ConfigError(f"{flag}: {problem['msg']}") from exc
    return RolloutRequest(
        store=args.store,
        endpoint_url=args.endpoint_url,
        broker=args.broker,
        key=args.key,
        name=None if resume else args.target[0],
        version=None if resume else int(args.target[1]),
        resume=resume,
        devices=devices,
        group=args.group,
        prefix=args.prefix,
        thresholds=thresholds,
        timeout_s=args.timeout,
        wait_all=args.wait,
        allow_unverified=args.allow_unverified,
        lease_ttl_s=args.lease_ttl,
        state_dir=args.state_dir,
    )


def _shadow(args: argparse.Namespace) -> Any:
    from cloud_sync.shadow_figures import ShadowSettings, parse_duration

    if not getattr(args, "shadow", False):
        return None
    try:
        return ShadowSettings(
            for_s=parse_duration(args.shadow_for),
            agreement=args.agreement,
            rate=args.shadow_rate,
            min_devices=args.shadow_min_devices,
        )
    except ValidationError as exc:
        problem = exc.errors()[0]
        flags = {"agreement": "--agreement", "rate": "--shadow-rate"}
        flag = {**flags, "min_devices": "--shadow-min-devices"}.get(str(problem["loc"][0]))
        raise ConfigError(f"{flag or '--shadow'}: {problem['msg']}") from exc


def _run(args: argparse.Namespace, resume: str | None) -> int:
    from cloud_sync.rollout_plan import execute, exit_code

    request = _request(args, resume)
    metrics = None
    if args.metrics_port:
        from cloud_sync.rollout_metrics import RolloutMetrics

        metrics = RolloutMetrics()
        metrics.serve(args.metrics_port)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # off a terminal, stderr carries only log records
    ) as bar:
        task = bar.add_task("planning", total=None)

        def started(s: Any) -> None:
            logging.getLogger("edgebento.rollout").info(
                f"rollout {s.id}: {s.name} v{s.version} to {len(s.devices)} devices"
            )
            bar.update(task, total=len(s.devices))

        def progress(s: Any) -> None:
            if metrics is not None:
                metrics.update(s)
            bar.update(
                task,
                completed=s.count("done"),
                description=f"{s.phase}, wave {min(s.current_wave + 1, s.wave_count)}"
                f"/{s.wave_count}",
            )

        def say(line: str) -> None:
            # A line per step of a wave as it happens: above the bar on a terminal, else a log
            # record on stderr (JSON where logs are), so stdout keeps the result alone.
            if console.is_terminal:
                bar.console.print(line, markup=False, highlight=False)
            else:
                logging.getLogger("edgebento.rollout").info("%s", line)

        state = execute(request, on_start=started, on_progress=progress, say=say)
    _show(state, args.json)
    if metrics is not None:
        metrics.update(state)
        metrics.linger(getattr(args, "metrics_linger", 0.0))
    return exit_code(state, args.wait)


def _status(args: argparse.Namespace, rollout_id: str) -> int:
    from cloud_sync.rollout_record import SaveRecord
    from cloud_sync.rollout_store import load_state
    from cloud_sync.sealed import public_of
    from modelpack.signing import load_private_key

    # With --key, only what that key signed is shown (what a resume would act on), and not an
    # older state than this machine recorded.
    trusted = public_of(load_private_key(args.key)) if args.key else None
    record = SaveRecord.in_dir(args.state_dir) if trusted else None
    _show(load_state(_store(args), rollout_id, trusted, record), args.json)
    return 0


def _list(args: argparse.Namespace) -> int:
    from cloud_sync.rollout_store import list_states
    from edgebento.cli.tables import Column, print_table

    headers = list_states(_store(args))
    if args.json:
        doc = [h.model_dump(mode="json", exclude={"saves"}) for h in headers]
        print(json.dumps({"rollouts": doc}, indent=2))
        return 0
    columns = [Column("id", ident=True), Column("pack"), Column("phase"), Column("devices")]
    rows = [
        [h.id, f"{h.name} v{h.version}", h.phase, _counts(h.counts), h.reason or ""]
        for h in headers
    ]
    print_table("rollouts", [*columns, Column("reason")], rows)
    return 0


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()) if n)


def _show(state: Any, as_json: bool) -> None:
    from edgebento.cli.tables import Column, print_table

    if as_json:
        print(json.dumps(state.model_dump(mode="json"), indent=2))
        return
    columns = [Column("device", ident=True), Column("wave"), Column("previous"), Column("state")]
    # A fleet of thousands is summed up by its counts; the table shows the first rows.
    rows = [
        [
            d.device,
            "canary" if d.wave == 0 else str(d.wave),
            f"v{d.previous.version}" if d.previous else "-",
            d.state,
            d.detail or "",
        ]
        for d in state.devices[:_SHOWN_DEVICES]
    ]
    title = f"rollout {state.id} ({state.name} v{state.version}, {state.phase})"
    print_table(title, [*columns, Column("detail")], rows)
    more = len(state.devices) - len(rows)
    tail = f" ({more} not shown: --json lists every device)" if more > 0 else ""
    print(f"{len(state.devices)} devices: {_counts(state.counts)}{tail}")
    for check in state.checks:
        verdict = "verified" if check.verified else "NOT VERIFIED"
        print(f"wave {check.wave}: {verdict}: {check.detail}")
    from cloud_sync.rollout_shadow import shadow_lines

    for line in shadow_lines(state.devices):
        print(line)
    for device, why in state.suspects.items():
        print(f"suspect {device}: {why}")
    if state.reason:
        print(f"{state.phase}: {state.reason}")
