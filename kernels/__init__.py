"""Triton kernels; each implements a reference from hf_attn_plus faster and never changes its semantics."""
