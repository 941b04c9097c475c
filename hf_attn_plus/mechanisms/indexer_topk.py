"""indexer_topk (DeepSeek-V3.2 DSA): a small learned "lightning indexer" scores every visible key,
I[t, s] = sum_j w[t, j] * relu(q^I_j[t] · k^I[s]), and the main attention runs exact softmax over the `budget`
best-scoring keys plus sinks and the local window.

Training (DSA): the indexer learns to predict where dense attention looks. Target p_t = dense attention
distribution of query t summed over heads and L1-normalised (`attention_target`).
- warm-up (main model frozen, dense attention): KL(p_t || softmax(I_t)) over all visible keys;
- sparse stage (main model trains on the selection): the same KL restricted to the selected set, both sides
  renormalised over it.
Option `objective` changes which keys the loss compares (`objective_target`): DSA's own ('all_keys', above), only
the keys the indexer chooses among ('candidates': the sinks and window are attended anyway), or the exact
top-`budget` candidates as a uniform target ('top_set').
The indexer reads detached inputs and the target is detached, so this loss trains only the indexer and the
language-modelling loss never reaches it (the top-k is not differentiable either).

The reference never holds a [q, kv] tensor: the selection is a `Selection` (sinks + window as a PositionRule, the
chosen keys as token lists scored query chunk by query chunk when the chunked reference reaches them), and the
training loss walks query chunks too (scores, target p_t and KL of one chunk at a time, recomputed in the backward by
activation checkpointing), its value and gradients those of the dense formula.

Here the indexer reads the main attention's own (detached) queries and keys: q^I and w from the query heads of
token t, k^I from the KV heads of key s, so it works through the attention interface on every patched architecture.
In cached inference the indexer keeps its own key cache (`IndexKeyCache`, index_dim numbers per token, a side state
of the layer's cache: patches/side_cache.py), so a decode step projects only the new keys; without a cache (training,
no cache, unpatched classes) k^I is projected from every key. Its weights are the layer's `attn_plus`
(`IndexerWeights`).

MISA (mixture of indexer heads): with `active_heads` = A < index_heads, a router picks per query the A indexer heads
with the largest w[t, j] * max_b relu(q_j[t] · mean k^I of block b) over complete blocks of `router_block` keys before
the query's block (`selection.routed_indexer_heads`), and only those heads score tokens: token scoring costs A / Hi
of the full indexer. The router itself scores blocks, not tokens. Option `stage` picks the DSA stage a training
forward runs: 'warmup' attends densely and records the full KL, 'sparse' attends the selection and records the
selected-set KL; `indexer_loss(model)` collects them for the recipes. Evaluation always attends the selection.

Scores are computed in fp32 in every model dtype. Backend 'kernel' ('auto' on CUDA tensors): in inference the
scoring and top-k run in the Triton indexer kernel (hf_attn_plus.kernels.indexer_topk: the same selection, exact
ties included; scores agree up to fp32 summation order) and the attention over the selection in the sparse attention
kernel; training forwards keep the reference (differentiable) scores and selection, which the KL losses need, and
run the sparse kernel (with its backward) for the attention.

On DeepSeek-V3.2 the mechanism reuses the model's own lightning indexer: its `indices` (config.index_topk keys per
query, honoured by the core as the dense restriction `ctx.restrict`, which is the model's own and stays dense) are
the selection, and this mechanism adds no weights;
its selection options do not apply there and are refused if given. The model's indexer is trained by transformers'
own code, not by this module's losses.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import attend_selection, use_kernel
from ..masking import AttentionContext
from ..options import choice_option, int_option
from ..patches.attn_plus import WINDOW, AttentionShape, MechanismWeights, mechanism_weights, register_weights
from ..patches.side_cache import SlotBuffer, side_state
from ..reference import attention_target
from ..registry import Mechanism, OptionError, register
from ..selection import (
    chosen_positions,
    chunk_visible,
    indexer_scores,
    query_chunks,
    routed_indexer_heads,
    stack_lists,
    top_positions,
    top_scoring,
)
from ..structure import DENSE, PositionRule, Selection, dense_keep

# Options that change the shape of the weights: the model must run with the ones they were built for.
WEIGHT_OPTIONS = ("index_heads", "index_dim")
# Models whose attention brings its own lightning indexer (the `indices` it passes restrict ctx.visible).
OWN_INDEXER_MODELS = ("deepseek_v32",)
SELECTION_OPTIONS = (
    "budget", "sinks", "window", "index_heads", "index_dim", "active_heads", "router_block", "stage", "objective"
)


# (index queries [B, Hi, q, Di], index keys [B, kv, Di], head weights [B, Hi, q]): what IndexerWeights.forward gives.
IndexInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def fp32_indexer_scores(index_query: torch.Tensor, index_key: torch.Tensor, head_weights: torch.Tensor) -> torch.Tensor:
    """I[t, s] [B, 1, q, kv] computed in fp32 whatever the model dtype: half-precision scores would tie far more
    often, and the kernel (exact products, fp32 sums) computes the same scores up to fp32 summation order, so it
    picks the same keys in every dtype; exact ties resolve identically (toward the most recent key)."""
    return indexer_scores(index_query.float(), index_key.float(), head_weights.float())


def chunk_scores(index_inputs: IndexInputs, rows: slice, keys: slice) -> torch.Tensor:
    """fp32 indexer scores [B, 1, rows, keys] of the queries of `rows` against the key slots `keys`."""
    index_query, index_key, head_weights = index_inputs
    return fp32_indexer_scores(index_query[:, :, rows], index_key[:, keys], head_weights[:, :, rows])


def scored_selection(
    ctx: AttentionContext, scores_of: Callable[[slice, slice], torch.Tensor], heads: int, budget: int, sinks: int, window: int
) -> Selection:
    """Sinks + window as a rule, and per query chunk (when the reference reaches it) the `budget` other visible keys
    with the largest `scores_of(chunk, keys)` ([B, 1|Hq, chunk, keys]; `heads` sizes the chunks) as token lists."""
    rule = PositionRule(sinks=sinks, window=window)
    return Selection(rule, tokens=functools.partial(top_positions, ctx, scores_of, rule, budget, heads))


def select_by_scores(scores: torch.Tensor, ctx: AttentionContext, budget: int, sinks: int, window: int) -> torch.Tensor:
    """The selection of full scores [B, 1|Hq, q, kv] as a dense keep mask: the oracle the indexer kernel is checked
    against (kernels/indexer_topk/reference.py) and tests; O(q * kv), never on the attention path."""
    selection = scored_selection(ctx, lambda rows, keys: scores[:, :, rows, keys], scores.shape[1], budget, sinks, window)
    return dense_keep(ctx, selection, scores.shape[1])


def indexer_kl_terms(scores: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over the rows of a query chunk that keep any key of KL(target_t || softmax(scores_t)), both restricted to
    and renormalised over `keep` ([B, 1, rows, kv]); the number of those rows): the loss is the sum over chunks
    divided by the rows counted."""
    target = target * keep
    target = target / target.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(target.dtype).tiny)
    log_predicted = torch.log_softmax(scores.float().masked_fill(~keep, torch.finfo(torch.float32).min), dim=-1)
    per_key = torch.xlogy(target, target) - target * log_predicted.masked_fill(~keep, 0.0)
    rows = keep.any(dim=-1)
    return per_key.sum(dim=-1)[rows].sum(), rows.sum()


