from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.support import models

# No property test's outcome may depend on the machine's speed: hypothesis's default 200 ms
# deadline per example (and its health check on slow data generation) fail a test whenever a
# busy machine preempts it; a test that means to bound a time says so itself.
settings.register_profile("edgebento", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edgebento")

# Nothing in the tests may reach the network beyond loopback, or AWS's real endpoints.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Under pytest-xdist (`make test`), each worker picks service ports from its own slice of the
# range, so two workers never pick the same port between one's pick and its service's bind.
if os.environ.get("PYTEST_XDIST_WORKER", "").startswith("gw"):
    os.environ["EDGEBENTO_PORT_SLICE"] = (
        f"{int(os.environ['PYTEST_XDIST_WORKER'][2:])}/{os.environ['PYTEST_XDIST_WORKER_COUNT']}"
    )
# Processes log JSON off a terminal; the tests read their errors as a person would, except the
# logging tests, which ask for JSON by name.
os.environ.setdefault("EDGEBENTO_LOG_FORMAT", "text")


@pytest.fixture(scope="session", autouse=True)
def _controller_state_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The rollout controller's record of saves (cloud_sync.rollout_record) in this session's
    temporary directory, for every rollout run in the tests and the processes they start,
    never in the home directory of whoever runs them."""
    state_dir = tmp_path_factory.mktemp("controller-state")
    os.environ.setdefault("EDGEBENTO_STATE_DIR", str(state_dir))


@pytest.fixture(autouse=True)
def _forget_passwords_seen() -> Iterator[None]:
    """The passwords a test's URLs taught the redactor are forgotten after it. The redactor
    remembers them for the process, to redact them in any text (``cloud_sync.redact``), so a
    property test's random passwords ("from", say) were redacted from what later tests read: a
    rollback's "fetched from ..." once came back as "fetched *** ..." and failed in CI."""
    from cloud_sync import redact

    kept = dict(redact._secrets)
    yield
    redact._secrets.clear()
    redact._secrets.update(kept)


@pytest.fixture(scope="session")
def mlp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models.mlp(tmp_path_factory.mktemp("models") / "mlp.onnx")


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(signing.key, signing.pub) made once for the session."""
    from modelpack import generate_keypair

    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture
def signed_pack(tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]) -> Path:
    """A fresh signed pack of the MLP, with golden samples, that a test may tamper with."""
    from modelpack import Samples, create_pack

    inputs, outputs = models.golden_samples(mlp_model)
    out = tmp_path / "pack"
    create_pack(
        mlp_model, out, name="tiny", version=1, samples=Samples(inputs, outputs), key=keys[0]
    )
    return out
