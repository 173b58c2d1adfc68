"""``edgebento rollback``: sign a rollback instruction and send it to a device.

A device goes back to a version at or below the highest it installed only with a signed,
unexpired ``RollbackInstruction`` for it and that exact version. This signs one with the
publisher's key (the one the device trusts for packs) and sends it as a ``rollback`` command
(the default: the reply is printed), as a retained desired state (``--desired``, for a device
that is offline now), or prints it (``--print``) for another tool to deliver.

After a rollback the command applied, the device's retained desired state is set to the version
it went back to (one generation above the one it replaces), so the fleet's desired state agrees
with what the device runs: ``fleet status`` shows no update pending, a restarted agent finds
nothing to refuse, and ``rollout resume`` of the rollout it undid is refused as superseded.
``--broker`` is needed for everything but ``--print``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import sys
import time
import uuid
from typing import Any

from edgebento.cli.pack import duration_s
from modelpack import untrusted_json


def register(sub: Any) -> None:
    rollback = sub.add_parser(
        "rollback", help="sign a rollback instruction and send it to a device"
    )
    rollback.add_argument("--device", required=True, help="the device that may go back")
    rollback.add_argument("--name", required=True, help="the model name")
    rollback.add_argument("--version", type=int, required=True, help="the version to go back to")
    rollback.add_argument("--key", required=True, help="the publisher's signing.key")
    rollback.add_argument(
        "--expires-in", type=duration_s, default=3600.0, metavar="DURATION",
        help="how long the instruction holds (default 1h): 3600, 90m, 12h, 1d",
    )  # fmt: skip
    rollback.add_argument("--url", help="where the device fetches the pack if it kept no copy")
    rollback.add_argument(
        "--leaves", type=int, metavar="VERSION",
        help="the version the device runs now, which the instruction leaves (default: what its "
        "retained status says; with --print, none unless given: then only a device that runs "
        "no model takes it)",
    )  # fmt: skip
    rollback.add_argument("--rollout", help="the rollout this rollback belongs to")
    rollback.add_argument("--broker", help="mqtt://[user:pass@]host:port (needed unless --print)")
    rollback.add_argument("--prefix", default="edgebento", help="topic prefix (default edgebento)")
    rollback.add_argument(
        "--desired", action="store_true",
        help="set the retained desired state instead of sending a command",
    )  # fmt: skip
    rollback.add_argument(
        "--generation", type=int, default=None,
        help="generation of the instruction and desired state (default: one above the "
        "device's retained desired state); a device applies each generation once",
    )  # fmt: skip
    rollback.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    rollback.add_argument("--print", action="store_true", help="print the signed JSON only")
    rollback.set_defaults(func=cmd_rollback)


def cmd_rollback(args: argparse.Namespace) -> int:
    from cloud_sync.mqtt import CloudClient
    from cloud_sync.protocol import ModelRef
    from cloud_sync.redact import redact_url
    from modelpack.errors import ConfigError
    from modelpack.signing import load_private_key

    model = ModelRef(name=args.name, version=args.version)
    signer = load_private_key(args.key)  # before anything connects
    if args.print:
        if args.generation is None:
            raise ConfigError(
                "--print needs --generation N: one above the device's retained desired state "
                "and above every rollback it applied (without --print it is read from the broker)"
            )
        leaves = ModelRef(name=args.name, version=args.leaves) if args.leaves else None
        print(_sign(signer, args, model, args.generation, leaves).model_dump_json())
        return 0
    if not args.broker:
        raise ConfigError(
            "--broker mqtt://host:port is needed to send the rollback (or --print the signed "
            "instruction for another tool to deliver)"
        )
    from cloud_sync.broker_url import check_broker_port

    check_broker_port(args.broker, "--broker")
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    with CloudClient(
        args.broker, on_message=lambda _c, _u, msg: inbox.put((msg.topic, bytes(msg.payload)))
    ) as client:
        generation, runs = _device_now(client, inbox, args)
        if args.leaves:
            runs = ModelRef(name=args.name, version=args.leaves)
        signed = _sign(signer, args, model, generation, runs)
        if args.desired:
            return _set_desired(client, args, model, generation, signed)
        reply = _command(client, inbox, args, signed)
        print(json.dumps(reply, indent=2, default=str))
        if not reply.get("ok"):
            shown = redact_url(args.broker)
            print(
                f"error: {args.device} refused: {reply.get('error')} (via {shown})", file=sys.stderr
            )
            return 1
        # The device runs what the instruction names now; the retained desired state must say so
        # too, or it keeps naming the version left behind: fleet status shows that update as
        # pending forever, and the device refuses it again at every restart. It grants nothing
        # (no authorization): the device already runs it, and nothing can replay it.
        _set_desired(client, args, model, generation, None)
    return 0


def _sign(signer: Any, args: argparse.Namespace, model: Any, generation: int, leaves: Any) -> Any:
    from cloud_sync.authority import sign_rollback

    return sign_rollback(
        signer,
        args.device,
        model,
        generation=generation,
        leaves=leaves,
        rollout=args.rollout,
        expires_in_s=args.expires_in,
    )


def _device_now(
    client: Any, inbox: queue.Queue[tuple[str, bytes]], args: argparse.Namespace
) -> tuple[int, Any]:
    """The generation to sign (``--generation``, else one above the device's retained desired
    state and the last desired state its status says it applied), so the device and a
    controller see the rollback as newer than the rollout it undoes; and what its retained
    status says it runs (what the instruction leaves; None when unknown)."""
    from cloud_sync.protocol import Desired, Status, Topics

    topics = Topics(args.prefix)
    desired, status = topics.desired(args.device), topics.status(args.device)
    marker = f"{args.prefix}/{args.device}/replies/rollback-{uuid.uuid4().hex[:12]}"
    # The broker sends a topic's retained message at its subscription, before it handles
    # anything we send later: once our own marker comes back, whatever was retained has come.
    client.client.subscribe([(desired, 1), (status, 1), (marker, 1)])
    client.publish(marker, b"marker")
    deadline = time.monotonic() + args.timeout
    retained: dict[str, bytes] = {}
    while time.monotonic() < deadline:
        try:
            got, payload = inbox.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            break
        if got in (desired, status):
            retained[got] = payload
        elif got == marker:
            client.client.unsubscribe([desired, status, marker])
            break
    seen = [0]
    runs = None
    # None, or a desired state nobody can act on: ours replaces it.
    with contextlib.suppress(ValueError):
        seen.append(Desired.model_validate_json(retained.get(desired, b"")).generation)
    try:
        now = Status.model_validate_json(retained.get(status, b""))
        runs = now.model
        seen.append(now.applied.generation if now.applied is not None else 0)
    except ValueError:
        pass
    generation = args.generation if args.generation is not None else max(seen) + 1
    return int(generation), runs


def _set_desired(
    client: Any, args: argparse.Namespace, model: Any, generation: int, signed: Any
) -> int:
    from cloud_sync.protocol import Desired, Topics

    desired = Desired(
        model=model,
        url=args.url,
        rollout=args.rollout,
        generation=generation,
        rollback=True,
        authorization=signed,
    )
    payload = desired.model_dump_json(exclude_none=True).encode()
    client.publish(Topics(args.prefix).desired(args.device), payload, retain=True)
    kind = "signed rollback" if signed is not None else "what the rollback installed"
    print(
        f"set the desired state of {args.device}: {model.name} v{model.version} "
        f"(generation {generation}, {kind})",
        file=sys.stderr if signed is None else sys.stdout,
    )
    return 0


def _command(
    client: Any, inbox: queue.Queue[tuple[str, bytes]], args: argparse.Namespace, signed: Any
) -> dict[str, Any]:
    from cloud_sync.protocol import RollbackCommand, Topics
    from modelpack.errors import BrokerError

    # Under the device's own replies/: the broker's ACL lets the device write only there.
    reply_to = f"{args.prefix}/{args.device}/replies/rollback-{uuid.uuid4().hex[:12]}"
    command = RollbackCommand(
        id=f"rollback-{uuid.uuid4().hex}",
        reply_to=reply_to,
        name=args.name,
        version=args.version,
        url=args.url,
        authorization=signed,
        expires_at=time.time() + args.timeout,
    )
    client.client.subscribe(reply_to, qos=1)
    time.sleep(0.2)  # the SUBACK before the command, so the reply cannot be missed
    topic = Topics(args.prefix).cmd(args.device, "rollback")
    client.publish(topic, command.model_dump_json(exclude_none=True).encode())
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            got, payload = inbox.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            break
        try:
            doc = untrusted_json.loads(payload)
        except untrusted_json.NotJsonError:  # not JSON, too deep, a 5,000-digit number
            continue
        if got == reply_to and isinstance(doc, dict) and doc.get("id") == command.id:
            return doc
    raise BrokerError(f"{args.device} did not answer the rollback within {args.timeout:.0f}s")
