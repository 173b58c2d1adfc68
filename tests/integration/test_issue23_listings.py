"""The registry's listings and ``pack inspect`` as a user pipes them (issue 23, item 7: never
truncate an identifier): ``registry list`` cut a long pack name and the fidelity figures to
``…`` at 80 columns, ``registry show`` cut the manifest's sha256 and ``pack inspect`` the
parent's, so what a user copied into ``registry show NAME`` or a grep matched nothing; and
``publish`` broke its one line in two."""

from __future__ import annotations

import json
from pathlib import Path

from modelpack import create_pack
from tests.support.cli_run import run_cli

# Wider than rich's 80-column table leaves a name column beside five others.
NAME = "warehouse-north-entrance-person-classifier-int8"
FIDELITY = {"accuracy": 0.93333, "top1_agreement": 0.975, "cosine_min": 0.84551}


def _pack(tmp_path: Path, model: Path, key: Path) -> Path:
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"within_budget": True, "fidelity": FIDELITY}))
    out = tmp_path / "pack"
    create_pack(model, out, name=NAME, version=1, report=report, key=key)
    return out


def test_piped_listings_keep_names_hashes_and_figures_whole(
    tmp_path: Path, mlp_model: Path, keys: tuple[Path, Path]
) -> None:
    pack = _pack(tmp_path, mlp_model, keys[0])
    store = str(tmp_path / "store")
    published = run_cli("publish", str(pack), "--store", store, "--key", str(keys[0]))
    assert published.returncode == 0, published.stderr
    line = published.stdout.splitlines()[0]  # one line, as a script reads it
    assert line.startswith(f"published {NAME} v1") and line.endswith("channel stable -> v1"), (
        published.stdout
    )

    listed = run_cli("registry", "list", "--store", store)
    assert listed.returncode == 0, listed.stderr
    fidelity = json.loads(run_cli("registry", "list", "--store", store, "--json").stdout)
    fidelity_text = fidelity["packs"][0]["fidelity"]
    rows = [line for line in listed.stdout.splitlines() if NAME in line.split()]
    assert len(rows) == 1, listed.stdout  # the whole name, on one row a grep finds
    assert fidelity_text in rows[0] and "…" not in listed.stdout, listed.stdout

    shown = run_cli("registry", "show", NAME, "1", "--store", store)
    assert shown.returncode == 0, shown.stderr
    entry = json.loads(run_cli("registry", "show", NAME, "1", "--store", store, "--json").stdout)
    assert entry["entry"]["manifest_sha256"] in shown.stdout, shown.stdout

    inspected = run_cli("pack", "inspect", str(pack))
    assert inspected.returncode == 0, inspected.stderr
    parent = json.loads(run_cli("pack", "inspect", str(pack), "--json").stdout)["parent"]
    assert parent and parent in inspected.stdout, inspected.stdout
