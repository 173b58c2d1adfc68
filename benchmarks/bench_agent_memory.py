"""The edge agent's memory after load and two model swaps on the digits model (issue 22 item 5):
RSS, USS and anonymous memory (``Anonymous`` in smaps_rollup, what the process allocates itself;
RSS and USS move with how much of the shared libraries the page cache maps in), side by side
with the agent issue 22 measured and the tree before this change, alternated, medians of 3.

Also: what each import adds (plain python and as the systemd unit starts the agent), the floor
any agent with the same runtime, MQTT client, outbox and session cannot go below (and what
pydantic with one model adds to it), the default malloc against two arenas, and the settings
tried beside the agent as shipped and not kept.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from benchmarks.agent_memory import (
    AS_SHIPPED_ENV,
    AS_SHIPPED_FLAGS,
    REPO,
    bytecode_cache,
    cpu_arena,
    rss_breakdown,
    rss_floor,
)
from benchmarks.baseline import baseline_tree
from benchmarks.bench_agent import GREENGRASS_MIN_RAM_MB, _memory_after_load, digits_packs
from tests.support import models
from tests.support.services import Mosquitto

TARGETS = {"rss_mb": 80.0, "anonymous_mb": 36.0}  # issue 22, after load and two swaps
# The agent issue 22 measured (92 MB RSS, about 43 MB anonymous after load and two swaps).
ISSUE_22_COMMIT = "6b3ac19e050faa2ee19dc75e31fea4ce4528c80c"
# The tree before the agent left unused modules unimported (edge_agent.memory.defer_unused_imports).
BEFORE_COMMIT = "3754e4e4653db8ab267611327811c1142e0bc375"


def run(results_dir: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-agent-memory-") as tmp:
        work = Path(tmp)
        pub, packs, x = digits_packs(work)
        broker = Mosquitto(workdir=work / "mosquitto").start()
        try:
            side_by_side = _side_by_side(broker, work, pub, packs, x)
            cache = bytecode_cache(work)
            arenas = {
                name: _memory_after_load(
                    name, broker, work, pub, packs[0], x, {**cache, **env}, REPO, packs[1:]
                )
                for name, env in (
                    ("default", {"MALLOC_ARENA_MAX": ""}),
                    ("malloc_arena_max_2", {"MALLOC_ARENA_MAX": "2"}),
                )
            }
            levers = _levers(broker, work, pub, packs, x)
            memory_floor = rss_floor(work / "digits1.onnx", broker.port, work)
            shipped_floor = rss_floor(
                work / "digits1.onnx", broker.port, work, AS_SHIPPED_FLAGS, AS_SHIPPED_ENV
            )
        finally:
            broker.stop()
        breakdown = rss_breakdown(packs[0], pub, env=cache)
        wide = models.mlp(work / "wide.onnx", n_in=1024, hidden=2048, n_out=10)
        arena = cpu_arena(
            {
                "digits_mlp_batch_1": (work / "digits1.onnx", 1, 64),
                "mlp_1024_2048_batch_256": (wide, 256, 1024),
            },
            work,
            AS_SHIPPED_FLAGS,
        )
        shipped_breakdown = rss_breakdown(
            packs[0], pub, AS_SHIPPED_FLAGS, {**AS_SHIPPED_ENV, **cache}
        )
    shipped, today = side_by_side["this_as_shipped"], side_by_side["today"]
    return {
        "model": "digits MLP 64-64-10, float32, batch 1; load: 300 round trips, 3,000 "
        "pipelined, then two deploys under pipelined load",
        "after_load_and_two_swaps_mb": side_by_side,
        "as_shipped": {
            "python_flags": list(AS_SHIPPED_FLAGS),
            "env": AS_SHIPPED_ENV,
            "unit": "deploy/systemd/edge-agent.service",
        },
        "bytecode": "cached, as after an install: one discarded run of each variant writes it",
        "rss_breakdown": breakdown,
        "rss_breakdown_as_shipped": shipped_breakdown,
        "rss_floor": memory_floor,
        "rss_floor_as_shipped": shipped_floor,
        "pydantic_share_as_shipped_mb": {
            k: round(shipped_floor["plus_pydantic_one_model"][k] - v, 1)
            for k, v in shipped_floor["runtime_mqtt_outbox_session"].items()
        },
        "levers_tried_after_load_and_two_swaps_mb": levers,
        "ort_cpu_arena_anonymous_mb": {
            "measured": "a fresh process, the session loaded and run 50 times (-OO, two arenas)",
            **arena,
        },
        "malloc_arenas": arenas,
        "baseline_greengrass_min_ram_mb": GREENGRASS_MIN_RAM_MB,
        "targets": TARGETS,
        "targets_met": bool(
            shipped["rss"] <= TARGETS["rss_mb"] and shipped["anonymous"] <= TARGETS["anonymous_mb"]
        ),
        "headline": (
            f"after load and two swaps, as the systemd unit starts it: RSS {shipped['rss']:.1f} "
            f"MB, anonymous {shipped['anonymous']:.1f} MB; issue 22's agent {today['rss']:.1f} "
            f"and {today['anonymous']:.1f} (median of 3 alternated runs; Greengrass >= "
            f"{GREENGRASS_MIN_RAM_MB} MB)"
        ),
    }


Variant = tuple[Path, tuple[str, ...], dict[str, str]]  # source tree, python flags, environment


def _side_by_side(
    broker: Mosquitto, work: Path, pub: Path, packs: list[Path], x: list[list[float]]
) -> dict[str, dict[str, Any]]:
    """Issue 22's agent, the tree before unused modules were deferred and this one (each also
    as the systemd unit starts it), after the same load and two swaps, alternated; the median
    round of each, and each round's figures. One discarded run of each first writes its
    bytecode to the cache all runs read."""
    cache = bytecode_cache(work)
    shipped = {**cache, **AS_SHIPPED_ENV}
    before = baseline_tree(work, BEFORE_COMMIT)
    variants: dict[str, Variant] = {
        "today": (baseline_tree(work, ISSUE_22_COMMIT), (), cache),
        "before": (before, (), cache),
        "before_as_shipped": (before, AS_SHIPPED_FLAGS, shipped),
        "this": (REPO, (), cache),
        "this_as_shipped": (REPO, AS_SHIPPED_FLAGS, shipped),
    }
    runs = _alternated(variants, broker, work, pub, packs, x, warm_up=True)
    out: dict[str, dict[str, Any]] = {}
    for name, each in runs.items():
        out[name] = {
            **_median(each),
            **{f"{k}_each_round": [f[k] for f in each] for k in ("rss", "uss", "anonymous")},
        }
    return out


# Settings tried beside the agent as shipped, none kept (docs/edge-agent.md, "Memory"): glibc's
# mmap threshold fixed (a freed large block goes back to the system at once instead of staying
# in the heap), and numpy's OpenBLAS without its thread per core.
LEVERS = {
    "mmap_threshold_64k": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"},
    "openblas_one_thread": {"OPENBLAS_NUM_THREADS": "1"},
}


def _levers(
    broker: Mosquitto, work: Path, pub: Path, packs: list[Path], x: list[list[float]]
) -> dict[str, dict[str, Any]]:
    """Each of ``LEVERS`` against the agent as shipped, alternated, after the same load and two
    swaps; the median round of each and what it saves (the side-by-side runs before it have
    cached the bytecode)."""
    shipped = {**bytecode_cache(work), **AS_SHIPPED_ENV}
    variants: dict[str, Variant] = {
        name: (REPO, AS_SHIPPED_FLAGS, {**shipped, **env})
        for name, env in {"as_shipped": {}, **LEVERS}.items()
    }
    runs = _alternated(variants, broker, work, pub, packs, x, warm_up=False)
    base = _median(runs["as_shipped"])
    out: dict[str, dict[str, Any]] = {}
    for name, each in runs.items():
        mid = _median(each)
        out[name] = {
            "rss": mid["rss"],
            "anonymous": mid["anonymous"],
            "anonymous_each_round": [f["anonymous"] for f in each],
            "saves_anonymous": round(base["anonymous"] - mid["anonymous"], 1),
            "saves_rss": round(base["rss"] - mid["rss"], 1),
        }
    return out


def _alternated(
    variants: dict[str, Variant],
    broker: Mosquitto,
    work: Path,
    pub: Path,
    packs: list[Path],
    x: list[list[float]],
    warm_up: bool,
    rounds: int = 3,
) -> dict[str, list[dict[str, float]]]:
    """Each variant after the same load and two swaps, ``rounds`` times (A B C A B C ...) so a
    busy moment of the machine hits all; with ``warm_up``, one discarded round first."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    for i in range(-1 if warm_up else 0, rounds):
        for name, (tree, flags, env) in variants.items():
            device = f"rss-{name}-{i + 1}"
            figures = _memory_after_load(
                device, broker, work, pub, packs[0], x, env, tree, packs[1:], flags
            )
            if i >= 0:
                runs[name].append(figures)
    return runs


def _median(each: list[dict[str, float]]) -> dict[str, float]:
    """The median round by anonymous memory (RSS moves with the page cache)."""
    return sorted(each, key=lambda f: f["anonymous"])[len(each) // 2]
