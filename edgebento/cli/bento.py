"""``edgebento bento import PACK --pub PUB``: a verified pack into the BentoML model store."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    bento = sub.add_parser("bento", help="put packs in the BentoML model store")
    verbs = bento.add_subparsers(dest="verb", metavar="VERB", required=True)
    imp = verbs.add_parser("import", help="verify a pack and store it as NAME:vVERSION")
    imp.add_argument("pack", type=Path, metavar="PACK")
    imp.add_argument(
        "--pub", type=Path, action="append", required=True, help="a trusted public key (repeat)"
    )
    imp.set_defaults(func=cmd_import)


def cmd_import(args: argparse.Namespace) -> int:
    from bentos.store import import_pack

    tag = import_pack(args.pack, args.pub)
    print(f"stored {tag} in the BentoML model store")
    print(f"serve it: EDGEBENTO_MODEL={tag} bentoml serve .")
    return 0
