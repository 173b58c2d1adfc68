"""The cloud half of edge sync: object store, registry, rollouts, telemetry ingestion, fleet status,
and the device protocol (topics and message schemas) that ``edge_agent`` speaks."""

from __future__ import annotations
