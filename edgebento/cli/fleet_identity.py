"""``edgebento fleet ca init | claim | enroll-service | broker-config | identity``: per-device
identity (cloud_sync.fleet_ca, identity_store, enroll, broker_config); ``fleet revoke`` is
edgebento.cli.fleet_revoke's, ``identity-repair`` and ``rebuild-spent-claims``
edgebento.cli.fleet_repair's."""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edgebento.cli.registry import add_store_args
from modelpack.errors import ConfigError, StoreError

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``90s``, ``10m``, ``24h``, ``90d``: seconds."""
    found = _DURATION.match(text.strip())
    if not found or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m, 24h or 90d")
    return float(found.group(1)) * _UNITS[found.group(2)]


_FIRST = "no --crl-file yet: write the fleet's first CRL on this host from the store alone"


def register_verbs(verbs: Any) -> None:
    ca = verbs.add_parser("ca", help="the fleet CA: an offline root and an issuing intermediate")
    ca.add_argument("action", choices=("init", "issue"))
    ca.add_argument("--out", type=Path, required=True, help="the CA's directory")
    ca.add_argument(
        "--name",
        action="append",
        default=[],
        help="issue: a cloud identity (sync, controller, claim, ...); repeat for several",
    )
    ca.add_argument("--host", action="append", default=[], help="issue: a broker's IP or name")
    ca.add_argument("--to", type=Path, help="issue: where its key and certificate go")
    ca.add_argument("--validity", type=duration, default=365 * 86400.0, help="issue (365d)")
    ca.set_defaults(func=cmd_ca)

    claim = verbs.add_parser("claim", help="one-time claim tokens (only their hashes are kept)")
    claim.add_argument("--devices", required=True, help="comma-separated device ids")
    claim.add_argument("--ttl", type=duration, default=86400.0, help="validity (24h)")
    claim.add_argument("--batch", action="store_true", help="one token for the whole list")
    claim.add_argument("--ca", type=Path, required=True, help="the CA directory: signs claims")
    add_store_args(claim)
    claim.set_defaults(func=cmd_claim)

    svc = verbs.add_parser("enroll-service", help="answer enrollments and renewals over MQTT")
    svc.add_argument("--broker", required=True, help="mqtts://HOST:PORT (the device listener)")
    svc.add_argument("--ca", type=Path, required=True, help="the CA directory (issuing key)")
    svc.add_argument("--cert", type=Path, required=True, help="the service's certificate")
    svc.add_argument("--key", type=Path, required=True, help="the service's key")
    svc.add_argument("--prefix", default="edgebento")
    svc.add_argument("--validity", type=duration, default=90 * 86400.0, help="device certs (90d)")
    svc.add_argument("--rate", type=float, default=200.0, help="signatures a second at most")
    svc.add_argument(
        "--renewal-budget",
        help="renewals per device per window, e.g. 4/24h (default: $EDGEBENTO_RENEWAL_BUDGET, "
        "else 4/24h): kept in the store, shared by every service",
    )
    svc.add_argument("--crl-file", type=Path, help="the CRL the broker reads (rotations)")
    svc.add_argument("--first-crl", action="store_true", help=_FIRST)
    svc.add_argument("--broker-pid", type=int, help="SIGHUP this broker after a CRL change")
    svc.add_argument(
        "--broker-pid-file", type=Path, help="or the broker whose pid is in this file (pid_file)"
    )
    svc.add_argument(
        "--crl-refresh",
        type=duration,
        default=86400.0,
        help="rewrite the CRL this often (24h): one past its nextUpdate (30 days) locks out all",
    )
    svc.add_argument(
        "--crl-check",
        type=duration,
        default=60.0,
        help="check the CRL on disk this often (60s): a damaged one is put back at once",
    )
    svc.add_argument("--metrics-port", type=int, help="serve the identity metrics on /metrics")
    svc.add_argument("--metrics-refresh", type=float, default=30.0, help="store reads (30 s)")
    add_store_args(svc)
    svc.set_defaults(func=cmd_enroll_service)

    conf = verbs.add_parser("broker-config", help="Mosquitto config and ACL for mTLS")
    conf.add_argument("--out", type=Path, required=True)
    conf.add_argument("--ca", type=Path, required=True, help="the CA directory")
    conf.add_argument("--port", type=int, default=8883)
    conf.add_argument("--claim-port", type=int, default=8884)
    conf.add_argument("--host", action="append", default=[], help="the broker's IP or name")
    conf.add_argument("--bind", help="listen on this address only (default: all)")
    conf.add_argument("--prefix", default="edgebento")
    conf.set_defaults(func=cmd_broker_config)

    aws = verbs.add_parser("aws-policy", help="the ACL as AWS IoT policies + fleet provisioning")
    aws.add_argument("--out", type=Path, required=True, help="the CloudFormation template (JSON)")
    aws.add_argument("--prefix", default="edgebento")
    aws.add_argument("--name", default="edgebento", help="prefix of the policies' names")
    aws.set_defaults(func=cmd_aws_policy)

    ident = verbs.add_parser("identity", help="each device's certificate: expiry, rotation")
    add_store_args(ident)
    ident.add_argument("--json", action="store_true")
    ident.add_argument("--ca", type=Path, help="check each record's signature (the CA directory)")
    ident.set_defaults(func=cmd_identity)


def _ids(args: argparse.Namespace, ca: Any = None, crl_file: Path | None = None) -> Any:
    from cloud_sync.identity_store import IdentityStore
    from cloud_sync.store import open_store

    return IdentityStore(open_store(args.store, endpoint_url=args.endpoint_url), ca, crl_file)


def cmd_ca(args: argparse.Namespace) -> int:
    from cloud_sync.fleet_ca import FleetCA, init_ca

    if args.action == "init":
        paths = init_ca(args.out)
        print(f"fleet CA in {args.out}: bundle {paths.bundle}, CRL {paths.crl}")
        print(f"move {paths.root_key.parent} offline: only the issuing key is needed from now")
        return 0
    if not args.name or not args.to:
        raise ConfigError("fleet ca issue --name NAME --to DIR")
    ca = FleetCA.load(args.out)
    for name in args.name:
        cert, key = ca.issue_identity(name, args.to, args.validity / 86400, args.host)
        print(f"{name}: {cert} (key {key}, 0600)")
    return 0


def cmd_claim(args: argparse.Namespace) -> int:
    from cloud_sync.fleet_ca import FleetCA

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    ids = _ids(args, FleetCA.load(args.ca))
    if args.batch:
        tokens = {",".join(devices): ids.create_batch_claim(devices, args.ttl)}
    else:
        tokens = ids.create_claims(devices, args.ttl)
    # The tokens are shown once, here: the store keeps only their hashes.
    print(json.dumps({"claims": tokens, "expires_in_s": args.ttl}, indent=2))
    return 0


def _broker_pid(args: argparse.Namespace) -> int | Path | None:
    if args.broker_pid is not None and args.broker_pid_file is not None:
        raise ConfigError("--broker-pid or --broker-pid-file, not both")
    return args.broker_pid if args.broker_pid is not None else args.broker_pid_file


def _keeper(args: argparse.Namespace, ca: Any, ids: Any) -> Any:
    """The CRL's writer and checker (cloud_sync.crl_keeper), with ``--crl-file``."""
    if args.crl_file is None:
        return None
    from cloud_sync.crl_keeper import CrlKeeper

    return CrlKeeper(ca, ids, args.crl_file, _broker_pid(args), args.crl_refresh, args.crl_check)


