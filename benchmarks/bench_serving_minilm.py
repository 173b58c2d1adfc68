"""all-MiniLM-L6-v2 end to end: what a user gains from the edgebento path.

Side by side in one run, wrk with 64 clients on loopback, one real sentence per request:

- baseline: the seed's pattern, a Flask app calling onnxruntime per request on the FP32 model,
  with requests tokenized to a fixed 64 tokens (``padding="max_length"``, as the seed did);
- for reference, the same Flask app sent real-length requests (no padding);
- edgebento: the int8 pack (the model bench_optimize_minilm chose, else per-channel dynamic
  quantization of the MatMuls), served by the BentoML service with adaptive batching and
  per-batch padding; requests carry real lengths;
- raw onnxruntime in process on the same pack, with the batches the service forms: queues of
  64 sorted into runs of similar length, padded per run, or each request alone when the
  service found that the pack's rows change each other's answers (a dynamically quantized
  model computes its activation scales over the whole batch), which is the ceiling for the
  overhead figure. The padded figure is kept beside it for that case.

Every server is started once and warmed (``WARMUP_S`` of load, not counted); then
``EDGEBENTO_BENCH_RUNS`` rounds (3 by default) measure every path, in an order that rotates each
round: wrk for ``ROUND_SECONDS`` per server, raw ORT for ``RAW_SECONDS`` while the servers idle,
the service and raw ORT on the same batches next to each other (which first alternates). Each
figure is the median of its rounds with its range; ratios (x Flask, share of raw ORT) are taken
within a round and then their median; the targets are judged on the medians. Each wrk run also
records the server's CPU per request (all its processes), which moves less with other work on
the machine than requests per second do.

Fidelity: mean-pooled (and normalized) sentence embeddings of int8 against FP32, cosine.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks import minilm
from benchmarks.runs import load, measured, median_of, summarize
from benchmarks.serving_common import (
    REPO,
    Process,
    import_to_store,
    start_bento,
    start_flask,
    wrk,
)

# The service and raw ORT alternate (the server idle while raw runs): a share from one pair of
# runs moved from 72% to 80% between two runs of this benchmark on this VM, so the share is the
# median of the rounds'.
ROUND_SECONDS, RAW_SECONDS, WARMUP_S = 8, 5, 3.0
CLIENTS = 64
BUILD = REPO / "build" / "bench-serving"


OPTIMIZED = REPO / "build" / "bench" / "minilm" / "pack" / "model.onnx"  # bench_optimize_minilm


def quantized(fp32: Path) -> tuple[Path, str]:
    """The optimized int8 MiniLM (cached): the model bench_optimize_minilm chose when it has
    run, else per-channel dynamic quantization of the MatMuls."""
    import shutil

    from optimize.quantize import PreprocessConfig, QuantizeConfig, preprocess, quantize_with

    target = BUILD / "minilm-int8.onnx"
    source = BUILD / "minilm-int8.source"
    BUILD.mkdir(parents=True, exist_ok=True)
    if OPTIMIZED.exists():  # copied each time: the optimizer's choice may have changed
        shutil.copyfile(OPTIMIZED, BUILD / "minilm-int8.tmp.onnx")
        (BUILD / "minilm-int8.tmp.onnx").replace(target)
        source.write_text("the model bench_optimize_minilm chose (build/bench/minilm/pack)")
        return target, source.read_text()
    if target.exists():
        return target, source.read_text() if source.exists() else "cached"
    pre = BUILD / "minilm-pre.onnx"
    preprocess(fp32, pre, PreprocessConfig(skip_symbolic_shape=True))
    config = QuantizeConfig(mode="dynamic", per_channel=True, op_types=("MatMul",))
    quantize_with(None)(pre, BUILD / "minilm-int8.tmp.onnx", config)  # type: ignore[operator]
    (BUILD / "minilm-int8.tmp.onnx").replace(target)
    pre.unlink()
    source.write_text("dynamic per-channel MatMul (optimize.quantize)")
    return target, source.read_text()


def real_length(feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One request per sentence, cut to its own length (what a client that does not pad sends)."""
    lengths = feeds["attention_mask"].sum(axis=1)
    return [{k: v[i : i + 1, : lengths[i]] for k, v in feeds.items()} for i in range(len(lengths))]


def _bodies(requests: list[dict[str, np.ndarray]]) -> list[bytes]:
    return [
        json.dumps({"inputs": {k: v.tolist() for k, v in r.items()}}).encode() for r in requests
    ]


def fidelity(fp32: Path, int8: Path, requests: list[dict[str, np.ndarray]]) -> dict[str, float]:
    import onnxruntime as ort

    a = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    cos = []
    for r in requests:
        x, y = a.run(None, r)[0][0], b.run(None, r)[0][0]
        cos.append(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))))
    return {"cosine_min": round(min(cos), 5), "cosine_mean": round(float(np.mean(cos)), 5)}


