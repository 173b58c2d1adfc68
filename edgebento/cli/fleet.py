"""``edgebento fleet status``: one row per device; ``edgebento fleet group add|remove|list``:
the groups a ``--group`` rollout targets, kept in the store (``cloud_sync.groups``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from edgebento.cli.registry import add_store_args
from modelpack.errors import ConfigError, clip


def register(sub: Any) -> None:
    fleet = sub.add_parser("fleet", help="what every device runs and how it is doing")
    verbs = fleet.add_subparsers(dest="verb", metavar="VERB", required=True)
    status = verbs.add_parser("status", help="one row per device from status and telemetry")
    status.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:port")
    status.add_argument("--prefix", default="edgebento", help="topic prefix (default edgebento)")
    status.add_argument(
        "--listen", type=float, default=2.0, help="seconds to listen for telemetry (2)"
    )
    status.add_argument("--store", help="also read each device's latest telemetry object here")
    status.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")
    status.add_argument(
        "--ca",
        type=Path,
        help="the fleet CA directory (its issuing certificate is enough): show each device's "
        "identity record from --store, checked; without it none is read",
    )
    status.add_argument("--json", action="store_true", help='print {"devices": {"ID": {...}}}')
    status.set_defaults(func=cmd_status)

    group = verbs.add_parser(
        "group", help="the devices of a group (what rollout --group targets), kept in the store"
    )
    group.add_argument("action", choices=("add", "remove", "list"))
    group.add_argument("group", nargs="?", help="the group (list: all groups when left out)")
    group.add_argument("devices", nargs="*", metavar="DEVICE", help="device ids (add, remove)")
    add_store_args(group)
    group.add_argument(
        "--key",
        help="signing key (add, remove): a rollout's --group takes only a group its key signed",
        type=Path,
    )
    group.add_argument("--json", action="store_true", help='print {"groups": {"G": [...]}}')
    group.set_defaults(func=cmd_group)

    from edgebento.cli.fleet_identity import register_verbs
    from edgebento.cli.fleet_repair import register_repairs
    from edgebento.cli.fleet_revoke import register_revoke

    register_verbs(verbs)  # ca, claim, enroll-service, broker-config, identity
    register_repairs(verbs)  # identity-repair, rebuild-spent-claims
    register_revoke(verbs)


def _ago(ts: float | None, heard: str | None = None) -> str:
    if heard == "connected":
        return "connected"  # its status dates from the connect; the broker holds its session
    if not ts:
        return "-"
    seconds = max(0.0, time.time() - ts)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def cmd_status(args: argparse.Namespace) -> int:
    from cloud_sync.broker_url import check_broker_port
    from cloud_sync.fleet import fleet_report
    from cloud_sync.protocol import Topics
    from cloud_sync.store import open_store

    check_broker_port(args.broker, "--broker")
    if args.ca is not None and args.store is None:
        raise ConfigError("--ca checks the identity records of --store: pass --store too")
    store = open_store(args.store, endpoint_url=args.endpoint_url) if args.store else None
    report = fleet_report(args.broker, Topics(args.prefix), listen_s=args.listen, store=store)
    devices = report.devices
    identity, refused = _identity(store, args.ca, devices)
    if args.json:
        doc: dict[str, Any] = {"devices": {d: s.as_json() for d, s in devices.items()}}
        # The store's record (expiry, last rotation, revoked, and where the device's own word
        # disagrees) beside identity_reported, what the device says.
        for device, row in identity.items():
            doc["devices"].setdefault(device, {})["identity"] = row
        if store is not None:
            doc |= {"identity_checked": args.ca is not None, "identity_refused": refused}
            doc["telemetry_objects_skipped"] = report.skipped_objects
        print(json.dumps(doc, indent=2, default=str))
        return 0
    from cloud_sync.redact import redact_url
    from edgebento.cli.tables import Cell, Column, print_table

    shown = redact_url(args.broker)
    if not devices:
        print(f"no device has reported on {shown}")
    else:
        columns = [
            Column("device", ident=True),
            Column("state"),
            Column("model"),
            Column("last seen"),
            Column("inf/s", right=True),
            Column("p99 ms", right=True),
            Column("errors", right=True),
            Column("pending"),
            Column("certificate"),
        ]
        rows: list[list[str | Cell]] = [
            [
                device,
                _state(s.state, s.extra.get("taken_over")),
                f"{s.model} v{s.version}" if s.model else "-",
                _ago(s.last_seen, s.extra.get("heard")),
                _num(s.inference_rate, ".1f"),
                _num(s.p99_ms, ".1f"),
                f"{s.errors:.0f}",
                f"-> v{s.desired_version}" if s.pending_update else "",
                _certificate(identity.get(device), s.extra.get("identity_reported")),
            ]
            for device, s in devices.items()
        ]
        print_table(f"fleet on {shown} ({len(devices)} devices)", columns, rows)
    _say_unshown(store is not None and args.ca is None, refused, identity, devices)
    if report.skipped_objects:
        print(
            f"{report.skipped_objects} telemetry object(s) in the store skipped as unreadable "
            "(see the log): the figures above leave them out"
        )
    return 0


def _say_unshown(
    unchecked: bool, refused: dict[str, str], identity: dict[str, Any], devices: dict[str, Any]
) -> None:
    """What the table leaves out of the store's identity records: all of them without --ca,
    and refused records that no reporting device's row shows."""
    if unchecked:
        print("(identity records not read: --ca DIR checks each against the fleet CA)")
    unshown = {d: r["refused"] for d, r in identity.items() if r.get("refused")} | refused
    lines = sorted((n, r) for n, r in unshown.items() if n not in devices)
    for name, reason in lines[:_REFUSED_SHOWN]:
        print(f"identity record refused ({_printable(reason)}): {_printable(name)}")
    if len(lines) > _REFUSED_SHOWN:  # thousands of objects planted under devices/
        print(f"... and {len(lines) - _REFUSED_SHOWN} more refused (--json: identity_refused)")