class _ChunkLoss:
    """One query chunk of the training loss: callable on its index inputs so activation checkpointing reruns it in
    the backward (what autograd keeps between forward and backward is then O(q + kv), not O(q * kv))."""

    def __init__(self, ctx, rows, rule, opts, query, key, scaling) -> None:
        self.ctx, self.rows, self.rule, self.opts = ctx, rows, rule, opts
        self.query, self.key, self.scaling = query[:, :, rows].detach(), key.detach(), scaling

    def __call__(self, *index_inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(loss sum, rows counted, the chosen positions [B, 1, rows, budget] (None in the warm-up))."""
        ctx, rows, rule, opts = self.ctx, self.rows, self.rule, self.opts
        scores = fp32_indexer_scores(*index_inputs)
        with torch.no_grad():
            visible = chunk_visible(ctx, rows)
            ruled = visible & rule.keep(ctx.query_pos[:, :, rows], ctx.key_pos)
            candidates = visible & ~ruled  # what the indexer chooses among (`chunk_candidates`)
            target = attention_target(self.query, self.key, visible, self.scaling)
            chosen = positions = None
            if opts.stage == "sparse":
                chosen = top_scoring(scores, candidates.expand_as(scores), opts.budget)
                positions = chosen_positions(ctx, chosen, opts.budget)
            target, keep = objective_target(opts.objective, opts.budget, target, visible, ruled, candidates, chosen)
        return *indexer_kl_terms(scores, target, keep), positions


def objective_target(
    objective: str,
    budget: int,
    target: torch.Tensor,
    visible: torch.Tensor,
    ruled: torch.Tensor,
    candidates: torch.Tensor,
    chosen: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, keys it is compared over) of one query chunk's loss, from the dense target p_t [B, 1, rows, kv], the
    chunk's visible keys, those the sinks / window rule keeps (`ruled`) and the rest (`candidates`), and, in the
    sparse stage, the indexer's choice (bool, None in the warm-up); `indexer_kl_terms` renormalises both.
    - 'all_keys' (DSA): every visible key in the warm-up, every attended key (rule's and chosen) in the sparse stage;
    - 'candidates': only the keys the indexer chooses among in the warm-up, only the chosen ones in the sparse
      stage: on SmolLM2 the rule's keys hold most of p_t, which the indexer never needs to rank;
    - 'top_set': over the candidates, a target uniform on the exact `budget` candidates with the most p_t (the
      selection an ideal indexer makes), in both stages."""
    if objective == "all_keys":
        return target, visible if chosen is None else ruled | chosen
    if objective == "candidates":
        return target, candidates if chosen is None else chosen
    return top_scoring(target, candidates, budget).to(target.dtype), candidates


def training_selection(
    index_inputs: IndexInputs,
    query: torch.Tensor,
    key: torch.Tensor,
    ctx: AttentionContext,
    opts: SimpleNamespace,
    scaling: float,
) -> tuple[torch.Tensor, Selection]:
    """(the indexer loss (`objective_target`), the selection to attend) of a training forward, query chunk by query
    chunk (scores, target and loss of one chunk exist at once). Warm-up: dense attention; sparse stage: the selected
    keys are attended."""
    rule = PositionRule(sinks=opts.sinks, window=opts.window)
    index_query, index_key, head_weights = index_inputs
    total, counted, lists = 0.0, 0, []
    for rows in query_chunks(query.shape[0], query.shape[1], slice(0, query.shape[2]), key.shape[2]):
        chunk = _ChunkLoss(ctx, rows, rule, opts, query, key, scaling)
        inputs = (index_query[:, :, rows], index_key, head_weights[:, :, rows])
        kl, count, positions = checkpoint(chunk, *inputs, use_reentrant=False)
        total, counted = total + kl, counted + count
        lists.append(positions)
    loss = total / counted.clamp(min=1)
    return loss, Selection(DENSE) if opts.stage == "warmup" else Selection(rule, tokens=stack_lists(lists))


@register_weights
class IndexerWeights(MechanismWeights):
    """One layer's lightning indexer: q^I (index_heads x index_dim) and head weights w from the token's query heads,
    k^I (index_dim) from its KV heads. `loss` holds the KL of the last training forward (None otherwise)."""

    mechanism = "indexer_topk"
    weight_options = WEIGHT_OPTIONS
    models_bringing_own = OWN_INDEXER_MODELS
    # It selects among the keys the layer's mask shows (within the model's window); its own softmax over the
    # selection implements neither soft-capping nor sinks.
    honours = frozenset({WINDOW})

    def __init__(self, shape: AttentionShape, opts: SimpleNamespace, layer_idx: int) -> None:
        super().__init__(shape, opts, layer_idx)
        query_width, key_width = shape.q_heads * shape.qk_dim, shape.kv_heads * shape.qk_dim
        self.query_proj = nn.Linear(query_width, opts.index_heads * opts.index_dim, bias=False)
        self.key_proj = nn.Linear(key_width, opts.index_dim, bias=False)
        # DSA's w is linear in the token; the bias (0 at a random start, so DSA exactly) lets `init_from_attention`
        # give every head the same constant weight.
        self.head_weights = nn.Linear(query_width, opts.index_heads, bias=True)
        self.loss: torch.Tensor | None = None
        IndexerWeights.reset_parameters(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.query_proj, self.key_proj, self.head_weights):
            nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
        self.head_weights.bias.zero_()

    @torch.no_grad()
    def init_from_attention(self, key_basis: torch.Tensor | None = None) -> None:
        """Index head h = query head h, w = 1 / sqrt(head dim) for every head, and the index key the projection of
        every KV head's key side by side onto `key_basis` ([index_dim, KV heads x head dim], orthonormal rows; None:
        the identity), q^I_h the same projection of q_h placed in its group's slot: I[t, s] = sum_h relu(q_h[t] ·
        B^T B k_h[s]) / sqrt(D), the DSA form of the layer's own attention (exact with the identity). Needs
        index_heads = query heads."""
        shape, opts = self.shape, self.opts
        heads, kv_heads, dim = shape.q_heads, shape.kv_heads, shape.qk_dim
        width = kv_heads * dim
        if opts.index_heads != heads or (key_basis is None and opts.index_dim != width):
            raise ValueError(
                f"indexer init from attention needs index_heads={heads} (query heads) and, without a key basis, "
                f"index_dim={width} (KV heads x head dim) in layer {self.layer_idx}; got index_heads={opts.index_heads}, "
                f"index_dim={opts.index_dim}"
            )
        weight = self.key_proj.weight
        basis = torch.eye(width) if key_basis is None else key_basis
        if basis.shape != (opts.index_dim, width):
            raise ValueError(f"key basis of layer {self.layer_idx} is {tuple(basis.shape)}; needs ({opts.index_dim}, {width})")
        basis = basis.to(weight)
        query = self.query_proj.weight.view(heads, opts.index_dim, heads, dim).zero_()
        for head in range(heads):
            group = head // (heads // kv_heads)
            query[head, :, head] = basis[:, group * dim : (group + 1) * dim]
        weight.copy_(basis)
        self.head_weights.weight.zero_()
        self.head_weights.bias.fill_(opts.index_heads**0.5 / dim**0.5)  # forward scales w by index_heads^-0.5

    def forward(
        self, query: torch.Tensor | None, key: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """From detached main queries [B, Hq, q, D]: index queries [B, Hi, q, Di] and head weights [B, Hi, q]; from
        detached main keys [B, Hkv, n, D]: index keys [B, n, Di] (the inputs of `fp32_indexer_scores` and of the
        indexer kernel). Either input may be None (the key cache projects only new keys): its outputs are then None."""
        index_query = head_weights = index_key = None
        if query is not None:
            tokens_q = query.detach().transpose(1, 2).flatten(2).to(self.query_proj.weight.dtype)
            index_query = self.query_proj(tokens_q).unflatten(-1, (self.opts.index_heads, -1)).transpose(1, 2)
            head_weights = self.head_weights(tokens_q).transpose(1, 2) * self.opts.index_heads**-0.5
        if key is not None:
            index_key = self.key_proj(key.detach().transpose(1, 2).flatten(2).to(self.key_proj.weight.dtype))
        return index_query, index_key, head_weights


class IndexKeyCache:
    """The indexer's own key cache: k^I of every cache slot, [B, slots, Di], grown by projecting only the keys a call
    adds. A side state of the layer's SideCacheLayer."""

    def __init__(self, project: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.project = project  # main keys [B, Hkv, n, D] -> index keys [B, n, Di]
        self._keys = SlotBuffer(dim=1)

    @property
    def covered(self) -> int:
        return self._keys.length

    @property
    def keys(self) -> torch.Tensor:
        return self._keys.value

    def extend(self, keys: torch.Tensor, key_pos: torch.Tensor) -> None:
        self._keys.append(self.project(keys))

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._keys.map_batch(fn)


def indexer_inputs(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, ctx: AttentionContext, opts: SimpleNamespace
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(index queries, index keys, head weights) through any adapter PEFT wrapped around the weights; index keys from
    the layer's key cache in cached inference; only the routed heads when `active_heads` is set (MISA)."""
    if ctx.cache_layer is None:
        index_query, index_key, head_weights = module.attn_plus(query, key)
    else:
        index_query, _, head_weights = module.attn_plus(query, None)
        new_cache = lambda: IndexKeyCache(lambda k: module.attn_plus(None, k)[1])  # noqa: E731
        index_key = side_state(ctx, f"indexer_topk:index_dim={opts.index_dim}", new_cache, key).keys
    if opts.active_heads is not None:
        index_query, head_weights = routed_indexer_heads(
            index_query, index_key, head_weights, ctx, opts.active_heads, opts.router_block
        )
    return index_query, index_key, head_weights


def attend_model_indexer(module, query, key, value, ctx, opts, scaling, dropout):
    """DeepSeek-V3.2: exact attention over the keys the model's own indexer chose: its [B, q, topk] `indices`, the
    dense restriction ctx.restrict (the model's, so it stays dense)."""
    given = sorted(set(getattr(module.config, "hf_attn_plus", None) or {}) & set(SELECTION_OPTIONS))
    if given:
        raise OptionError(
            f"hf_attn_plus mechanism 'indexer_topk' on {module.config.model_type} uses the model's own indexer "
            f"(config.index_topk={module.config.index_topk}); option(s) {', '.join(map(repr, given))} do not apply there"
        )
    if use_kernel(MECHANISM, opts, query, dropout):
        from ..kernel_inputs import attend_kernel

        return attend_kernel(query, key, value, ctx, Selection(DENSE), scaling), None
    return attend_selection(module, query, key, value, ctx, Selection(DENSE), opts, scaling, dropout), None


def attend(module, query, key, value, ctx, opts, scaling, dropout):
    if module.config.model_type in OWN_INDEXER_MODELS:
        return attend_model_indexer(module, query, key, value, ctx, opts, scaling, dropout)
    weights = mechanism_weights(module, "indexer_topk")
    weights.check_options(opts)
    index_inputs = indexer_inputs(module, query, key, ctx, opts)
    kernel = use_kernel(MECHANISM, opts, query, dropout)
    weights.loss = None
    if module.training:  # the KL losses need the differentiable scores: reference scoring and selection
        weights.loss, selection = training_selection(index_inputs, query, key, ctx, opts, scaling)
    elif kernel:
        from ..kernels.indexer_topk.wrapper import indexer_topk_keep

        from ..kernel_inputs import masked_kernel_attention

        keep = indexer_topk_keep(*index_inputs, ctx, opts.budget, opts.sinks, opts.window)
        return masked_kernel_attention(query, key, value, ctx, keep, scaling), None
    else:
        scores_of = functools.partial(chunk_scores, index_inputs)
        selection = scored_selection(ctx, scores_of, index_inputs[0].shape[1], opts.budget, opts.sinks, opts.window)
    if kernel:  # training: the selection's lists go to the block-sparse kernel
        from ..kernel_inputs import attend_kernel

        return attend_kernel(query, key, value, ctx, selection, scaling), None
    return attend_selection(module, query, key, value, ctx, selection, opts, scaling, dropout), None


def init_from_attention(model: nn.Module, calibration: torch.Tensor | None = None) -> int:
    """Start every indexer of `model` from its layer's own attention (`IndexerWeights.init_from_attention`). With
    index_dim = KV heads x head dim the index key is every key as it is; with a smaller index_dim it is their
    projection onto the top principal directions (uncentred) of the layer's keys in a dense forward of `calibration`
    (input ids [N, T]). On SmolLM2 at 10 % of a 512-token context the untrained indexer gives ppl 9.38 with every
    dimension (dense 9.06), where a random one trained 100 steps reaches 15.2. Returns the number of indexers set."""
    indexers = [m for m in model.modules() if isinstance(m, IndexerWeights)]
    if not indexers:
        raise ValueError("no indexer_topk weights in the model: set attn_implementation 'hf_attn_plus:indexer_topk' first")
    wrong_heads = [m for m in indexers if m.opts.index_heads != m.shape.q_heads]
    if wrong_heads:
        wrong_heads[0].init_from_attention()  # raises, naming what is needed
    full = all(m.opts.index_dim == m.shape.kv_heads * m.shape.qk_dim for m in indexers)
    if not full and calibration is None:
        raise ValueError(
            f"indexer init from attention with index_dim={indexers[0].opts.index_dim} below KV heads x head dim "
            f"({indexers[0].shape.kv_heads * indexers[0].shape.qk_dim}) projects the keys onto their principal "
            "directions: pass calibration input ids"
        )
    keys = None if full else dense_keys(model, indexers, calibration)
    for indexer in indexers:
        basis = None
        if keys is not None:
            basis = torch.linalg.svd(keys[indexer.layer_idx], full_matrices=False).Vh[: indexer.opts.index_dim]
        indexer.init_from_attention(basis)
    return len(indexers)


def dense_keys(model: nn.Module, indexers: list[IndexerWeights], calibration: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each indexer layer's main keys (post-RoPE, [tokens, KV heads x head dim], fp32) in a forward of `calibration`
    that attends densely (the warm-up stage's training forward, run without gradients)."""
    keys: dict[int, list[torch.Tensor]] = {}

    def record(module: IndexerWeights, args: tuple) -> None:
        key = args[1]
        if key is not None:
            keys.setdefault(module.layer_idx, []).append(key.detach().transpose(1, 2).flatten(2).flatten(0, 1).float())

    hooks = [indexer.register_forward_pre_hook(record) for indexer in indexers]
    options, training = dict(model.config.hf_attn_plus), model.training
    model.config.hf_attn_plus = {**options, "stage": "warmup"}
    try:
        model.train()
        with torch.no_grad():
            model(input_ids=calibration.to(model.device))
    finally:
        model.config.hf_attn_plus = options
        model.train(training)
        for hook in hooks:
            hook.remove()
    return {layer: torch.cat(parts) for layer, parts in keys.items()}


def indexer_loss(model: nn.Module) -> torch.Tensor:
    """Mean over layers of the indexer KL recorded by the last training forward of `model` (for the recipes)."""
    losses = [m.loss for m in model.modules() if isinstance(m, IndexerWeights) and m.loss is not None]
    if not losses:
        raise ValueError(
            "no indexer loss recorded: run a training-mode forward of a model with attn_implementation "
            "'hf_attn_plus:indexer_topk' first"
        )
    return torch.stack(losses).mean()


MECHANISM = register(
    Mechanism(
        name="indexer_topk",
        family="learned",
        summary="learned lightning indexer picks top-k keys + sinks + local window (DSA); KL training losses",
        options=(
            int_option("budget", 256, 1, "keys chosen by indexer score, besides sinks and window"),
            int_option("sinks", 4, 0, "first real tokens always attended"),
            int_option("window", 64, 0, "most recent keys always attended"),
            int_option("index_heads", 4, 1, "indexer heads j"),
            int_option("index_dim", 32, 1, "indexer query/key size"),
            int_option("active_heads", None, 1, "MISA: indexer heads routed per query; None: all (DSA)", True),
            int_option("router_block", 64, 1, "MISA: keys per block of the router's block-mean statistics"),
            choice_option(
                "stage", "sparse", ("warmup", "sparse"),
                "training forwards: 'warmup' attends densely, KL over all keys; 'sparse' attends the selection, KL over it",
            ),
            choice_option(
                "objective", "all_keys", ("all_keys", "candidates", "top_set"),
                "indexer loss: 'all_keys' DSA's KL; 'candidates' the KL over the keys sinks/window do not keep; "
                "'top_set' cross-entropy to the exact top-budget set of dense attention",
            ),
        ),
        attend=attend,
        attend_has_kernel=True,
        training_free=False,
        side_cache=True,
    )
)
