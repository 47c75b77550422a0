"""Benchmarks: each prints a table and writes JSON to bench/out/. Run from the repo root as
`python -m bench.bench_claims` (etc.) or all of them with `bash scripts/bench.sh`."""
