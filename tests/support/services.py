"""Real services on free loopback ports: Mosquitto (from edgebento.localservices) and moto's S3."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgebento.localservices import (
    LOOPBACK,
    Mosquitto,
    free_port,
    mosquitto_binary,
    running_mosquitto,
    wait_for_port,
)

__all__ = [
    "LOOPBACK",
    "Mosquitto",
    "MotoS3",
    "SmallPacketMosquitto",
    "VolatileMosquitto",
    "free_port",
    "mosquitto_binary",
    "running_mosquitto",
    "wait_for_port",
]


@dataclass
class MotoS3:
    """moto's S3 API server on a free loopback port, used through real boto3 calls."""

    port: int = field(default_factory=free_port)
    server: object | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address=LOOPBACK, port=self.port, verbose=False)
        self.server.start()  # type: ignore[attr-defined]
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()  # type: ignore[attr-defined]
            self.server = None

    def client(self) -> object:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@dataclass
class VolatileMosquitto(Mosquitto):
    """Mosquitto as it ships (``persistence false``): a kill -9 loses every message and session
    it held, including what it had already acknowledged with a PUBACK."""

    def _write_config(self) -> Path:
        conf = super()._write_config()
        conf.write_text(conf.read_text().replace("persistence true", "persistence false"))
        return conf


@dataclass
class SmallPacketMosquitto(Mosquitto):
    """A broker that drops any client sending a packet over ``max_packet`` bytes (its
    ``max_packet_size``; AWS IoT Core: 128 KiB). An MQTT 5 client is told the limit in CONNACK;
    an MQTT 3.1.1 client cannot be: its connection is closed with no reason given."""

    max_packet: int = 16384

    def _write_config(self) -> Path:
        conf = super()._write_config()
        conf.write_text(conf.read_text() + f"max_packet_size {self.max_packet}\n")
        return conf
