"""LoRA fine-tune end to end through `accelerate launch`: learning, exact resume, adapter and merged reload."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import hf_attn_plus
from hf_attn_plus.teacher import perplexity

from .runs import evals, launch, losses, run_recipe, tiny_eval_blocks

CONFIG = "teacher/sliding_window.yaml"
RUN = ["train.steps=6", "train.save_every=3", "train.eval_every=6", "train.lr=0.01", "lora.kl_weight=0.5",
       "options.window=16"]


@pytest.fixture(scope="module")
def run(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    output_dir = tmp_path_factory.mktemp("lora")
    return launch("lora_finetune.py", CONFIG, output_dir, [f"model={tiny_teacher}", *RUN]), output_dir


def test_lora_learns_on_the_mechanism(run: tuple[dict, Path]) -> None:
    summary, _ = run
    before, after = evals(summary)[0]["ppl@64"], evals(summary)[-1]["ppl@64"]
    assert sorted(losses(summary)) == list(range(1, 7))
    assert after < before, (before, after)


def test_resume_repeats_the_uninterrupted_trajectory(run: tuple[dict, Path], tiny_teacher: Path, tmp_path: Path) -> None:
    summary, output_dir = run
    # A run that stopped after its step-3 checkpoint: only that checkpoint and the log up to it survive.
    shutil.copytree(output_dir / "checkpoints" / "step-3", tmp_path / "checkpoints" / "step-3")
    (tmp_path / "log.jsonl").write_text("".join(
        line + "\n" for line in (output_dir / "log.jsonl").read_text().splitlines()[:4]
    ))
    resumed = launch("lora_finetune.py", CONFIG, tmp_path, [f"model={tiny_teacher}", *RUN])
    full, rest = losses(summary), losses(resumed)
    assert sorted(rest) == list(range(1, 7))
    for step in (4, 5, 6):
        assert rest[step] == pytest.approx(full[step], rel=1e-6, abs=1e-7), step
    assert evals(resumed)[-1]["ppl@64"] == pytest.approx(evals(summary)[-1]["ppl@64"], rel=1e-6)


def test_adapter_and_merged_model_reload_to_the_trained_outputs(run: tuple[dict, Path], tiny_teacher: Path) -> None:
    summary, output_dir = run
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    with_adapter = PeftModel.from_pretrained(base, output_dir / "final")
    hf_attn_plus.set_attention(with_adapter, "sliding_window", window=16, sinks=4)
    merged = AutoModelForCausalLM.from_pretrained(output_dir / "merged")  # the mechanism comes back from its config
    assert merged.config._attn_implementation == "hf_attn_plus:sliding_window"
    assert merged.config.hf_attn_plus == {"window": 16, "sinks": 4}

    tokens = torch.randint(3, base.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, with_adapter(tokens).logits, rtol=1e-4, atol=1e-4)
        with with_adapter.disable_adapter():
            assert not torch.allclose(with_adapter(tokens).logits, merged(tokens).logits)  # the adapter did something
    assert perplexity(merged, tiny_eval_blocks(tiny_teacher)) == pytest.approx(summary["results"]["sliding_window + LoRA ppl@64"], rel=1e-4)


@pytest.mark.parametrize("spread", [False, True])
def test_head_budget_gates_learn_at_sampled_budgets(spread: bool, tiny_teacher: Path, tmp_path: Path) -> None:
    """The LoRA recipe trains head_budget's gates (modules_to_save) at per-step budgets with the cost term: the
    saved adapter carries gates that moved off their initialisation. With head_budget.spread_thresholds the gates
    the training logs after every step compute the step's budget to within one KV group."""
    from hf_attn_plus.mechanisms.head_budget import HeadGateWeights

    summary = launch(
        "lora_finetune.py", "teacher/head_budget.yaml", tmp_path,
        [f"model={tiny_teacher}", "train.steps=3", "train.eval_every=3", "train.lr=0.05", "head_budget.cost_weight=5.0",
         f"head_budget.spread_thresholds={str(spread).lower()}"],
    )
    assert sorted(losses(summary)) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in losses(summary).values())
    config = AutoConfig.from_pretrained(tiny_teacher)
    groups = config.num_hidden_layers * config.num_key_value_heads
    gaps = [abs(row["exact_share"] - row["budget"]) for row in summary["log"] if "loss" in row]
    assert (max(gaps) <= 1 / groups + 1e-6) == spread, gaps
    base = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    hf_attn_plus.set_attention(base, "head_budget", budget=0.5, inner="sliding_window", inner_options={"window": 32, "sinks": 4})
    initial = [m.steepness.detach().clone() for m in base.modules() if isinstance(m, HeadGateWeights)]
    tuned = PeftModel.from_pretrained(base, tmp_path / "final")
    attentions = [layer.self_attn for layer in tuned.base_model.model.model.layers]
    trained = [attention.attn_plus(0.5) for attention in attentions]  # through the adapter's trained copy
    untrained = [(1 - 0.5 * torch.nn.functional.softplus(s)).clamp(0, 1) for s in initial]
    assert len(trained) == len(untrained) > 0
    assert any(not torch.allclose(after, before) for after, before in zip(trained, untrained))


