"""Long-context fine-tune with a sparse mechanism: LoRA-train on blocks of `long_context.seq_len` (longer than the
model was trained on) while the mechanism (sliding_window, dilated, topk, ...) bounds what each query attends, then
report held-out perplexity of the dense teacher and of the student at each of `long_context.eval_lengths`.

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/long_context.py \
        --config recipes/teacher/long_sliding_window.yaml

Same objective, adapters and outputs as lora_finetune.py (set `lora.kl_weight` for a KL to the dense teacher).
"""

from __future__ import annotations

from common import parse_args
from lora_finetune import finetune

if __name__ == "__main__":
    finetune(parse_args(__doc__), long_context=True)
