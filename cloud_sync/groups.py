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
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, Field, ValidationError

from cloud_sync.rollout_state import DEVICE_ID, check_device_ids
from cloud_sync.store import ObjectStore
from modelpack.errors import ConfigError, ConflictError, NotFoundError, StoreError

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


def _read(store: ObjectStore, group: str) -> tuple[GroupDoc, str | None]:
    key = group_key(group)
    try:
        data, etag = store.read(key)
    except NotFoundError:
        return GroupDoc(group=group), None
    try:
        doc = GroupDoc.model_validate_json(data)
    except ValidationError as exc:
        raise StoreError(f"{key} in {store.url} is not a group document") from exc
    if doc.group != group:  # a document copied under another name would enrol its devices
        raise StoreError(f"{key} in {store.url} names group {doc.group!r}")
    return doc, etag


def group_members(store: ObjectStore, group: str) -> list[str]:
    return list(_read(store, group)[0].devices)


def change_group(
    store: ObjectStore, group: str, add: Iterable[str] = (), remove: Iterable[str] = ()
) -> list[str]:
    """Add and remove devices; the members after the change."""
    added, removed = check_device_ids(list(add)), set(check_device_ids(list(remove)))
    for _ in range(_TRIES):
        doc, etag = _read(store, group)
        members = [d for d in dict.fromkeys([*doc.devices, *added]) if d not in removed]
        body = GroupDoc(group=group, devices=sorted(members)).model_dump_json(indent=2).encode()
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
