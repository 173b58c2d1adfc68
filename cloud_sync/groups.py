"""Fleet groups, kept by the cloud: which devices a ``--group`` rollout targets.

Import path and API::

    from cloud_sync.groups import change_group, group_members, list_groups
    change_group(store, "lobby", add=["cam-1", "cam-2"])
    group_members(store, "lobby")   # ["cam-1", "cam-2"]

A group is ``fleet/groups/{group}.json`` in the store (``{"schema_version", "group",
"devices"}``), changed by an operator (``edgebento fleet group add|remove``), never by what a
device says about itself: a device that lists ``"groups": ["lobby"]`` in its own status is not in
the lobby. Changes are a compare-and-swap on the document's etag (create when it is new), so two
operators changing one group at once both land.

A change made with the signing key (``fleet group add --key``) is signed (``cloud_sync.sealed``);
a rollout reads its ``--group`` only with its own key's signature on it, so a writer to the bucket
without the key cannot enrol a device in a rollout (``group_members(store, g, trusted)``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field, ValidationError

from cloud_sync.rollout_state import DEVICE_ID, check_device_ids
from cloud_sync.sealed import seal, unseal
from cloud_sync.store import ObjectStore
from modelpack.errors import ConfigError, ConflictError, NotFoundError, StoreError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from modelpack.signing import TrustedKey

ROOT = "fleet/groups"
SCHEMA_VERSION = 1
_TRIES = 10


class GroupDoc(BaseModel):
    schema_version: int = SCHEMA_VERSION
    group: str
    devices: list[str] = Field(default_factory=list)


def group_key(group: str) -> str:
    if not DEVICE_ID.fullmatch(group):  # the same rule as a device id: one plain word
        raise ConfigError(f"group {group!r} must be 1-64 of A-Z a-z 0-9 _ . - (not starting . -)")
    return f"{ROOT}/{group}.json"


def _read(
    store: ObjectStore, group: str, trusted: TrustedKey | None = None
) -> tuple[GroupDoc, str | None]:
    key = group_key(group)
    try:
        data, etag = store.read(key)
    except NotFoundError:
        return GroupDoc(group=group), None
    try:
        if trusted is not None:
            doc = GroupDoc.model_validate(unseal(data, trusted, f"{key} in {store.url}"))
        else:
            doc = GroupDoc.model_validate_json(data)
    except ValidationError as exc:
        raise StoreError(f"{key} in {store.url} is not a group document") from exc
    if doc.group != group:  # a document copied under another name would enrol its devices
        raise StoreError(f"{key} in {store.url} names group {doc.group!r}")
    return doc, etag


def group_members(store: ObjectStore, group: str, trusted: TrustedKey | None = None) -> list[str]:
    """The members; with ``trusted``, only if that key signed the group (``SignatureError``)."""
    return list(_read(store, group, trusted)[0].devices)


def change_group(
    store: ObjectStore,
    group: str,
    add: Iterable[str] = (),
    remove: Iterable[str] = (),
    signer: Ed25519PrivateKey | None = None,
) -> list[str]:
    """Add and remove devices, signing the result with ``signer`` when given (what a rollout's
    ``--group`` needs); the members after the change."""
    added, removed = check_device_ids(list(add)), set(check_device_ids(list(remove)))
    for _ in range(_TRIES):
        doc, etag = _read(store, group)
        members = [d for d in dict.fromkeys([*doc.devices, *added]) if d not in removed]
        doc = GroupDoc(group=group, devices=sorted(members))
        if signer is not None:
            body = seal(doc.model_dump(mode="json"), signer)
        else:
            body = doc.model_dump_json(indent=2).encode()
        try:
            if etag is None:
                store.create(group_key(group), body)
            else:
                store.replace(group_key(group), body, etag)
        except ConflictError:
            continue  # another operator changed it since: read it again
        return sorted(members)
    raise ConflictError(f"group {group} kept changing under us ({_TRIES} tries); try again")


def list_groups(store: ObjectStore) -> dict[str, list[str]]:
    groups = {}
    for key in store.list(f"{ROOT}/"):
        name = key.removeprefix(f"{ROOT}/").removesuffix(".json")
        if key.endswith(".json") and DEVICE_ID.fullmatch(name):
            groups[name] = group_members(store, name)
    return dict(sorted(groups.items()))
