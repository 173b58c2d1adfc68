from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

from edge_agent.heartbeat import Heartbeat
from tests.support.agent import AgentProcess, Client, make_pack, wait_online
from tests.support.services import Mosquitto

REPO = Path(__file__).resolve().parents[3]

PROBE = """
import json, sys
from pathlib import Path
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
agent = Agent(AgentConfig(device="d", data_dir=Path(sys.argv[1]), trust=[Path(sys.argv[2])]))
agent.updater.boot(Path(sys.argv[3]))
agent.inference.infer({"inputs": {"x": [[0.0] * 8]}})
heavy = ("bentoml", "tensorflow", "onnx", "boto3", "torch", "prometheus_client", "psutil", "tarfile")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in heavy)))
"""


def test_a_device_with_a_model_loaded_imports_nothing_heavy(
    tmp_path: Path, signed_pack: Path, keys: tuple[Path, Path]
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "data"), str(keys[1]), str(signed_pack)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    # onnx would cost ~15 MB: the signature proves the publisher ran onnx.checker. psutil (0.9 MB)
    # is not needed for a heartbeat, and tarfile (0.35 MB) only once an archive arrives.
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


SHADOW_PROBE = """
import json, sys
from pathlib import Path
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
def agent(data):
    return Agent(AgentConfig(device="d", data_dir=data, trust=[Path(sys.argv[2])]))
fresh = agent(Path(sys.argv[1]) / "fresh")
out = {"fresh_imports_it": "edge_agent.shadow" in sys.modules, "status": fresh.status().shadow}
runner = fresh.shadow
out["first_use_hooks_it"] = fresh.inference.core.shadow is runner and fresh.shadow is runner
left = Path(sys.argv[1]) / "left"
(left / "shadow" / "copy").mkdir(parents=True)
(left / "shadow" / "copy" / "model.onnx").write_bytes(b"a copy from before a restart")
agent(left)
out["left_copy_kept"] = (left / "shadow").exists()
print(json.dumps(out))
"""


def test_the_shadow_runner_is_built_at_first_use_and_a_copy_left_is_cleared_at_start(
    tmp_path: Path, keys: tuple[Path, Path]
) -> None:
    """``Agent.shadow`` is built when a shadow command first asks for it, and then hooked into
    the serving core; a shadow's copy left by a process that died is still removed at start."""
    done = subprocess.run(
        [sys.executable, "-c", SHADOW_PROBE, str(tmp_path), str(keys[1])],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "fresh_imports_it": False,
        "status": None,
        "first_use_hooks_it": True,
        "left_copy_kept": False,
    }


# What a started agent (no metrics port, no baseline in its pack, not enrolled) must not hold:
# each is imported where it is first used. Prefixes of module names.
NOT_AT_START = (
    "bentoml",
    "tensorflow",
    "torch",
    "onnx",  # onnx itself; onnxruntime is the runtime the agent serves with
    "boto3",
    "botocore",
    "rich",
    "prometheus_client",  # only with a metrics port
    "psutil",
    "tarfile",  # only once an archive arrives
    "edge_agent.http",  # the HTTP endpoint (and edge_agent.http_wire): only with metrics_port
    "edge_agent.metrics",
    "edge_agent.identity",  # x509 and the enrollment protocol: only with an identity of its own
    "cloud_sync.enroll",
    # 1.8 MB: packs' signatures are checked in a child process (modelpack.signature_child),
    # keys are read without it, and x509 is the identity's
    "cryptography",
    "bcrypt",
    "modelpack.baseline",  # drift: only for a pack with a baseline
    "cloud_sync.drift_summary",
    "modelpack.monitor",  # drift's reducers, and shadow's: only for a baseline or a shadow
    "cloud_sync.shadow_figures",  # only once a shadow starts
    "edge_agent.shadow",  # the runner: built at the first shadow command
    "edge_agent.drift_bins",  # drift's bins and windows: only for a pack with a baseline
    "edge_agent.drift_window",
    "tomllib",  # only with a config file
    # What libraries import for what the agent never asks of them (paho-mqtt's proxy lookup,
    # pydantic's plugin scan and secret types, numpy's ndarray.dump, compressed archives):
    # edge_agent.memory.defer_unused_imports keeps them out, 2.2 MB anonymous
    "urllib.request",
    "http.client",
    "email",
    "importlib.metadata",
    "secrets",
    "pickle",
    "gzip",
    "bz2",
    "lzma",
)


