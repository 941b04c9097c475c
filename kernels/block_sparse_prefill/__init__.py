"""Block-sparse prefill: flash-attention forward and backward over per-(batch, kv head, row block) key-tile lists,
causal-aware, with the exact per-token keep mask applied inside tiles. Kernels: kernel.py (backward; the forward is
selected_decode.kernel with one split); autograd wrapper: function.py; reference:
hf_attn_plus.reference.masked_attention. Import the submodules (they need Triton)."""
