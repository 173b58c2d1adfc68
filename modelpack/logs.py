"""Structured logs: one JSON object per line on stderr, for ELK, Loki or ``jq``.

Every edgebento process (the agent, ``edgebento sync``, ``edgebento rollout``, the BentoML
service, the CLI) calls :func:`install` once at start-up. The schema is documented in
``docs/logging.md``; the keys are ``time``, ``level``, ``logger``, ``message`` and, where one
exists, ``device``, ``model``, ``request_id``, ``trace_id``, ``rollout``, then ``error`` (with
the traceback) for an exception.

Context that holds for the whole process (the agent's device) is set once with
:func:`set_context`; context of one request travels with the record (``log.info(...,
extra={"request_id": rid})``) or with :func:`bound` around a block of work.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("json", "text")
ENV_FORMAT = "EDGEBENTO_LOG_FORMAT"
# The optional keys, in the order they are written.
CONTEXT_KEYS = ("device", "model", "request_id", "trace_id", "rollout")
# Libraries that log every HTTP request at INFO: only their warnings, unless debugging.
CHATTY = ("httpx", "httpcore", "urllib3", "botocore", "boto3", "s3transfer")
_process_context: dict[str, str] = {}
_bound: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "edgebento_log_context", default=None
)


def set_context(**fields: object) -> None:
    """Context for every later record of this process (None removes a key)."""
    for key, value in fields.items():
        if value is None:
            _process_context.pop(key, None)
        else:
            _process_context[key] = str(value)


@contextlib.contextmanager
def bound(**fields: object) -> Iterator[None]:
    """Context for the records logged inside the block (this thread or task only)."""
    current = dict(_bound.get() or {})
    current.update({k: str(v) for k, v in fields.items() if v is not None})
    token = _bound.set(current)
    try:
        yield
    finally:
        _bound.reset(token)


def _context_of(record: logging.LogRecord) -> dict[str, str]:
    fields = {**_process_context, **(_bound.get() or {})}
    for key in CONTEXT_KEYS:
        value = getattr(record, key, None)
        if value is not None:
            fields[key] = str(value)
    return {k: fields[k] for k in CONTEXT_KEYS if k in fields}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line whatever the message holds."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        doc.update(_context_of(record))
        if record.exc_info:
            doc["error"] = self.formatException(record.exc_info)
        elif record.stack_info:
            doc["error"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger [device model request]: message`` for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(context)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        context = _context_of(record)
        record.context = (" [" + " ".join(f"{k}={v}" for k, v in context.items()) + "]") * bool(
            context
        )
        return super().format(record)


def default_format(stream: TextIO | None = None) -> str:
    """``EDGEBENTO_LOG_FORMAT`` when set, else text at a terminal and JSON anywhere else."""
    chosen = os.environ.get(ENV_FORMAT, "").strip().lower()
    if chosen in FORMATS:
        return chosen
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return "text" if callable(isatty) and isatty() else "json"


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else TextFormatter()


def install(
    fmt: str | None = None, level: int | str = logging.INFO, stream: TextIO | None = None
) -> str:
    """Send every logger's records to ``stream`` (stderr) in ``fmt``; returns the format used.

    Also routes ``warnings`` and uncaught exceptions (main thread and others) through logging,
    so that in JSON mode every line a process writes to stderr parses.
    """
    fmt = fmt or default_format(stream)
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    os.environ[ENV_FORMAT] = fmt  # child processes (bentoml's workers) log the same way
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in CHATTY:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_thread
    return fmt


def reformat_handlers(*logger_names: str, fmt: str | None = None) -> None:
    """Give the handlers a framework installed (BentoML's) our formatter."""
    fmt = fmt or default_format()
    for name in ("", *logger_names):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(formatter(fmt))


def add_argument(parser: Any) -> None:
    """``--log-format json|text`` on an argparse parser (default: :func:`default_format`)."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default=None,
        help="log lines on stderr as JSON or text (default: text at a terminal, else JSON; "
        f"or {ENV_FORMAT})",
    )


def report_error(fmt: str, logger: str, error: object, exc_info: bool = False) -> None:
    """A command's final error: ``error: ...`` for a person, a JSON record for a collector."""
    if fmt == "text":
        print(f"error: {error}", file=sys.stderr)
    else:
        logging.getLogger(logger).error("%s", error, exc_info=exc_info)


def _log_uncaught(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("edgebento").critical(
        "uncaught %s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb)
    )


def _log_uncaught_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("edgebento").critical(
        "uncaught %s in thread %s: %s",
        args.exc_type.__name__,
        args.thread.name if args.thread else "?",
        args.exc_value,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )
