"""The registry's index documents and key layout (see ``cloud_sync.registry``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from modelpack.errors import ConfigError

ARCHIVE = "pack.tar.gz"
INDEX = "index.json"
# Matched with fullmatch: "$" alone lets a trailing newline through ("det\n" is not "det").
CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# ASCII digits, no leading zero: str.isdigit() also says yes to "²", which int() refuses.
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
_SHA256 = r"^[0-9a-f]{64}$"


class PackEntry(BaseModel):
    """What the registry knows about one published version (``index.json``)."""

    # Strict: an index is written by whoever can write the bucket, so "5", 5.0 or true are not
    # versions, and a size of 0 or less must not turn the download cap off.
    model_config = ConfigDict(extra="allow", strict=True)
    schema_version: int = Field(default=2, ge=1, le=2)
    name: str
    version: int = Field(gt=0)
    manifest_sha256: str = Field(pattern=_SHA256)
    # Part of the objects' key (see ``objects``): only hex, never "/" or "..".
    archive_sha256: str = Field(pattern=_SHA256)
    archive_size: int = Field(gt=0)
    created_at: str
    published_at: float
    signed_by: str | None = None
    fidelity: str | None = None
    within_budget: bool | None = None

    @property
    def objects(self) -> str:
        """Where this version's archive, manifest and signature are (schema 1: beside it)."""
        base = version_prefix(self.name, self.version)
        return base if self.schema_version < 2 else f"{base}{self.archive_sha256}/"


class ChannelPointer(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    schema_version: int = 1
    name: str
    channel: str
    version: int = Field(gt=0)
    updated_at: float


@dataclass(frozen=True)
class Stray:
    """A key under ``packs/`` that is not a valid published version, and why."""

    key: str
    reason: str


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(f"pack name {name!r} must be 1-128 of A-Z a-z 0-9 . _ -")
    return name


def version_prefix(name: str, version: int) -> str:
    return f"packs/{check_name(name)}/{int(version)}/"


def channel_key(name: str, channel: str) -> str:
    return f"channels/{check_name(name)}/{channel}.json"


def check_channel(channel: str) -> str:
    if not CHANNEL_NAME.fullmatch(channel):
        raise ConfigError(f"channel {channel!r} must be 1-64 of A-Z a-z 0-9 . _ -")
    return channel


def index_key(key: str) -> tuple[str, int] | None:
    """(name, version) of ``packs/{name}/{version}/index.json`` written canonically, else None."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "packs" or parts[3] != INDEX:
        return None
    name, version = parts[1], parts[2]
    if not _NAME.fullmatch(name) or not _VERSION.fullmatch(version):
        return None
    return name, int(version)
