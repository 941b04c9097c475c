"""Attention transfer (LoLCATs stage 1): train only the mechanism's new weights so that every layer's attention
output matches dense attention's, both computed on the dense model's own hidden states.

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/attention_transfer.py \
        --config recipes/teacher/hybrid.yaml

The interface to a mechanism is small: it is an `attn_implementation` that the attention modules call, and its
trainable weights are the parameters whose name contains `.attn_plus.` (the plugin's convention). Everything else
stays frozen. Reports held-out perplexity of the dense teacher, of the untrained swap and of the distilled model, and
saves the distilled model (mechanism weights and options included) to output_dir/final.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import dense_teacher, load_corpus, load_model, parse_args, perplexity, setup, summarise, train

MECHANISM_WEIGHTS = ".attn_plus."


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's attention modules, in layer order (Llama, Qwen and DeepSeek name them `self_attn`)."""
    layers = [module for name, module in model.named_modules() if name.endswith("self_attn")]
    if not layers:
        raise ValueError(f"no `self_attn` modules in {type(model).__name__}")
    return layers


def attention_pairs(model: torch.nn.Module, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (output of the layer's attention under the model's mechanism, output under dense attention),
    both on the inputs the layer receives in the dense model. Only the first carries gradients.

    One dense forward records each attention module's call (hidden states, rotary embeddings, mask); each module is
    then called again on exactly those inputs with the mechanism switched back on.
    """
    calls: dict[torch.nn.Module, tuple] = {}

    def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        calls[module] = (args, kwargs, output[0])

    layers = attention_layers(model)
    handles = [layer.register_forward_hook(record, with_kwargs=True) for layer in layers]
    try:
        with dense_teacher(model) as teacher:
            teacher.get_decoder()(input_ids=input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    pairs = []
    for layer in layers:
        args, kwargs, dense = calls[layer]
        pairs.append((layer(*args, **kwargs)[0], dense))
    return pairs


def train_only_mechanism_weights(model: torch.nn.Module, mechanism: str) -> int:
    """Freeze every parameter except the mechanism's own; returns how many parameters stay trainable."""
    trainable = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(MECHANISM_WEIGHTS in name)
        trainable += parameter.numel() if parameter.requires_grad else 0
    if not trainable:
        raise ValueError(
            f"mechanism {mechanism!r} adds no weights (no parameter name contains {MECHANISM_WEIGHTS!r}); attention "
            "transfer trains a mechanism's new weights: use one that has them, such as 'linear' or 'hybrid'"
        )
    return trainable


class AttentionTransfer(torch.nn.Module):
    """Mean over layers of MSE(mechanism attention output, dense attention output)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = [F.mse_loss(student.float(), dense.float()) for student, dense in attention_pairs(self.model, input_ids)]
        return {"loss": torch.stack(losses).mean()}


def main() -> dict:
    started = time.time()
    cfg = parse_args(__doc__)
    accelerator = setup(cfg)
    model, tokenizer = load_model(cfg, accelerator)
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
