"""The rotation rules (``cloud_sync.identity_rotation``) over any sequence of renewals whose
answers arrive or not, confirmations and the grace: the certificate the device holds is never
retired while it runs with it, and whatever it does not run with is retired once it confirms
or the grace has passed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cloud_sync.identity_records import CertRecord, DeviceIdentity, retired_entries
from cloud_sync.identity_rotation import MAX_PENDING, issued, rotated, settled

GRACE = 100.0
STEPS = st.lists(st.sampled_from(["renew_lost", "renew_got", "rotated", "wait"]), max_size=30)


def _cert(n: int, at: float) -> CertRecord:
    return CertRecord(serial=format(n, "x"), issued_at=at, not_after=at + 10_000, via="renew")


@given(STEPS)
def test_the_certificate_held_is_never_listed_and_the_rest_are_once_settled(steps: list[str]):
    now, serial = 0.0, 1
    doc = issued(DeviceIdentity(device="d"), _cert(1, now), "claim", now)
    held = "1"  # what the device runs with
    received: str | None = None  # a new certificate it got and has not yet said it uses
    for step in steps:
        now += 1.0
        doc = settled(doc, now, GRACE)
        if step.startswith("renew") and received is None and len(doc.pending) < MAX_PENDING:
            serial += 1
            doc = issued(doc, _cert(serial, now), "renew", now)
            if step == "renew_got":
                received = held = format(serial, "x")  # installed; its ``rotated`` is next
        elif step == "rotated" and received is not None:
            doc, received = rotated(doc, received, now), None
        elif step == "wait" and not (held == doc.current and doc.pending):
            # Days pass; not while its renewal went unanswered: the agent retries in minutes
            # (silent past the grace with every answer lost, it is locked out: documented).
            now += GRACE / 3
        listed = {e.serial for e in retired_entries(doc)}
        assert held not in listed, (steps, doc)
        assert held in {doc.current, *doc.pending}
    doc = settled(doc, now + GRACE + 1, GRACE)
    if received is None and doc.current == held:
        assert not doc.pending
        others = {c.serial for c in doc.certificates} - {held}
        assert others <= {e.serial for e in retired_entries(doc)}


def test_a_serial_neither_current_nor_pending_is_refused() -> None:
    doc = issued(DeviceIdentity(device="d"), _cert(1, 0.0), "claim", 0.0)
    try:
        rotated(doc, "ff", 1.0)
    except ValueError:
        return
    raise AssertionError("rotated to a certificate never issued")
