from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent import REPO, AgentProcess, Client, ModuleAgent, make_pack
from tests.support.fleet import wait_versions
from tests.support.services import Mosquitto, MotoS3, SmallPacketMosquitto, free_port, wait_for_port
from tests.support.sim import Simulated, publish_v1_v2

DEVICE_PASSWORDS = {
    "operator": "operator-secret",
    "controller": "controller-secret",
    "sync": "sync-secret",
    "dev-a": "pw-a",
    "dev-b": "pw-b",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _compiled_sources() -> None:
    """The repository's modules compiled once, before the processes the tests start import them.

    Under ``PYTHONDONTWRITEBYTECODE`` (set on the CI machine) no process writes a ``.pyc``, so
    every agent, CLI run and ``bentoml serve`` compiled each module of ours it imported again,
    a tenth of a second or more a start, hundreds of starts a run. They still read a fresh one
    (py_compile writes it whatever that variable says, atomically); a stale one is recompiled
    in memory as before."""
    import compileall

    ours = ("modelpack", "optimize", "bentos", "edge_agent", "cloud_sync", "edgebento", "tools")
    for folder in (*ours, "benchmarks", "tests/support"):
        compileall.compile_dir(REPO / folder, quiet=2, workers=1)


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


@pytest.fixture
def small_broker(tmp_path: Path) -> Iterator[SmallPacketMosquitto]:
    """A broker of its own for one test that drops any client sending a packet over 16 KiB
    (``max_packet_size``; MQTT 3.1.1 clients are not told)."""
    broker = SmallPacketMosquitto(workdir=tmp_path / "mosquitto").start()
    yield broker
    broker.stop()


@pytest.fixture(name="pack_v1")
def pack_v1_fixture(tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]) -> Path:
    return make_pack(tmp_path / "v1", mlp_model, keys[0], 1)


@pytest.fixture(name="pack_v2")
def pack_v2_fixture(tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]) -> Path:
    """The same model as version 2: an update that passes every check."""
    return make_pack(tmp_path / "v2", mlp_model, keys[0], 2)


@pytest.fixture(name="agent_factory")
def agent_factory_fixture(
    broker: Mosquitto, tmp_path: Path, keys: tuple[Path, Path], topic_prefix: str
) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def start(**kwargs: Any) -> AgentProcess:
        kwargs.setdefault("broker", broker)
        kwargs.setdefault("data_dir", tmp_path / "agent")
        kwargs.setdefault("trust", keys[1])
        kwargs.setdefault("prefix", topic_prefix)
        agent = AgentProcess(**kwargs).start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()


@pytest.fixture(scope="module")
def module_agent(
    broker: Mosquitto,
    tmp_path_factory: pytest.TempPathFactory,
    mlp_model: Path,
    keys: tuple[Path, Path],
) -> Iterator[ModuleAgent]:
    """One agent for a module's tests that each send their own requests, on a connection or a
    reply topic of their own, and check only the answers to them: none reads what another left
    (counters, caches), so they share a start instead of paying one each (about 0.8 s)."""
    work = tmp_path_factory.mktemp("module-agent")
    port = free_port()
    config = work / "agent.toml"
    config.write_text(f"[agent]\nmetrics_port = {port}\n")
    prefix = f"t{uuid.uuid4().hex[:10]}"
    pack = make_pack(work / "v1", mlp_model, keys[0], 1)
    agent = AgentProcess(
        broker, work / "agent", keys[1], prefix, pack=pack, args=("--config", str(config))
    ).start()
    try:
        wait_for_port(port)
        yield ModuleAgent(agent, prefix, port)
    finally:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()


@pytest.fixture(name="client")
def client_fixture(broker: Mosquitto) -> Iterator[Client]:
    c = Client(broker)
    yield c
    c.close()


@pytest.fixture
def fleet(
    broker: Mosquitto,
    tmp_path: Path,
    keys: tuple[Path, Path],
    topic_prefix: str,
    mlp_model: Path,
    s3_server: MotoS3,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., list[AgentProcess]]]:
    """Publish v1 and v2 (of ``v2_model`` when given; golden samples it cannot reproduce with
    ``broken_v2``) to an S3 registry and start one agent per device serving v1."""
    from cloud_sync.registry import Registry
    from cloud_sync.store import open_store

    env = {"AWS_ENDPOINT_URL": s3_server.endpoint_url}
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store_url = f"s3://{s3_bucket}/fleet"
    agents: list[AgentProcess] = []

    def start(
        devices: list[str], broken_v2: bool = False, v2_model: Path | None = None
    ) -> list[AgentProcess]:
        registry = Registry(open_store(store_url))
        v1 = make_pack(tmp_path / "v1", mlp_model, keys[0], 1)
        registry.publish(v1, key=keys[0])
        v2 = make_pack(tmp_path / "v2", v2_model or mlp_model, keys[0], 2, wrong_golden=broken_v2)
        registry.publish(v2, key=keys[0])
        for device in devices:
            agent = AgentProcess(
                broker,
                tmp_path / device,
                keys[1],
                topic_prefix,
                device,
                v1,
                ("--store", store_url),
                env,
            )
            agents.append(agent.start())
        wait_versions(broker, topic_prefix, dict.fromkeys(devices, 1))
        return agents

    start.store_url = store_url  # type: ignore[attr-defined]
    yield start
    for agent in agents:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait()


@pytest.fixture(name="sim_store_url")
def sim_store_url_fixture(tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]) -> str:
    """A directory store holding the MLP as tiny v1 and v2, for the simulated fleets."""
    url = str(tmp_path / "store")
    publish_v1_v2(url, tmp_path, mlp_model, keys[0])
    return url


@pytest.fixture(name="simulate")
def simulate_fixture(
    broker: Mosquitto, topic_prefix: str, keys: tuple[Path, Path], tmp_path: Path
) -> Iterator[Callable[..., Simulated]]:
    """Starts ``simulate(devices, first, *flags)`` simulated devices; stops them after the test."""
    started: list[Simulated] = []

    def start(devices: int, first: int = 0, *flags: str) -> Simulated:
        log = tmp_path / f"sim-{first}.log"
        sim = Simulated(broker, topic_prefix, keys[1], log, devices, first, flags)
        started.append(sim.start())
        return sim

    yield start
    for sim in started:
        sim.stop()