def raw_same_batches(
    pack: Path,
    pub: Path,
    requests: list[dict[str, np.ndarray]],
    queue: int = CLIENTS,
    sessions_per_core: bool = True,
    batched: bool = True,
    seconds: float = 8,
) -> tuple[float, float]:
    """Sentences/s, and CPU microseconds per sentence, of raw ONNX Runtime in process on the batches the service forms: queues of
    ``queue`` requests sorted into runs of similar length, padded per run, or (``batched``
    False: the service found that the model's rows change each other, as a dynamically
    quantized model's do, and runs each request alone) each request alone. Laid out as the
    service runs by default (one single-threaded session per core, in parallel), or as one
    session using every core."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from modelpack import Predictor, PredictorOptions, load_pack
    from modelpack.serving.padding import pad_feeds, request_length, sequence_axis, split_by_length

    loaded = load_pack(pack, [pub])
    plan = sequence_axis(loaded.manifest)
    assert plan is not None
    batches = [] if batched else list(requests)  # alone: each at its own length
    for start in range(0, len(requests) if batched else 0, queue):
        chunk = requests[start : start + queue]
        for group in split_by_length([request_length(r, plan) for r in chunk]):
            padded, _ = pad_feeds([chunk[i] for i in group], plan)
            batches.append({k: np.concatenate([p[k] for p in padded]) for k in padded[0]})
    cores = (os.cpu_count() or 1) if sessions_per_core else 1
    threads = 1 if sessions_per_core else 0
    sessions = [
        Predictor.from_pack(loaded, PredictorOptions(intra_op_threads=threads))
        for _ in range(cores)
    ]

    def work(index: int) -> int:
        done, begin = 0, time.perf_counter()
        while time.perf_counter() - begin < seconds:
            for feed in batches[index::cores]:  # ORT releases the GIL while it runs
                sessions[index].run(feed, validate=False)
                done += len(feed["input_ids"])
        return done

    begin, cpu = time.perf_counter(), time.process_time()  # this process: ORT's threads too
    with ThreadPoolExecutor(cores) as pool:
        total = sum(pool.map(work, range(cores)))
    return total / (time.perf_counter() - begin), 1e6 * (time.process_time() - cpu) / total


def _rounds() -> int:
    return max(1, int(os.environ.get("EDGEBENTO_BENCH_RUNS", "3")))


def _served(server: Process, path: str, bodies: list[bytes]) -> dict[str, Any]:
    """wrk's figures, and the CPU the server's processes spent per request while it ran; both
    count the requests answered (2xx) only. A request refused at once (a 503 when the queue's
    expected wait is past its bound, as on a machine busy with other work) costs little: counted,
    it made a round that shed a third of its requests look twice as fast and cheap."""
    result, cpu = measured(
        server.popen.pid, lambda: wrk(server.url + path, bodies, CLIENTS, ROUND_SECONDS)
    )
    answered = max(result.requests - result.non_2xx, 0)  # wrk counts responses, any status
    return {
        **result.as_dict(),
        "requests_per_s": round(answered / result.seconds, 1) if result.seconds else 0.0,
        "sent_per_s": round(result.rps, 1),
        "server_cpu_us_per_request": round(1e6 * cpu / max(answered, 1), 1),
    }


def _round(
    r: int, steps: list[tuple[str, ...]], measure: dict[str, Any], console: Console
) -> dict[str, Any]:
    """One round: each step in an order that rotates with ``r``; a pair's order alternates."""
    one: dict[str, Any] = {"load_before": load(), "order": []}
    for step in [steps[(r + i) % len(steps)] for i in range(len(steps))]:
        for name in step if r % 2 == 0 else step[::-1]:
            console.print(f"round {r + 1}: {name} ...")
            got = measure[name]()
            if isinstance(got, tuple):  # raw ORT: sentences/s and its CPU per sentence
                one[name], one[name.removesuffix("_sps") + "_cpu_us_per_sentence"] = got
            else:
                one[name] = got
            one["order"].append(name)
    one["share_of_raw"] = (
        one["edgebento_int8"]["requests_per_s"] / one["raw_onnxruntime_same_batches_sps"]
    )
    one["x_flask_fp32"] = (
        one["edgebento_int8"]["requests_per_s"] / one["flask_fp32_padded64"]["requests_per_s"]
    )
    # The same ratios from CPU per request: what a machine busy with other work leaves intact.
    ours_cpu = one["edgebento_int8"]["server_cpu_us_per_request"]
    one["cpu_bound_share_of_raw"] = (
        one["raw_onnxruntime_same_batches_cpu_us_per_sentence"] / ours_cpu
    )
    one["cpu_bound_x_flask_fp32"] = (
        one["flask_fp32_padded64"]["server_cpu_us_per_request"] / ours_cpu
    )
    return one


