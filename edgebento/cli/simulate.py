"""``edgebento simulate --devices N``: a fleet of simulated devices on the real broker."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run N simulated devices, each on its own MQTT connection (for rollout drills)",
    )
    p.add_argument("--devices", type=int, required=True, metavar="N", help="how many devices")
    p.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:port")
    p.add_argument("--prefix", default="edgebento", help="topic prefix (default edgebento)")
    p.add_argument("--id", default="sim-{:05d}", help="device id format (sim-{:05d})")
    p.add_argument("--first", type=int, default=0, help="number of the first device (0)")
    p.add_argument("--model", default="tiny", help="model name the devices run (tiny)")
    p.add_argument("--model-version", type=int, default=1, help="version they run (1)")
    p.add_argument(
        "--trust", type=Path, action="append", default=[], help="key a rollback must be signed by"
    )
    p.add_argument(
        "--fail-version",
        type=int,
        action="append",
        default=[],
        help="a version whose health check fails (repeatable)",
    )
    p.add_argument("--install-s", type=float, default=0.2, help="seconds an install takes")
    p.add_argument("--telemetry-s", type=float, default=10.0, help="seconds between windows")
    p.add_argument("--p99-ms", type=float, default=5.0, help="p99 every version reports")
    p.add_argument(
        "--error-rate",
        action="append",
        default=[],
        metavar="VERSION=RATE",
        help="share of inferences that fail on a version, 0..1 (repeatable; default none)",
    )
    p.add_argument(
        "--lie",
        default="",
        metavar="KEY=VALUE,...",
        help="report these figures in every window whatever happens, as a compromised device "
        "would: ok, errors, p99_ms, and version (the model version it names)",
    )
    p.add_argument(
        "--agreement",
        action="append",
        default=[],
        metavar="VERSION=SHARE",
        help="a shadow of this version agrees with the live one on this share of answers, "
        "0..1 (repeatable; default 1)",
    )
    p.add_argument("--group", action="append", default=[], help="group the devices list")
    p.add_argument("--duration", type=float, help="seconds to run (default: until stopped)")
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    from cloud_sync.broker_url import check_broker_port
    from cloud_sync.protocol import ModelRef, Topics
    from cloud_sync.redact import redact_url
    from cloud_sync.sim_fleet import SimFleet
    from cloud_sync.simulator import LIES, Behavior
    from modelpack.errors import ConfigError
    from modelpack.signing import load_public_key

    check_broker_port(args.broker, "--broker")
    if args.devices < 1:
        raise ConfigError("--devices must be at least 1")
    try:
        devices = [args.id.format(args.first + i) for i in range(args.devices)]
    except (IndexError, KeyError, ValueError) as exc:
        raise ConfigError(f"--id {args.id!r} is not a format for one number") from exc
    behavior = Behavior(
        install_s=args.install_s,
        fail_versions=frozenset(args.fail_version),
        base_p99_ms=args.p99_ms,
        error_rate={int(v): r for v, r in _pairs(args.error_rate, "--error-rate").items()},
        telemetry_s=args.telemetry_s,
        groups=tuple(args.group),
        lie=_pairs([p for p in args.lie.split(",") if p], "--lie", LIES),
        agreement={int(v): r for v, r in _pairs(args.agreement, "--agreement").items()},
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_a: stop.set())
    end = time.monotonic() + args.duration if args.duration else float("inf")
    with SimFleet(
        args.broker,
        devices,
        ModelRef(name=args.model, version=args.model_version),
        topics=Topics(args.prefix),
        behavior=behavior,
        trusted=[load_public_key(k) for k in args.trust],
    ) as fleet:
        print(f"ready: {len(fleet.connected)} devices on {redact_url(args.broker)}", flush=True)
        fleet.run(until=lambda: stop.is_set() or time.monotonic() >= end)
        versions: dict[int, int] = {}
        for sim in fleet.sims.values():
            versions[sim.model.version] = versions.get(sim.model.version, 0) + 1
    shown = ", ".join(f"{n} on v{v}" for v, n in sorted(versions.items()))
    print(f"stopped: {shown}", file=sys.stderr)
    return 0


def _pairs(items: list[str], flag: str, keys: tuple[str, ...] | None = None) -> dict[str, float]:
    """``KEY=NUMBER`` items as a dict; one error line naming the flag otherwise."""
    from modelpack.errors import ConfigError

    out: dict[str, float] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if keys is None:
            ok = key.strip().isdigit() and 0 <= number <= 1
        else:
            ok = key.strip() in keys and 0 <= number <= 1e18
        if not ok:
            want = "VERSION=RATE with RATE in 0..1" if keys is None else f"KEY=N, KEY in {keys}"
            raise ConfigError(f"{flag} {item!r}: expected {want}")
        out[key.strip()] = number
    return out
