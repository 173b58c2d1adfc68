"""``edgebento demo``: the whole story end to end (what ``make demo`` runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    demo = sub.add_parser("demo", help="run the whole story end to end on local services")
    demo.add_argument(
        "--workdir", type=Path, default=Path("build/demo"), help="where it all goes (wiped first)"
    )
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from edgebento.demo import run_demo

    return run_demo(args.workdir)
