"""Attention transfer (LoLCATs stage 1): train only the mechanism's new weights so that every layer's attention
output matches dense attention's, both computed on the dense model's own hidden states.

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/attention_transfer.py \
        --config recipes/teacher/hybrid.yaml

The interface to a mechanism is small: `hf_attn_plus.distill.attention_pairs` gives each layer's (mechanism output,
dense output) on the same query/key/value, and its trainable weights are the parameters whose name contains
`.attn_plus.` (the plugin's convention). Everything else stays frozen. Reports held-out perplexity of the dense
teacher, of the untrained swap and of the distilled model, and saves the distilled model (mechanism weights and
options included) to output_dir/final.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (
    dense_teacher,
    load_corpus,
    load_model,
    parse_args,
    perplexity,
    setup,
    summarise,
    train,
    train_only_mechanism_weights,
)

from hf_attn_plus.distill import attention_pairs

class AttentionTransfer(torch.nn.Module):
    """Mean over layers of MSE(mechanism attention output, dense attention output), each layer fed the dense
    model's hidden states (`hf_attn_plus.distill.attention_pairs` with propagate='teacher')."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        with attention_pairs(self.model) as pairs:
            self.model.get_decoder()(input_ids=input_ids, use_cache=False)  # the LM head plays no part
        losses = [F.mse_loss(pair.student.float(), pair.teacher.float()) for pair in pairs.values()]
        return {"loss": torch.stack(losses).mean()}


def main() -> dict:
    started = time.time()
    cfg = parse_args(__doc__)
    accelerator = setup(cfg)
    model, tokenizer = load_model(cfg, accelerator, {"data.seq_len": cfg.data.seq_len})
    n_trainable = train_only_mechanism_weights(model, cfg.mechanism)
    accelerator.print(f"training {n_trainable} mechanism parameters; everything else is frozen")
    corpus = load_corpus(cfg.data, tokenizer, accelerator)
    train_blocks = corpus.train_blocks(cfg.data.seq_len)
    eval_blocks = corpus.eval_blocks(cfg.data.seq_len, cfg.data.eval_blocks)
    with dense_teacher(model) as teacher:
        teacher_ppl = perplexity(accelerator, teacher, eval_blocks)

    def evaluate(objective: AttentionTransfer) -> dict[str, float]:
        with torch.no_grad():
            mse = objective(eval_blocks[:8].to(accelerator.device))["loss"].item()
        return {"ppl": perplexity(accelerator, objective.model, eval_blocks), "attention_mse": mse}

    log = train(cfg, accelerator, AttentionTransfer(model), train_blocks, evaluate)
    accelerator.wait_for_everyone()
    evals = [row["eval"] for row in log if "eval" in row]
    rows = {
        "teacher (dense) ppl": teacher_ppl,
        f"{cfg.mechanism} untrained ppl": evals[0]["ppl"],
        f"{cfg.mechanism} distilled ppl": evals[-1]["ppl"],
        "attention MSE untrained": evals[0]["attention_mse"],
        "attention MSE distilled": evals[-1]["attention_mse"],
    }
    summary = summarise(cfg, accelerator, log, rows, started)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        model.save_pretrained(Path(cfg.train.output_dir) / "final")
        tokenizer.save_pretrained(Path(cfg.train.output_dir) / "final")
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
