"""Selected-block decode: attention of a few new queries over only the selected KV tiles, split over tiles with a
log-sum-exp merge (flash-decoding), GQA-aware; its block mode (block_topk) goes from chosen blocks to tiles without a
per-token mask. Kernel: kernel.py; wrapper: wrapper.py; reference: hf_attn_plus.reference.masked_attention over a
mechanism's `select` keep mask. Import the submodules (they need
Triton); this package itself imports without it."""
