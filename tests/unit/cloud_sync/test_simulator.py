"""The simulated device keeps the agent's rules: no downgrade without a signed instruction,
each generation acted on once, the outcome echoed in Status.applied, telemetry kept until
acknowledged."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from cloud_sync.authority import sign_rollback
from cloud_sync.protocol import Desired, ModelRef, Status, TelemetryAck, Topics
from cloud_sync.simulator import Behavior, SimDevice
from modelpack.signing import load_private_key, load_public_key

V1, V2 = ModelRef(name="m", version=1), ModelRef(name="m", version=2)


def device(
    keys: tuple[Path, Path], **behavior: object
) -> tuple[SimDevice, list[tuple[str, bytes]]]:
    sent: list[tuple[str, bytes]] = []
    later: list[Callable[[], None]] = []

    def schedule(_delay: float, action: Callable[[], None]) -> None:
        later.append(action)
        action()  # no clock: installs finish at once

    sim = SimDevice(
        "d", V1, Topics("p"), Behavior(**behavior), [load_public_key(keys[1])],  # type: ignore[arg-type]
        lambda topic, payload, _q, _r: sent.append((topic, payload)), schedule,
    )  # fmt: skip
    return sim, sent


def last_status(sent: list[tuple[str, bytes]]) -> Status:
    return Status.model_validate_json(next(p for t, p in reversed(sent) if t == "p/d/status"))


def test_update_then_a_downgrade_only_when_signed(keys: tuple[Path, Path]) -> None:
    sim, sent = device(keys)
    sim.on_desired(Desired(model=V2, rollout="r", generation=3))
    status = last_status(sent)
    assert status.model == V2 and status.applied and status.applied.outcome == "installed"
    sim.on_desired(Desired(model=V1, rollout="r", generation=4, rollback=True))
    refused = last_status(sent)
    assert refused.model == V2 and refused.applied and refused.applied.outcome == "refused"
    key = load_private_key(keys[0])
    signed = sign_rollback(key, "d", V1, generation=6, leaves=V2, rollout="r")
    forged = sign_rollback(key, "other", V1, generation=5, leaves=V2, rollout="r")
    sim.on_desired(
        Desired(model=V1, rollout="r", generation=5, rollback=True, authorization=forged)
    )
    assert last_status(sent).applied.outcome == "refused"  # type: ignore[union-attr]
    sim.on_desired(
        Desired(model=V1, rollout="r", generation=6, rollback=True, authorization=signed)
    )
    back = last_status(sent)
    assert back.model == V1 and (back.applied.generation, back.applied.outcome) == (6, "installed")  # type: ignore[union-attr]
    count = len(sent)
    sim.on_desired(
        Desired(model=V1, rollout="r", generation=6, rollback=True, authorization=signed)
    )
    assert len(sent) == count  # a retained repeat is not acted on twice
    v3 = ModelRef(name="m", version=3)
    sim.on_desired(Desired(model=v3, rollout="r2", generation=7))
    sim.on_desired(  # the same instruction again, under a new desired state: spent
        Desired(model=V1, rollout="r3", generation=8, rollback=True, authorization=signed)
    )
    again = last_status(sent)
    assert again.model == v3 and again.applied and again.applied.outcome == "refused"
    assert "not newer than generation 6" in (again.applied.reason or "")


def test_a_failing_version_rolls_back_and_says_so(keys: tuple[Path, Path]) -> None:
    sim, sent = device(keys, fail_versions=frozenset({2}))
    sim.on_desired(Desired(model=V2, rollout="r", generation=1))
    status = last_status(sent)
    assert status.model == V1 and status.applied and status.applied.outcome == "rolled_back"


def test_telemetry_stays_in_the_outbox_until_acknowledged(keys: tuple[Path, Path]) -> None:
    sim, sent = device(keys, telemetry_s=1.0)
    for _ in range(3):
        sim.tick_telemetry()
    records = [json.loads(p)["records"][0] for t, p in sent if t == "p/d/telemetry"]
    assert [r["seq"] for r in records] == [0, 1, 2] and records[0]["data"]["model"]["version"] == 1
    sim.on_ack(TelemetryAck(boot_id="another-boot", seq=2))
    assert len(sim.outbox) == 3
    sim.on_message(
        "p/d/telemetry/ack", TelemetryAck(boot_id=sim.boot_id, seq=1).model_dump_json().encode()
    )
    assert list(sim.outbox) == [2]
    sim.on_message("p/d/desired", b"not json")  # ignored, never raised
