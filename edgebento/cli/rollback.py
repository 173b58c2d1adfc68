"""``edgebento rollback``: sign a rollback instruction and send it to a device.

A device goes back to a version at or below the highest it installed only with a signed,
unexpired ``RollbackInstruction`` for it and that exact version. This signs one with the
publisher's key (the one the device trusts for packs) and sends it as a ``rollback`` command
(the default: the reply is printed), as a retained desired state (``--desired``, for a device
that is offline now), or prints it (``--print``) for another tool to deliver.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from typing import Any

from edgebento.cli.pack import duration_s


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
    rollback.add_argument("--rollout", help="the rollout this rollback belongs to")
    rollback.add_argument("--broker", help="mqtt://[user:pass@]host:port")
    rollback.add_argument("--prefix", default="edgebento", help="topic prefix (default edgebento)")
    rollback.add_argument(
        "--desired", action="store_true",
        help="set the retained desired state instead of sending a command",
    )  # fmt: skip
    rollback.add_argument("--generation", type=int, default=None, help="desired generation")
    rollback.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (60)")
    rollback.add_argument("--print", action="store_true", help="print the signed JSON only")
    rollback.set_defaults(func=cmd_rollback)


def cmd_rollback(args: argparse.Namespace) -> int:
    from cloud_sync.authority import sign_rollback
    from cloud_sync.protocol import ModelRef
    from cloud_sync.redact import redact_url
    from modelpack.errors import ConfigError
    from modelpack.signing import load_private_key

    model = ModelRef(name=args.name, version=args.version)
    signed = sign_rollback(
        load_private_key(args.key),
        args.device,
        model,
        rollout=args.rollout,
        expires_in_s=args.expires_in,
    )
    if args.print:
        print(signed.model_dump_json())
        return 0
    if not args.broker:
        raise ConfigError("--broker is needed to send the rollback (or --print it)")
    if args.desired:
        return _set_desired(args, model, signed)
    reply = _command(args, signed)
    print(json.dumps(reply, indent=2, default=str))
    shown = redact_url(args.broker)
    if not reply.get("ok"):
        print(f"error: {args.device} refused: {reply.get('error')} (via {shown})", file=sys.stderr)
        return 1
    return 0


def _set_desired(args: argparse.Namespace, model: Any, signed: Any) -> int:
    from cloud_sync.mqtt import CloudClient
    from cloud_sync.protocol import Desired, Topics

    desired = Desired(
        model=model,
        url=args.url,
        rollout=args.rollout,
        generation=args.generation if args.generation is not None else int(time.time()),
        rollback=True,
        authorization=signed,
    )
    with CloudClient(args.broker) as client:
        payload = desired.model_dump_json(exclude_none=True).encode()
        client.publish(Topics(args.prefix).desired(args.device), payload, retain=True)
    print(
        f"set the desired state of {args.device}: {model.name} v{model.version} (signed rollback)"
    )
    return 0


def _command(args: argparse.Namespace, signed: Any) -> dict[str, Any]:
    import queue

    from cloud_sync.mqtt import CloudClient
    from cloud_sync.protocol import RollbackCommand, Topics
    from modelpack.errors import BrokerError

    replies: queue.Queue[bytes] = queue.Queue()
    reply_to = f"{args.prefix}-replies/rollback-{uuid.uuid4().hex[:12]}"
    command = RollbackCommand(
        id=f"rollback-{uuid.uuid4().hex}",
        reply_to=reply_to,
        name=args.name,
        version=args.version,
        url=args.url,
        authorization=signed,
        expires_at=time.time() + args.timeout,
    )

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        replies.put(bytes(msg.payload))

    with CloudClient(args.broker, on_message=on_message) as client:
        client.client.subscribe(reply_to, qos=1)
        time.sleep(0.2)  # the SUBACK before the command, so the reply cannot be missed
        topic = Topics(args.prefix).cmd(args.device, "rollback")
        client.publish(topic, command.model_dump_json(exclude_none=True).encode())
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            try:
                doc = json.loads(replies.get(timeout=max(0.05, deadline - time.monotonic())))
            except queue.Empty:
                break
            if isinstance(doc, dict) and doc.get("id") == command.id:
                return doc
    raise BrokerError(f"{args.device} did not answer the rollback within {args.timeout:.0f}s")
