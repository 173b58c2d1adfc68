"""``edgebento fleet revoke DEVICE | --cert FILE | --serial HEX``: a device, a certificate that
is no device's, or one known by its serial alone, into the CRL the broker reads, the broker
reloaded and a live session taken over (cloud_sync.revocation)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from edgebento.cli.fleet_identity import _FIRST, _broker_pid, _ids
from edgebento.cli.registry import add_store_args
from modelpack.errors import ConfigError


def register_revoke(verbs: Any) -> None:
    revoke = verbs.add_parser("revoke", help="revoke a device and drop its live session")
    revoke.add_argument("device", nargs="?", help="the device (or --cert)")
    revoke.add_argument(
        "--cert", type=Path, help="or a certificate that is no device's (the claim certificate)"
    )
    revoke.add_argument("--serial", help="or a certificate by its serial (hex), file or not")
    revoke.add_argument("--ca", type=Path, required=True, help="the CA directory")
    revoke.add_argument("--crl-file", type=Path, required=True, help="the CRL the broker reads")
    revoke.add_argument("--first-crl", action="store_true", help=_FIRST)
    revoke.add_argument("--broker-pid", type=int, help="SIGHUP this broker")
    revoke.add_argument("--broker-pid-file", type=Path, help="or the broker of this pid_file")
    revoke.add_argument("--broker", help="mqtts://HOST:PORT: drop the device's live session")
    revoke.add_argument("--prefix", default="edgebento")
    add_store_args(revoke)
    revoke.set_defaults(func=cmd_revoke)


def cmd_revoke(args: argparse.Namespace) -> int:
    from cloud_sync.fleet_ca import FleetCA
    from cloud_sync.mqtt import parse_broker_url
    from cloud_sync.revocation import revoke_certificate, revoke_device, revoke_serial

    if [args.device, args.cert, args.serial].count(None) != 2:
        raise ConfigError("fleet revoke DEVICE, --cert FILE or --serial HEX: one of them")
    broker = None
    if args.broker:
        address = parse_broker_url(args.broker)
        broker = (address.host, address.port)
    started = time.monotonic()
    ca, pid = FleetCA.load(args.ca), _broker_pid(args)
    ids = _ids(args, ca, args.crl_file)  # its claims listed revoked beside the CRL
    if args.first_crl:
        from cloud_sync.crl_publish import publish_crl

        publish_crl(ca, ids, args.crl_file, None, first=True)
    kicked, done = False, dict[str, Any]()
    if args.serial is not None:
        serial = _hex_serial(args.serial)
        revoke_serial(ids, ca, serial, args.crl_file, pid, broker)
        done = {"serial": format(serial, "x")}  # no CN known: no session to take over
    elif args.cert is not None:
        try:
            pem = args.cert.read_bytes()
        except OSError as exc:
            raise ConfigError(f"--cert {args.cert}: {exc.strerror}") from exc
        name, kicked = revoke_certificate(ids, ca, pem, args.crl_file, pid, broker)
        done = {"certificate": str(args.cert), "cn": name}
    else:
        _, kicked = revoke_device(
            ids, ca, args.device, args.crl_file, pid, broker, prefix=args.prefix
        )
        done = {"device": args.device}
    took = round(time.monotonic() - started, 3)
    print(json.dumps({**done, "revoked": True, "session_dropped": kicked, "seconds": took}))
    return 0


def _hex_serial(text: str) -> int:
    try:
        serial = int(text.strip().removeprefix("0x").replace(":", ""), 16)
    except ValueError as exc:
        raise ConfigError(f"--serial {text!r} is not a hex serial") from exc
    if not 0 < serial < 1 << 160:  # RFC 5280: positive, at most 20 octets
        raise ConfigError(f"--serial {text!r} is not a certificate serial (1 to 20 octets)")
    return serial
