"""Shadow rollouts to simulated fleets (``edgebento simulate``) on a real Mosquitto, at sizes
real agents cannot reach here: a version whose shadow agrees on 90 % of answers aborts before
any of 120 devices switches, whatever three liars claim (they are named suspects: more runs than
the rate allows); one that agrees on every answer switches every wave."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sync.rollout_store import load_state
from cloud_sync.store import open_store
from edgebento.cli import main
from tests.support.fleet import rollout_ids
from tests.support.services import Mosquitto
from tests.support.sim import versions, wait_for

pytestmark = pytest.mark.slow


def rollout(
    sim_store_url: str, broker: Mosquitto, prefix: str, key: Path, names: list[str], canary: str
) -> int:
    return main([
        "rollout", "tiny", "2", "--store", sim_store_url, "--broker", broker.url, "--prefix", prefix,
        "--key", str(key), "--lease-ttl", "5", "--devices", ",".join(names), "--canary", canary,
        "--waves", "1", "--bake", "0", "--wave-timeout", "30", "--allow-unverified",
        "--shadow", "--shadow-for", "3", "--shadow-rate", "50",
    ])  # fmt: skip


def test_a_tenth_of_answers_changed_aborts_across_a_fleet_and_liars_change_nothing(
    simulate: object,
    sim_store_url: str,
    broker: Mosquitto,
    topic_prefix: str,
    keys: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    honest = simulate(117, 0, "--agreement", "2=0.9", "--telemetry-s", "0.5")  # type: ignore[operator]
    liars = simulate(3, 117, "--lie", "shadow_samples=1000000000", "--telemetry-s", "0.5")  # type: ignore[operator]
    names = honest.names + liars.names
    code = rollout(sim_store_url, broker, topic_prefix, keys[0], names, "100")  # all shadow at once
    out = capsys.readouterr().out
    state = load_state(open_store(sim_store_url), rollout_ids(sim_store_url)[0])
    assert code != 0 and state.phase == "aborted", out
    assert "shadow of v2 failed" in (state.reason or "") and "no device switched" in state.reason
    assert set(versions(broker, topic_prefix, names).values()) == {1}
    assert all(d.state == "pending" for d in state.devices)
    judged = [d for d in state.devices if getattr(d, "shadow", None)]
    verdicts = {d.shadow["verdict"] for d in judged}  # type: ignore[attr-defined]
    assert verdicts <= {"fail", "pending"}, verdicts  # the abort comes as soon as it is certain
    assert sum(d.shadow["verdict"] == "fail" for d in judged) >= 3  # type: ignore[attr-defined]
    assert "3 suspect" in state.reason, state.reason  # type: ignore[operator]
    for liar in liars.names:  # suspects: their figures never counted
        assert liar not in {d.device for d in judged}, liar


def test_an_equivalent_version_switches_every_wave_of_a_fleet(
    simulate: object,
    sim_store_url: str,
    broker: Mosquitto,
    topic_prefix: str,
    keys: tuple[Path, Path],
) -> None:
    fleet = simulate(120, 0, "--telemetry-s", "0.5")  # type: ignore[operator]
    code = rollout(sim_store_url, broker, topic_prefix, keys[0], fleet.names, "20")
    state = load_state(open_store(sim_store_url), rollout_ids(sim_store_url)[0])
    assert code == 0 and state.phase == "completed", state.reason
    wait_for(broker, topic_prefix, dict.fromkeys(fleet.names, 2))
    assert all(d.shadow["verdict"] == "pass" for d in state.devices)  # type: ignore[attr-defined]
