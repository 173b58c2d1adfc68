"""``edgebento optimize``: prune and quantize a model into a verified ModelPack."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgebento.cli.pack import add_monitor_args, attach_monitoring
from modelpack.errors import ConfigError


def _prune(value: str) -> str | float:
    if value in ("auto", "off"):
        return value
    try:
        return float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("auto, off or a ratio such as 0.5") from exc


def register(sub: Any) -> None:
    p = sub.add_parser(
        "optimize",
        help="prune and quantize a model under an accuracy budget into a ModelPack",
    )
    p.add_argument(
        "source",
        type=Path,
        metavar="SOURCE",
        help=".onnx or zip .keras; .h5, SavedModel dir, TorchScript .pt with --trust-model-code",
    )
    p.add_argument("--out", type=Path, required=True, help="the pack directory to write")
    p.add_argument("--name", help="pack name (default: the source's file name)")
    p.add_argument("--version", type=int, default=1)
    p.add_argument(
        "--data", type=Path, help=".npz, one array per input (+ labels): calibration and eval"
    )
    p.add_argument("--eval-data", type=Path, help=".npz held back for fidelity only")
    p.add_argument("--max-drop", type=float, help="budget as a fraction: 0.01 = 1 accuracy point")
    p.add_argument("--quantize", choices=("auto", "dynamic", "static", "off"), default="auto")
    p.add_argument(
        "--prune", type=_prune, default="auto", help="auto, off or a ratio of units to remove"
    )
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="[OUTPUT=]NAME[@REDUCTION][>=X]",
        help="how an output is judged: cosine, pooled-cosine, first-token-cosine, token-cosine,"
        " top1, accuracy, max-abs, equal or module:function (repeatable; see docs/optimize.md)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="stop trying new candidates after this long from the start (default 600; 0: no"
        " limit); the best found so far is kept and the report lists what was not tried",
    )
    p.add_argument("--train-data", type=Path, help=".npz with labels to fine-tune Keras pruning")
    p.add_argument("--key", type=Path, help="sign the pack with this signing.key")
    p.add_argument("--bentoml", action="store_true", help="also save it to the BentoML model store")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--trust-model-code",
        action="store_true",
        help="also load HDF5/SavedModel Keras and TorchScript: they are programs that run with"
        " your rights (docs/build-inputs.md)",
    )
    add_monitor_args(p, data=False)  # --data records the drift baseline too
    p.set_defaults(func=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> int:
    from modelpack.monitor import parse_monitor
    from optimize import optimize_model

    for text in args.monitor:  # a typo is found before the optimization, not after it
        parse_monitor(text)
    from optimize.report import machine_text

    result = optimize_model(
        args.source,
        args.out,
        name=args.name or args.source.stem.replace(" ", "-") or "model",
        version=args.version,
        data=args.data,
        eval_data=args.eval_data,
        max_drop=args.max_drop,
        quantize=args.quantize,
        prune=args.prune,
        train_data=args.train_data,
        key=args.key,
        progress=not args.no_progress,
        trust_model_code=args.trust_model_code,
        metrics=args.metric,
        time_budget=args.time_budget,
    )
    Console().print(candidates_table(result.rows))
    # The lines below are one line each however narrow the terminal or pipe (80 columns when
    # piped): a note, a failed bound or the pick cut in two is what a grep or a CI log misses.
    console = Console(soft_wrap=True)
    batch = max((r["latency"]["batch"] for r in result.rows if r["latency"]), default=1)
    if any(r["row_independent"] is False for r in result.rows):
        console.print(
            f"rows: ×{batch} = the service batches requests together (timed at {batch} rows);"
            " alone = a row's answer changes with the rows beside it (dynamic int8 scales a"
            " whole batch), so the service runs it one request at a time, and it was timed so"
        )
    for row in result.rows:
        if row["error"] or row["violation"]:
            console.print(
                f"✗ {escape(row['candidate'])}: {escape(row['error'] or row['violation'])}"
            )
    for note in result.notes:
        console.print(f"note: {escape(note)}")
    console.print(f"measured on: {escape(machine_text(result.machine))}")
    console.print(f"chosen: [bold]{escape(result.chosen.name)}[/bold] ({escape(result.reason)})")
    decided = next((_fid(r).get("decided_by") for r in result.rows if r["chosen"]), None)
    if decided:
        console.print(f"decided by: {escape(decided)}")
    leading = all(result.batch_axes.get(s.name) == 0 for s in _pack_inputs(result.pack_dir))
    if args.monitor or (args.data is not None and leading):
        console.print(escape(attach_monitoring(args, result.pack_dir, args.key)))
    elif args.data is not None:  # a baseline counts rows on axis 0 of every input
        console.print(
            "note: no drift baseline recorded: not every input has its rows on axis 0"
            f" (batch axes {result.batch_axes}); name the tensors to watch with --monitor"
        )
    console.print(f"pack: {result.pack_dir}   report: {result.report_html}")
    if args.bentoml:
        console.print(
            f"saved to the BentoML model store as {_save_to_bentoml(result.pack_dir, args.key)}"
        )
    return 0


FIDELITY_COLUMNS = (("accuracy", "acc"), ("top1_agreement", "top-1"), ("cosine_min", "cos"))


def _served(row: dict[str, Any]) -> str:
    """How the service runs it, which is how it was timed: batches of N rows, or one request
    at a time when a row's answer depends on the rows beside it."""
    lat = row["latency"]
    if row["row_independent"] is False:
        return "alone"
    return f"×{lat['batch']}" if lat else "-"