def _printable(text: str) -> str:
    """A name read from the store, or a string a device sent, as one printable line (a key or
    a status may hold control characters)."""
    return clip(text if text.isprintable() else ascii(text)[1:-1], 200)


def _short(serial: Any) -> str:
    """A serial's first 8 characters, printable: a device's status says what it likes."""
    return _printable(str(serial)[:8])


_REFUSED_SHOWN = 20  # refused records of devices that sent no status, printed one by one


def _state(state: str, taken_over: Any) -> Any:
    """The state, and how often another client with the device's client id took its session
    this boot (a cloned image or config), as the device says: a figure to look into, never
    one the fleet decides anything by."""
    from edgebento.cli.tables import Cell

    if isinstance(taken_over, int) and taken_over > 0:
        return Cell(f"{state}, taken over {taken_over}x", "yellow")
    return Cell(state, "green" if state == "online" else "red")


def _identity(
    store: Any, ca_dir: Path | None, devices: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Each device's certificate from the store's identity records (docs/fleet-identity.md),
    read only with the fleet CA and only if it signed them there, with ``mismatch``: where the
    device's word disagrees. A refused record is a row of its reason alone, never of what it
    says. Also the objects under the records' prefix that are no device's (key: reason)."""
    if store is None or ca_dir is None:
        return {}, {}
    from cloud_sync.identity_environment import checking_ca
    from cloud_sync.identity_store import IdentityStore
    from cloud_sync.identity_view import identity_rows, reported_mismatch
    from cloud_sync.rollout_state import DEVICE_ID

    ids = IdentityStore(store, checking_ca(ca_dir))
    records = ids.devices()
    # A refused record shows in its device's row only if the device reports: the others are
    # identity_refused, never rows of devices that may not exist (objects planted by the
    # thousand under devices/).
    named = {n: r for n, r in ids.refused_records.items() if DEVICE_ID.fullmatch(n)}
    named = {n: r for n, r in named.items() if n in devices}
    others = {n: r for n, r in ids.refused_records.items() if n not in named}
    rows = identity_rows(records, time.time(), named)
    for device, summary in devices.items():
        reported = summary.extra.get("identity_reported")
        if rows.get(device, {}).get("refused"):
            continue  # what a refused record says is not compared: it says nothing
        if reported is not None:
            row = rows.get(device)
            mismatch = reported_mismatch(row, reported)
            rows.setdefault(device, {"state": "no record"})["mismatch"] = mismatch
        elif device in rows:
            rows[device]["mismatch"] = []
    return rows, others


def _certificate(row: dict[str, Any] | None, reported: dict[str, Any] | None) -> Any:
    """The store's record when there is one (what the device says only where it disagrees),
    else the device's own word, marked as such."""
    from edgebento.cli.tables import Cell

    if row is None:
        if not reported or reported.get("not_after") is None:
            return "-"
        left = float(reported["not_after"]) - time.time()
        said = f"{_short(reported.get('serial', '?'))} {_ago_span(max(0.0, left))} left"
        return Cell(f"{said} (device says)", "dim")
    mismatch = row.get("mismatch") or []
    if row.get("refused"):  # the CA did not sign it as it is here: nothing of it is shown
        said = (
            f"; device says {_short(reported['serial'])}"
            if reported and reported.get("serial")
            else ""
        )
        return Cell(f"record refused ({_printable(row['refused'])}){said}", "red")
    if row["state"] == "no record":  # a device with a certificate the store never issued
        said = _short((reported or {}).get("serial", "?"))
        return Cell(f"no record in the store; device says {said}", "red")
    if row["state"] != "valid":
        text = row["state"]
    else:
        rotated = f", rotated {_ago(row['last_rotation'])}" if row["last_rotation"] else ""
        text = f"{_short(row['serial'])} {_ago_span(row['expires_in_s'] or 0.0)} left{rotated}"
    if mismatch:
        shown = ", ".join(_printable(str(m)) for m in mismatch)
        return Cell(f"{text}; device says otherwise: {shown}", "red")
    return text if row["state"] == "valid" else Cell(text, "red")


def _ago_span(seconds: float) -> str:
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h" if seconds < 3 * 86400 else f"{seconds / 86400:.0f}d"


def cmd_group(args: argparse.Namespace) -> int:
    from cloud_sync.groups import change_group, group_members, list_groups
    from cloud_sync.store import open_store

    store = open_store(args.store, endpoint_url=args.endpoint_url)
    if args.action == "list":
        if args.devices:
            raise ConfigError("fleet group list takes at most a group")
        groups = (
            {args.group: group_members(store, args.group)} if args.group else list_groups(store)
        )
    else:
        if not args.group or not args.devices:
            raise ConfigError(f"fleet group {args.action} GROUP DEVICE... (at least one device)")
        from modelpack.signing import load_private_key

        # Without --key the group is kept unsigned: good for monitor cohorts, refused by a
        # rollout --group, which acts only on what its own key signed.
        signer = load_private_key(args.key) if args.key else None
        change = {"add": args.devices} if args.action == "add" else {"remove": args.devices}
        groups = {args.group: change_group(store, args.group, **change, signer=signer)}
    if args.json:
        print(json.dumps({"groups": groups}, indent=2))
        return 0
    for name, members in groups.items():
        print(f"{name}: {' '.join(members) if members else '(no devices)'}")
    return 0
