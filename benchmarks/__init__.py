"""Benchmarks: each ``bench_*.py`` module has ``run(results_dir: Path) -> dict`` and writes
``results_dir/NAME.json``; ``python -m benchmarks [NAME ...]`` runs them and prints a table.
Speed is measured here, never asserted in tests."""