def candidates_table(rows: list[dict[str, Any]]) -> Table:
    """One line of figures per candidate, narrow enough for an 80-column terminal: sizes in MB,
    p50 at the rows it was timed with (×N: batches of N, as the service batches it; alone: one
    request at a time, as the service runs a model whose rows mix), speed per row as a multiple
    of FP32, and fidelity (cos: the lowest cosine similarity to FP32). p99, the footprint and
    every other figure are in report.html and report.json."""
    fidelity = [
        (key, label)
        for key, label in FIDELITY_COLUMNS
        if any(_fid(r).get(key) is not None for r in rows)
    ]
    table = Table(title="candidates", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("candidate", overflow="fold", min_width=18)
    for label in ("MB", "gzip", "p50 ms", "rows", "speed", *(label for _, label in fidelity)):
        table.add_column(label, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for row in rows:
        lat = row["latency"]
        mark = "✓" if row["chosen"] else ("✗" if row["error"] or row["violation"] else "")
        table.add_row(
            escape(row["candidate"]),
            _mb(row["size_bytes"]),
            _mb(row["gzip_bytes"]),
            f"{lat['p50_ms']:.2f}" if lat else "-",
            _served(row),
            f"{row['speedup']:.2f}x" if row["speedup"] else "-",
            *(_figure(_fid(row).get(key)) for key, _ in fidelity),
            mark,
            style="bold" if row["chosen"] else None,
        )
    return table


def _fid(row: dict[str, Any]) -> dict[str, Any]:
    return row["fidelity"] or {}


def _mb(size: int | None) -> str:
    return f"{size / 1e6:.2f}" if size else "-"


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _pack_inputs(pack_dir: Path) -> list[Any]:
    from modelpack.manifest import MANIFEST_FILE, Manifest

    return list(Manifest.from_bytes((pack_dir / MANIFEST_FILE).read_bytes()).inputs)


def _save_to_bentoml(pack_dir: Path, key: Path | None) -> str:
    # optimize knows nothing of BentoML; the CLI composes it with bentos' one import function.
    from bentos.store import import_pack

    if key is None:
        return import_pack(pack_dir, [], allow_unsigned=True)
    pub = key.with_suffix(".pub")
    if not pub.exists():
        raise ConfigError(f"--bentoml with --key needs the public key beside it: {pub} is missing")
    return import_pack(pack_dir, [pub])