def test_head_budget_gates_train_at_their_own_rate_with_the_relaxation_on_the_trained_copies() -> None:
    """The gates (PEFT's trained copies of `attn_plus`) form their own optimizer group at head_budget.gate_lr without
    weight decay, everything else trains at train.lr; the hard-concrete noise is set on the copies that run."""
    from common import HeadBudgetSection
    from lora_finetune import BudgetObjective
    from peft import LoraConfig, get_peft_model

    from hf_attn_plus.mechanisms.head_budget import HeadGateWeights
    from hf_attn_plus.tiny import tiny_config

    config = tiny_config("llama", hf_attn_plus=dict(budget=0.5, inner="sliding_window", inner_options={"window": 8}))
    base = AutoModelForCausalLM.from_config(config, attn_implementation="hf_attn_plus:head_budget")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["attn_plus"]))
    objective = BudgetObjective(model, 0.0, 1.0, HeadBudgetSection(gate_noise=0.7, gate_lr=0.3), seed=0)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    rest, gates = objective.parameter_groups(trainable)
    copies = [m for name, m in model.named_modules() if isinstance(m, HeadGateWeights) and "modules_to_save" in name]
    assert copies and {id(p) for p in gates["params"]} == {id(m.steepness) for m in copies}
    assert gates["peak_lr"] == 0.3 and gates["weight_decay"] == 0.0 and "peak_lr" not in rest
    assert len(rest["params"]) + len(gates["params"]) == len(trainable)
    assert all("lora_" in name for name, p in model.named_parameters() if any(p is q for q in rest["params"]))
    assert all(m.gate_noise == 0.7 for m in copies)
    model.train()
    attn_plus = model.base_model.model.model.layers[0].self_attn.attn_plus
    assert not torch.equal(attn_plus(0.5), attn_plus(0.5))  # the copy that runs draws its noise


def test_head_budget_spread_thresholds_moves_the_trained_copies_after_each_step() -> None:
    """end_step spreads the gates that run (PEFT's trained copies) and leaves the frozen originals; without
    head_budget.spread_thresholds it changes nothing."""
    from common import HeadBudgetSection
    from lora_finetune import BudgetObjective
    from peft import LoraConfig, get_peft_model

    from hf_attn_plus.mechanisms.head_budget import HeadGateWeights
    from hf_attn_plus.tiny import tiny_config

    config = tiny_config("llama", hf_attn_plus=dict(budget=0.5, inner="sliding_window", inner_options={"window": 8}))
    base = AutoModelForCausalLM.from_config(config, attn_implementation="hf_attn_plus:head_budget")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["attn_plus"]))
    gates = [m for m in model.modules() if isinstance(m, HeadGateWeights)]
    with torch.no_grad():
        for gate in gates:
            gate.steepness.copy_(torch.randn_like(gate.steepness))
    copies = [m for name, m in model.named_modules() if isinstance(m, HeadGateWeights) and "modules_to_save" in name]
    originals = [m for m in gates if all(m is not c for c in copies)]
    assert len(copies) == len(originals) == 2

    def thresholds(layers: list[HeadGateWeights]) -> torch.Tensor:
        return torch.cat([m.thresholds().detach() for m in layers])

    saved = thresholds(copies), thresholds(originals)
    BudgetObjective(model, 0.0, 1.0, HeadBudgetSection(), seed=0).end_step(0)
    assert torch.equal(thresholds(copies), saved[0])
    BudgetObjective(model, 0.0, 1.0, HeadBudgetSection(spread_thresholds=True), seed=0).end_step(0)
    lowest = torch.cat([m.thresholds().detach().view(m.shape.kv_heads, -1).amin(1) for m in copies])
    torch.testing.assert_close(lowest.sort().values, torch.arange(1, 5) / 5)
    assert torch.equal(thresholds(originals), saved[1])


