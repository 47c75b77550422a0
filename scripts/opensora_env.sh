#!/usr/bin/env bash
# Builds the Open-Sora v1.3 environment the resident server (hparray/servers/opensora_v1_3.py) and
# tests/integration/test_opensora.py run in: a checkout at tag v1.3 and a venv with its requirements.
#
#   scripts/opensora_env.sh DEST [CHECKOUT | GIT_SOURCE]
#
# DEST/Open-Sora is the checkout (cloned from GIT_SOURCE, default the hpcaitech/Open-Sora repository
# on GitHub, or a local mirror; an existing CHECKOUT, a folder holding opensora/, is used in place and
# must be at v1.3), DEST/venv the venv, made with $PYTHON (default python3.10; >= 3.10 because
# opensora/utils/ckpt_utils.py:245 at v1.3 writes `torch.device | str`, which 3.9 cannot import).
# Ends by printing the two export lines that the integration test reads.
#
# torch comes from pip's configured index (PyPI: there torch 2.2.2 for Linux is the CUDA 12.1 build,
# which also runs on a CPU, and brings NVIDIA's libraries as wheels, about 2.5 GB); set TORCH_INDEX
# (e.g. PyTorch's cpu or cu121 wheel index) to take torch, torchvision and xformers from there.
# Not installed, because only GitHub or a CUDA toolkit has them: flash-attn, NVIDIA apex, tensornvme
# (docs/opensora.md: the server switches the first two off where they are missing).
set -euo pipefail

usage() { echo "usage: PYTHON=python3.10 $0 DEST [CHECKOUT | GIT_SOURCE]" >&2; exit 2; }
if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi

TAG=v1.3
COMMIT=b096aa3c1c59de663f1f40bf091945ee3f9ec455
PYTHON=${PYTHON:-python3.10}
mkdir -p "$1"
DEST=$(cd "$1" && pwd)
SOURCE=${2:-https://github.com/hpcaitech/Open-Sora.git}

# The versions verified together (docs/opensora.md, "Verified, and how"), within the bounds of
# Open-Sora's requirements/requirements-cu121.txt and requirements.txt (its inference part) at v1.3;
# pandas, ftfy and av keep that file's lower bounds (resolved to 2.3.3, 6.3.1 and 17.1.0 when the
# integration test last passed). sentencepiece: the tests' tiny T5 tokenizer.
# numpy goes with torch: torchvision would otherwise bring numpy 2, which the second step takes back.
TORCH_PINS=(torch==2.2.2 torchvision==0.17.2 xformers==0.0.25.post1 numpy==1.26.4)
PINS=(
  colossalai==0.5.0 mmengine==0.10.7 transformers==4.51.3 diffusers==0.29.0 accelerate==0.29.2
  timm==0.9.16 rotary_embedding_torch==0.5.3 "pandas>=2.0.3" "ftfy>=6.2.0" "av>=12.0.0" sentencepiece
)

say() { echo "opensora_env: $*" >&2; }

# ---------------------------------------------------------------- the checkout
if [ -d "$SOURCE/opensora" ]; then
  CHECKOUT=$(cd "$SOURCE" && pwd)
  say "using the checkout $CHECKOUT"
else
  CHECKOUT=$DEST/Open-Sora
  if [ ! -d "$CHECKOUT/.git" ]; then
    say "cloning $SOURCE -> $CHECKOUT"
    git clone --quiet "$SOURCE" "$CHECKOUT"
  fi
  git -C "$CHECKOUT" -c advice.detachedHead=false checkout --quiet "$TAG"
fi
head=$(git -C "$CHECKOUT" rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$head" != "$COMMIT" ]; then
  say "$CHECKOUT is at $head, not $TAG ($COMMIT): the server was written against $TAG"
  exit 1
fi

# ---------------------------------------------------------------- the venv
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { say "$PYTHON is $("$PYTHON" --version 2>&1); Open-Sora v1.3 needs >= 3.10"; exit 1; }
VENV=$DEST/venv
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
say "installing ${TORCH_PINS[*]}"
if [ -n "${TORCH_INDEX:-}" ]; then
  "${PIP[@]}" --index-url "$TORCH_INDEX" "${TORCH_PINS[@]}"
else
  "${PIP[@]}" "${TORCH_PINS[@]}"
fi
say "installing ${PINS[*]}"
# the torch pins again, so that nothing here moves them
"${PIP[@]}" "${TORCH_PINS[@]}" "${PINS[@]}"
"$VENV/bin/python" -m pip check >&2
"$VENV/bin/python" -m pip freeze >"$DEST/pip-freeze.txt"
say "checking that Open-Sora's modules import"
(cd "$CHECKOUT" && "$VENV/bin/python" -c '
import opensora.models, opensora.schedulers, torch, xformers, colossalai, mmengine
print(f"torch {torch.__version__}, xformers {xformers.__version__}, colossalai {colossalai.__version__}")' >&2)

echo "export HPARRAY_OPENSORA_CHECKOUT=$CHECKOUT"
echo "export HPARRAY_OPENSORA_PYTHON=$VENV/bin/python"