def run(results_dir: Path) -> dict[str, Any]:
    import httpx

    from modelpack import SequenceInput, create_pack, generate_keypair

    console = Console()
    console.print("exporting and quantizing all-MiniLM-L6-v2 (cached after the first run) ...")
    fp32 = minilm.export_minilm(REPO / "build" / "minilm")
    int8, int8_source = quantized(fp32)
    texts = minilm.sentences("eval", limit=512)
    padded64 = minilm.tokenize(texts, max_length=64)
    real = real_length(padded64)
    mean_tokens = float(padded64["attention_mask"].sum(axis=1).mean())
    figures: dict[str, Any] = {
        "sentences": len(texts),
        "mean_tokens": round(mean_tokens, 1),
        "int8_model": int8_source,
        "fidelity_int8_vs_fp32": fidelity(fp32, int8, real[:200]),
    }
    padded_requests = [{k: v[i : i + 1] for k, v in padded64.items()} for i in range(len(texts))]
    padded_bodies, real_bodies = _bodies(padded_requests), _bodies(real)
    per_round: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-minilm-") as tmp:
        work = Path(tmp)
        key, pub = generate_keypair(work / "keys")
        pack = work / "pack"
        sequence = [SequenceInput(input="input_ids", axis=1, mask_input="attention_mask")]
        create_pack(int8, pack, name="minilm", version=1, sequence=sequence, key=key)
        tag = import_to_store(pack, pub, work / "bentoml")
        servers: dict[str, Process] = {}
        try:
            servers["flask"] = start_flask(fp32, work)
            servers["bento"] = start_bento(work / "bentoml", tag, work)  # a worker per core
            # For reference, the scheduler's default policy for the service's threads.
            servers["default"] = start_bento(work / "bentoml", tag, work, EDGEBENTO_SCHED_BATCH="0")
            paths = {"flask": "/api/predict", "bento": "/predict", "default": "/predict"}
            for name, server in servers.items():
                console.print(f"{name}: warming up for {WARMUP_S:.0f} s ...")
                wrk(server.url + paths[name], real_bodies, CLIENTS, WARMUP_S)
            meta = httpx.get(servers["bento"].url + "/metadata").json()  # one worker's
            batched = bool(meta["batching"])
            flask, bento, default = servers["flask"], servers["bento"], servers["default"]
            measure: dict[str, Any] = {
                "flask_fp32_padded64": lambda: _served(flask, "/api/predict", padded_bodies),
                "flask_fp32_real_length": lambda: _served(flask, "/api/predict", real_bodies),
                "edgebento_int8": lambda: _served(bento, "/predict", real_bodies),
                "raw_onnxruntime_same_batches_sps": lambda: raw_same_batches(
                    pack, pub, real, batched=batched, seconds=RAW_SECONDS
                ),
                "edgebento_int8_default_scheduler": lambda: _served(
                    default, "/predict", real_bodies
                ),
                "raw_onnxruntime_one_session_sps": lambda: raw_same_batches(
                    pack, pub, real, sessions_per_core=False, batched=batched, seconds=RAW_SECONDS
                ),
            }
            steps: list[tuple[str, ...]] = [
                ("flask_fp32_padded64",),
                ("flask_fp32_real_length",),
                ("edgebento_int8", "raw_onnxruntime_same_batches_sps"),
                ("edgebento_int8_default_scheduler",),
                ("raw_onnxruntime_one_session_sps",),
            ]
            # What the raw figure was before it followed the service's batching: stacked and
            # padded batches, which the service must not form for this pack (they change answers).
            if not batched:
                measure["raw_onnxruntime_padded_batches_sps"] = lambda: raw_same_batches(
                    pack, pub, real, seconds=RAW_SECONDS
                )
                steps.append(("raw_onnxruntime_padded_batches_sps",))
            for r in range(_rounds()):
                per_round.append(_round(r, steps, measure, console))
            meta = httpx.get(bento.url + "/metadata").json()
        finally:
            for server in servers.values():
                server.stop()
    for name in [k for k in per_round[0] if k in measure or k.endswith("_per_sentence")]:
        figures[name] = summarize([one[name] for one in per_round], 1)
    # The reference run kept its old key: the requests/s alone.
    figures["edgebento_int8_default_scheduler_sps"] = figures.pop(
        "edgebento_int8_default_scheduler"
    )["requests_per_s"]
    stats = meta["batches"]
    figures["service_mean_batch"] = round(stats["rows"] / max(stats["count"], 1), 1)
    figures["service_batching"] = batched
    figures["service_batching_off"] = meta.get("batching_off")
    speedup = summarize([one["x_flask_fp32"] for one in per_round])
    share = summarize([one["share_of_raw"] for one in per_round])
    by_cpu = {
        k: summarize([one[f"cpu_bound_{k}"] for one in per_round])
        for k in ("share_of_raw", "x_flask_fp32")
    }
    n = len(per_round)
    base = median_of(figures["flask_fp32_padded64"]["requests_per_s"])
    ours = median_of(figures["edgebento_int8"]["requests_per_s"])
    targets = {
        "at_least_4x_flask_fp32": median_of(speedup) >= 4,
        "cosine_min_ge_0.99": figures["fidelity_int8_vs_fp32"]["cosine_min"] >= 0.99,
        "ge_75pct_of_raw_onnxruntime": median_of(share) >= 0.75,  # issue 10
        # Shares of wall throughput follow the other work on a busy machine; CPU per answered
        # request does not (3 rounds at load 9-13: 80-84% by CPU, 88-119% by throughput).
        "cpu_bound_ge_75pct_of_raw_onnxruntime": median_of(by_cpu["share_of_raw"]) >= 0.75,
        "cpu_bound_at_least_4x_flask_fp32": median_of(by_cpu["x_flask_fp32"]) >= 4,
        "zero_non_2xx": all(one["edgebento_int8"]["non_2xx"] == 0 for one in per_round),
    }
    _print(figures, console)
    return {
        "headline": (
            f"{ours:.0f} sentences/s vs Flask FP32 {base:.0f} ({median_of(speedup):.1f}x), "
            f"{median_of(share):.0%} of raw ORT (by CPU per sentence: "
            f"{median_of(by_cpu['share_of_raw']):.0%} of raw ORT, "
            f"{median_of(by_cpu['x_flask_fp32']):.1f}x Flask), cosine_min "
            f"{figures['fidelity_int8_vs_fp32']['cosine_min']} (medians of {n} runs)"
        ),
        "targets_met": all(targets.values()),
        "targets": targets,
        "runs": n,
        "speedup_vs_flask_fp32": speedup,
        "fraction_of_raw_onnxruntime": share,
        "cpu_bound": by_cpu,
        "figures": figures,
        "per_round": [
            {
                "round": i + 1,
                "load_1m": one["load_before"]["load_1m"],
                "sentences_per_s": one["edgebento_int8"]["requests_per_s"],
                "raw_sps": round(one["raw_onnxruntime_same_batches_sps"], 1),
                "share": round(one["share_of_raw"], 3),
                "share_by_cpu": round(one["cpu_bound_share_of_raw"], 3),
                "flask_fp32_padded64": one["flask_fp32_padded64"]["requests_per_s"],
                "x_flask": round(one["x_flask_fp32"], 2),
                "x_flask_by_cpu": round(one["cpu_bound_x_flask_fp32"], 2),
                "edgebento_cpu_us_per_request": one["edgebento_int8"]["server_cpu_us_per_request"],
                "raw_cpu_us_per_sentence": round(
                    one["raw_onnxruntime_same_batches_cpu_us_per_sentence"], 1
                ),
                "flask_cpu_us_per_request": one["flask_fp32_padded64"]["server_cpu_us_per_request"],
            }
            for i, one in enumerate(per_round)
        ],
        "note": (
            "2 cores shared with the load generator and other work; every figure the median of "
            "the rounds, the servers and raw ORT in a rotating order; targets judged on the medians"
        ),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }


