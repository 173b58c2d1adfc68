"""The agent's own Prometheus metrics (names from docs/metrics.md), read from its parts when
scraped, so nothing is counted twice and no thread updates a gauge."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edge_agent.ports import MetricsSource

OUTCOMES = ("installed", "refused", "rolled_back")


class AgentCollector:
    def __init__(self, agent: MetricsSource) -> None:
        self.agent = agent

    def describe(self) -> list[Any]:
        return []  # collected at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        agent = self.agent
        counters = agent.outbox.counters()
        yield GaugeMetricFamily(
            "edgebento_outbox_depth",
            "telemetry records not yet acknowledged by the ingestion",
            value=agent.outbox.count,
        )
        yield CounterMetricFamily(
            "edgebento_outbox_evicted",
            "records dropped because the outbox was full",
            value=counters.get("evicted", 0),
        )
        yield CounterMetricFamily(
            "edgebento_outbox_dropped_corrupt",
            "telemetry records a previous run left (queued or set aside) whose stored row was "
            "not a record the ingestion takes, deleted",
            value=counters.get("dropped_corrupt", 0),
        )
        yield CounterMetricFamily(
            "edgebento_outbox_dropped_aside",
            "telemetry records set aside over the broker's packet limit, then deleted because "
            "more were kept aside than the outbox holds (the agent's set-aside events first)",
            value=counters.get("dropped_aside", 0),
        )
        yield CounterMetricFamily(
            "edgebento_telemetry_acked",
            "records acknowledged as stored by the ingestion",
            value=agent.telemetry.acknowledged,
        )
        updates = CounterMetricFamily("edgebento_updates", "update attempts", labels=["outcome"])
        for outcome in OUTCOMES:
            updates.add_metric([outcome], agent.updater.outcomes.get(outcome, 0))
        yield updates
        yield GaugeMetricFamily(
            "edgebento_model_expired",
            "1 when the serving pack has expired (it keeps serving)",
            value=1.0 if agent.updater.expired else 0.0,
        )
        quarantined = CounterMetricFamily(
            "edgebento_state_quarantined",
            "corrupt local state files renamed aside",
            labels=["file"],
        )
        for name, store in (("telemetry.db", agent.outbox), ("commands.db", agent.replies)):
            quarantined.add_metric([name], len(store.quarantined))
        yield quarantined
        yield CounterMetricFamily(
            "edgebento_agent_session_taken_over",
            "connections lost to another client with this agent's MQTT client id",
            value=agent.session.takeover.taken_over,
        )
        yield CounterMetricFamily(
            "edgebento_agent_packets_over_limit",
            "messages an MQTT 3.1.1 broker dropped the connection for three times in a row, "
            "twice after holding without them: over its packet limit, never sent again",
            value=agent.session.limit.refused,
        )
        yield GaugeMetricFamily(
            "edgebento_agent_packet_limit_bytes",
            "the largest packet the agent publishes: the broker's limit, said (MQTT 5), "
            "configured (max_packet_bytes) or learned",
            value=agent.session.max_packet,
        )
        yield CounterMetricFamily(
            "edgebento_agent_telemetry_set_aside",
            "telemetry records over the broker's packet limit on their own, set aside unsent",
            value=agent.telemetry.set_aside,
        )
