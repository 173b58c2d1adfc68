"""Shadow rollouts, what both sides agree on: the settings a rollout runs a shadow with, and the
figures a device reports about the version it runs beside the live one (in its status, under
``shadow``, and as telemetry records of kind ``shadow``).

A device's figures are cumulative since it started the shadow, so the latest one says it all and
a resent or lost record changes nothing. The controller judges them per device
(``device_verdict``), each bounded by what the device can have run at the rate it was asked for.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud_sync.protocol import ModelRef

KIND = "shadow"  # the telemetry record's kind
# top1: rows whose top class agrees; cosine: summed cosines of rows; max_abs: rows whose largest
# difference is within ``bound`` (the pack's own); equal: rows exactly equal.
Metric = Literal["top1", "cosine", "max_abs", "equal"]
_METRIC_WORDS = {
    "top1": "top-1 agreement",
    "cosine": "cosine",
    "max_abs": "rows within max |diff| {bound:.3g}",
    "equal": "rows equal",
}


class ShadowSettings(BaseModel):
    """How a rollout runs and judges its shadows (``edgebento rollout --shadow``)."""

    model_config = ConfigDict(extra="forbid")

    for_s: float = Field(default=600.0, gt=0, le=86_400)  # each wave shadows this long
    agreement: float = Field(default=0.99, ge=0, le=1)  # the share of rows agreeing (Metric)
    rate: float = Field(default=5.0, gt=0, le=1000)  # shadow runs a second, per device
    max_latency_ratio: float = Field(default=2.0, gt=0)  # its mean run time over the live one's
    max_error_rate: float = Field(default=0.01, ge=0, le=1)  # of its runs
    min_samples: int = Field(default=100, ge=1)  # runs on a device before it says anything
    # Judged devices a verdict needs with any one of them left out (so one more than this).
    min_devices: int = Field(default=2, ge=1)
    abort_share: float = Field(default=0.5, gt=0, le=1)  # of judged devices failing: abort


class ShadowFigures(BaseModel):
    """What one device reports of its shadow: cumulative counts since it started."""

    model_config = ConfigDict(extra="ignore")

    model: ModelRef  # the version shadowed
    state: Literal["running", "failed", "stopped"]
    reason: str | None = Field(default=None, max_length=512)
    metric: Metric | None = None
    bound: float | None = Field(default=None, ge=0, allow_inf_nan=False)  # max_abs's
    samples: int = Field(default=0, ge=0, lt=1 << 53)  # shadow runs that answered
    errors: int = Field(default=0, ge=0, lt=1 << 53)  # shadow runs that raised
    busy: int = Field(default=0, ge=0, lt=1 << 53)  # samples dropped: the infer queue was busy
    rows: int = Field(default=0, ge=0, lt=1 << 53)
    agreeing: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # rows, or summed cosines
    max_abs: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    shadow_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)  # summed over samples
    current_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent(self) -> ShadowFigures:
        if self.agreeing > self.rows * (1 + 1e-9):
            raise ValueError("more agreeing rows than rows")
        return self

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.rows if self.rows else None

    @property
    def error_rate(self) -> float | None:
        runs = self.samples + self.errors
        return self.errors / runs if runs else None

    @property
    def latency_ratio(self) -> float | None:
        return self.shadow_ms / self.current_ms if self.current_ms > 0 else None

    def line(self) -> str:
        """One line for people: the figures a verdict rests on."""
        if self.state == "failed":
            return f"failed: {self.reason or 'no reason given'}"
        parts = [f"{self.samples} runs"]
        if (a := self.agreement) is not None:
            words = _METRIC_WORDS[self.metric or "cosine"].format(bound=self.bound or 0.0)
            parts.append(f"{words} {a:.4f}")
        if self.max_abs is not None:
            parts.append(f"max |diff| {self.max_abs:.3g}")
        if (r := self.latency_ratio) is not None:
            parts.append(f"latency x{r:.2f}")
        if self.errors:
            parts.append(f"{self.errors} errors")
        return ", ".join(parts)


Verdict = Literal["pass", "fail", "pending"]


def device_verdict(figures: ShadowFigures, settings: ShadowSettings) -> tuple[Verdict, str]:
    """Pass, fail or not yet (too few runs), with why."""
    if figures.state == "failed":
        return "fail", figures.line()
    if figures.samples + figures.errors < settings.min_samples:
        return "pending", f"{figures.samples + figures.errors} of {settings.min_samples} runs"
    why = []
    agreement, errors, ratio = figures.agreement, figures.error_rate, figures.latency_ratio
    if agreement is None or agreement < settings.agreement:
        why.append(f"agreement {agreement if agreement is None else round(agreement, 4)}")
    if errors is not None and errors > settings.max_error_rate:
        why.append(f"error rate {errors:.3f}")
    if ratio is not None and ratio > settings.max_latency_ratio:
        why.append(f"latency x{ratio:.2f}")
    return ("fail", "; ".join(why)) if why else ("pass", figures.line())


def parse_duration(text: str) -> float:
    """``600``, ``90s``, ``10m`` or ``1h`` as seconds; a ConfigError otherwise."""
    from modelpack.errors import ConfigError

    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    body, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1.0)
    try:
        seconds = float(body) * unit
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= 86_400:
        raise ConfigError(f"--shadow-for {text!r}: write seconds, or 90s, 10m, 1h (at most 24h)")
    return seconds
