#!/usr/bin/env bash
# make demo: the lr search on the bundled sample videos with the built-in tiny LTX-Video model and
# two local workers, end to end; then the status table and the report.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # one thread per worker: two workers share two cores
hp() { .venv/bin/hparray "${METRICS[@]}" "$@"; }

METRICS=()
if ! .venv/bin/python -c "from hparray.metrics import lpips_weights_status as s; raise SystemExit(0 if s().genuine else 1)"; then
  echo "LPIPS: the AlexNet backbone alexnet-owt-7be5be79.pth is not on this machine (offline), so the demo scores PSNR and SSIM only."
  METRICS=(--metrics psnr,ssim)
fi

hp plan --search lr --dry-run
hp plan --search lr
hp submit --local --workers 2
hp status
hp report