@pytest.mark.parametrize("share", ["exact", "relaxed"])
def test_head_budget_multipliers_grow_while_over_budget_and_the_noise_anneals(share: str) -> None:
    """Dual ascent: each step moves the two knots around its budget by multiplier_lr x (share - budget) in
    proportion to their interpolation weights, down as well as up, the share being the deterministic gates' or its
    expectation under the noise (`multiplier_share`); the noise falls geometrically from gate_noise to
    gate_noise_end on the gates that run."""
    from common import HeadBudgetSection
    from lora_finetune import BudgetObjective
    from peft import LoraConfig, get_peft_model

    from hf_attn_plus.mechanisms.head_budget import HeadGateWeights, expected_cost
    from hf_attn_plus.tiny import tiny_config

    config = tiny_config("llama", hf_attn_plus=dict(budget=0.5, inner="sliding_window", inner_options={"window": 8}))
    base = AutoModelForCausalLM.from_config(config, attn_implementation="hf_attn_plus:head_budget")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["attn_plus"]))
    section = HeadBudgetSection(min_budget=0.2, gate_noise=0.4, gate_noise_end=0.05, multiplier_lr=3.0, multiplier_knots=5,
                                multiplier_share=share)
    objective = BudgetObjective(model, 0.0, 1.0, section, seed=0, steps=11).train()
    weights = objective.knot_weights(0.35)  # knots 0.2, 0.4, 0.6, 0.8, 1.0
    assert torch.allclose(weights, torch.tensor([0.25, 0.75, 0.0, 0.0, 0.0]))
    assert objective.noise_at(0) == pytest.approx(0.4) and objective.noise_at(10) == pytest.approx(0.05)
    assert objective.noise_at(5) == pytest.approx((0.4 * 0.05) ** 0.5)

    objective.begin_step(5)
    copies = [m for name, m in model.named_modules() if isinstance(m, HeadGateWeights) and "modules_to_save" in name]
    assert copies and all(m.gate_noise == pytest.approx(objective.noise_at(5)) for m in copies)
    b = objective.budget
    exact = share == "exact"
    excess = float(expected_cost(model, b, exact=exact).detach()) - b
    assert excess > 0  # initial gates g = b: every group runs at every budget below 1
    assert (excess == pytest.approx(1 - b)) == exact  # the noise makes the expected share below 1
    assert torch.allclose(objective.multipliers, 3.0 * excess * objective.knot_weights(b))
    before = objective.multipliers.clone()
    with torch.no_grad():
        for m in copies:
            m.steepness.fill_(30.0)  # thresholds 1 - 1/30, above any budget drawn: no group runs
    under = float(expected_cost(model, b, exact=exact).detach()) - b
    assert under < 0
    objective.begin_step(5)  # under budget: the knots fall (an equality constraint)
    assert torch.allclose(objective.multipliers, before + 3.0 * under * objective.knot_weights(b))
    assert (objective.multipliers < before).any()
    assert "multipliers" in objective.state_dict()  # checkpointed with the objective: a resume continues the ascent
    with pytest.raises(ValueError, match="multiplier_knots got 1"):
        BudgetObjective(model, 0.0, 1.0, HeadBudgetSection(multiplier_knots=1), seed=0)
    with pytest.raises(ValueError, match="multiplier_share got 'hard'; allowed: 'exact', 'relaxed'"):
        BudgetObjective(model, 0.0, 1.0, HeadBudgetSection(multiplier_share="hard"), seed=0)


def test_two_processes_follow_the_one_process_trajectory(run: tuple[dict, Path], tiny_teacher: Path, tmp_path: Path) -> None:
    """DDP on 2 gloo processes (LoRA + KL to the dense teacher): same losses and same trained adapter as 1 process;
    only the float reduction order differs."""
    summary, output_dir = run
    two = launch("lora_finetune.py", CONFIG, tmp_path, [f"model={tiny_teacher}", *RUN], processes=2)
    assert two["processes"] == 2
    one_losses, two_losses = losses(summary), losses(two)
    assert sorted(two_losses) == sorted(one_losses)
    for step, loss in one_losses.items():
        assert two_losses[step] == pytest.approx(loss, rel=1e-4), step
    one_adapter = load_file(output_dir / "final" / "adapter_model.safetensors")
    two_adapter = load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert one_adapter.keys() == two_adapter.keys()
    for name, weight in one_adapter.items():
        torch.testing.assert_close(two_adapter[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    lora_b = [w for n, w in one_adapter.items() if "lora_B" in n]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b)  # trained (B starts at zero), so the match means something


def test_fsdp_config_on_cpu_is_refused_not_run_as_ddp(tiny_teacher: Path, tmp_path: Path) -> None:
    """Accelerate 1.15 (and 1.16) applies FSDP only on GPU-type devices: on CPU it would quietly run DDP instead."""
    result = run_recipe("lora_finetune.py", CONFIG, tmp_path, [f"model={tiny_teacher}"], processes=2,
                        accelerate_config="fsdp.yaml")
    assert result.returncode != 0
    assert "asks for FSDP (ACCELERATE_USE_FSDP=true) but Accelerate runs MULTI_CPU on cpu" in result.stderr
    assert not (tmp_path / "log.jsonl").exists()
