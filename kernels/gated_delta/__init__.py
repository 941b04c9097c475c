"""Triton kernels for the gated delta rule; each equals hf_attn_plus.linear_ops (`chunked_gated_delta` /
`recurrent_gated_delta`). `recurrent.py`: the token-by-token forward (decode) and the backward; `chunked.py`: the
chunked (UT transform) forward and the autograd function that pairs it with that backward."""
