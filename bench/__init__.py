"""Benchmarks: each module has `run(quick: bool) -> dict` and runs with `python -m bench.NAME`."""
