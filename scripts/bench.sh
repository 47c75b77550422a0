#!/usr/bin/env bash
# Every benchmark, one after the other (`make bench`): tables on stdout, JSON in bench/out/.
# On a shared machine compare rows of one run only; the JSON files record the load average.
# Takes about 15 minutes on 2 quiet cores (the demo model's 20 videos x 8 arms are half of it). BENCH_QUICK=1 runs small sizes (2-3 minutes) to check
# that everything works.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
export PYTHONUNBUFFERED=1
# The tiny model on a few shared cores: one thread per process keeps the timings steady.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"

if ! "$PY" -c "import optuna" 2>/dev/null; then
  echo "optuna is missing: $PY -m pip install -e '.[bench]'" >&2
  exit 1
fi

if [[ "${BENCH_QUICK:-0}" == 1 ]]; then
  claims=(--procs 1,8 --target-s 1)
  overhead=(--videos 1 --steps 2 --no-360p)
  pipeline=(--videos 1 --gpu-s 4 --no-sizes)
  resident=(--tasks 2 --steps 2)
  server=(--videos 2 --load-s 1)
  verdicts=(--sweeps 50)
  stopping=(--sweeps 100)
  demo_model=(--videos 4 --lrs 1e-6,1e-4)
else
  claims=()
  overhead=()
  pipeline=()
  resident=()
  server=()
  verdicts=()
  stopping=()
  demo_model=()
fi

started=$(date +%s)
echo "== load: $(uptime)"
echo "== planned work (bench/bench_plan.py)"
"$PY" -m bench.bench_plan
echo "== claim throughput (bench/bench_claims.py)"
"$PY" -m bench.bench_claims "${claims[@]}"
echo "== orchestration overhead (bench/bench_overhead.py)"
"$PY" -m bench.bench_overhead "${overhead[@]}"
echo "== GPU idle between rows at 360p, background stage off/on; bytes per row (bench/bench_pipeline.py)"
"$PY" -m bench.bench_pipeline "${pipeline[@]}"
echo "== resident model vs one process per task (bench/bench_resident.py)"
"$PY" -m bench.bench_resident "${resident[@]}"
echo "== a slow-loading model: resident server vs command runner (bench/bench_server.py)"
"$PY" -m bench.bench_server "${server[@]}"
if [[ "${BENCH_QUICK:-0}" != 1 ]]; then
  echo "== LTX-Video's 2 B architecture on the CPU (bench/bench_ltx_2b.py; ~10 GiB)"
  "$PY" -m bench.bench_ltx_2b
fi
echo "== the report's verdicts on simulated sweeps (bench/bench_verdicts.py)"
"$PY" -m bench.bench_verdicts "${verdicts[@]}"
echo "== sequential stopping on simulated searches (bench/bench_stopping.py)"
"$PY" -m bench.bench_stopping "${stopping[@]}"
echo "== the shipped demo model on held-out videos (bench/bench_demo_model.py)"
"$PY" -m bench.bench_demo_model "${demo_model[@]}"
echo "== done in $(( $(date +%s) - started )) s; results in bench/out/; load: $(uptime)"
