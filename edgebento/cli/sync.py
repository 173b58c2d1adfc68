"""``edgebento sync``: the fleet's telemetry from MQTT into the store, and /metrics for the fleet."""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import threading
from typing import Any

from edgebento.cli.registry import add_store_args

log = logging.getLogger("edgebento.sync")


def register(sub: Any) -> None:
    sync = sub.add_parser(
        "sync", help="ingest the fleet's telemetry into the store (runs until stopped)"
    )
    sync.add_argument("--broker", required=True, help="mqtt://[user:pass@]host:port")
    add_store_args(sync)  # --store falls back to $EDGEBENTO_STORE, as in every other command
    sync.add_argument("--prefix", default="edgebento", help="topic prefix (default edgebento)")
    sync.add_argument(
        "--share",
        default="edgebento-sync",
        help="shared subscription group (default edgebento-sync)",
    )
    sync.add_argument(
        "--client-id",
        help="MQTT client id; keep it fixed per process so a restart resumes its session "
        "(default: edgebento-sync-HOSTNAME)",
    )
    sync.add_argument(
        "--flush-interval", type=float, default=1.0, help="seconds between writes (default 1)"
    )
    sync.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    sync.add_argument("--metrics-addr", default="127.0.0.1", help="address for /metrics")
    sync.set_defaults(func=cmd_sync)


def cmd_sync(args: argparse.Namespace) -> int:
    from cloud_sync.broker_url import check_broker_port, check_listen_port
    from cloud_sync.ingest import SyncOptions, TelemetrySync
    from cloud_sync.protocol import Topics
    from cloud_sync.redact import install_log_redaction, redact_url
    from cloud_sync.store import open_store

    install_log_redaction()
    check_broker_port(args.broker, "--broker")
    check_listen_port(args.metrics_port, "--metrics-port")
    store = open_store(args.store, endpoint_url=args.endpoint_url)
    options = SyncOptions(
        share=args.share,
        client_id=args.client_id or f"edgebento-sync-{socket.gethostname()}",
        flush_interval_s=args.flush_interval,
    )
    sync = TelemetrySync(store, args.broker, topics=Topics(args.prefix), options=options)
    if args.metrics_port:
        sync.metrics.watch_rollouts(store)  # how rollouts ended, for EdgebentoRolloutAborted
        sync.metrics.serve(args.metrics_port, args.metrics_addr)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    sync.start(keep_trying=True)  # a broker that is down now is waited for, not a failure
    log.info(
        f"syncing telemetry from {redact_url(args.broker)} to {redact_url(store.url)} as {options.client_id}"
        + (f"; /metrics on {args.metrics_addr}:{args.metrics_port}" if args.metrics_port else "")
    )
    try:
        while not stop.wait(1.0):
            if sync.client.fatal is not None:  # wrong credentials stay wrong: stop
                raise sync.client.fatal
    finally:
        sync.stop()
        log.info(f"stopped: {sync.stored_records} records in {sync.objects_written} objects")
    return 0
