"""The edge agent's memory: RSS, USS and PSS of a running agent, where it goes by import, and the
floor any agent with the same runtime, MQTT client, outbox and session cannot go below."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# What the agent process imports, in order; each row adds one layer (measured in a fresh process).
# cryptography is not one: the agent checks signatures in a child (modelpack.signature_child).
LAYERS = [
    (
        "python (and the placeholders of edge_agent.memory.defer_unused_imports)",
        "from edge_agent.memory import defer_unused_imports\ndefer_unused_imports()",
    ),
    ("+ numpy", "import numpy"),
    ("+ onnxruntime", "import onnxruntime"),
    ("+ paho-mqtt (and ssl)", "import paho.mqtt.client"),
    ("+ pydantic", "import pydantic"),
    ("+ modelpack (its pydantic models built)", "import modelpack"),
    ("+ edge_agent", "import edge_agent.agent, edge_agent.cli"),
    (
        "+ the digits pack verified (in a child) and its session loaded",
        "from modelpack import Predictor, PredictorOptions, load_pack, signing\n"
        "from pathlib import Path\n"
        "signing.verify_out_of_process()\n"
        "p = Predictor.from_pack(load_pack(Path({pack!r}), [Path({pub!r})], check_model=False),"
        " PredictorOptions(intra_op_threads=1))",
    ),
]
# How deploy/systemd/edge-agent.service starts the agent: without docstrings and asserts (-OO;
# 2.8 MB of anonymous memory here, most of it numpy's and pydantic's docstrings) and with two
# malloc arenas. Bytecode is cached as after an install (pip compiles it; for -OO the unit's
# install step does), not compiled at each start: each run writes to and reads from one prefix.
AS_SHIPPED_FLAGS = ("-OO",)
AS_SHIPPED_ENV = {"MALLOC_ARENA_MAX": "2"}


def bytecode_cache(work: Path) -> dict[str, str]:
    """The environment that gives every process of a run the same cached bytecode ("": unset)."""
    return {"PYTHONPYCACHEPREFIX": str(work / "pycache"), "PYTHONDONTWRITEBYTECODE": ""}


# RSS, and the two figures that do not count shared library pages in full: USS (pages only this
# process holds) and PSS (shared pages divided among the processes sharing them).
_PROBE = """
fields = {}
for line in open('/proc/self/smaps_rollup'):
    parts = line.split()
    if len(parts) == 3 and parts[2] == 'kB':
        fields[parts[0].rstrip(':')] = int(parts[1])
uss = fields.get('Private_Clean', 0) + fields.get('Private_Dirty', 0)
print(fields['Rss'], uss, fields['Pss'], fields['Anonymous'])
"""


def _memory_of_imports(
    code: str,
    argv: list[str] | None = None,
    flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> dict[str, float]:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    out = subprocess.run(
        [sys.executable, *flags, "-c", code + "\n" + _PROBE, *(argv or [])],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env={k: v for k, v in environ.items() if v != ""},
    )
    rss, uss, pss, anon = (int(v) / 1024 for v in out.stdout.split()[-4:])
    return {
        "rss_mb": round(rss, 1),
        "uss_mb": round(uss, 1),
        "pss_mb": round(pss, 1),
        "anonymous_mb": round(anon, 1),
    }


# The least any agent that does what the issue asks can hold: the runtime, the MQTT client and the
# SQLite outbox, the model's session loaded and run, connected and subscribed, and no edgebento
# code at all. Then the same with pydantic and one model, which the house style requires for
# everything that arrives over MQTT.
_FLOOR = """
import sqlite3, sys, time
import numpy, onnxruntime as ort
import paho.mqtt.client as mqtt
options = ort.SessionOptions()
options.intra_op_num_threads = options.inter_op_num_threads = 1
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
for _ in range(100):
    session.run(None, {"x": numpy.zeros((1, 64), numpy.float32)})
outbox = sqlite3.connect(sys.argv[3])
outbox.execute("pragma journal_mode=wal")
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="floor", protocol=mqtt.MQTTv5)
client.connect("127.0.0.1", int(sys.argv[2]))
client.loop_start()
client.subscribe("floor/#", 1)
time.sleep(1)
"""
_WITH_PYDANTIC = """
from pydantic import BaseModel
class Request(BaseModel):
    id: str
    inputs: dict[str, list[list[float]]]
