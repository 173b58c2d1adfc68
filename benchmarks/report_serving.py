"""The figures of the serving benchmarks for ``benchmarks/report.py``: ``serving_mlp`` and
``serving_overload`` put edgebento beside the bare uvicorn ASGI app (the ceiling), the plain
BentoML service a user writes without edgebento, and the seed's Flask app, all in one run;
``serving_minilm`` beside Flask and raw ONNX Runtime; ``serving_memory`` per kind of body."""

from __future__ import annotations

from typing import Any

from benchmarks.figure import Figure, get, num
from benchmarks.runs import median_of

PLAIN = "plain BentoML (ONNX Runtime in a `@bentoml.api`)"
BARE = "bare uvicorn ASGI, same model and codec"


def serving_mlp(d: dict[str, Any]) -> list[Figure]:
    e, b, r = "figures.edgebento", "figures.bare_asgi", "ratios"
    return [
        Figure("requests/s, 64 clients", num(get(d, f"{e}.clients_64.requests_per_s"), ",.0f"),
               num(get(d, f"{b}.clients_64.requests_per_s"), ",.0f"), BARE),
        Figure("share of bare uvicorn ASGI, 64 clients", num(get(d, f"{r}.clients_64.share_of_bare_asgi"), ".0%"),
               "100%", BARE, ">= 85%"),
        Figure("share of bare uvicorn ASGI by CPU per request, 64 clients",
               num(get(d, f"{r}.clients_64.cpu_bound_share_of_bare_asgi"), ".0%"), "100%", BARE, ">= 85%"),
        Figure("x plain BentoML, 64 clients", num(get(d, f"{r}.clients_64.x_plain_bentoml"), ".2f", "x"),
               num(get(d, "figures.plain_bentoml.clients_64.requests_per_s"), ",.0f", " req/s"), PLAIN, ">= 1.5x"),
        Figure("x Flask, 64 clients", num(get(d, f"{r}.clients_64.x_flask"), ".2f", "x"),
               num(get(d, "figures.flask.clients_64.requests_per_s"), ",.0f", " req/s"), "Flask + onnxruntime (the seed)", ">= 1x"),
        Figure("server CPU µs per request, 64 clients", num(get(d, f"{e}.clients_64.server_cpu_us_per_request"), ",.0f"),
               num(get(d, f"{b}.clients_64.server_cpu_us_per_request"), ",.0f"), BARE),
        Figure("share of bare uvicorn ASGI, 1 client", num(get(d, f"{r}.clients_1.share_of_bare_asgi"), ".0%"),
               "100%", BARE),
        Figure("x plain BentoML, 1 client", num(get(d, f"{r}.clients_1.x_plain_bentoml"), ".2f", "x"),
               num(get(d, "figures.plain_bentoml.clients_1.requests_per_s"), ",.0f", " req/s"), PLAIN),
        Figure("p99 ms, 64 clients", num(get(d, f"{e}.clients_64.p99_ms"), ".1f"),
               num(get(d, f"{b}.clients_64.p99_ms"), ".1f"), BARE, "<= 50"),
        Figure("p50 ms, 1 client", num(get(d, f"{e}.clients_1.p50_ms"), ".2f"),
               num(get(d, f"{b}.clients_1.p50_ms"), ".2f"), BARE, "<= 3"),
        Figure("non-2xx answers, 64 clients", num(get(d, f"{e}.clients_64.non_2xx"), "d"),
               num(get(d, f"{b}.clients_64.non_2xx"), "d"), BARE, "0"),
    ]  # fmt: skip


