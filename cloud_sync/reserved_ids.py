"""Device ids that no device may enroll under: names of the cloud's identities, and the topic
levels the cloud's ACL grants it.

Import path and API::

    from cloud_sync.reserved_ids import RESERVED_IDS, check_enrollable, reserved_records
    check_enrollable(["cam-1"])       # ConfigError for an invalid or reserved id
    check_revocable(["broker"], has_record)   # a reserved id too, if it has a record
    reserved_records(store)           # ids of records already in the store under reserved ids

Why the ACL's words: a device's enrollment topics are ``{prefix}/enroll/{device}/{kind}``, and
the cloud's grants have ``+`` at the second level, which matches ``enroll``. With ``topic write
edgebento/+/cmd/#`` the operator and the controller may publish on
``edgebento/enroll/cmd/renew`` and ``.../response``: a device called ``cmd`` could be sent a
forged refusal (a ``retry_after_s`` of a year), and the operator could ask for a certificate in
its name with a CSR of its own, and get one. So every word granted at the third level under
``+`` is reserved; ``tests/unit/cloud_sync/test_reserved_ids.py`` reads the ACL templates
(``deploy/mosquitto/acl``, ``cloud_sync.broker_config``) and fails on a grant whose word is not
here, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from cloud_sync.identity_records import DEVICES, device_of
from cloud_sync.rollout_state import check_device_ids
from cloud_sync.store import ObjectStore
from modelpack.errors import ConfigError

# The cloud's identities (their certificates' CN is their user name on the broker), the
# enrollment topics' and group commands' second level, the broker's own certificate (CN
# broker) and the certificate `fleet revoke` probes the CRL with.
CLOUD_NAMES = frozenset(
    {"sync", "controller", "operator", "claim", "enroll", "group", "broker", "revocation-probe"}
)
# What the cloud's ACL grants at the third level under ``+`` (the module's docstring says why).
ACL_WORDS = frozenset({"cmd", "replies", "infer", "status", "desired", "telemetry"})
RESERVED_IDS = CLOUD_NAMES | ACL_WORDS


def check_enrollable(devices: Iterable[str]) -> list[str]:
    """``devices``, each a valid id that is not reserved; ConfigError otherwise."""
    devices = check_device_ids(list(devices))
    taken = sorted(set(devices) & RESERVED_IDS)
    if taken:
        raise ConfigError(
            f"device id {taken[0]!r} is reserved: a name of the cloud's identities or a topic "
            "level the cloud's ACL grants (docs/fleet-identity.md)"
        )
    return devices


def check_revocable(devices: Iterable[str], recorded: Callable[[str], bool]) -> list[str]:
    """As ``check_enrollable``, but a reserved id with a record (``recorded``: enrolled before
    it was reserved, as ``cmd``, or ``broker`` and ``revocation-probe``, reserved since
    e17baad) can still be revoked: ``reserved_records`` tells the operator to. A reserved id
    without one is refused: revoking it would write a record under a cloud name."""
    devices = check_device_ids(list(devices))
    check_enrollable(d for d in devices if d not in RESERVED_IDS or not recorded(d))
    return devices


def reserved_records(store: ObjectStore) -> list[str]:
    """The reserved ids that have a record in ``store`` (enrolled before they were reserved):
    a listing, no record read. Their enrollment topics are open to cloud identities, and the
    service refuses their renewals: revoke them and enroll the devices under other ids."""
    found = (device_of(key) for key in store.list(DEVICES))
    return sorted(d for d in found if d is not None and d in RESERVED_IDS)
