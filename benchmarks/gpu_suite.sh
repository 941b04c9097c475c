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
SPARSE="sliding_window dilated block_topk block_sparse topk"

log "CUDA tests (kernels vs references)"
timeout 120 python -m pytest -q -x tests/kernels tests/selection/test_gathered_attention.py tests/linear/test_kernels.py \
  2>&1 | tail -15 | tee "$OUT/gpu_tests_${DEVICE}.txt"

log "long context: Triton kernels (structured key sets) vs SDPA, prefill 16k-128k, decode, training"
timeout 110 python benchmarks/long_context.py --device cuda --backend kernel --mechanisms $SPARSE \
  --lengths 16384 65536 131072 --decode-contexts 32768 131072 --train-length 32768 --repeat 3 \
  --out "$OUT/long_context_kernel_${DEVICE}.json" 2>&1 | tail -30

log "long context: FlexAttention (compiled, dynamic shapes) on the same selections"
timeout 100 python benchmarks/long_context.py --device cuda --backend flex --mechanisms sliding_window dilated block_topk \
  --lengths 16384 65536 131072 --parts prefill train --train-length 32768 --repeat 3 \
  --out "$OUT/long_context_flex_${DEVICE}.json" 2>&1 | tail -20

log "long context: the chunked PyTorch reference on CUDA tensors"
timeout 70 python benchmarks/long_context.py --device cuda --backend reference --mechanisms sliding_window dilated block_topk \
  --lengths 32768 131072 --parts prefill decode_call --decode-contexts 131072 --repeat 2 \
  --out "$OUT/long_context_reference_${DEVICE}.json" 2>&1 | tail -20

log "sparse kernels vs SDPA / FlexAttention"
timeout 60 python benchmarks/sparse_attention.py --parts decode prefill 2>&1 | tail -30

log "linear family vs flash-linear-attention"
timeout 60 python benchmarks/linear_family.py --out "$OUT/linear_family_${DEVICE}.json" 2>&1 | tail -20
log done