Request.model_validate_json('{"id": "a", "inputs": {"x": [[1.0]]}}')
"""


def rss_floor(
    model: Path,
    broker_port: int,
    work: Path,
    flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """The floor, and the same with pydantic and one model: the difference is what an agent
    that parsed its messages without pydantic would not hold."""
    argv = [str(model), str(broker_port), str(work / "floor.db")]
    cache = bytecode_cache(work)
    for code in (_FLOOR, _FLOOR + _WITH_PYDANTIC):  # the first run writes the bytecode
        _memory_of_imports(code, argv, flags, {**cache, **(env or {})})
    return {
        name: _memory_of_imports(code, argv, flags, {**cache, **(env or {})})
        for name, code in (
            ("runtime_mqtt_outbox_session", _FLOOR),
            ("plus_pydantic_one_model", _FLOOR + _WITH_PYDANTIC),
        )
    }


def rss_breakdown(
    pack: Path, pub: Path, flags: Sequence[str] = (), env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    code, previous = "", {"rss_mb": 0.0, "uss_mb": 0.0, "anonymous_mb": 0.0}
    for label, line in LAYERS:
        code += line.format(pack=str(pack), pub=str(pub)) + "\n"
        _memory_of_imports(code, flags=flags, env=env)  # the first run writes the bytecode
        mem = _memory_of_imports(code, flags=flags, env=env)
        rows.append(
            {
                "layer": label,
                **mem,
                "adds_rss_mb": round(mem["rss_mb"] - previous["rss_mb"], 1),
                "adds_uss_mb": round(mem["uss_mb"] - previous["uss_mb"], 1),
                "adds_anonymous_mb": round(mem["anonymous_mb"] - previous["anonymous_mb"], 1),
            }
        )
        previous = mem
    return rows


def agent_rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / (1 << 20)


def agent_private_mb(pid: int) -> dict[str, float]:
    """USS (memory only this process holds), PSS, and anonymous memory: what the process itself
    allocated. RSS and USS move by +-15 MB with how much of the shared libraries the page cache
    maps in; anonymous memory does not depend on that, so it is the figure to compare trees by."""
    import psutil

    info = psutil.Process(pid).memory_full_info()
    return {
        "uss": round(info.uss / (1 << 20), 1),
        "pss": round(info.pss / (1 << 20), 1),
        "anonymous": round(_smaps_rollup(pid)["Anonymous"] / 1024, 1),
    }


def _smaps_rollup(pid: int) -> dict[str, int]:
    """The kernel's totals for the process, in kB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            fields[parts[0].rstrip(":")] = int(parts[1])
    return fields


# ONNX Runtime's CPU arena on and off (issue 22 item 5 asked for it): anonymous memory after a
# session is loaded and run 50 times, in a fresh process each, as the agent's sessions run.
_ARENA = """
import sys
import numpy, onnxruntime as ort
options = ort.SessionOptions()
options.intra_op_num_threads = options.inter_op_num_threads = 1
options.enable_cpu_mem_arena = sys.argv[2] == "on"
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
x = numpy.zeros((int(sys.argv[3]), int(sys.argv[4])), numpy.float32)
for _ in range(50):
    session.run(None, {"x": x})
"""


def cpu_arena(
    models: dict[str, tuple[Path, int, int]], work: Path, flags: Sequence[str] = ()
) -> dict[str, dict[str, float]]:
    """For each model (path, batch, inputs): anonymous MB with the arena on and off."""
    env = {**bytecode_cache(work), "MALLOC_ARENA_MAX": "2"}
    out: dict[str, dict[str, float]] = {}
    for name, (model, batch, width) in models.items():
        figures = {}
        for arena in ("on", "off", "on", "off"):  # alternated; the later of each is kept
            argv = [str(model), arena, str(batch), str(width)]
            figures[f"arena_{arena}"] = _memory_of_imports(_ARENA, argv, flags, env)["anonymous_mb"]
        out[name] = figures
    return out
