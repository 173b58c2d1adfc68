from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import Mosquitto, MotoS3

DEVICE_PASSWORDS = {"admin": "admin-secret", "dev-a": "pw-a", "dev-b": "pw-b"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A plain Mosquitto on a free loopback port, shared by the session."""
    mosq = Mosquitto(workdir=tmp_path_factory.mktemp("mosquitto")).start()
    yield mosq
    mosq.stop()


@pytest.fixture(scope="session")
def auth_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """Mosquitto with a password file and an ACL confining each device to its own topics."""
    mosq = Mosquitto(
        workdir=tmp_path_factory.mktemp("mosquitto-auth"), users=DEVICE_PASSWORDS
    ).start()
    yield mosq
    mosq.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker for one test alone, which it may kill -9 and restart."""
    mosq = Mosquitto(workdir=tmp_path / "mosquitto").start()
    yield mosq
    mosq.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3]:
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: MotoS3) -> str:
    """A new, empty bucket on the moto server for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)  # type: ignore[attr-defined]
    return name


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic prefix, so tests on one broker never hear each other."""
    return f"t{uuid.uuid4().hex[:10]}"