def _warn_reserved(ids: Any) -> None:
    """Devices enrolled under an id reserved since (cloud_sync.reserved_ids): said at start.
    A store that cannot be listed now (its endpoint down) is said and does not stop the
    service, which answers ``internal`` until the store is back."""
    from cloud_sync.reserved_ids import reserved_records

    log = logging.getLogger("edgebento.fleet")
    try:
        taken = reserved_records(ids.store)
    except StoreError as exc:
        log.error(
            "cannot list device records for reserved ids (checked at the next start): %s", exc
        )
        return
    if taken:
        log.warning(
            "device records under reserved ids %s: the cloud's identities may publish on their "
            "enrollment topics (a forged answer, a renewal in their name), so their renewals "
            "are refused; revoke them (fleet revoke) and enroll the devices under other ids",
            ", ".join(taken),
        )


def cmd_enroll_service(args: argparse.Namespace) -> int:
    from cloud_sync.enroll import EnrollmentService, RateLimit
    from cloud_sync.fleet_ca import FleetCA, tls_context
    from cloud_sync.renewal_budget import budget_from_env, check_fits, parse_budget

    budget = parse_budget(args.renewal_budget) if args.renewal_budget else budget_from_env()
    check_fits(budget, args.validity)  # before anything starts: the fleet would expire
    ca = FleetCA.load(args.ca)
    ids = _ids(args, ca, args.crl_file)  # records are checked against the broker's CRL too
    if args.crl_file is None:
        logging.getLogger("edgebento.fleet").warning(
            "enroll-service without --crl-file: records and claims are not checked against "
            "the broker's CRL, so an older signed record put back in the bucket, or a revoked "
            "device's record deleted, lets a spare claim re-enroll it, and rotations do not "
            "revoke the old certificate"
        )
    _warn_reserved(ids)
    keeper = _keeper(args, ca, ids)
    if keeper is not None:  # fatal if it fails: the operator acts (--first-crl on a new host)
        keeper.start(first=args.first_crl)
    service = EnrollmentService(
        ca,
        ids,
        days=args.validity / 86400,
        limit=RateLimit(rate=args.rate, burst=max(1, int(args.rate * 2))),
        on_retired=keeper.publish if keeper is not None else None,
        budget=budget,
    )
    if args.metrics_port is not None:
        from prometheus_client import CollectorRegistry, start_http_server

        from cloud_sync.identity_metrics import IdentityCollector

        registry = CollectorRegistry()
        collector = IdentityCollector(service, args.metrics_refresh, args.crl_file)
        registry.register(collector)  # type: ignore[arg-type]
        start_http_server(args.metrics_port, addr="127.0.0.1", registry=registry)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    service.serve(args.broker, tls_context(ca.paths.bundle, args.cert, args.key), args.prefix)
    try:
        while not done.wait(0.2):
            if service.fatal is not None:  # refused credentials or subscriptions: say so, exit
                service.stop()
                raise service.fatal
            if keeper is not None:  # the CRL refresh and its check on disk: never fatal
                keeper.tick()
    except KeyboardInterrupt:
        pass
    service.stop()
    print(service.stats_json())
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from cloud_sync.broker_config import BrokerTls, mosquitto_conf, tls_listeners
    from cloud_sync.crl_disk import broker_crl
    from cloud_sync.fleet_ca import FleetCA
    from edgebento.localservices import fleet_acl

    # Absolute paths: Mosquitto opens them from wherever it is started.
    args.out = args.out.resolve()
    ca = FleetCA.load(args.ca.resolve())
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    hosts = args.host or ["127.0.0.1", "localhost"]
    cert, key = ca.issue_identity("broker", args.out, 825, hosts)
    crl = args.out / "crl.pem"
    kept = broker_crl(ca, crl)  # a live CRL is kept (its ledger): an empty one would verify
    if kept is not None:
        print(f"kept {crl}: the fleet CA's, CRLNumber {kept.number}, {len(kept.entries)} listed")
    tls = BrokerTls(ca.paths.bundle, cert, key, crl)
    base = fleet_acl(args.prefix)
    listeners = tls_listeners(
        args.port, args.claim_port, args.bind, tls, args.out, base, args.prefix
    )
    text = mosquitto_conf(listeners, args.out / "data")
    (args.out / "mosquitto.conf").write_text(text)
    print(f"wrote {args.out / 'mosquitto.conf'}, {args.out / 'acl'} and {args.out / 'claim.acl'}")
    return 0


