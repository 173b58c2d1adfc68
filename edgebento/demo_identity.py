"""The demo's identity step (docs/fleet-identity.md), on the fleet's own mTLS broker: a third
device enrolls by claim, a device cannot speak for another (nothing it publishes on dev-2's
topics reaches a subscriber), the certificates the fleet's devices renewed while the story ran,
and the third device revoked: dropped at once while dev-1 and dev-2 stay connected."""

from __future__ import annotations

import json
import queue
import subprocess
import time
from typing import Any

from edgebento.demo_fleet import DEVICES, Fleet, start_agent
from edgebento.demo_mtls import claim
from edgebento.demo_runner import BIN, Demo, console

PREFIX = "edgebento"
THIRD = "dev-3"
# What a device of the fleet tries on another's topics: its status, telemetry and replies (the
# device's own rights, on the wrong device), a command and a desired state (no device's).
FORGED = ("status", "telemetry", "replies/x", "cmd/restart", "desired")


def _watch(fleet: Fleet, devices: tuple[str, ...]) -> tuple[Any, queue.Queue[Any]]:
    """The operator's subscription to every topic of ``devices``."""
    seen: queue.Queue[Any] = queue.Queue()
    client = fleet.client("operator")
    client.on_message = lambda _c, _u, msg: seen.put(msg)
    for device in devices:
        client.subscribe(f"{PREFIX}/{device}/#", 1)
    return client, seen


def _states(seen: queue.Queue[Any], states: dict[str, str], forged: list[str]) -> dict[str, str]:
    while not seen.empty():
        msg = seen.get()
        if b"forged" in msg.payload:
            forged.append(msg.topic)
        if msg.topic.endswith("/status") and msg.payload:
            states[msg.topic.split("/")[1]] = json.loads(msg.payload).get("state", "?")
    return states


def _until(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.3)


def _forge(fleet: Fleet) -> None:
    """A device of the fleet (its own certificate, CN intruder) speaks for dev-2. Each publish
    must have been made and refused by the broker (MQTT 5: PUBACK "Not authorized"): one that
    never connected would show nothing reaching the subscriber for the wrong reason."""
    for topic in FORGED:
        doc = json.dumps({"id": "forged", "device": "dev-2", "state": "online", "forged": True})
        done = subprocess.run(
            ["mosquitto_pub", *fleet.mosquitto_args("intruder"), "-V", "mqttv5", "-q", "1",
             "-t", f"{PREFIX}/dev-2/{topic}", "-m", doc],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if done.returncode != 0 or "Not authorized" not in done.stderr:
            raise RuntimeError(f"the intruder's publish on dev-2/{topic}: {done.stderr.strip()}")


def step_identity(demo: Demo, fleet: Fleet) -> str:
    from cloud_sync.identity_store import IdentityStore
    from cloud_sync.store import open_store

    records = IdentityStore(open_store(str(fleet.store)))
    every = (*DEVICES, THIRD)
    operator, seen = _watch(fleet, every)
    states: dict[str, str] = {}
    forged: list[str] = []
    try:
        token = claim(demo, fleet.store, (THIRD,))[THIRD]
        start_agent(demo, fleet, THIRD, token)
        _until(
            lambda: _states(seen, states, forged).get(THIRD) == "online", "dev-3's enrollment", 90
        )
        _forge(fleet)
        # The intruder's publishes are acknowledged (or refused) before mosquitto_pub exits: a
        # message the operator publishes after them arrives after anything the broker let by.
        operator.publish(f"{PREFIX}/dev-2/replies/after-forge", b"after-forge", 1)
        _until(
            lambda: any(m.payload == b"after-forge" for m in list(seen.queue)),
            "the operator's own message after the forged ones",
            30,
        )
        _states(seen, states, forged)
        if forged:
            raise RuntimeError(f"forged messages reached a subscriber: {forged}")
        console.print(
            f"intruder's publishes on {', '.join(f'dev-2/{t}' for t in FORGED)}: "
            "refused by the broker (Not authorized), nothing reached the subscriber"
        )

        def rotated() -> list[str]:
            return [d for d in DEVICES if (r := records.device(d)) and r.last_rotation]

        _until(lambda: bool(rotated()), "a rotation of a fleet device's certificate", 90)
        demo.run(BIN / "edgebento", "fleet", "identity", "--store", fleet.store)
        pki = fleet.pki
        demo.run(
            BIN / "edgebento", "fleet", "revoke", THIRD, "--store", fleet.store, "--ca", pki.ca,
            "--crl-file", pki.crl, "--broker-pid-file", pki.pid_file, "--broker", fleet.url,
        )  # fmt: skip
        _until(lambda: _states(seen, states, forged).get(THIRD) == "offline", "dev-3 dropped", 15)
        time.sleep(2)  # long enough for a device that was dropped too to send its last will
        if any(_states(seen, states, forged).get(d) == "offline" for d in DEVICES):
            raise RuntimeError(f"another device was dropped: {states}")
    finally:
        operator.disconnect()
        operator.loop_stop()
    return (
        f"dev-3 enrolled by claim; a device's publishes on dev-2's topics reached nobody; "
        f"rotated while the story ran: {', '.join(rotated())}; dev-3 revoked and dropped, "
        "dev-1 and dev-2 stayed online"
    )
