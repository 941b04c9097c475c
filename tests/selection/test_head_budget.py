import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_attn_plus
from core.models import token_batch
from hf_attn_plus.mechanisms.head_budget import (
    HeadGateWeights,
    expected_cost,
    head_gates,
    set_gate_noise,
    spread_thresholds,
)
from hf_attn_plus.tiny import tiny_config

from .selection_helpers import assert_cached_equals_uncached, causal_context, logits

INNER = dict(inner="topk", inner_options=dict(budget=3, window=2, sinks=1))


def gated_model(arch="llama", layers: int = 2, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tiny_config(arch, num_hidden_layers=layers, hf_attn_plus={**INNER, **options})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="hf_attn_plus:head_budget").eval()
    with torch.no_grad():
        for gate in (m for m in model.modules() if isinstance(m, HeadGateWeights)):
            gate.steepness.copy_(torch.randn_like(gate.steepness) * 2)
    return model


@pytest.mark.parametrize("ramp", [1.0, 0.2])
def test_gates_are_monotone_in_budget_and_one_at_full_budget(ramp):
    model = gated_model()
    budgets = torch.linspace(0, 1, 21).tolist()
    for gate in (m for m in model.modules() if isinstance(m, HeadGateWeights)):
        values = torch.stack([gate(b, ramp=ramp) for b in budgets])
        assert ((values >= 0) & (values <= 1)).all()
        assert (values[1:] >= values[:-1]).all(), "a lower budget enabled more of a head"
        assert torch.equal(values[-1], torch.ones_like(values[-1]))
        active = values > 0
        assert (active[:-1] <= active[1:]).all(), "a head off at a higher budget is on at a lower one"
        assert not active[0].all(), "random steepness must switch some head off at budget 0"


# Gemma 2's soft-capping, gpt-oss's sinks and Gemma 3's windowed layer: the gates scale what the inner mechanism computes.
ARCHS = ["llama", "deepseek_v3", "mistral", "phi3", "olmo2", "granite", "qwen3_moe", "gemma2", "gpt_oss", "gemma3_text", "cohere2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_full_budget_equals_the_ungated_mechanism_and_lower_budgets_gate(arch):
    model = gated_model(arch)
    ids = token_batch(2, 16)
    gated = logits(model, ids)
    hf_attn_plus.set_attention(model, "head_budget", **INNER, budget=0.3)
    lowered = logits(model, ids)
    hf_attn_plus.set_attention(model, INNER["inner"], **INNER["inner_options"])
    torch.testing.assert_close(gated, logits(model, ids))
    assert not torch.allclose(lowered, gated, atol=1e-4)


def test_gates_learn_from_the_loss_and_the_cost(tmp_path):
    model = gated_model(budget=0.6).train()
    ids = token_batch(2, 16)
    loss = model(input_ids=ids, labels=ids).loss + expected_cost(model, 0.6)
    loss.backward()
    steepness = [m.steepness for m in model.modules() if isinstance(m, HeadGateWeights)]
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in steepness)
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for again, original in zip((m.steepness for m in loaded.modules() if isinstance(m, HeadGateWeights)), steepness):
        assert torch.equal(again, original)
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids))


def layer_gates(model) -> list[HeadGateWeights]:
    return [m for m in model.modules() if isinstance(m, HeadGateWeights)]


def test_spread_thresholds_keeps_the_learned_order_and_holds_every_budget_to_one_group():
    model = gated_model(layers=5)
    gates = [m for m in model.modules() if isinstance(m, HeadGateWeights)]

    def grouped() -> torch.Tensor:  # [groups, heads per group], every layer's
        return torch.cat([g.thresholds().detach().view(g.shape.kv_heads, -1) for g in gates])

    before = grouped()
    spread_thresholds(model)
    after = grouped()
    count = after.shape[0]
    assert count == 10
    assert torch.equal(before.amin(1).argsort(), after.amin(1).argsort()), "the groups' order changed"
    torch.testing.assert_close(after.amin(1).sort().values, torch.arange(1, count + 1) / (count + 1))
    assert torch.equal(before.argsort(1), after.argsort(1)), "a group's heads changed order"
    assert (after < 1).all()
    for budget in torch.linspace(0, 1, 101).tolist():
        on = torch.cat([(g(budget) > 0).view(g.shape.kv_heads, -1).any(1) for g in gates])  # brute force
        assert abs(float(on.float().mean()) - budget) <= 1 / count + 1e-6, budget
    assert torch.equal(head_gates(model, 1.0), torch.ones(5 * 8))
    spread_thresholds(model)
    torch.testing.assert_close(grouped(), after, rtol=0, atol=1e-5)  # a projection: spreading twice is once


