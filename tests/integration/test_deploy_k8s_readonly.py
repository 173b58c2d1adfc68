"""The built bento starts under the constraints ``deployment.yaml`` puts on it, reproduced here.

In a private mount namespace (``unshare -m``), the bento is laid out where the image has it
(``/home/bentoml/bento``), every mount is made read-only (``readOnlyRootFilesystem``), and each
emptyDir of the manifest becomes a fresh tmpfs at its ``mountPath``. Then the container's
command runs with the manifest's environment and the image's, and must answer ``/predict``.
The control drops the emptyDirs: with nothing writable BentoML cannot start, so the run above
proves those mounts are what it needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from bentos.deploy_k8s import K8sOptions, write_manifests
from modelpack import read_samples
from tests.support.agent import make_pack
from tests.support.containers import stop_tree
from tests.support.services import LOOPBACK, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOME = "/home/bentoml"  # BENTOML_HOME of the image; the bento is BENTO_PATH below it
IMAGE_ENV = {"BENTOML_HOME": f"{HOME}/", "BENTO_PATH": f"{HOME}/bento", "HOME": HOME}

# Every mount read-only but the kernel's own (/proc, /sys, /dev stay as a container has them).
# The image has its Python outside /home and /tmp; this host's venv and checkout may be under
# them (a clone in /tmp): each tmpfs laid over one is given them back, read-only, from a
# directory descriptor opened in the namespace before (KEEP: paths, parents first).
READ_ONLY_ROOT = r"""
set -eu
kept=()
while IFS= read -r path; do exec {fd}<"$path"; kept+=("$fd=$path"); done <<< "$KEEP"
reveal() {
  for entry in "${kept[@]}"; do
    fd=${entry%%=*} path=${entry#*=}
    case "$path/" in "$1"/*)
      mkdir -p "$path"
      mount -c --bind "/proc/self/fd/$fd" "$path"
      mount -o remount,bind,ro "$path" ;;
    esac
  done
}
mount -t tmpfs -o size=16m tmpfs /home
reveal /home
mkdir -p /home/bentoml
mount --bind "$LAYOUT" /home/bentoml
for mp in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do
  case "$mp" in /proc*|/sys*|/dev*) ;; *) mount -o remount,bind,ro "$mp" 2>/dev/null || true ;; esac
done
for dir in $EMPTY_DIRS; do mount -t tmpfs -o size=256m tmpfs "$dir"; reveal "$dir"; done
for probe in /home/bentoml/probe /home/bentoml/bento/probe /probe "$VENV/probe"; do
  if touch "$probe" 2>/dev/null; then echo "still writable: $probe" >&2; exit 97; fi
done
for entry in "${kept[@]}"; do fd=${entry%%=*}; exec {fd}<&-; done
cd /home/bentoml/bento
exec "$@"
"""


def _can_unshare() -> bool:
    done = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True
    )
    return done.returncode == 0


@pytest.fixture(scope="module")
def layout(
    tmp_path_factory: pytest.TempPathFactory, mlp_model: Path, keys: tuple[Path, Path]
) -> tuple[Path, dict[str, Any]]:
    """(the image's /home/bentoml with the built bento in it, the manifest's container spec)."""
    if not _can_unshare():
        pytest.skip("unshare -m is not permitted here: no mount namespace to make read-only")
    work = tmp_path_factory.mktemp("readonly")
    pack = make_pack(work / "tiny", mlp_model, keys[0], version=1)
    env = {**os.environ, "BENTOML_HOME": str(work / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    env["EDGEBENTO_MODEL"] = "tiny:v1"
    for cmd in (
        [str(BIN / "edgebento"), "bento", "import", str(pack), "--pub", str(keys[1])],
        [str(BIN / "bentoml"), "build", "."],
    ):
        subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    (built,) = (work / "bentoml" / "bentos" / "edgebento").glob("*/bento.yaml")  # one build
    home = work / "home"
    home.mkdir()
    shutil.copytree(built.parent, home / "bento", symlinks=True)
    # `bentoml containerize` puts the bento's models in the build context's models/, beside it.
    shutil.copytree(work / "bentoml" / "models", home / "bento" / "models", symlinks=True)
    write_manifests(K8sOptions(bento="edgebento:test", model="tiny:v1"), work / "deploy")
    deployment = yaml.safe_load((work / "deploy" / "k8s" / "deployment.yaml").read_text())
    return home, {"pod": deployment["spec"]["template"]["spec"], "pack": pack}


def _start(home: Path, pod: dict[str, Any], empty_dirs: list[str], port: int, log: Path) -> Any:
    container = pod["containers"][0]
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "BENTOML_DO_NOT_TRACK": "true",
        **IMAGE_ENV,
        **{e["name"]: e["value"] for e in container["env"]},
    }
    shell = {
        "LAYOUT": str(home),
        "EMPTY_DIRS": " ".join(empty_dirs),
        "VENV": str(BIN.parent),
        # What the server runs from on this host (an editable install's code is the checkout).
        "KEEP": "\n".join(sorted({str(REPO), str(BIN.parent)}, key=len)),
    }
    # The container's args, after the image's entrypoint: `bentoml serve ... $BENTO_PATH`.
    args = [*container["args"], "--host", LOOPBACK, "--port", str(port), IMAGE_ENV["BENTO_PATH"]]
    args[0] = str(BIN / args[0])
    return subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "bash", "-c", READ_ONLY_ROOT, "sh", *args],
        env={**env, **shell},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _ready(url: str, process: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def test_the_bento_serves_with_a_read_only_root_and_the_manifests_empty_dirs(
    layout: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    home, spec = layout
    pod = spec["pod"]
    volumes = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    empty_dirs = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    assert {m["name"] for m in pod["containers"][0]["volumeMounts"]} <= volumes
    port, log = free_port(), tmp_path / "serve.log"
    server = _start(home, pod, empty_dirs, port, log)
    try:
        url = f"http://{LOOPBACK}:{port}"
        assert _ready(url, server, 120), log.read_text()[-3000:]
        samples = read_samples(spec["pack"] / "samples.npz")
        reply = httpx.post(url + "/predict", json={"inputs": {"x": samples.inputs["x"].tolist()}})
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == {"name": "tiny", "version": 1}
        np.testing.assert_allclose(
            reply.json()["outputs"]["probs"], samples.outputs["probs"], rtol=1e-5
        )
        assert httpx.get(url + "/metrics").status_code == 200  # the multiprocess files work
    finally:
        stop_tree(server)
    assert "Read-only file system" not in log.read_text()


def test_without_the_empty_dirs_bentoml_cannot_start(
    layout: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """The control: the same read-only root with no emptyDir, and the server never comes up."""
    home, spec = layout
    port, log = free_port(), tmp_path / "serve.log"
    server = _start(home, spec["pod"], [], port, log)
    try:
        assert not _ready(f"http://{LOOPBACK}:{port}", server, 60)
    finally:
        stop_tree(server)
    text = log.read_text()
    assert "still writable" not in text  # the constraint held; it was not a set-up failure
    assert "Read-only file system" in text or "No usable temporary directory" in text, text[-2000:]
