from __future__ import annotations

from prometheus_client import generate_latest

from cloud_sync.fleet_metrics import FleetMetrics, FleetView, histogram_quantile_ms
from cloud_sync.mqtt import parse_broker_url
from cloud_sync.protocol import Status
from modelpack.metrics import LATENCY_BUCKETS


def agent_record(ts: float, ok: int, errors: int, bucket: int) -> dict:
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    counts[bucket] = ok
    data = {
        "ok": ok,
        "errors": errors,
        "latency_buckets_s": [*LATENCY_BUCKETS, "+Inf"],
        "latency_counts": counts,
    }
    return {"device": "d1", "boot_id": "b", "seq": 1, "ts": ts, "kind": "inference", "data": data}


def test_the_agents_inference_records_feed_the_fleet_metrics() -> None:
    view, metrics = FleetView(), FleetMetrics()
    metrics.on_status(
        view,
        Status.model_validate(
            {"device": "d1", "state": "online", "model": {"name": "m", "version": 3}}
        ),
    )
    metrics.on_record(view, agent_record(100.0, 10, 0, 2))
    metrics.on_record(view, agent_record(102.0, 40, 2, 2))
    summary = view.snapshot()["d1"]
    assert summary.version == 3 and summary.inferences == 52 and summary.errors == 2
    assert summary.inference_rate == 21.0  # 42 in the 2 s since the previous record
    assert summary.p99_ms == LATENCY_BUCKETS[2] * 1000
    text = generate_latest(metrics.registry).decode()
    assert 'edgebento_fleet_inferences_total{device="d1"} 52.0' in text
    assert 'edgebento_fleet_model_version{device="d1",model="m"} 3.0' in text
    assert "edgebento_fleet_devices_online 1.0" in text


def test_histogram_quantile() -> None:
    data = {"latency_buckets_s": [0.001, 0.01, "+Inf"], "latency_counts": [98, 1, 1]}
    assert histogram_quantile_ms(data, 0.5) == 1.0
    assert histogram_quantile_ms(data, 0.99) == 10.0
    assert histogram_quantile_ms({"latency_counts": []}, 0.5) is None


def test_broker_urls() -> None:
    a = parse_broker_url("mqtts://user:p%40ss@broker.example:8884")
    assert (a.host, a.port, a.tls, a.username, a.password) == (
        "broker.example",
        8884,
        True,
        "user",
        "p@ss",
    )
    assert parse_broker_url("mqtt://127.0.0.1").port == 1883
