"""Indexer training for `indexer_topk` (DeepSeek-V3.2 DSA), one stage per run, chosen by `options.stage`:

- warmup: the main model is frozen and attends densely; only the indexer (`*.attn_plus.*`) trains, on
  KL(dense attention summed over heads || softmax(index scores)) over all visible keys (option `objective` picks
  other keys or targets). `indexer.init: attention` starts it from the layer's own attention instead of at random
  (in either stage: from that start the sparse stage can run directly).
- sparse: the model attends its indexer's selection; LoRA on the attention projections learns the next-token loss
  while the indexer keeps training on the KL restricted to the selected set (its input is detached, so the two
  losses never mix gradients).

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/indexer_training.py \
        --config recipes/teacher/indexer_topk.yaml                      # warm-up
    accelerate launch --config_file recipes/accelerate/single.yaml recipes/indexer_training.py \
        --config recipes/teacher/indexer_topk.yaml --stage sparse    # on the warm-up's output (`stages.sparse`)

Reports held-out perplexity of the dense teacher and of the sparse model before and after, and the indexer KL;
saves the model (warm-up) or the LoRA adapter with the indexer (sparse) to output_dir/final.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

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

from hf_attn_plus.mechanisms.indexer_topk import indexer_loss, init_from_attention


class IndexerObjective(torch.nn.Module):
    """Indexer KL of a training forward (recorded by each layer's indexer), plus the next-token loss when the main
    model trains too (sparse stage)."""

    def __init__(self, model: torch.nn.Module, with_lm_loss: bool, indexer_lr: float | None = None) -> None:
        super().__init__()
        self.model, self.with_lm_loss, self.indexer_lr = model, with_lm_loss, indexer_lr

    def parameter_groups(self, trainable: list[torch.nn.Parameter]) -> list[dict]:
        """The indexer at its own peak rate (`indexer.lr`) when one is set: a started indexer should move slower than
        a LoRA learns."""
        if self.indexer_lr is None:
            return [{"params": trainable}]
        indexer = {id(p) for name, p in self.named_parameters() if ".attn_plus." in name}
        return [
            {"params": [p for p in trainable if id(p) not in indexer]},
            {"params": [p for p in trainable if id(p) in indexer], "peak_lr": self.indexer_lr},
        ]

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        labels = input_ids if self.with_lm_loss else None
        output = self.model(input_ids=input_ids, labels=labels, use_cache=False)
        kl = indexer_loss(self.model)
        return {"loss": kl + output.loss if self.with_lm_loss else kl}


def main() -> dict:
    started = time.time()
    cfg = parse_args(__doc__)
    if cfg.mechanism != "indexer_topk":
        raise ValueError(f"indexer training is for mechanism 'indexer_topk', got mechanism={cfg.mechanism!r}")
    if cfg.indexer.init not in ("random", "attention"):
        raise ValueError(f"indexer.init got {cfg.indexer.init!r}; allowed: 'random', 'attention'")
    accelerator = setup(cfg)
    model, tokenizer = load_model(cfg, accelerator, {"data.seq_len": cfg.data.seq_len})
    sparse = model.config.hf_attn_plus.get("stage", "sparse") == "sparse"
    corpus = load_corpus(cfg.data, tokenizer, accelerator)
    train_blocks = corpus.train_blocks(cfg.data.seq_len)
    if cfg.indexer.init == "attention":
        # Either stage (from this start the warm-up did not help on SmolLM2); a resumed checkpoint overwrites it.
        # Below full width the key basis comes from training text.
        init_from_attention(model, calibration=train_blocks[: cfg.indexer.calibration_blocks])
    if sparse:
        lora = cfg.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                modules_to_save=["attn_plus"],  # the indexer keeps training beside the adapters
            ),
        )
    else:
        train_only_mechanism_weights(model, cfg.mechanism)
    eval_blocks = corpus.eval_blocks(cfg.data.seq_len, cfg.data.eval_blocks)
    with dense_teacher(model) as teacher:
        teacher_ppl = perplexity(accelerator, teacher, eval_blocks)
    objective = IndexerObjective(model, with_lm_loss=sparse, indexer_lr=cfg.indexer.lr)

    def evaluate(objective: IndexerObjective) -> dict[str, float]:
        # The KL is recorded by training forwards only; evaluate it without updating anything.
        objective.model.train()
        with torch.no_grad():
            kl = objective(eval_blocks[:8].to(accelerator.device))["loss"].item()
        return {"ppl": perplexity(accelerator, objective.model, eval_blocks), "objective": kl}

    log = train(cfg, accelerator, objective, train_blocks, evaluate)
    accelerator.wait_for_everyone()
    evals = [row["eval"] for row in log if "eval" in row]
    stage = "sparse" if sparse else "warmup"
    rows = {
        "teacher (dense) ppl": teacher_ppl,
        f"indexer_topk before {stage} ppl": evals[0]["ppl"],
        f"indexer_topk after {stage} ppl": evals[-1]["ppl"],
        f"{stage} objective before": evals[0]["objective"],
        f"{stage} objective after": evals[-1]["objective"],
    }
    summary = summarise(cfg, accelerator, log, rows, started)
    if accelerator.is_main_process:
        final = Path(cfg.train.output_dir) / "final"
        accelerator.unwrap_model(objective).model.save_pretrained(final)
        tokenizer.save_pretrained(final)
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
