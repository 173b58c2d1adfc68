"""``edge_agent.memory.defer_unused_imports``: the modules paho-mqtt and pydantic import for
features the agent never uses stay unimported, and work as ever the moment anything uses them.
Each case runs in a fresh interpreter (this one imported them long ago)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

_LOADED = """
def loaded(name):
    return name in sys.modules and type(sys.modules[name]).__name__ != "_Deferred"
"""


def _run(code: str, env: dict[str, str] | None = None) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if k != "PYDANTIC_DISABLE_PLUGINS"}
    done = subprocess.run(
        [sys.executable, "-c", "import json, os, sys\n" + _LOADED + code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**environ, **(env or {})},
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_paho_and_pydantic_models_leave_http_email_and_metadata_unimported() -> None:
    out = _run(
        "from edge_agent.memory import defer_unused_imports\n"
        "defer_unused_imports()\n"
        "import paho.mqtt.client\n"
        "from cloud_sync.protocol import DeployCommand\n"
        "DeployCommand.model_validate({'id': 'a', 'version': 2})\n"
        "names = ('urllib.request', 'http.client', 'email', 'importlib.metadata', 'zipfile')\n"
        "print(json.dumps({n: loaded(n) for n in names}))\n"
    )
    assert out == dict.fromkeys(
        ("urllib.request", "http.client", "email", "importlib.metadata", "zipfile"), False
    )


def test_a_deferred_module_is_the_real_one_at_first_use() -> None:
    out = _run(
        "from edge_agent.memory import defer_unused_imports\n"
        "defer_unused_imports()\n"
        "import urllib.request\n"
        "before = loaded('urllib.request')\n"
        "opener = urllib.request.build_opener\n"  # an attribute: the real module
        "from importlib.metadata import version\n"
        "import importlib.metadata, urllib\n"
        "print(json.dumps({'before': before, 'after': loaded('urllib.request'),\n"
        "    'package': urllib.request is sys.modules['urllib.request'],\n"
        "    'real': type(sys.modules['importlib.metadata']).__name__,\n"
        "    'version': version('pydantic') == __import__('pydantic').VERSION,\n"
        "    'plugins': os.environ.get('PYDANTIC_DISABLE_PLUGINS')}))\n"
    )
    assert out == {
        "before": False,
        "after": True,
        "package": True,
        "real": "module",
        "version": True,
        "plugins": "__all__",
    }


def test_a_forwarded_name_and_an_operators_plugin_setting_still_work() -> None:
    """pydantic binds ``entry_points`` at import: the forwarder imports the real module when
    called. An operator who turns plugins on keeps them."""
    out = _run(
        "from edge_agent.memory import defer_unused_imports\n"
        "defer_unused_imports()\n"
        "from importlib.metadata import entry_points\n"
        "before = loaded('importlib.metadata')\n"
        "found = [e.name for e in entry_points(group='console_scripts')]\n"
        "print(json.dumps({'before': before, 'after': loaded('importlib.metadata'),\n"
        "    'edge-agent': 'edge-agent' in found,\n"
        "    'plugins': os.environ['PYDANTIC_DISABLE_PLUGINS']}))\n",
        env={"PYDANTIC_DISABLE_PLUGINS": "some_plugin"},
    )
    assert out == {"before": False, "after": True, "edge-agent": True, "plugins": "some_plugin"}


def test_threads_that_first_use_a_deferred_module_together_get_one_module() -> None:
    out = _run(
        "import threading\n"
        "from edge_agent.memory import defer_unused_imports\n"
        "defer_unused_imports()\n"
        "import urllib.request\n"
        "placeholder = sys.modules['urllib.request']\n"
        "start, seen = threading.Barrier(8), []\n"
        "def use():\n"
        "    start.wait()\n"
        "    seen.append(placeholder.getproxies.__module__)\n"
        "    seen.append(id(sys.modules['urllib.request']))\n"
        "threads = [threading.Thread(target=use) for _ in range(8)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "print(json.dumps({'values': sorted(set(map(str, seen))), 'n': len(seen)}))\n"
    )
    assert out["n"] == 16
    values = out["values"]
    assert isinstance(values, list) and len(values) == 2 and "urllib.request" in values
