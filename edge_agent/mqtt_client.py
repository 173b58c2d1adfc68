"""The paho-mqtt client the session runs: its protocol, credentials and TLS (the last will is
``last_will``'s); what a TLS broker that drops us before CONNACK most likely means; and whether
the broker acknowledged a message by a deadline.

Kept apart from ``session`` (which keeps the connection up) because it is what a device's
configuration decides once, at the start: MQTT 5, or MQTT 3.1.1 with a persistent session;
messages acknowledged by hand (``manual_ack``, see ``session``); reconnects left to the
session, never to paho.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.config import AgentConfig

SESSION_EXPIRY_S = 3600  # MQTT 5: how long the broker keeps our session while we are away


def _no_delay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    """Nagle's algorithm would hold a reply behind our PUBACK until a delayed ACK: 40 ms."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(cfg: AgentConfig, client_id: str) -> tuple[mqtt.Client, ssl.SSLContext | None]:
    """The client, and its TLS context (kept: a certificate rotation loads the new chain into
    it). The session sets the callbacks and the last will (before each connect)."""
    if cfg.protocol == "5":
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=True,
        )
    else:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
            manual_ack=True,
        )
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.password)
    tls = None
    if cfg.tls:
        tls = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        if cfg.cert_file:
            tls.load_cert_chain(str(cfg.cert_file), str(cfg.key_file) if cfg.key_file else None)
        client.tls_set_context(tls)
    client.max_inflight_messages_set(100)
    client.on_socket_open = _no_delay
    return client, tls


def connect(client: mqtt.Client, cfg: AgentConfig) -> None:
    """Open the connection and send CONNECT, keeping the broker's session (clean start off);
    raises OSError or ssl.SSLError when the broker cannot be reached."""
    if cfg.protocol == "5":
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        client.connect(
            cfg.broker_host, cfg.broker_port, cfg.keepalive, clean_start=False, properties=props
        )
    else:
        client.connect(cfg.broker_host, cfg.broker_port, cfg.keepalive)


def certificate_problem(cert_file: Path) -> str:
    """Why a broker that takes our CA may drop us before CONNACK: our certificate."""
    import datetime as dt

    from cloud_sync.fleet_ca import load_cert
    from modelpack.errors import ConfigError

    try:
        cert = load_cert(cert_file.read_bytes())
    except (OSError, ConfigError) as exc:
        return f"the client certificate {cert_file} cannot be read: {exc}"
    serial, until = format(cert.serial_number, "x"), cert.not_valid_after_utc
    when = until.isoformat(timespec="seconds")
    if until <= dt.datetime.now(dt.UTC):
        return (
            f"the device certificate {serial} expired at {when}: enroll again with a new "
            "claim token (--enroll TOKEN)"
        )
    return (
        f"the broker dropped the connection before accepting it: the device certificate "
        f"{serial} (valid until {when}) may be revoked"
    )


def acknowledged(info: mqtt.MQTTMessageInfo, deadline: float) -> bool:
    """Whether the broker acknowledged it by ``deadline`` (monotonic). Not paho's
    ``wait_for_publish``: it raises at once for a message first published while the connection
    was down (rc NO_CONN), which paho sends all the same once connected."""
    with info._condition:
        return info._condition.wait_for(
            lambda: info._published, max(0.0, deadline - time.monotonic())
        )
