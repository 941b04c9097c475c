"""Lightning-indexer (DSA) scoring and top-k selection for indexer_topk, side by side: reference.py (plain PyTorch,
the truth), kernel.py (Triton: scores + exclusions -> fp32 scores, sortable keys or a per-split top-k), wrapper.py
(final top-k -> index list and keep mask). Import the submodules on use: Triton stays optional."""
