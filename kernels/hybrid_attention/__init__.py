"""Triton kernels for hybrid (LoLCATs) attention; they equal hf_attn_plus.linear_ops.chunked_hybrid_attention.
`kernel.py`: the forward (prefill, training and the decode step), the backward, and the autograd function
`hybrid_attention`."""
