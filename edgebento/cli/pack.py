"""``edgebento keygen`` and ``edgebento pack create|sign|verify|inspect``."""

from __future__ import annotations

import argparse
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from modelpack import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    Manifest,
    create_pack,
    generate_keypair,
    load_pack,
    sign_pack,
)
from modelpack.errors import ConfigError, ManifestError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
EXPIRES_HELP = "expire this long from now: 3600, 90m, 12h, 30d or 8w (signed with the manifest)"


def duration_s(text: str) -> float:
    """``3600``, ``90m``, ``12h``, ``30d``, ``8w`` as seconds; argparse's type for durations."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 3600, 90m, 12h or 30d")
    return float(match[1]) * _UNITS[match[2] or "s"]


def expires_at(seconds: float | None) -> datetime | None:
    if seconds is None:
        return None
    try:
        return datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=seconds)
    except OverflowError as exc:
        raise ConfigError(f"--expires-in {seconds:.0f}s is past the year 9999") from exc


def register(sub: Any) -> None:
    keygen = sub.add_parser("keygen", help="write an ed25519 signing key pair")
    keygen.add_argument(
        "--out", type=Path, required=True, help="directory for signing.key and signing.pub"
    )
    keygen.set_defaults(func=cmd_keygen)

    pack = sub.add_parser("pack", help="create, sign, verify and inspect ModelPacks")
    verbs = pack.add_subparsers(dest="verb", metavar="VERB", required=True)

    create = verbs.add_parser("create", help="make a pack directory from an ONNX model")
    create.add_argument("model", type=Path, metavar="MODEL.onnx")
    create.add_argument("--name", required=True)
    create.add_argument("--version", type=int, required=True)
    create.add_argument("--out", type=Path, required=True)
    create.add_argument(
        "--samples", type=Path, help="golden samples (.npz with inputs/NAME and outputs/NAME)"
    )
    create.add_argument(
        "--label", action="append", default=[], dest="labels", help="a class label (repeat)"
    )
    create.add_argument("--key", type=Path, help="sign with this signing.key as well")
    create.add_argument("--expires-in", type=duration_s, metavar="DURATION", help=EXPIRES_HELP)
    add_monitor_args(create)
    create.set_defaults(func=cmd_create)

    sign = verbs.add_parser("sign", help="sign a pack's manifest")
    sign.add_argument("dir", type=Path)
    sign.add_argument("--key", type=Path, required=True)
    sign.add_argument("--expires-in", type=duration_s, metavar="DURATION", help=EXPIRES_HELP)
    sign.set_defaults(func=cmd_sign)

    verify = verbs.add_parser(
        "verify", help="check signature, hashes and layout; exit 0 when valid"
    )
    verify.add_argument("dir", type=Path)
    verify.add_argument(
        "--pub", type=Path, action="append", required=True, help="a trusted public key (repeat)"
    )
    verify.set_defaults(func=cmd_verify)

    inspect = verbs.add_parser("inspect", help="print the manifest")
    inspect.add_argument("dir", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the manifest JSON as it is")
    inspect.add_argument(
        "--pub",
        type=Path,
        action="append",
        default=[],
        help="a public key to check the signature with: shows which key signed (repeat)",
    )
    inspect.set_defaults(func=cmd_inspect)


def cmd_keygen(args: argparse.Namespace) -> int:
    key, pub = generate_keypair(args.out)
    print(f"wrote {key} (keep it secret) and {pub} (give it to every device and service)")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    create_pack(
        args.model,
        args.out,
        name=args.name,
        version=args.version,
        samples=args.samples,
        labels=args.labels,
        expires_at=(when := expires_at(args.expires_in)),
        key=args.key,
    )
    monitoring = attach_monitoring(args, args.out, args.key)
    state = "signed" if args.key else "unsigned; sign it with 'edgebento pack sign'"
    until = f", expires {when.isoformat()}" if when else ""
    print(f"wrote pack {args.name} v{args.version} to {args.out} ({state}{until})")
    if monitoring:
        print(monitoring)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    when = expires_at(args.expires_in)
    sig = sign_pack(args.dir, args.key, expires_at=when)
    until = f"; expires {when.isoformat()}" if when else ""
    print(f"signed {args.dir} ({sig.name}{until})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    pack = load_pack(args.dir, trusted=args.pub)
    m = pack.manifest
    print(f"ok: {m.name} v{m.version}, {len(m.files)} files, signed by key {pack.signed_by}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = args.dir / MANIFEST_FILE
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read {path}: {exc.strerror}") from exc
    manifest = Manifest.from_bytes(data)
    if args.json:
        print(json.dumps(json.loads(data), indent=2))
        return 0
    from edgebento.cli.tables import Column, print_pairs, print_table

    pairs = [
        ("created", manifest.created_at.isoformat()),
        ("expires", manifest.expires_at.isoformat() if manifest.expires_at else "never"),
        ("parent", manifest.parent or "-"),
        ("signed", _signer(args.dir, data, args.pub)),
    ]
    if manifest.labels:
        pairs.append(("labels", ", ".join(manifest.labels)))
    for key, value in manifest.optimization.items():
        pairs.append(
            (f"optimization.{key}", json.dumps(value) if not isinstance(value, str) else value)
        )
    print_pairs(f"{manifest.name} v{manifest.version}", pairs)
    io: list[list[str]] = []
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for s in specs:
            shape = (
                "unknown"
                if s.shape is None
                else "[" + ", ".join("?" if d is None else str(d) for d in s.shape) + "]"
            )
            io.append([kind, s.name, s.dtype, shape])
    print_table(
        "io signature",
        [Column(""), Column("name", ident=True), Column("dtype"), Column("shape")],
        io,
    )
    files = [[f.path, f"{f.size:,}", f.sha256] for f in manifest.files]
    print_table(
        "files",
        [Column("path", ident=True), Column("size", right=True), Column("sha256", ident=True)],
        files,
    )
    return 0


def _signer(root: Path, manifest: bytes, keys: list[Path]) -> str:
    """Who signed: an ed25519 signature names no key, so it is tried against each --pub."""
    from modelpack.errors import SignatureError
    from modelpack.signing import load_public_key, verify

    try:
        signature = (root / SIGNATURE_FILE).read_bytes()
    except FileNotFoundError:
        return "no"
    except OSError as exc:
        raise ManifestError(f"cannot read {root / SIGNATURE_FILE}: {exc.strerror}") from exc
    if not keys:
        return "yes (a signature names no key: add --pub KEY to see whether KEY made it)"
    try:
        key = verify(manifest, signature, [load_public_key(k) for k in keys])
    except SignatureError as exc:  # another key, a changed manifest, or a damaged signature
        return f"yes, but by none of the --pub keys: {exc}"
    return f"by key {key.key_id} ({key.source})"


def add_monitor_args(parser: Any, data: bool = True) -> None:
    """``--data`` and ``--monitor``: the pack's drift baseline (docs/monitoring.md)."""
    if data:
        parser.add_argument(
            "--data", type=Path, help=".npz, one array per input: record a drift baseline on it"
        )
    parser.add_argument(
        "--monitor",
        action="append",
        default=[],
        metavar="TENSOR=REDUCER[:k=v,...]",
        help="how a tensor is watched for drift: columns, summary, image, tokens, classes, none",
    )


def attach_monitoring(args: argparse.Namespace, root: Path, key: Path | None) -> str:
    """The baseline of ``--data`` in the pack at ``root``; a line saying what was recorded."""
    from modelpack.baseline import make_baseline, read_data
    from modelpack.monitor import parse_monitor

    specs = [parse_monitor(text) for text in args.monitor]
    if args.data is None:
        return "" if not specs else "--monitor needs --data: no baseline recorded"
    baseline = make_baseline(root, read_data(args.data), specs, key=key)
    return f"baseline: {len(baseline.features)} monitored features on {baseline.rows} rows"