def cmd_aws_policy(args: argparse.Namespace) -> int:
    from cloud_sync.aws_policy import cloudformation_template

    doc = cloudformation_template(args.prefix, args.name)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}: deploy with aws cloudformation deploy --capabilities CAPABILITY_IAM")
    return 0


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if abs(seconds) < 3600:
        return f"{seconds:.0f}s"
    return f"{seconds / 3600:.1f}h" if abs(seconds) < 3 * 86400 else f"{seconds / 86400:.0f}d"


def cmd_identity(args: argparse.Namespace) -> int:
    from cloud_sync.fleet_ca import FleetCA
    from cloud_sync.identity_view import identity_rows

    ids = _ids(args, FleetCA.load(args.ca) if args.ca else None)
    rows = identity_rows(ids.devices(), time.time(), ids.refused_records)
    if args.json:
        print(json.dumps({"devices": rows, "checked": ids.ca is not None}, indent=2))
        return 0
    if ids.ca is None:
        print("(records not checked: --ca checks the fleet CA's signature on each)")
    from edgebento.cli.tables import printable  # store keys may hold control characters

    for device, row in rows.items():
        rotation = row["last_rotation"]
        rotated = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rotation)) if rotation else "-"
        waiting = f", renewed to {len(row['pending'])} unconfirmed" if row["pending"] else ""
        print(
            f"{printable(device)}: {printable(row['state'])}, expires in "
            f"{_span(row['expires_in_s'])}, last rotation {rotated}{waiting}"
        )
    return 0
