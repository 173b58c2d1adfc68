"""Property: one to three devices sending anything on their own status and telemetry topics
cannot change the verdict that 10 to 100 honest devices give (issue 19, finding 3), whether the
new version is healthy, fails half its inferences or is slow (the p99 check was a median over
one shared window that one device could fill). The messages go through the watch's own parsing
and counting (``FleetWatch._handle``) and the verdict through ``judge``, as in a rollout; no
broker is needed for the property."""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from cloud_sync.protocol import ModelRef, Topics
from cloud_sync.rollout_checks import judge
from cloud_sync.rollout_state import Thresholds, new_rollout
from cloud_sync.watch import FleetWatch

TOPICS = Topics("p")
V1 = ModelRef(name="m", version=1)


@dataclass(frozen=True)
class Liar:
    status_version: int  # what its status says it runs after the push
    claim: int | None  # the version its records name (None: none)
    ok: int
    errors: int
    p99_ms: float


liars = st.builds(
    Liar,
    status_version=st.sampled_from([1, 2]),
    claim=st.sampled_from([None, 1, 2, 3]),
    ok=st.one_of(st.integers(0, 100), st.integers(0, 10**15)),
    errors=st.one_of(st.integers(0, 100), st.integers(0, 10**15)),
    p99_ms=st.one_of(st.floats(0, 50), st.floats(0, 1e9)),
)


class Feed:
    def __init__(self, watch: FleetWatch) -> None:
        self.watch = watch
        self.seqs: dict[str, int] = {}

    def status(self, device: str, version: int) -> None:
        doc = {"device": device, "state": "online", "model": {"name": "m", "version": version}}
        self.watch._handle(TOPICS.status(device), json.dumps(doc).encode())

    def window(self, device: str, data: dict[str, object]) -> None:
        seq = self.seqs[device] = self.seqs.get(device, -1) + 1
        record = {"device": device, "boot_id": "b", "seq": seq, "ts": 1.0, "kind": "inference"}
        batch = {"records": [{**record, "data": data}]}
        self.watch._handle(TOPICS.telemetry(device), json.dumps(batch).encode())


V2 = {"name": "m", "version": 2}
NEW = {  # what the honest devices report on v2
    "healthy": {"ok": 20, "errors": 0, "p99_ms": 5.0, "model": V2},
    "failing": {"ok": 10, "errors": 10, "p99_ms": 5.0, "model": V2},  # half its inferences fail
    "slow": {"ok": 20, "errors": 0, "p99_ms": 50.0, "model": V2},  # p99 10x its v1 one
}


@settings(max_examples=60, deadline=None)
@given(
    honest=st.integers(10, 100),
    kind=st.sampled_from(sorted(NEW)),
    drawn=st.lists(liars, min_size=1, max_size=3),
)
def test_up_to_three_liars_never_change_the_verdict_of_10_to_100_honest_devices(
    honest: int, kind: str, drawn: list[Liar]
) -> None:  # fmt: skip
    watch = FleetWatch("mqtt://127.0.0.1:1", TOPICS)
    names = [f"h{i}" for i in range(honest)] + [f"l{i}" for i in range(len(drawn))]
    thresholds = Thresholds(canary_pct=100, min_devices=10, min_inferences=40)
    state = new_rollout("m", 2, names, dict.fromkeys(names, V1), thresholds, "p")
    for progress in state.devices:
        state.move(progress, "done", "runs v2")
    feed = Feed(watch)
    for device in names:
        feed.status(device, 1)
    for _ in range(3):  # before the push: everyone on v1, the liars already lying
        for i in range(honest):
            feed.window(f"h{i}", {"ok": 20, "errors": 0, "p99_ms": 5.0, "model": V1.model_dump()})
        for i, liar in enumerate(drawn):
            feed.window(f"l{i}", _lie(liar))
    for i in range(honest):
        feed.status(f"h{i}", 2)
    for i, liar in enumerate(drawn):
        feed.status(f"l{i}", liar.status_version)
    for _ in range(3):
        for i in range(honest):
            feed.window(f"h{i}", NEW[kind])
        for i, liar in enumerate(drawn):
            feed.window(f"l{i}", _lie(liar))
    verdict = judge(state, watch, 0)
    assert verdict.kind == ("verified" if kind == "healthy" else "abort"), (verdict.reason, drawn)
    assert verdict.figures.reporting >= honest
    assert set(watch.suspects) <= {f"l{i}" for i in range(len(drawn))}


def _lie(liar: Liar) -> dict[str, object]:
    data: dict[str, object] = {"ok": liar.ok, "errors": liar.errors, "p99_ms": liar.p99_ms}
    if liar.claim is not None:
        data["model"] = {"name": "m", "version": liar.claim}
    return data