def serving_overload(d: dict[str, Any]) -> list[Figure]:
    t, p, b = "figures.tensor_json", "baselines.plain_bentoml", "baselines.bare_asgi"
    c = f"{t}.refusal_cost"
    floods = get(d, "figures") or {}
    worst = min(
        (
            v
            for f in floods.values()
            if isinstance(v := _median(get(f, "goodput_of_capacity")), float)
        ),
        default=None,
    )
    return [
        Figure("goodput, share of capacity, tensor JSON", num(get(d, f"{t}.goodput_of_capacity"), ".0%"),
               num(get(d, f"{p}.goodput_of_capacity"), ".0%"), PLAIN + ", its own capacity", ">= 90%"),
        Figure("goodput, share of capacity, tensor JSON, beside the bare app", num(get(d, f"{t}.goodput_of_capacity"), ".0%"),
               num(get(d, f"{b}.goodput_of_capacity"), ".0%"), BARE + ", its own capacity", ">= 90%"),
        Figure("goodput per CPU-second, share of capacity's, tensor JSON",
               num(get(d, f"{t}.goodput_per_cpu_of_capacity"), ".0%"),
               num(get(d, f"{p}.goodput_per_cpu_of_capacity"), ".0%"), PLAIN),
        Figure("goodput per CPU-second, share of capacity's, tensor JSON, beside the bare app",
               num(get(d, f"{t}.goodput_per_cpu_of_capacity"), ".0%"),
               num(get(d, f"{b}.goodput_per_cpu_of_capacity"), ".0%"), BARE),
        Figure("goodput, share of capacity, worst of the floods", num(worst, ".0%"), "", "", ">= 90%"),
        Figure("server CPU µs per refusal (503, in the flood / alone) and per 200, tensor JSON",
               f"{num(get(d, f'{c}.server_cpu_us_per_503'), ',.0f')} / "
               f"{num(get(d, f'{c}.server_cpu_us_per_503_alone'), ',.0f')} and "
               f"{num(get(d, f'{c}.server_cpu_us_per_200'), ',.0f')}", "", "",
               f"a refusal <= {num(_median(get(d, f'{c}.refusal_budget_for_90pct_us')), ',.0f')} µs "
               "(90% with the server's CPU its own)"),
        Figure("goodput that the refusals' cost allows, the server's CPU its own, tensor JSON",
               num(get(d, f"{c}.goodput_of_capacity_its_own_cpu_allows"), ".0%"), "", "", ">= 90%"),
        Figure("slowest answer at the client s, tensor JSON", num(get(d, f"{t}.slowest_s"), ".2f"),
               num(get(d, f"{p}.slowest_s"), ".2f"), PLAIN, "<= deadline + one batch"),
        Figure("capacity requests/s, tensor JSON", num(get(d, f"{t}.capacity_rps"), ",.0f"),
               num(get(d, f"{b}.capacity_rps"), ",.0f"), BARE),
    ]  # fmt: skip


def _median(value: Any) -> Any:
    found = median_of(value)
    return float(found) if isinstance(found, int | float) and not isinstance(found, bool) else None


def serving_minilm(d: dict[str, Any]) -> list[Figure]:
    f = "figures"
    return [
        Figure("sentences/s", num(get(d, f"{f}.edgebento_int8.requests_per_s"), ",.0f"),
               num(get(d, f"{f}.flask_fp32_padded64.requests_per_s"), ",.0f"), "Flask FP32", ">= 4x Flask"),
        Figure("share of raw onnxruntime", num(get(d, "fraction_of_raw_onnxruntime"), ".0%"),
               "100%", "raw onnxruntime, same batches", ">= 75%"),
        # From CPU per answered request: what other work on the machine leaves intact.
        Figure("share of raw onnxruntime by CPU per sentence", num(get(d, "cpu_bound.share_of_raw"), ".0%"),
               "100%", "raw onnxruntime, same batches", ">= 75%"),
        Figure("x Flask FP32 by CPU per request", num(get(d, "cpu_bound.x_flask_fp32"), ".1f", "x"),
               "1.0x", "Flask FP32", ">= 4x"),
        Figure("cosine_min vs FP32", num(get(d, f"{f}.fidelity_int8_vs_fp32.cosine_min"), ".3f"),
               "1.000", "FP32", ">= 0.99"),
    ]  # fmt: skip


def serving_memory(d: dict[str, Any]) -> list[Figure]:
    per_mb = "per_mb"
    return [
        Figure("peak RSS added per MB of body, OIP binary", num(get(d, f"{per_mb}.binary"), ".1f"),
               num(get(d, f"{per_mb}.json"), ".1f"), "tensor JSON", "<= 4"),
        Figure("peak RSS added per MB of body, tensor JSON b64", num(get(d, f"{per_mb}.b64"), ".1f"),
               num(get(d, f"{per_mb}.json"), ".1f"), "tensor JSON"),
        Figure("MB added refusing a 19 MB JSON body (413)", num(get(d, "refused_json_peak_added_mb"), ".0f"),
               "", ""),
    ]  # fmt: skip