def _print(figures: dict[str, Any], console: Console) -> None:
    table = Table(
        title=f"MiniLM sentences/s at {CLIENTS} clients (wrk, loopback; median of rounds)"
    )
    for col in ("path", "sentences/s", "p50", "p99", "non-2xx", "server CPU us/req"):
        table.add_column(col)
    for name in ("flask_fp32_padded64", "flask_fp32_real_length", "edgebento_int8"):
        f = {k: median_of(v) for k, v in figures[name].items()}
        table.add_row(
            name,
            f"{f['requests_per_s']:.0f}",
            f"{f['p50_ms']:.0f} ms",
            f"{f['p99_ms']:.0f} ms",
            str(f["non_2xx"]),
            f"{f['server_cpu_us_per_request']:.0f}",
        )
    for name, what in (
        ("edgebento_int8_default_scheduler_sps", "edgebento, scheduler's default policy"),
        ("raw_onnxruntime_same_batches_sps", "raw onnxruntime, a session per core"),
        ("raw_onnxruntime_one_session_sps", "raw onnxruntime, one session"),
        ("raw_onnxruntime_padded_batches_sps", "raw, padded batches (unsafe here)"),
    ):
        if name in figures:
            table.add_row(what, f"{median_of(figures[name]):.0f}", "-", "-", "-", "-")
    console.print(table)
