"""``edgebento bento import PACK --pub PUB``: a verified pack into the BentoML model store;
``edgebento bento build TAG``: a bento of it, built from any folder."""

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
    build = verbs.add_parser(
        "build", help="build a bento serving a stored model, from any folder (then containerize)"
    )
    build.add_argument("model", metavar="TAG", help="a model in the store, NAME:vVERSION")
    build.set_defaults(func=cmd_build)


def cmd_import(args: argparse.Namespace) -> int:
    from bentos.build import serve_command
    from bentos.store import import_pack

    tag = import_pack(args.pack, args.pub)
    print(f"stored {tag} in the BentoML model store")
    print(f"serve it: {serve_command(tag)}")
    print(f"or build a bento of it for a container: edgebento bento build {tag}")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from bentos.build import build_bento

    tag = build_bento(args.model)
    print(f"built bento {tag}")
    print(f"containerize it: bentoml containerize {tag}   (docs/containers.md: without Docker)")
    return 0
