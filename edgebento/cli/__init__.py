"""``edgebento``: one sub-command module per library module, each thin."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from edge_agent.cli import installed_version
from modelpack import logs
from modelpack.errors import EdgebentoError

# Long-running commands log their progress; the others only warnings and errors.
INFO_COMMANDS = {"sync", "rollout", "demo"}

# Each module has ``register(subparsers)``, which adds its verbs with ``func`` set.
COMMAND_MODULES = [
    "edgebento.cli.pack",
    "edgebento.cli.demo",
    "edgebento.cli.optimize",
    "edgebento.cli.bento",
    "edgebento.cli.deploy",
    "edgebento.cli.sync",
    "edgebento.cli.registry",
    "edgebento.cli.rollout",
    "edgebento.cli.fleet",
    "edgebento.cli.simulate",
    "edgebento.cli.rollback",
    "edgebento.cli.monitor",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgebento",
        description="Make a model small and fast, then serve the same signed pack everywhere.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"edgebento {installed_version()}")
    logs.add_argument(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = logging.INFO if args.command in INFO_COMMANDS else logging.WARNING
    fmt = logs.install(args.log_format, level=logging.DEBUG if args.verbose else quiet)
    try:
        return int(args.func(args) or 0)
    except EdgebentoError as exc:
        return _fail(fmt, str(exc))
    except KeyboardInterrupt:
        return 130
    except MemoryError as exc:  # numpy's says how much it wanted: worth keeping
        message = f"out of memory: {_first_line(exc) or 'an allocation failed'}"
        return _fail(fmt, message, args.verbose)
    except Exception as exc:  # a bug or a library's own error: one line, the traceback on -v
        hint = "" if args.verbose else " (run with -v for the traceback)"
        return _fail(fmt, f"{type(exc).__name__}: {_first_line(exc)}{hint}", args.verbose)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _fail(fmt: str, message: str, traceback: bool = False) -> int:
    """The command's one error: an ``error:`` line in text, one record (with the traceback on
    -v) in JSON."""
    if traceback and fmt == "text":
        import traceback as tb

        tb.print_exc()
    logs.report_error(fmt, "edgebento", " ".join(message.split()), exc_info=traceback)
    return 1


if __name__ == "__main__":
    sys.exit(main())
