import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_sync.authority import sign_rollback, verify_rollback
from cloud_sync.protocol import ModelRef
from modelpack.errors import SignatureError
from modelpack.signing import TrustedKey, key_id


def _key():
    k = Ed25519PrivateKey.generate()
    return k, TrustedKey(k.public_key(), key_id(k.public_key()), "t")


def test_roundtrip_and_refusals():
    k, t = _key()
    m = ModelRef(name="det", version=1)
    s = sign_rollback(k, "dev1", m)
    assert verify_rollback(s, [t], "dev1", m).model.version == 1
    with pytest.raises(SignatureError, match="device"):
        verify_rollback(s, [t], "dev2", m)
    with pytest.raises(SignatureError, match="not det v2"):
        verify_rollback(s, [t], "dev1", ModelRef(name="det", version=2))
    with pytest.raises(SignatureError, match="expired"):
        verify_rollback(sign_rollback(k, "dev1", m, expires_in_s=-1), [t], "dev1", m)
    _, other = _key()
    with pytest.raises(SignatureError, match="trusted key"):
        verify_rollback(s, [other], "dev1", m)
    forged = s.model_copy(update={"payload": s.payload[:-4] + "AAAA"})
    with pytest.raises(SignatureError):
        verify_rollback(forged, [t], "dev1", m)
