"""Session-wide test settings, applied before any test module imports hf_attn_plus (and through it triton)."""

import os

import torch

# Triton decides at decoration time whether kernels are interpreted, so this must precede the first import of the
# kernels; on a machine without a GPU the interpreter is the only way they run.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The suite is many tiny models: one thread beats two oversubscribed ones on a shared 2-core machine.
torch.set_num_threads(1)
