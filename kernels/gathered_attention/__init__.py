"""Gathered attention: each query attends to two slot ranges of the KV cache (its sinks and its local window) and an
explicit list of other key slots, each listed key with an additive log-weight (0 for exact attention; an importance
correction for sampled estimators). Shared by stochastic_routing (training and inference) and santa (decode).
What a query sees comes as key_sets.Visibility (positions; no mask).

hf_attn_plus.kernel_inputs turns real positions into the ranges and slot lists; reference.py is the plain-PyTorch
truth; kernel.py the Triton forward and backward; function.py the autograd Function. Import the kernel and function
submodules only where Triton is available; the reference needs only PyTorch.
"""
