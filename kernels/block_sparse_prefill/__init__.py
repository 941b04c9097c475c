"""Block-sparse prefill: flash-attention forward and backward over per-(batch, kv head, row block) key-tile lists,
with the exact keep test of a key_sets.KeySet (positions, rule, sorted lists) applied inside tiles. Kernels:
kernel.py (backward; the forward is selected_decode.kernel with one split); autograd wrapper: function.py; reference:
hf_attn_plus.chunked_attention.selected_attention. Import the submodules (they need Triton)."""
