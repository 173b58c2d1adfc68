"""``edge-agent run``: the device daemon's command line (flags override EDGEBENTO_* and the file)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    from modelpack import logs

    parser = argparse.ArgumentParser(
        prog="edge-agent",
        description="The edgebento device daemon: MQTT commands, local inference, verified updates.",
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="connect to the broker and serve the installed model")
    run.add_argument("--config", type=Path, help="a TOML file with these settings and more")
    run.add_argument("--device", help="this device's id (topics are {prefix}/{device}/...)")
    run.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    run.add_argument("--data-dir", type=Path, help="where packs, state and the outbox live")
    run.add_argument(
        "--trust", type=Path, action="append", help="a publisher's public key (repeatable)"
    )
    run.add_argument("--store", help="object store URL for deploy by name and capture uploads")
    run.add_argument("--pack", type=Path, help="the pack to serve when nothing is installed yet")
    run.add_argument("--telemetry-interval", type=float, help="seconds between heartbeats")
    run.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz and POST /infer")
    run.add_argument("--prefix", help="topic prefix (default edgebento)")
    run.add_argument("--group", dest="groups", action="append", help="a group this device is in")
    run.add_argument("--protocol", choices=["5", "3.1.1"], help="MQTT version (default 5)")
    run.add_argument("--client-id", help="MQTT client id (default edge-agent-DEVICE)")
    run.add_argument("--username", help="broker user name")
    run.add_argument("--password", help="broker password (better: EDGEBENTO_PASSWORD)")
    run.add_argument("--ca-file", type=Path, help="CA bundle for mqtts://")
    run.add_argument("--cert-file", type=Path, help="client certificate (mTLS)")
    run.add_argument("--key-file", type=Path, help="client key (mTLS)")
    run.add_argument("--enroll", dest="enroll_token", help="a one-time claim token (first start)")
    run.add_argument("--enroll-file", dest="enroll_token_file", type=Path, help="... in a file")
    run.add_argument("--claim-broker", help="mqtts://HOST:PORT of the broker's claim listener")
    run.add_argument("--claim-cert", dest="claim_cert_file", type=Path, help="claim certificate")
    run.add_argument("--claim-key", dest="claim_key_file", type=Path, help="claim certificate key")
    run.add_argument("--outbox-max-bytes", type=int, help="telemetry outbox cap in bytes")
    run.add_argument(
        "--file-root",
        dest="file_roots",
        type=Path,
        action="append",
        help="a directory file:// deploys may install from (repeatable; default: none)",
    )
    run.add_argument(
        "--ack-timeout",
        dest="telemetry_ack_timeout",
        type=float,
        help="seconds before unacknowledged telemetry is sent again (default 10)",
    )
    run.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    logs.add_argument(run)
    run.set_defaults(func=_run)
    return parser


class _Version(argparse.Action):
    """``--version``, read only when asked: the lookup scans the installed distributions'
    metadata, and a running agent would keep the caches it fills."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"edge-agent {installed_version()}")  # stdout, as argparse's own version action
        parser.exit()