def _imported(log: str) -> list[str]:
    """The modules ``-X importtime`` (PYTHONPROFILEIMPORTTIME) saw the process import."""
    return [
        line.rsplit("|", 1)[1].strip()
        for line in log.splitlines()
        if line.startswith("import time:") and "|" in line
    ]


def test_a_started_agent_imports_what_it_uses_only_when_it_uses_it(
    tmp_path: Path, keys: tuple[Path, Path], mlp_model: Path
) -> None:
    """The real ``python -m edge_agent run`` process, through a model load, answered inferences
    and a swap to another version: the modules it never needed were never imported."""
    broker = Mosquitto(workdir=tmp_path / "mosquitto").start()
    v1 = make_pack(tmp_path / "v1", mlp_model, keys[0], 1)
    v2 = make_pack(tmp_path / "v2", mlp_model, keys[0], 2)
    agent = AgentProcess(
        broker, tmp_path / "data", keys[1], "fp", pack=v1, env={"PYTHONPROFILEIMPORTTIME": "1"}
    )
    client = Client(broker)
    try:
        agent.start()
        wait_online(client, "fp", "dev-a", version=1)
        x = [[0.5] * 8]
        for _ in range(3):
            assert client.request("fp/dev-a/infer", {"inputs": {"x": x}})["ok"]
        assert client.request("fp/dev-a/cmd/deploy", {"url": str(v2)}, timeout=60)["ok"]
        assert client.request("fp/dev-a/infer", {"inputs": {"x": x}})["model"]["version"] == 2
        assert agent.stop() == 0
    finally:
        client.close()
        agent.stop()
        broker.stop()
    imported = _imported(agent.output())
    assert "edge_agent.agent" in imported and "onnxruntime" in imported  # the log is complete
    held = sorted(m for m in imported if any(m == p or m.startswith(p + ".") for p in NOT_AT_START))
    assert held == []


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def test_heartbeat_reports_this_process_rss_and_cpu() -> None:
    """The heartbeat reads the kernel's counters; psutil (a test dependency) checks the RSS, and
    the CPU share is bounded by the same counters read just outside and just inside the
    heartbeat's interval: on a busy machine the share is small, and still right."""
    cpu0, t0 = _cpu_s(), time.monotonic()
    beat = Heartbeat()
    cpu1, t1 = _cpu_s(), time.monotonic()
    spin_until = time.process_time() + 0.2
    while time.process_time() < spin_until:  # 0.2 s of CPU on this thread
        pass
    cpu2, t2 = _cpu_s(), time.monotonic()
    sample = beat.sample()
    cpu3, t3 = _cpu_s(), time.monotonic()
    rss = psutil.Process(os.getpid()).memory_info().rss
    assert abs(sample["rss_bytes"] - rss) < 0.1 * rss
    least, most = 100 * (cpu2 - cpu1) / (t3 - t0), 100 * (cpu3 - cpu0) / (t2 - t1)
    assert 0 < least - 0.05 <= sample["cpu_percent"] <= most + 0.05  # rounded to 0.1
    assert sample["threads"] >= 1 and sample["uptime_s"] >= 0


def test_an_idle_interval_reports_little_cpu() -> None:
    beat = Heartbeat()
    beat.sample()
    time.sleep(0.3)
    assert beat.sample()["cpu_percent"] < 20


def test_freed_memory_goes_back_to_the_os_on_glibc() -> None:
    import platform

    from edge_agent.memory import release_freed_memory

    blocks = [bytearray(4096) for _ in range(20000)]  # 80 MB of small heap blocks
    del blocks
    released = release_freed_memory()
    if platform.libc_ver()[0] == "glibc":
        assert released
