"""``edgebento fleet identity-repair | rebuild-spent-claims``: what an operator holding the CA
key runs to bring identity state back (cloud_sync.identity_repair, cloud_sync.spent_rebuild)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgebento.cli.fleet_identity import _ids
from edgebento.cli.registry import add_store_args


def register_repairs(verbs: Any) -> None:
    fix = verbs.add_parser(
        "identity-repair", help="sign an older release's device records, rebuild the CRL index"
    )
    fix.add_argument("--ca", type=Path, required=True, help="the CA directory (issuing key)")
    fix.add_argument("--crl-file", type=Path, required=True, help="the CRL the broker reads")
    fix.add_argument(
        "--sign-unsigned", action="store_true", help="after the upgrade too (records you checked)"
    )
    add_store_args(fix)
    fix.set_defaults(func=cmd_identity_repair)

    spent = verbs.add_parser(
        "rebuild-spent-claims",
        help="rebuild {crl-file}.spent-claims.json from the bucket and the CRL (damaged, lost)",
    )
    spent.add_argument("--ca", type=Path, required=True, help="the CA directory (issuing key)")
    spent.add_argument("--crl-file", type=Path, required=True, help="the CRL the broker reads")
    add_store_args(spent)
    spent.set_defaults(func=cmd_rebuild_spent_claims)


def cmd_identity_repair(args: argparse.Namespace) -> int:
    from cloud_sync.fleet_ca import FleetCA
    from cloud_sync.identity_repair import repair

    report = repair(_ids(args, FleetCA.load(args.ca)), args.crl_file, args.sign_unsigned)
    print(json.dumps(report.__dict__, indent=2))
    return 1 if report.refused else 0


def cmd_rebuild_spent_claims(args: argparse.Namespace) -> int:
    from cloud_sync.fleet_ca import FleetCA
    from cloud_sync.spent_rebuild import rebuild_spent

    report = rebuild_spent(_ids(args, FleetCA.load(args.ca), args.crl_file))
    print(json.dumps(report.__dict__, indent=2))
    return 0
