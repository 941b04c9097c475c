"""Selected decode: attention of a few new queries over only the KV tiles a key_sets.KeySet covers, split over tiles
with a log-sum-exp merge (flash-decoding), GQA-aware, without a per-token mask. Kernel: kernel.py; wrapper:
wrapper.py; reference: hf_attn_plus.chunked_attention.selected_attention. Import the submodules (they need Triton);
this package itself imports without it."""
