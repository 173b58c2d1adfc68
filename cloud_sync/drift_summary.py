"""The drift summary a device sends in telemetry (records of kind ``drift``), schema version 1.

One summary covers one model version and one window (``window_start`` is a multiple of
``window_s`` in UTC seconds, so the cloud lines up the windows of every device): per monitored
feature the counts in the baseline's bins (``c``: below the range, each bin, at or above the
range's end), the NaN count, and the sum and sum of squares of the values (a mergeable mean and
standard deviation); the rows answered (``rows``, every one) and the requests refused for their
schema (every one). The bins, NaN counts, sums and squares are those of the ``binned`` rows: a
sample of the window's requests, each binned with the same probability (``edge_agent.drift``),
so their shares estimate those of every row; a summary without ``binned`` binned every row.
Never raw inputs.

Built by the agent (``edge_agent.drift``) and parsed by the cloud (``cloud_sync.drift``) with
this one model.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KIND = "drift"
MAX_COUNT = 1 << 53


class FeatureCounts(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    c: list[int] = Field(min_length=3, max_length=1002)
    nan: int = Field(default=0, ge=0, lt=MAX_COUNT)
    s: float = 0.0
    q: float = Field(default=0.0, ge=0)

    @field_validator("c")
    @classmethod
    def _counts(cls, value: list[int]) -> list[int]:
        if any(not 0 <= v < MAX_COUNT for v in value):
            raise ValueError("a count is negative or past 2**53")
        return value

    @field_validator("s", "q")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value


class DriftSummary(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    schema_version: Literal[1] = 1
    model: str = Field(min_length=1, max_length=128)
    version: int = Field(gt=0, lt=MAX_COUNT)
    baseline: str = Field(pattern=r"^[0-9a-f]{64}$")  # sha256 of the pack's baseline.json
    window_start: float = Field(ge=0, allow_inf_nan=False)
    window_s: float = Field(ge=1, le=86_400, allow_inf_nan=False)
    rows: int = Field(ge=0, lt=MAX_COUNT)
    binned: int | None = Field(default=None, ge=0, lt=MAX_COUNT)  # None: every row
    refused: dict[str, int] = Field(default_factory=dict, max_length=16)
    features: dict[str, FeatureCounts] = Field(default_factory=dict, max_length=64)

    @model_validator(mode="after")
    def _binned_of_rows(self) -> DriftSummary:
        if self.binned is not None and self.binned > self.rows:
            raise ValueError("binned more rows than it answered")
        return self

    @property
    def binned_rows(self) -> int:
        """The rows the bins count: a sample of ``rows``, or every one."""
        return self.rows if self.binned is None else self.binned
