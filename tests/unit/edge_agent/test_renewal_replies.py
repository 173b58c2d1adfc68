"""Which answer a renewal reads (``edge_agent.identity.Renewer._ask``): the enrollment service
answers every delivery of a request, so a duplicate delivery (QoS 1 after a reconnect) gets a
second answer with the same id, ``replayed``, after the ``ok`` that carries the certificate.
The agent kept the last answer: the certificate was thrown away, its renewal spent, and the
device asked again. Answers to requests given up on were kept for good. Now the ``ok`` answer
stands and only the request asked is kept."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cloud_sync.enroll import EnrollReply
from edge_agent.config import AgentConfig
from edge_agent.identity import Renewer
from edge_agent.identity_files import IdentityFiles


class Answering:
    """A channel whose service answers each request with ``answers`` (id filled in), in order,
    as they arrive on the device's response topic, after a late answer to another request."""

    def __init__(self, *answers: dict[str, Any]) -> None:
        self.answers = answers
        self.handler: Any = None

    def route(self, topic_filter: str, handler: Any) -> None:
        self.handler = handler

    def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        request_id = json.loads(payload)["id"]
        late = {"id": "an-old-request", "ok": False, "reason": "internal"}
        for answer in (late, *({**a, "id": request_id} for a in self.answers)):
            self.handler(SimpleNamespace(payload=EnrollReply(**answer).model_dump_json()))

    def use_identity(self, cert_file: Path, key_file: Path) -> None: ...

    def wait_connected(self, timeout: float) -> bool:
        return True


def _renewer(tmp_path: Path, channel: Answering) -> Renewer:
    config = AgentConfig(device="rep-a", data_dir=tmp_path, trust=[tmp_path / "signing.pub"])
    return Renewer(config, channel, IdentityFiles(tmp_path / "identity"), lambda *_: None)


def test_a_duplicate_deliverys_replayed_answer_does_not_replace_the_certificate(
    tmp_path: Path,
) -> None:
    ok = {"ok": True, "certificate": "PEM"}
    replayed = {"ok": False, "reason": "replayed", "error": "already answered"}
    renewer = _renewer(tmp_path, Answering(ok, replayed))
    reply = renewer._ask("renew", json.dumps({"id": "r1"}).encode(), "r1")
    assert reply is not None and reply.ok and reply.certificate == "PEM", reply
    assert renewer._replies == {}  # nothing kept: not the late answer, not the duplicate's
