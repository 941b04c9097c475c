"""Triton kernels for the gated delta rule; each equals hf_attn_plus.linear_ops (`chunked_gated_delta` /
`recurrent_gated_delta`). `recurrent.py`: the token-by-token forward (decode); `chunked.py`: the chunked (UT transform)
forward and backward, and the autograd function `gated_delta`."""
