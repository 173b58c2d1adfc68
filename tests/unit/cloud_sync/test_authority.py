import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.authority import sign_rollback, verify_rollback
from cloud_sync.protocol import ModelRef
from modelpack.errors import SignatureError
from modelpack.signing import TrustedKey, key_id


def _key():
    k = Ed25519PrivateKey.generate()
    return k, TrustedKey(k.public_key(), key_id(k.public_key()), "t")


V2 = ModelRef(name="det", version=2)
FRESH = {"applied_generation": 0, "runs": V2}


def test_roundtrip_and_refusals():
    k, t = _key()
    m = ModelRef(name="det", version=1)
    s = sign_rollback(k, "dev1", m, generation=3, leaves=V2)
    got = verify_rollback(s, [t], "dev1", m, **FRESH)
    assert (got.model.version, got.leaves, got.generation) == (1, V2, 3)
    with pytest.raises(SignatureError, match="device"):
        verify_rollback(s, [t], "dev2", m, **FRESH)
    with pytest.raises(SignatureError, match="not det v2"):
        verify_rollback(s, [t], "dev1", ModelRef(name="det", version=2), **FRESH)
    with pytest.raises(SignatureError, match="expired"):
        expired = sign_rollback(k, "dev1", m, generation=3, leaves=V2, expires_in_s=-1)
        verify_rollback(expired, [t], "dev1", m, **FRESH)
    _, other = _key()
    with pytest.raises(SignatureError, match="trusted key"):
        verify_rollback(s, [other], "dev1", m, **FRESH)
    forged = s.model_copy(update={"payload": s.payload[:-4] + "AAAA"})
    with pytest.raises(SignatureError):
        verify_rollback(forged, [t], "dev1", m, **FRESH)


def test_an_instruction_works_once_and_never_undoes_a_later_install():
    k, t = _key()
    m = ModelRef(name="det", version=1)
    s = sign_rollback(k, "dev1", m, generation=3, leaves=V2)
    with pytest.raises(SignatureError, match="not newer than generation 3"):
        verify_rollback(s, [t], "dev1", m, applied_generation=3, runs=V2)
    with pytest.raises(SignatureError, match="runs det v3"):
        verify_rollback(
            s, [t], "dev1", m, applied_generation=0, runs=ModelRef(name="det", version=3)
        )
    with pytest.raises(SignatureError, match="runs no model"):
        verify_rollback(s, [t], "dev1", m, applied_generation=0, runs=None)
    unbound = sign_rollback(k, "dev1", m, generation=4, leaves=None)
    assert verify_rollback(unbound, [t], "dev1", m, applied_generation=3, runs=None).generation == 4
    with pytest.raises(SignatureError, match="names no version it leaves, and this device runs"):
        verify_rollback(unbound, [t], "dev1", m, applied_generation=3, runs=V2)  # installed since
    a, b = (sign_rollback(k, "dev1", m, generation=5, leaves=V2) for _ in range(2))
    assert a.payload != b.payload  # the nonce: the same step signed twice is two instructions
