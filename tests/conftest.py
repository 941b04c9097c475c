"""Suite-wide setup that must precede every test module's imports."""

import os

# `import hf_attn_plus` imports triton; Triton decides at import whether kernels (and triton.language's own jit
# helpers such as tl.sum's combine function) run in the CPU interpreter. Set here, before any folder's conftest or
# test module imports the package, so kernel tests pass whatever folder pytest collects first.
os.environ.setdefault("TRITON_INTERPRET", "1")
