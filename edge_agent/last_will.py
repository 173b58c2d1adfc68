"""The last will: the offline status the broker publishes for a device that goes without a word,
bounded so that it never keeps the device off the broker.

paho sends the will inside CONNECT, and a broker with a packet limit (Mosquitto's
``max_packet_size``, AWS IoT Core's 128 KiB) refuses a CONNECT over it by closing the connection,
before any CONNACK: a status grown large (64 groups, a long update message, the shadow's figures:
about 9 KB) would keep the device off such a broker for good. So the will's payload is at most
``WILL_BYTES``: the status whole when it fits; else its essential fields (what the cloud reads of
an offline device: ``schema_version``, ``device``, ``state``, ``boot_id``, ``ts``, ``model``,
``applied``, ``expired``, ``taken_over``, ``groups``) and then each extra that still fits, in order;
``trimmed`` names what was left out or cut. And when the broker's limit is known (said by an MQTT
5 broker in its last CONNACK, set as ``max_packet_bytes``, or learned from a 3.1.1 broker's
drops: ``Session.max_packet``), the whole CONNECT fits it: the will is cut further (the groups,
then ``applied``'s reason, then field by field down to ``device``, ``state``, ``boot_id`` and
``ts``), and when not even that fits, the agent connects with no will rather than not at all.
Either is logged (WARNING) when it starts and when it changes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from edge_agent.packet_limit import longest_fitting

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig

log = logging.getLogger("edge_agent.session")  # one logger for all the connection says

# The will's payload, at most: the essentials of a status fit (a device id of 64, a model
# name of 128; a long reason is cut), and a CONNECT with a short client id and
# credentials fits the smallest packet limit this agent supports (1024, ``max_packet_bytes``).
WILL_BYTES = 768
BARE = ("schema_version", "device", "state", "boot_id", "ts")  # then ``trimmed: ["*"]``
ESSENTIAL = (*BARE, "model", "applied", "expired", "taken_over")  # and as many ``groups`` as fit
EXTRAS = ("identity", "last_update", "outbox", "shadow")  # kept in this order while they fit
# Cut in this order when even the essentials do not fit what the broker's limit leaves (the
# groups go first, one by one from the end, before each of these).
CUTS = ("applied.reason", "applied", "taken_over", "expired", "model")

# The will's topic and the status as JSON fields (``Status.model_dump(mode="json")``), or what
# makes them again before each connect.
WillSource = tuple[str, dict[str, Any]] | Callable[[], tuple[str, dict[str, Any]]]


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def bounded(doc: dict[str, Any], room: int) -> bytes | None:
    """The will's payload from the status ``doc``, at most ``room`` bytes; None when not even
    the bare will fits (``schema_version``, ``device``, ``state``, ``boot_id``, ``ts``)."""
    whole = _dumps(doc)
    if len(whole) <= room:
        return whole
    will = {k: doc[k] for k in ESSENTIAL if k in doc}
    groups = list(doc.get("groups") or [])
    trimmed = [k for k in doc if k not in will and k != "groups"]

    def payload(count: int) -> bytes:
        """The will with the first ``count`` groups (as many as fit), saying what it lacks."""
        said = [*trimmed, "groups"] if count < len(groups) else trimmed
        return _dumps({**will, "groups": groups[:count], "trimmed": said})

    def fitting() -> bytes | None:
        found = payload(longest_fitting(len(groups), lambda n: len(payload(n)) <= room))
        return found if len(found) <= room else None

    if len(payload(len(groups))) <= room:  # the essentials fit: then what else does, in order
        for extra in (k for k in EXTRAS if k in trimmed):
            trimmed.remove(extra)
            will[extra] = doc[extra]
            if len(payload(len(groups))) > room:
                del will[extra]
                trimmed.append(extra)
        return payload(len(groups))
    for cut in CUTS:
        found = fitting()
        if found is not None:
            return found
        field, _, part = cut.partition(".")
        value = will.get(field)
        if part and isinstance(value, dict) and part in value:
            will[field] = {k: v for k, v in value.items() if k != part}
        elif part or field not in will:
            continue  # nothing to cut
        else:
            del will[field]
        trimmed.append(cut)
    found = fitting()
    if found is not None:
        return found
    bare = _dumps({**{k: doc[k] for k in BARE if k in doc}, "trimmed": ["*"]})
    return bare if len(bare) <= room else None


def connect_bytes(client_id: str, topic: str, username: str | None, password: str | None) -> int:
    """An upper bound on the CONNECT's size with a will on ``topic`` and an empty payload: fixed
    header (5), variable header (10), MQTT 5's properties (session expiry) and will properties
    (8), the payload's two-byte length, then each string with its own."""
    strings = [client_id, topic] + [s for s in (username, password) if s is not None]
    return 5 + 10 + 8 + 2 + sum(2 + len(s.encode()) for s in strings)


class LastWill:
    """Sets the will on the client before each connect, within the room the limit leaves."""

    def __init__(self, source: WillSource, client_id: str, cfg: AgentConfig) -> None:
        self.source = source
        self.client_id, self.username, self.password = client_id, cfg.username, cfg.password
        self.said: tuple[str, ...] | None = ()  # what the limit cut, as last logged; None: all

    def set(self, client: mqtt.Client, max_packet: int) -> None:
        """The will as of now (the takeovers counted, the model): within ``WILL_BYTES`` and,
        with the rest of the CONNECT, within ``max_packet``."""
        try:
            topic, doc = self.source() if callable(self.source) else self.source
            overhead = connect_bytes(self.client_id, topic, self.username, self.password)
            room = max_packet - overhead
            payload = bounded(doc, min(WILL_BYTES, room))
        except Exception:  # the will set before stays: a bug here must not stop reconnecting
            log.exception("the last will could not be made again")
            return
        if payload is None:
            client.will_clear()
        else:
            client.will_set(topic, payload, qos=1, retain=True)
        # Logged when the broker's limit cuts more than the budget alone does, once a change.
        cut = room < WILL_BYTES and payload != bounded(doc, WILL_BYTES)
        said = None if payload is None else tuple(json.loads(payload).get("trimmed", ()))
        if cut and said != self.said and payload is None:
            log.warning(
                "connecting with no last will: the broker takes packets of at most %d bytes, "
                "and the CONNECT without a will is up to %d (client id, will topic and "
                "credentials): the cloud will not see this device go offline",
                max_packet,
                overhead,
            )
        elif cut and said != self.said:
            log.warning(
                "the last will is cut to %d bytes to fit the broker's packet limit (%d bytes; "
                "the rest of the CONNECT is up to %d): left out or cut: %s",
                len(payload or b""),
                max_packet,
                overhead,
                ", ".join(said or ()),
            )
        self.said = said if cut else ()
