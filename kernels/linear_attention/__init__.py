"""Triton kernels for causal linear attention; each equals hf_attn_plus.linear_ops (chunked / recurrent forms)."""
