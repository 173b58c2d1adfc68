"""When a renewal the service did not serve is tried again (``edge_agent.renewal_wait``): not
before the service's ``retry_after_s`` (with a jitter), never into the certificate's last
stretch, never faster than the backoff, whatever a buggy or hostile service sends; and the
agent's ``Renewer`` says when in its log and status. The previous agent tried again at its
backoff's pace whatever the answer said (the service's ``retry_after_s`` was never read)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from cloud_sync.enroll import EnrollReply
from cloud_sync.fleet_ca import FleetCA, cert_pem, init_ca, new_key
from edge_agent.config import AgentConfig
from edge_agent.identity import KeyMaker, NotServed, Renewer
from edge_agent.identity_files import IdentityFiles, cert_window
from edge_agent.renewal_wait import JITTER, JITTER_MAX_S, next_try_in, reserve_s

DAY = 86400.0
lives = st.floats(min_value=10.0, max_value=400 * DAY)
fractions = st.floats(min_value=0.0, max_value=1.0)
waits = st.floats(min_value=1e-3, max_value=30 * DAY)
# Not a number of seconds above 0: what a buggy or hostile service might send.
not_waits = st.one_of(
    st.none(),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, True, False, "3600", [3600]]),
    st.floats(max_value=0.0),
    st.integers(max_value=0),
    st.integers(min_value=10**309, max_value=10**400),  # past a float
)


@given(
    life=lives,
    at=fractions,
    backoff=st.floats(min_value=0.0, max_value=300.0),
    asked=waits,
    reason=st.sampled_from(["renewal_budget", "rate_limited", "internal"]),
    draw=fractions,
)
@example(life=90 * DAY, at=0.7, backoff=200.0, asked=3 * 3600.0, reason="renewal_budget", draw=1)
def test_a_refusal_is_tried_again_no_sooner_than_asked_and_never_into_the_last_stretch(
    life: float, at: float, backoff: float, asked: float, reason: str, draw: float
) -> None:
    not_before, now = 1_000_000.0, 1_000_000.0 + at * life
    not_after = not_before + life
    wait = next_try_in(backoff, reason, asked, now, not_before, not_after, lambda: draw)
    assert math.isfinite(wait) and wait >= backoff  # never faster than the backoff
    last = not_after - reserve_s(not_before, not_after)  # the last stretch starts here
    if now + backoff >= last:
        assert wait == backoff  # in the last stretch: the backoff's pace, whatever was asked
        return
    assert now + wait <= last  # a try is left before the certificate ends
    if now + asked <= last:
        assert wait >= asked  # as long as the service asked: sooner is refused again
    assert wait <= max(backoff, asked + min(JITTER * asked, JITTER_MAX_S))


@given(life=lives, at=fractions, asked=waits)
def test_a_fleet_refused_together_comes_back_spread(life: float, at: float, asked: float) -> None:
    not_before, now = 0.0, at * life
    not_after = life
    early, late = (
        next_try_in(1.0, "renewal_budget", asked, now, not_before, not_after, lambda d=d: d)
        for d in (0.0, 1.0)
    )
    if asked > 1.0 and now + asked * (1 + JITTER) < not_after - reserve_s(0.0, life):
        assert late - early == pytest.approx(min(JITTER * asked, JITTER_MAX_S))


@given(asked=not_waits, life=lives, at=fractions, backoff=st.floats(0.0, 300.0))
def test_what_is_not_a_wait_and_replayed_keep_the_backoffs_pace(
    asked: Any, life: float, at: float, backoff: float
) -> None:
    now = at * life
    assert next_try_in(backoff, "renewal_budget", asked, now, 0.0, life) == backoff
    # replayed spent nothing: asked again at once, whatever it carries.
    assert next_try_in(backoff, "replayed", 3600.0, now, 0.0, life) == backoff


class Refusing:
    """A channel whose service answers every renewal with ``answer`` (the id filled in)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer, self.handler, self.asked = answer, None, 0

    def route(self, topic_filter: str, handler: Any) -> None:
        self.handler = handler

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        self.asked += 1
        reply = EnrollReply(**{**self.answer, "id": json.loads(payload)["id"]})
        assert self.handler is not None
        self.handler(SimpleNamespace(payload=reply.model_dump_json()))

    def use_identity(self, cert_file: Path, key_file: Path) -> None: ...

    def wait_connected(self, timeout: float) -> bool:
        return True


def _renewer(tmp_path: Path, channel: Refusing, life_s: float) -> Renewer:
    init_ca(tmp_path / "ca")
    ca = FleetCA.load(tmp_path / "ca")
    cert = ca.sign_device_csr(KeyMaker().csr(new_key(), "wait-a"), "wait-a", life_s / DAY)
    files = IdentityFiles(tmp_path / "identity")
    files.dir.mkdir()
    files.cert.write_bytes(cert_pem(cert))
    config = AgentConfig(device="wait-a", data_dir=tmp_path, trust=[tmp_path / "signing.pub"])
    return Renewer(config, channel, files, lambda *_: None)


def test_the_renewer_waits_as_asked_and_says_when_in_its_log_and_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    answer = {"ok": False, "reason": "renewal_budget", "error": "spent", "retry_after_s": 7200.0}
    channel = Refusing(answer)
    renewer = _renewer(tmp_path, channel, 10 * DAY)
    with pytest.raises(NotServed) as refused:
        renewer.renew_once()
    before = time.time()
    wait = renewer._after_failure(1, refused.value)
    assert 7200.0 <= wait <= 7200.0 * (1 + JITTER)  # the previous agent: under 75 s
    status = renewer.files.read_status()
    assert status["state"] == "valid" and status["renew_after"] >= before + 7200.0
    assert "renewal_budget" in status["reason"] and "trying again in" in status["reason"]
    assert "trying again in 7" in caplog.text and "(renewal_budget)" in caplog.text
    # The same answer with the certificate near its end: the backoff's pace, not 2 h.
    _, not_after, _ = cert_window(renewer.files.cert)
    late = next_try_in(60.0, "renewal_budget", 7200.0, not_after - 3000, 0.0, not_after)
    assert late == 60.0
    assert channel.asked == 1