def installed_version() -> str:
    """The installed distribution's version (what pip knows), not a copy kept in the source."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgebento")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    names = [
        "device",
        "broker",
        "data_dir",
        "trust",
        "store",
        "pack",
        "metrics_port",
        "prefix",
        "groups",
        "protocol",
        "client_id",
        "username",
        "password",
        "ca_file",
        "cert_file",
        "key_file",
        "enroll_token",
        "enroll_token_file",
        "claim_broker",
        "claim_cert_file",
        "claim_key_file",
        "outbox_max_bytes",
        "file_roots",
        "telemetry_ack_timeout",
        "log_level",
    ]
    flags: dict[str, Any] = {n: getattr(args, n) for n in names}
    if args.telemetry_interval is not None:
        flags["limits"] = {"telemetry_interval": args.telemetry_interval}
    return flags


def check_start(config: Any) -> None:
    """Every setting that cannot work stops the agent here, with one line naming its flag:
    a device that starts but can never connect, or never verify a pack, helps no one."""
    from cloud_sync.broker_url import check_broker_port
    from modelpack.errors import ConfigError, KeyFileError
    from modelpack.signing import load_public_key

    check_broker_port(config.broker, "--broker")
    if config.claim_broker:
        check_broker_port(config.claim_broker, "--claim-broker")
    for path in config.trust:
        try:
            load_public_key(path)
        except KeyFileError as exc:
            # A device that trusts no readable key can never install nor roll back anything.
            raise ConfigError(f"--trust {path}: {exc}") from exc
    data = Path(config.data_dir)
    if data.exists() and not data.is_dir():
        raise ConfigError(f"--data-dir {data}: exists and is not a directory")
    own_cert = data / "identity" / "device.crt"  # made by enrollment: need not exist yet
    for flag, path in (
        ("--ca-file", config.ca_file),
        ("--cert-file", None if config.cert_file == own_cert else config.cert_file),
        ("--key-file", None if config.cert_file == own_cert else config.key_file),
        ("--claim-cert", config.claim_cert_file),
        ("--claim-key", config.claim_key_file),
    ):
        if path is not None:
            _check_readable_file(flag, Path(path))
    if config.pack is not None and not Path(config.pack).exists():
        # Silently serving nothing would hide a typo until a request finds no model.
        raise ConfigError(f"--pack {config.pack}: no such file or directory")
    _make_data_dir(data)  # last: a refused start leaves nothing behind


def _check_readable_file(flag: str, path: Path) -> None:
    """A TLS file the agent will open at its first connect: a missing one was a traceback then."""
    from modelpack.errors import ConfigError

    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from exc


def _make_data_dir(data: Path) -> None:
    """The data directory, made as the agent would (packs, state.json and the outbox live
    there): one that cannot be made was a traceback from deep in the start-up."""
    from modelpack.errors import ConfigError

    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--data-dir {data}: {exc.strerror or exc}") from exc


def _enrolls(config: Any) -> bool:
    """Whether this device has an identity of its own or is to get one (a claim token): only
    then is ``edge_agent.identity`` imported, with x509 and the enrollment protocol (0.6 MB a
    device with operator-managed or no certificates never needs). Its directory is
    ``identity.files_of``'s."""
    if (
        config.cert_file is not None
        and config.cert_file != Path(config.data_dir) / "identity" / "device.crt"
    ):
        return False  # certificates managed by the operator
    return (
        bool(config.enroll_token or config.enroll_token_file)
        or (Path(config.data_dir) / "identity").exists()
    )


def _run(args: argparse.Namespace) -> int:
    from cloud_sync.redact import redact_url
    from edge_agent.agent import Agent
    from edge_agent.config import load_config
    from edge_agent.inference import install_hint
    from modelpack import logs
    from modelpack.errors import AuthError
    from modelpack.signing import verify_out_of_process

    # Signatures are checked once per update (and at boot); cryptography would stay resident
    # for it (1.8 MB of the device's 36). A child checks the bytes this process keeps.
    verify_out_of_process()
    config = load_config(args.config, _flags(args))
    check_start(config)
    logging.getLogger().setLevel(config.log_level.upper())
    logs.set_context(device=config.device)
    enrolls = _enrolls(config)
    if enrolls:
        from edge_agent.identity import Renewer, prepare_identity

        config = prepare_identity(config)  # enrolls by claim on first start; refuses expired certs
    agent = Agent(config)
    signal.signal(signal.SIGTERM, lambda *_: agent.request_stop())
    signal.signal(signal.SIGINT, lambda *_: agent.request_stop())
    agent.start()
    renewer = Renewer.for_agent(config, agent.session, agent.record) if enrolls else None
    logging.getLogger("edge_agent").info(
        "device %s serving %s on %s%s",
        config.device,
        agent.serving_label(),
        redact_url(config.broker),
        "" if agent.inference.model_ref else f"; {install_hint(config.prefix, config.device)}",
    )
    try:
        agent.run_forever()
    except AuthError:
        if renewer is not None:
            renewer.stop()
        agent.stop(flush_s=0)
        raise
    if renewer is not None:
        renewer.stop()
    agent.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from edge_agent.memory import defer_unused_imports

    defer_unused_imports()  # first: modelpack's import builds pydantic models
    from modelpack import logs
    from modelpack.errors import AuthError, EdgebentoError

    parser = build_parser()
    args = parser.parse_args(argv)
    fmt = logs.install(getattr(args, "log_format", None))
    from cloud_sync.redact import install_log_redaction, redact_text

    install_log_redaction()
    try:
        return int(args.func(args) or 0)
    except AuthError as exc:
        logs.report_error(fmt, "edge_agent", redact_text(str(exc)))
        return 3  # systemd: RestartPreventExitStatus=3, a wrong password stays wrong
    except EdgebentoError as exc:
        logs.report_error(fmt, "edge_agent", redact_text(str(exc)))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
