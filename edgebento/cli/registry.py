"""``edgebento publish`` and ``edgebento registry list|show|promote``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console


def add_store_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get("EDGEBENTO_STORE")
    parser.add_argument(
        "--store",
        default=env,
        required=env is None,
        help="s3://bucket/prefix, file:///path or a path (default $EDGEBENTO_STORE)",
    )
    parser.add_argument("--endpoint-url", help="S3-compatible endpoint (else AWS_ENDPOINT_URL)")


def register(sub: Any) -> None:
    publish = sub.add_parser("publish", help="verify, sign and upload a pack to the registry")
    publish.add_argument("pack", type=Path, metavar="PACK", help="a pack directory")
    add_store_args(publish)
    publish.add_argument("--key", type=Path, help="signing.key: signs an unsigned pack")
    publish.add_argument(
        "--trust", type=Path, action="append", default=[], help="a public key to verify with"
    )
    publish.add_argument("--channel", default="stable", help="channel to point at it (stable)")
    publish.add_argument(
        "--no-channel", action="store_true", help="publish without moving any channel"
    )
    publish.add_argument(
        "--allow-backwards",
        action="store_true",
        help="let the channel move to a version lower than the one it points at",
    )
    publish.add_argument(
        "--force", action="store_true", help="publish although the report failed its budget"
    )
    publish.set_defaults(func=cmd_publish)

    registry = sub.add_parser("registry", help="list and show published packs")
    verbs = registry.add_subparsers(dest="verb", metavar="VERB", required=True)
    listing = verbs.add_parser("list", help="every published version")
    add_store_args(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_list)
    show = verbs.add_parser("show", help="one version: its entry and manifest")
    show.add_argument("name")
    show.add_argument("version", type=int)
    add_store_args(show)
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)
    promote = verbs.add_parser("promote", help="point a channel at a published version")
    promote.add_argument("name")
    promote.add_argument("version", type=int)
    promote.add_argument("--channel", required=True)
    promote.add_argument(
        "--allow-backwards", action="store_true", help="allow a lower version than now"
    )
    add_store_args(promote)
    promote.set_defaults(func=cmd_promote)


def _registry(args: argparse.Namespace) -> Any:
    from cloud_sync.registry import Registry
    from cloud_sync.store import open_store

    return Registry(open_store(args.store, endpoint_url=args.endpoint_url))


def _when(ts: str | float) -> str:
    if isinstance(ts, float | int):
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return ts.replace("T", " ").removesuffix("+00:00")


def cmd_publish(args: argparse.Namespace) -> int:
    registry = _registry(args)
    console = Console()
    channel = None if args.no_channel else args.channel
    before = _published_entry(registry, args.pack)
    with console.status(f"verifying and uploading {args.pack} to {registry.store.url}"):
        entry = registry.publish(
            args.pack,
            key=args.key,
            trusted=args.trust,
            channel=channel,
            force=args.force,
            allow_backwards=args.allow_backwards,
        )
    forced = " (failed its budget; published with --force)" if entry.within_budget is False else ""
    moved = f"channel {channel} -> v{entry.version}" if channel else "no channel moved"
    # For the same bytes the registry returns the entry it holds: nothing was uploaded then.
    # print, not the console: one line when piped (rich wraps at 80 columns), no markup read.
    if before is not None and before.published_at == entry.published_at:
        print(
            f"already published: {entry.name} v{entry.version} with the same bytes, on "
            f"{_when(entry.published_at)} UTC; nothing uploaded; {moved}"
        )
        return 0
    print(
        f"published {entry.name} v{entry.version} ({entry.archive_size:,} bytes, signed by "
        f"{entry.signed_by}) to {registry.store.url}; {moved}{forced}"
    )
    return 0


def _published_entry(registry: Any, pack: Path) -> Any:
    """The registry's entry for the version ``pack`` names, or None when it is not published
    (or the pack cannot be read: ``publish`` then says why)."""
    from modelpack import MANIFEST_FILE, Manifest
    from modelpack.errors import EdgebentoError

    try:
        manifest = Manifest.from_bytes((pack / MANIFEST_FILE).read_bytes())
        return registry.entry(manifest.name, manifest.version)
    except (OSError, EdgebentoError):
        return None


def cmd_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entries, strays = registry.scan()
    for stray in strays:  # reported, never fatal: one bad key must not hide the registry
        print(f"warning: skipped {stray.key}: {stray.reason}", file=sys.stderr)
    channels = {name: registry.channels(name) for name in {e.name for e in entries}}
    if args.json:
        out = [
            {
                **e.model_dump(mode="json"),
                "channels": sorted(c for c, v in channels[e.name].items() if v == e.version),
            }
            for e in entries
        ]
        skipped = [{"key": s.key, "reason": s.reason} for s in strays]
        print(json.dumps({"packs": out, "skipped": skipped}, indent=2))
        return 0
    if not entries:
        print(f"no packs in {registry.store.url}")
        return 0
    from edgebento.cli.tables import Column, print_table

    columns = [
        Column("name", ident=True),
        Column("version", right=True),
        Column("channel"),
        Column("size", right=True),
        Column("created"),
        Column("fidelity"),
    ]
    rows: list[list[str]] = []
    for e in entries:
        tags = ", ".join(sorted(c for c, v in channels[e.name].items() if v == e.version))
        fidelity = e.fidelity or "-"
        if e.within_budget is False:
            fidelity += " (over budget)"
        rows.append(
            [
                e.name,
                str(e.version),
                tags or "-",
                f"{e.archive_size:,}",
                _when(e.created_at),
                fidelity,
            ]
        )
    print_table(f"packs in {registry.store.url}", columns, rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    registry = _registry(args)
    entry = registry.entry(args.name, args.version)
    manifest = registry.manifest(args.name, args.version)
    channels = sorted(c for c, v in registry.channels(args.name).items() if v == args.version)
    if args.json:
        doc = {
            "entry": entry.model_dump(mode="json"),
            "channels": channels,
            "manifest": manifest.model_dump(mode="json"),
        }
        print(json.dumps(doc, indent=2))
        return 0
    from edgebento.cli.tables import print_pairs

    rows = {
        "channels": ", ".join(channels) or "-",
        "created": _when(entry.created_at),
        "published": _when(entry.published_at),
        "signed by": entry.signed_by or "-",
        "archive": f"{entry.archive_size:,} bytes, sha256 {entry.archive_sha256}",
        "manifest sha256": entry.manifest_sha256,
        "fidelity": entry.fidelity or "-",
        "within budget": {True: "yes", False: "NO", None: "unknown"}[entry.within_budget],
        "inputs": ", ".join(f"{t.name} {t.dtype} {t.shape}" for t in manifest.inputs),
        "outputs": ", ".join(f"{t.name} {t.dtype} {t.shape}" for t in manifest.outputs),
        "files": ", ".join(f.path for f in manifest.files),
    }
    print_pairs(f"{entry.name} v{entry.version}", list(rows.items()))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    registry = _registry(args)
    registry.set_channel(
        args.name, args.channel, args.version, allow_backwards=args.allow_backwards
    )
    print(f"channel {args.channel} of {args.name} -> v{args.version}")
    return 0
