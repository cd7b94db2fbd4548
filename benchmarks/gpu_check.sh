#!/usr/bin/env bash
# One GPU check, one command, one JSON (benchmarks/out/gpu_check.json): full finetune samples/s and
# FLOP utilisation at 1024², LoRA r16 peak memory with the bf16 and fp8 bases, the full finetune's
# peak with both memory savers and Adafactor, the attention kernel
# actually used, and bf16-vs-fp32 loss agreement. Under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh              # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: every code path on the CPU with the tiny UNet
#
# Which Python: $PYTHON when set (an environment that already has a CUDA torch and this package's
# dependencies); else .venv/bin/python when it exists; else a fresh .venv is made: torch from
# TORCH_INDEX_URL (default: the CUDA 12.8 wheel index; the dry run uses `make install`'s CPU torch),
# then `make install` (the package at the tested versions in constraints.txt, keeping that torch).
# Anything missing stops the check with a message and a non-zero exit; a part that fails is
# recorded in the JSON and also makes the exit status non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  command -v python3 >/dev/null || { echo "gpu_check: python3 not found" >&2; exit 2; }
  if [ "$dry" = 0 ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}" \
      --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" \
      || { echo "gpu_check: could not install a CUDA torch; set TORCH_INDEX_URL or PYTHON" >&2; exit 2; }
  fi
  make install >/dev/null || { echo "gpu_check: make install failed" >&2; exit 2; }
  py=.venv/bin/python
fi

"$py" -c "import torch, diffusers, transformers, peft" 2>/dev/null \
  || { echo "gpu_check: $py lacks torch, diffusers, transformers or peft (make install, or set PYTHON)" >&2; exit 2; }
if [ "$dry" = 0 ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: $py's torch sees no CUDA device ($("$py" -c 'import torch; print(torch.__version__)')); on a CPU use --dry-run" >&2
  exit 2
fi
PYTHONUNBUFFERED=1 exec "$py" benchmarks/gpu_check.py "$@"
