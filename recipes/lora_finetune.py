"""LoRA fine-tune onto a mechanism (LoLCATs stage 2): PEFT LoRA on the attention projections, next-token loss,
optionally plus a KL to the dense teacher's logits (the same model with dense attention and the adapters off).

    accelerate launch --config_file recipes/accelerate/single.yaml recipes/lora_finetune.py \
        --config recipes/teacher/sliding_window.yaml

Saves the adapter to output_dir/final (load it with `PeftModel.from_pretrained` on the base model, then
`set_attention`) and, with `lora.merge`, the merged model to output_dir/merged (reloads with the mechanism set).

`head_budget` learns its gates (PEFT `modules_to_save` on `attn_plus`) the Budgeted-Attention way: every step
samples a budget b in [head_budget.min_budget, 1] from the step (so a resumed run repeats it), runs the model at b,
and adds head_budget.cost_weight * relu(expected_cost(b) - b) to the loss, where the cost is the expected share of
heads computed under the hard-concrete relaxation (`head_budget.gate_noise`); the gates train at their own rate
(`head_budget.gate_lr`); evaluation runs the exact gates at `options.budget`. With `head_budget.spread_thresholds`
every optimizer step ends by spreading the KV groups' thresholds evenly over the budget axis in their learned order
(`spread_thresholds`), so the exact gates hold every budget to within one group and the gradient decides the order.
`stochastic_routing` with `resample: true` draws its graph from the step (`set_step`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from hf_attn_plus.mechanisms.head_budget import expected_cost, set_gate_noise, spread_thresholds
from hf_attn_plus.mechanisms.stochastic_routing import set_step
from hf_attn_plus.selection import counter_uniform

from common import (
    HeadBudgetSection,
    RecipeConfig,
    dense_teacher,
    load_corpus,
    load_model,
    parse_args,
    perplexity,
    setup,
    summarise,
    train,
)


class NextTokenObjective(torch.nn.Module):
    """Cross-entropy on the next token, plus kl_weight * T^2 * KL(teacher_T || student_T) when kl_weight > 0."""

    def __init__(self, model: torch.nn.Module, kl_weight: float, temperature: float) -> None:
        super().__init__()
        self.model, self.kl_weight, self.temperature = model, kl_weight, temperature

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        output = self.model(input_ids=input_ids, labels=input_ids, use_cache=False)
        if not self.kl_weight:
            return {"loss": output.loss}
        with dense_teacher(self.model) as teacher:
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        t = self.temperature
        kl = F.kl_div(
            F.log_softmax(output.logits[:, :-1].float() / t, -1).flatten(0, 1),
            F.log_softmax(teacher_logits[:, :-1].float() / t, -1).flatten(0, 1),
            log_target=True,
            reduction="batchmean",
        )
        return {"loss": output.loss + self.kl_weight * t * t * kl}

    def begin_step(self, step: int) -> None:
        set_step(self.model, step)


class BudgetObjective(NextTokenObjective):
    """head_budget: the next-token objective at a budget sampled per step, plus the cost of the heads kept over it
    (a fixed weight on the excess and, with `multiplier_lr`, a Lagrange multiplier per budget knot holding the share
    computed at the budget from both sides; its dual step reads the exact or the relaxed share, `multiplier_share`);
    with `spread_thresholds`, the thresholds spread evenly after each optimizer step."""

    def __init__(self, model: torch.nn.Module, kl_weight: float, temperature: float, budget: HeadBudgetSection,
                 seed: int, steps: int = 1) -> None:
        super().__init__(model, kl_weight, temperature)
        if budget.multiplier_knots < 2:
            raise ValueError(f"head_budget.multiplier_knots got {budget.multiplier_knots}; allowed: an integer >= 2")
        if budget.multiplier_lr < 0:
            raise ValueError(f"head_budget.multiplier_lr got {budget.multiplier_lr}; allowed: a number >= 0")
        if budget.multiplier_share not in ("exact", "relaxed"):
            raise ValueError(f"head_budget.multiplier_share got {budget.multiplier_share!r}; allowed: 'exact', 'relaxed'")
        if budget.gate_noise_end is not None and budget.gate_noise_end <= 0:
            raise ValueError(f"head_budget.gate_noise_end got {budget.gate_noise_end}; allowed: a number > 0 or null")
        self.config, self.seed, self.steps = budget, seed, steps
        self.budget = 1.0
        # Saved with the objective's state (resume continues the dual ascent); identical on every process because
        # the expected cost depends on the (synchronised) gates and the budget on the step only.
        self.register_buffer("multipliers", torch.zeros(budget.multiplier_knots))
        set_gate_noise(model, budget.gate_noise)  # only acts in training mode: evaluation sees the exact gates

    def parameter_groups(self, trainable: list[torch.nn.Parameter]) -> list[dict]:
        gates = {id(p) for name, p in self.named_parameters() if name.endswith(".steepness")}
        return [
            {"params": [p for p in trainable if id(p) not in gates]},
            {"params": [p for p in trainable if id(p) in gates], "peak_lr": self.config.gate_lr, "weight_decay": 0.0},
        ]

    def knot_weights(self, budget: float) -> torch.Tensor:
        """Linear-interpolation weights of `budget` on the multiplier knots, [knots] (two nonzero, summing to 1)."""
        knots = torch.linspace(self.config.min_budget, 1.0, len(self.multipliers), device=self.multipliers.device)
        return (1 - (knots - budget).abs() / (knots[1] - knots[0])).clamp(min=0)

    def noise_at(self, step: int) -> float:
        start, end = self.config.gate_noise, self.config.gate_noise_end
        if end is None or start <= 0:
            return start
        return start * (end / start) ** (step / max(self.steps - 1, 1))

    def set_budget(self, budget: float) -> None:
        self.budget = budget
        self.model.config.hf_attn_plus = {**self.model.config.hf_attn_plus, "budget": budget}

    def begin_step(self, step: int) -> None:
        super().begin_step(step)
        low = self.config.min_budget
        self.set_budget(low + (1 - low) * float(counter_uniform(self.seed, step)))
        set_gate_noise(self.model, self.noise_at(step))
        if self.config.multiplier_lr:  # dual ascent on this step's constraint, before the step's gradient uses it
            with torch.no_grad():
                share = expected_cost(self.model, self.budget, exact=self.config.multiplier_share == "exact")
                excess = share - self.budget
                self.multipliers.add_(self.config.multiplier_lr * excess * self.knot_weights(self.budget))

    def end_step(self, step: int) -> None:
        if self.config.spread_thresholds:
            spread_thresholds(self.model)

    def step_metrics(self) -> dict[str, float | list[float]]:
        with torch.no_grad():
            share = float(expected_cost(self.model, self.budget))
            exact = float(expected_cost(self.model, self.budget, exact=True))
        return {"budget": self.budget, "expected_share": share, "exact_share": exact,
                "multipliers": self.multipliers.tolist()}

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = super().forward(input_ids)["loss"]
        excess = expected_cost(self.model, self.budget) - self.budget
        multiplier = (self.multipliers * self.knot_weights(self.budget)).sum()
        return {"loss": loss + self.config.cost_weight * torch.relu(excess) + multiplier * excess}


def finetune(cfg: RecipeConfig, long_context: bool = False) -> dict:
    """LoRA-train `cfg.model` running `cfg.mechanism` on blocks of `data.seq_len` (`long_context.seq_len` with
    `long_context`); report held-out perplexity of the dense teacher and of the student before and after, at that
    length (at each of `long_context.eval_lengths`)."""
    started = time.time()
    if long_context:
        train_seq_len, eval_lengths = cfg.long_context.seq_len, cfg.long_context.eval_lengths
        lengths = {"long_context.seq_len": train_seq_len, "long_context.eval_lengths": max(eval_lengths)}
    else:
        train_seq_len, eval_lengths = cfg.data.seq_len, [cfg.data.seq_len]
        lengths = {"data.seq_len": train_seq_len}
    accelerator = setup(cfg)
    model, tokenizer = load_model(cfg, accelerator, lengths)
    lora = cfg.lora
    model = get_peft_model(
        model,
        LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
            modules_to_save=["attn_plus"] if cfg.mechanism == "head_budget" else None,  # the gates learn too
        ),
    )
    corpus = load_corpus(cfg.data, tokenizer, accelerator)
    train_blocks = corpus.train_blocks(train_seq_len)
    eval_sets = {n: corpus.eval_blocks(n, cfg.data.eval_blocks) for n in eval_lengths}

    with dense_teacher(model) as teacher:
        teacher_ppl = {n: perplexity(accelerator, teacher, blocks) for n, blocks in eval_sets.items()}

    def evaluate(objective: NextTokenObjective) -> dict[str, float]:
        if isinstance(objective, BudgetObjective):
            objective.set_budget(cfg.options.get("budget", 1.0))
        return {f"ppl@{n}": perplexity(accelerator, objective.model, blocks) for n, blocks in eval_sets.items()}

    if cfg.mechanism == "head_budget":
        objective = BudgetObjective(
            model, lora.kl_weight, lora.kl_temperature, cfg.head_budget, cfg.train.seed, cfg.train.steps
        )
    else:
        objective = NextTokenObjective(model, lora.kl_weight, lora.kl_temperature)
    log = train(cfg, accelerator, objective, train_blocks, evaluate)

    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(objective).model
    out = Path(cfg.train.output_dir)
    if accelerator.is_main_process:
        model.save_pretrained(out / "final")
        tokenizer.save_pretrained(out / "final")
    evals = [row["eval"] for row in log if "eval" in row]
    rows = {}
    for n in eval_lengths:
        rows[f"teacher (dense) ppl@{n}"] = teacher_ppl[n]
        rows[f"{cfg.mechanism} before ppl@{n}"] = evals[0][f"ppl@{n}"]
        rows[f"{cfg.mechanism} + LoRA ppl@{n}"] = evals[-1][f"ppl@{n}"]
    summary = summarise(cfg, accelerator, log, rows, started)
    if lora.merge and accelerator.is_main_process:
        merged = model.merge_and_unload()
        merged.save_pretrained(out / "merged")
        tokenizer.save_pretrained(out / "merged")
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    finetune(parse_args(__doc__))
