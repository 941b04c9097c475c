"""Triton kernel for hybrid (LoLCATs) attention; equals hf_attn_plus.linear_ops.chunked_hybrid_attention.
`kernel.py`: the forward (prefill, training and the decode step) and the autograd function `hybrid_attention`."""
