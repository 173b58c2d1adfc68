"""`edgebento fleet aws-policy` (issue 20): the CloudFormation template passes cfn-lint, and its
device policy grants exactly what deploy/mosquitto/acl grants a device, with the thing name in
place of %u."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_sync.aws_policy import THING, cloudformation_template

REPO = Path(__file__).resolve().parents[3]


def _cfn_lint() -> str:
    found = shutil.which("cfn-lint") or str(Path(sys.executable).parent / "cfn-lint")
    if not Path(found).exists():
        pytest.fail("cfn-lint is missing: pip install -e '.[test]'")
    return found


def test_the_template_passes_cfn_lint(tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    done = subprocess.run(
        [sys.executable, "-m", "edgebento", "fleet", "aws-policy", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    lint = subprocess.run([_cfn_lint(), str(out)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def _resources(action: str) -> set[str]:
    doc = cloudformation_template()["Resources"]["DevicePolicy"]["Properties"]["PolicyDocument"]
    found: set[str] = set()
    for statement in doc["Statement"]:
        if action in statement["Action"]:
            for resource in statement["Resource"]:
                found.add(resource["Fn::Sub"].split(":", 6)[-1].split("/", 1)[1])
    return found


def test_the_device_policy_is_the_acl_with_the_thing_name() -> None:
    patterns = [
        line.split(None, 2)[1:]
        for line in (REPO / "deploy" / "mosquitto" / "acl").read_text().splitlines()
        if line.startswith("pattern ")
    ]
    publish, subscribe = _resources("iot:Publish"), _resources("iot:Subscribe")
    receive = _resources("iot:Receive")
    for access, topic in patterns:
        topic = topic.replace("%u", THING)
        if access in ("write", "readwrite"):
            assert topic.replace("#", "*") in publish, topic
        if access in ("read", "readwrite"):
            assert topic.replace("+", "*") in subscribe, topic  # a group: any of them
            assert topic.replace("+", "*").replace("#", "*") in receive, topic
    device_topics = {t for t in publish if t.startswith("edgebento/")}
    written = {t.replace("%u", THING).replace("#", "*") for a, t in patterns if "write" in a}
    assert device_topics == written  # nothing more than the ACL: no desired, no commands
    assert json.dumps(cloudformation_template()).count("${!iot:Connection.Thing.ThingName}")
