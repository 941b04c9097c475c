"""Triton kernels; each implements a reference from hf_attn_plus faster and never changes its semantics. The sparse
attention kernels (key sets, selected_decode, block_sparse_prefill, block_scoring, gathered_attention) are leaves:
they import nothing from hf_attn_plus (tensors and lists in, tensors out); indexer_topk, linear_attention and
hybrid_attention still import from it.

- key_sets.py, keep_tile.py, tile_lists.py: what the attention kernels read instead of a [q, kv] mask (per-sequence
  positions, a position rule's integers, sorted block / token lists), the in-kernel keep test, and the per-row-block
  tile lists built from them; hf_attn_plus/kernel_inputs.py builds them from a structure.Selection.
- selected_decode/: attention of a few new queries over selected KV tiles, split-KV with a log-sum-exp merge.
- block_sparse_prefill/: flash-attention forward/backward over per-row-block tile lists (autograd Function).
- block_scoring/: per-block key min/max summaries grown with the cache, and the Quest bound kernel.
- gathered_attention/: attention over per-query slot ranges plus listed slots with log-weights (stochastic_routing,
  santa); Triton forward and backward (dK/dV by fp32 atomics).
- linear_attention/: chunked causal linear attention, Triton forward and backward (autograd Function, gradients of the
  initial state too) and the one-token decode step.
- gated_delta/: the gated delta rule: chunked UT-form forward and backward (autograd Function) and the recurrent decode
  step; momentum.py: the same three for the momentum delta rule, on its (S, M) state.
- hybrid_attention/: LoLCATs hybrid (softmax window + linear attention over older keys, one normaliser): forward (also
  the decode step) and backward, built on linear_attention's helpers.
- indexer_topk/: lightning-indexer scoring with sortable (score, position) keys and a running per-split top-k.
- sparse_attention.py: decode or prefill kernel for a key set (what every `select` mechanism's kernel runs).

Triton is imported only when a kernel runs, so the package and every reference path work without it.
"""