def test_without_noise_the_cost_is_the_share_of_heads_computed():
    """A KV group runs when one of its gates is above 0 (attend skips only all-off groups): brute force over gates."""
    model = gated_model()
    kv_heads = model.config.num_key_value_heads
    for budget in (0.0, 0.3, 0.6, 1.0):
        gates = head_gates(model, budget).view(-1, kv_heads, model.config.num_attention_heads // kv_heads)
        groups_on = (gates > 0).any(dim=-1).float().mean()
        assert expected_cost(model, budget) == groups_on
    assert expected_cost(model, 1.0) == 1.0


def test_the_training_relaxation_moves_each_groups_thresholds_by_one_logistic_draw_and_its_cost_is_the_open_probability():
    """Hard-concrete gates: in training each KV group's thresholds t_h = 1 - 1/softplus(theta_h) move by one shared
    logistic draw of scale `noise` (budget units); the cost, P(group runs) = sigmoid((b - min t) / noise), matches the
    frequency over draws and has a gradient, which the deterministic count has not. Evaluation mode and budget 1
    stay exact."""
    model = gated_model().train()
    gate = layer_gates(model)[0]
    noise = 0.3
    slope = torch.nn.functional.softplus(gate.steepness.detach())
    thresholds = gate.thresholds().detach()
    torch.testing.assert_close(thresholds, 1 - 1 / slope)
    budget = float(thresholds.median().clamp(0.2, 0.8))  # some groups near their threshold
    exact = gate(budget)
    torch.testing.assert_close(exact, ((budget - thresholds) / (1 - thresholds)).clamp(0, 1))
    assert not expected_cost(model, budget).requires_grad  # the deterministic count

    set_gate_noise(model, noise)
    kv_heads = gate.shape.kv_heads
    torch.manual_seed(0)
    draws = torch.stack([gate(budget).detach() for _ in range(4000)])
    by_group = (-1, kv_heads, thresholds.numel() // kv_heads)
    # an unclamped gate g = (b - t - shift) / (1 - t) gives back the group's shift
    shift = (budget - thresholds - draws * (1 - thresholds)).view(by_group)
    shift = shift[((draws > 0) & (draws < 1)).view(by_group).all(dim=-1)]
    assert shift.numel() > 0 and torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-5)
    frequency = (draws.view(by_group) > 0).any(dim=-1).float().mean(dim=0)
    probability = gate(budget, open_probability=True).detach()
    lowest = thresholds.view(kv_heads, -1).amin(dim=1)
    torch.testing.assert_close(probability, torch.sigmoid((budget - lowest) / noise))
    standard_error = (probability * (1 - probability) / 4000).sqrt().clamp_min(1e-3)
    assert ((frequency - probability).abs() / standard_error).max() < 5

    expected_cost(model, budget).backward()
    # The cost reaches each group's lowest threshold only (the head that decides whether the group runs).
    moved = gate.steepness.grad.view(kv_heads, -1) != 0
    lowest_head = torch.nn.functional.one_hot(thresholds.view(kv_heads, -1).argmin(dim=1), moved.shape[1]).bool()
    assert moved.any() and not (moved & ~lowest_head).any()
    assert torch.equal(gate(1.0), torch.ones_like(exact))  # no noise at budget 1: the ungated mechanism
    model.eval()
    assert torch.equal(gate(budget), exact)
    with pytest.raises(ValueError, match="gate noise scale got -1"):
        set_gate_noise(model, -1)


def test_the_ramp_sets_how_fast_a_gate_rises_not_when_it_opens():
    """g(b, ramp) = clamp(g(b, 1) / ramp): the same heads on at every budget, full strength sooner, budget 1 still
    the ungated mechanism; attend reads the option."""
    model = gated_model()
    for gate in (m for m in model.modules() if isinstance(m, HeadGateWeights)):
        for budget in torch.linspace(0, 1, 11).tolist():
            linear = gate(budget)
            ramped = gate(budget, ramp=0.25)
            torch.testing.assert_close(ramped, (linear / 0.25).clamp(0, 1))
            assert torch.equal(ramped > 0, linear > 0)
    ids = token_batch(2, 16)
    at = {}
    for budget in (0.6, 1.0):
        for ramp in (1.0, 0.25):
            hf_attn_plus.set_attention(model, "head_budget", **INNER, budget=budget, ramp=ramp)
            at[budget, ramp] = logits(model, ids)
    torch.testing.assert_close(at[1.0, 1.0], at[1.0, 0.25])
    assert not torch.allclose(at[0.6, 1.0], at[0.6, 0.25], atol=1e-4)


def test_bad_options_are_named():
    model = gated_model()
    with pytest.raises(hf_attn_plus.OptionError, match="'ramp' got 0; allowed: a number > 0.0 and <= 1.0"):
        hf_attn_plus.set_attention(model, "head_budget", ramp=0)
    with pytest.raises(hf_attn_plus.OptionError, match="'budget' got 1.5; allowed: a number >= 0.0 and <= 1.0"):
        hf_attn_plus.set_attention(model, "head_budget", budget=1.5)
    with pytest.raises(hf_attn_plus.OptionError, match="'inner' got 'head_budget'"):
        hf_attn_plus.set_attention(model, "head_budget", inner="head_budget")


@pytest.mark.parametrize("arch, inner", [("llama", INNER), ("deepseek_v3", dict(inner="stochastic_routing", inner_options=dict(window=3, links=2, seed=5)))])
def test_groups_whose_heads_are_all_off_are_not_computed_and_nothing_else_changes(arch, inner, monkeypatch):
    """Skipping is exact (stochastic_routing draws per head index, so it also checks the model's head numbering
    reaches the inner mechanism) and really skips: the inner mechanism sees only the groups with a head on."""
    from hf_attn_plus.mechanisms import head_budget

    model = gated_model(arch, **inner, budget=0.5)
    attention = model.model.layers[0].self_attn
    config = model.config
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group = q_heads // kv_heads
    with torch.no_grad():  # first KV group off at budget 0.5 (softplus 4: g = 1 - 0.5*4 < 0), the rest on
        steep = torch.full((q_heads,), -1.0)
        steep[:group] = 4.0
        attention.attn_plus.steepness.copy_(steep)
    opts = hf_attn_plus.registry.options_from_config(hf_attn_plus.registry.get_mechanism("head_budget"), config)
    torch.manual_seed(1)
    length, dim = 11, 16
    query, key, value = (torch.randn(2, h, length, dim) for h in (q_heads, kv_heads, kv_heads))
    ctx = causal_context(2, length)

    seen_heads = []
    run_delegate = head_budget.run_delegate

    def spy(*args):
        seen_heads.append(args[5].shape[1])
        return run_delegate(*args)

    monkeypatch.setattr(head_budget, "run_delegate", spy)
    out, _ = head_budget.attend(attention, query, key, value, ctx, opts, dim**-0.5, 0.0)
    assert seen_heads == [q_heads - group]
    full, _ = run_delegate(head_budget.MECHANISM.name, opts.inner, opts.inner_options, opts, attention, query, key, value, ctx, dim**-0.5)
    gates = attention.attn_plus(0.5).view(1, -1, 1, 1)
    assert (gates[0, :group] == 0).all() and (gates[0, group:] > 0).all()
    torch.testing.assert_close(out, full * gates, rtol=0, atol=1e-6)
    assert (out[:, :group] == 0).all()

    with torch.no_grad():
        attention.attn_plus.steepness.fill_(4.0)  # every head off: nothing runs
    seen_heads.clear()
    out, _ = head_budget.attend(attention, query, key, value, ctx, opts, dim**-0.5, 0.0)
    assert seen_heads == [] and (out == 0).all()


FALLBACK = dict(fallback="sliding_window", fallback_options=dict(window=3, sinks=1))


def test_the_fallback_fills_the_rest_of_each_gate_and_runs_only_where_a_gate_is_below_one(monkeypatch):
    """out = g * inner + (1 - g) * fallback per head (DuoAttention's streaming heads), against each mechanism run on
    every head; the inner mechanism runs on the groups with a gate above 0, the fallback on those with one below 1."""
    from hf_attn_plus.mechanisms import head_budget

    model = gated_model(**FALLBACK, budget=0.5, ramp=0.5)
    attention = model.model.layers[0].self_attn
    config = model.config
    q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    group = q_heads // kv_heads
    opts = hf_attn_plus.registry.options_from_config(hf_attn_plus.registry.get_mechanism("head_budget"), config)
    torch.manual_seed(1)
    length, dim = 11, 16
    query, key, value = (torch.randn(2, h, length, dim) for h in (q_heads, kv_heads, kv_heads))
    ctx = causal_context(2, length)
    run_delegate = head_budget.run_delegate
    seen = []

    def spy(*args):
        seen.append((args[1], args[5].shape[1]))
        return run_delegate(*args)

    monkeypatch.setattr(head_budget, "run_delegate", spy)
    # softplus 4: g = 0; 1.6: g = 0.4; 0.2: g = 1 (at budget 0.5, ramp 0.5)
    first_group_mixed = [4.0, 4.0, 1.6, 0.2] + [0.2] * (q_heads - group)
    first_group_off = [4.0] * group + [1.6, 0.2] * ((q_heads - group) // 2)
    for slopes, expect in (
        (first_group_mixed, [("topk", q_heads), ("sliding_window", group)]),
        (first_group_off, [("topk", q_heads - group), ("sliding_window", q_heads)]),
    ):
        with torch.no_grad():
            slope = torch.tensor(slopes)
            attention.attn_plus.steepness.copy_(slope + torch.log(-torch.expm1(-slope)))
        gates = attention.attn_plus(0.5, ramp=0.5)
        assert {0.0, 1.0} < set(gates.tolist()), gates
        seen.clear()
        out, probs = head_budget.attend(attention, query, key, value, ctx, opts, dim**-0.5, 0.0)
        assert seen == expect and probs is None
        inner, _ = run_delegate("head_budget", opts.inner, opts.inner_options, opts, attention, query, key, value, ctx, dim**-0.5)
        rest, _ = run_delegate("head_budget", opts.fallback, opts.fallback_options, opts, attention, query, key, value, ctx, dim**-0.5)
        g = gates.view(1, -1, 1, 1)
        torch.testing.assert_close(out, g * inner + (1 - g) * rest, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_with_a_fallback_budget_1_is_the_inner_mechanism_budget_0_the_fallback_and_decode_is_exact(arch):
    model = gated_model(arch, **FALLBACK)
    spread_thresholds(model)  # every threshold in (0, 1): budget 0 switches every head off
    ids = token_batch(2, 16)
    full = logits(model, ids)
    hf_attn_plus.set_attention(model, "head_budget", **INNER, **FALLBACK, budget=0.0)
    none_on = logits(model, ids)
    hf_attn_plus.set_attention(model, "head_budget", **INNER, **FALLBACK, budget=0.5)
    assert_cached_equals_uncached(model)
    hf_attn_plus.set_attention(model, INNER["inner"], **INNER["inner_options"])
    torch.testing.assert_close(full, logits(model, ids))
    hf_attn_plus.set_attention(model, FALLBACK["fallback"], **FALLBACK["fallback_options"])
    torch.testing.assert_close(none_on, logits(model, ids))


def test_a_bad_fallback_is_named():
    model = gated_model()
    allowed = "allowed: 'none' or the name of a registered hf_attn_plus mechanism without weights of its own"
    for bad in ("linear", "dense", "head_budget", "nope"):
        with pytest.raises(hf_attn_plus.OptionError, match=f"'fallback' got '{bad}'; {allowed}"):
            hf_attn_plus.set_attention(model, "head_budget", fallback=bad)
    with pytest.raises(hf_attn_plus.OptionError, match="options for 'sliding_window'.*'window' got 0"):
        hf_attn_plus.set_attention(model, "head_budget", fallback="sliding_window", fallback_options=dict(window=0))
    with pytest.raises(hf_attn_plus.OptionError, match="fallback_options=.* with fallback 'none'"):
        hf_attn_plus.set_attention(model, "head_budget", fallback_options=dict(window=3))


WEIGHTED_INNER = [
    ("linear", dict(feature_map="hedgehog")),
    ("gated_delta", {}),
    ("indexer_topk", dict(budget=3, window=2, sinks=1, index_heads=2, index_dim=4)),
]


@pytest.mark.parametrize("inner, inner_options", WEIGHTED_INNER)
def test_inner_mechanisms_with_weights_keep_them_beside_the_gates(inner, inner_options, tmp_path):
    """The inner mechanism's weights live in attn_plus.inner: at budget 1 the model is the inner mechanism with those
    weights; at a lower budget cached decode (recurrent state / hidden states served to the inner weights) equals
    recomputation; save -> load keeps everything."""
    options = dict(inner=inner, inner_options=inner_options)
    model = gated_model("llama", **options)
    plain = AutoModelForCausalLM.from_config(
        tiny_config("llama", hf_attn_plus=inner_options), attn_implementation=f"hf_attn_plus:{inner}"
    ).eval()
    weights = {
        name.replace(".attn_plus.inner.", ".attn_plus."): value
        for name, value in model.state_dict().items()
        if not name.endswith(".attn_plus.steepness")
    }
    plain.load_state_dict(weights)  # strict: the inner weights are exactly the plain mechanism's
    ids = token_batch(2, 16)
    torch.testing.assert_close(logits(model, ids), logits(plain, ids))

    hf_attn_plus.set_attention(model, "head_budget", **options, budget=0.4)
    with torch.no_grad():  # at budget 0.4 heads 0, 2, 4, ... are off (softplus 3.05), the others on (0.13)
        for gate in (m for m in model.modules() if isinstance(m, HeadGateWeights)):
            gate.steepness.copy_(torch.tensor([3.0, -2.0]).repeat(gate.steepness.numel() // 2))
    gates = model.model.layers[0].self_attn.attn_plus(0.4)
    assert (gates[::2] == 0).all() and (gates[1::2] > 0).all()
    assert_cached_equals_uncached(model)
    lowered = logits(model, ids)
    assert not torch.allclose(lowered, logits(plain, ids), atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(loaded, ids), lowered)


def test_adapters_reach_the_inner_weights():
    """LoRA on an inner projection and modules_to_save on the whole attn_plus both take part in the inner mechanism."""
    from peft import LoraConfig, get_peft_model

    options = dict(inner="indexer_topk", inner_options=dict(budget=2, window=1, sinks=1, index_heads=2, index_dim=4))
    ids = token_batch(2, 16)
    model = gated_model("llama", **options)
    before = logits(model, ids)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["attn_plus.inner.key_proj"], init_lora_weights=False))
    assert not torch.allclose(logits(lora, ids), before, atol=1e-4)
    with lora.disable_adapter():
        torch.testing.assert_close(logits(lora, ids), before)

    model = gated_model("llama", **options)
    saved = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["attn_plus"]))
    with torch.no_grad():
        for name, param in saved.named_parameters():
            if "modules_to_save" in name and ".inner.key_proj" in name:
                param.add_(torch.randn_like(param))
    assert not torch.allclose(logits(saved, ids), before, atol=1e-4), "the trained copy's inner weights must be used"
    with saved.disable_adapter():
        torch.testing.assert_close(logits(saved, ids), before)
