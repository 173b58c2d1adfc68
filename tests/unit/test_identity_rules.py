"""deploy/observability/rules/identity.rules.yml: valid, every alert fires and stays quiet in
promtool's unit tests, and every metric it names is one the enrollment service serves."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from tests.support.promtool import assert_promtool_passes, promtool

REPO = Path(__file__).resolve().parents[1].parent
OBS = REPO / "deploy" / "observability"
RULES = OBS / "rules" / "identity.rules.yml"


def _run(*args: str) -> None:
    done = subprocess.run([promtool(), *args], cwd=OBS, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_identity_rules_pass_promtool_and_their_unit_tests() -> None:
    _run("check", "rules", "rules/identity.rules.yml")
    _run("test", "rules", "tests/identity.test.yml")
    tested = yaml.safe_load((OBS / "tests" / "identity.test.yml").read_text())
    fired = {
        case["alertname"]
        for test in tested["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert fired == alerts


def test_the_rules_name_only_metrics_the_enrollment_service_serves(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from cloud_sync.enroll import EnrollmentService
    from cloud_sync.fleet_ca import FleetCA, init_ca
    from cloud_sync.identity_metrics import IdentityCollector
    from cloud_sync.identity_store import IdentityStore
    from cloud_sync.store import open_store

    init_ca(tmp_path / "ca")
    service = EnrollmentService(
        FleetCA.load(tmp_path / "ca"), IdentityStore(open_store(str(tmp_path / "s")))
    )
    service.refusals["bad_csr"] += 1
    registry = CollectorRegistry()
    crl = tmp_path / "ca" / "crl.pem"  # what init_ca wrote: 30 days to its nextUpdate
    registry.register(IdentityCollector(service, crl_file=crl))  # type: ignore[arg-type]
    text = generate_latest(registry).decode()
    assert_promtool_passes(text)
    left = re.search(r"^edgebento_identity_crl_next_update_seconds (\S+)$", text, re.M)
    assert left is not None and 29 * 86400 < float(left.group(1)) <= 30 * 86400
    # A CRL the broker cannot read either counts as past its nextUpdate: the alert fires.
    gone = IdentityCollector(service, crl_file=tmp_path / "missing.pem")  # type: ignore[arg-type]
    assert gone.crl_left_s() == 0.0
    # Every refusal series is there at 0 before the first refusal: increase() sees it.
    zero = 'edgebento_identity_records_refused_total{object="crl_index",reason="replayed"} 0.0'
    assert zero in text.splitlines()
    served = set(re.findall(r"^# TYPE (\S+)", text, re.M))
    named = set(re.findall(r"edgebento_[a-z_]+", RULES.read_text()))
    for name in named:
        assert name in served or name.removesuffix("_total") in served, name
