"""Triton kernels; each implements a reference from hf_attn_plus faster and never changes its semantics.

- selected_decode/: attention of a few new queries over selected KV tiles, split-KV with a log-sum-exp merge; a block
  mode reads chosen key blocks (block_topk decode) without a per-token mask.
- block_sparse_prefill/: flash-attention forward/backward over per-row-block tile lists (autograd Function).
- block_scoring/: per-block key min/max summaries and slot spans grown with the cache, and the Quest bound kernel.
- gathered_attention/: attention over per-query slot ranges plus listed slots with log-weights (stochastic_routing,
  santa); Triton forward and backward (dK/dV by fp32 atomics).
- linear_attention/: chunked causal linear attention, Triton forward and backward (autograd Function, gradients of the
  initial state too) and the one-token decode step.
- gated_delta/: the gated delta rule: chunked UT-form forward and backward (autograd Function) and the recurrent decode
  step; momentum.py: the same three for the momentum delta rule, on its (S, M) state.
- hybrid_attention/: LoLCATs hybrid (softmax window + linear attention over older keys, one normaliser): forward (also
  the decode step) and backward, built on linear_attention's helpers.
- indexer_topk/: lightning-indexer scoring with sortable (score, position) keys and a running per-split top-k.
- sparse_attention.py: the Mechanism.kernel adapter for every mechanism that is softmax over `select`'s keys.

Triton is imported only when a kernel runs, so the package and every reference path work without it.
"""
