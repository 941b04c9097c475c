#!/usr/bin/env bash
# One command for a lent GPU (under 9 minutes): the CUDA test subset, then every benchmark at long context, each
# results file named with the device. Run from the repository root: bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=$(python -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))")
OUT=benchmarks/results
mkdir -p "$OUT"
log() { echo "== $(date +%T) $*"; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
pip install -q --no-deps -e . >/dev/null 2>&1 || true

log "CUDA tests (kernels vs references)"
timeout 150 python -m pytest -q -x tests/kernels tests/selection/test_gathered_attention.py tests/linear/test_kernels.py \
  2>&1 | tail -15 | tee "$OUT/gpu_tests_${DEVICE}.txt"

log "long context: the chunked reference on CUDA tensors (the Triton kernels still read a dense keep mask: 16k only)"
timeout 150 python benchmarks/long_context.py --device cuda --backend reference --lengths 8192 32768 65536 131072 \
  --decode-contexts 32768 131072 --train-length 32768 --repeat 3 --out "$OUT/long_context_${DEVICE}.json" 2>&1 | tail -40
timeout 60 python benchmarks/long_context.py --device cuda --backend kernel --lengths 16384 --parts prefill \
  --mechanisms sliding_window block_topk --out "$OUT/long_context_kernel_${DEVICE}.json" 2>&1 | tail -10

log "sparse kernels vs SDPA / FlexAttention"
timeout 150 python benchmarks/sparse_attention.py --parts decode prefill 2>&1 | tail -30

log "linear family vs flash-linear-attention"
timeout 90 python benchmarks/linear_family.py --out "$OUT/linear_family_${DEVICE}.json" 2>&1 | tail -20
log done
