from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

PROBE = """
import json, sys
from pathlib import Path
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
agent = Agent(AgentConfig(device="d", data_dir=Path(sys.argv[1]), trust=[Path(sys.argv[2])]))
agent.updater.boot(Path(sys.argv[3]))
agent.inference.infer({"inputs": {"x": [[0.0] * 8]}})
heavy = ("bentoml", "tensorflow", "onnx", "boto3", "torch", "prometheus_client")
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
    # onnx would cost ~15 MB: the signature proves the publisher ran onnx.checker.
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
