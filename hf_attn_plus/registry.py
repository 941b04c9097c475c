"""The one registry of mechanisms: name -> options schema, reference selection, optional kernel."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from types import SimpleNamespace
from typing import Any

from .options import Option, OptionError, choice_option, float_option, int_option, layers_option, validate

PREFIX = "hf_attn_plus:"

# Options every mechanism accepts. `logit_scale` composes with any selection because it rescales the logits of
# whatever set of keys the mechanism keeps.
COMMON_OPTIONS: tuple[Option, ...] = (
    choice_option(
        "logit_scale",
        "none",
        ("none", "log"),
        "'log': multiply logits by beta(n) = 1 + c*log(n/train_length) when a query attends n > train_length keys",
    ),
    float_option("logit_scale_c", 0.1, 0.0, "c in beta(n) = 1 + c*log(n/train_length)"),
    int_option("train_length", None, 1, "n_train of the log-n scaling; None: config.max_position_embeddings", True),
    choice_option(
        "apply_to",
        "all",
        ("all", "decode"),
        "'decode': the mechanism runs only in decode calls (at most 4 new queries, no gradient) and prefill and "
        "training attend densely, as Quest and most KV-sparsity methods run; selection mechanisms only",
    ),
    choice_option(
        "backend",
        "auto",
        ("auto", "reference", "kernel", "flex"),
        "'auto': a Triton kernel when one exists for this mechanism and the tensors are on a GPU, else the reference; "
        "'flex': torch's FlexAttention over the mechanism's selection (rules and block lists; no CPU backward)",
    ),
    # Quest and most training-free KV-sparsity methods leave the first layers dense: their attention is broad.
    int_option("dense_first", 0, 0, "the first n layers run the model's own attention, whatever `layers` selects"),
    int_option("dense_last", 0, 0, "the last n layers run the model's own attention, whatever `layers` selects"),
    layers_option(
        "layers",
        ("full_attention", "sliding_attention"),
        "the layers the mechanism runs in (the others run the model's own attention): 'full_attention' / "
        "'sliding_attention' are those without / with the model's own sliding window; a mechanism with weights gets "
        "them in these layers only",
    ),
)


@dataclasses.dataclass(frozen=True)
class Mechanism:
    name: str
    family: str  # "sparse", "linear", "learned", "stochastic"
    summary: str
    options: tuple[Option, ...]
    # select(query, key, ctx, opts) -> bool keep mask [B, Hq or 1, q_len, kv_len]: for mechanisms that are exact
    # softmax over a chosen key set, this is the semantic truth and the entry point does the attention.
    select: Callable[..., Any] | None = None
    # attend(module, query, key, value, ctx, opts, scaling, dropout) -> (output [B, Hq, q_len, Dv], probs or None):
    # for mechanisms that are not softmax over a key set (linear, sampled estimators); replaces select.
    attend: Callable[..., Any] | None = None
    training_free: bool = True
    # kernel(query, key, value, ctx, opts, scaling) -> output [B, Hq, q_len, Dv]; must equal the reference.
    kernel: Callable[..., Any] | None = None
    # An `attend` mechanism whose attend dispatches its own Triton kernel and honours the `backend` option itself
    # (its kernel needs the recurrent state, which only attend sees).
    attend_has_kernel: bool = False
    # The mechanism keeps per-layer side state derived from the cached keys (block summaries, an indexer's key cache):
    # in cached inference on a patched model class, `ctx.cache_layer` is then the layer's SideCacheLayer and
    # `hf_attn_plus.patches.side_cache.side_state(ctx, name, factory, key)` returns the state extended by the new keys
    # only; elsewhere (ctx.cache_layer None) the same call rebuilds it from every key.
    side_cache: bool = False
    # kept_keys(opts) -> (sinks, window) or None: when not None, no later query attends beyond the first `sinks` real
    # tokens and the last `window` keys, and cached inference evicts everything else (patches/streaming_cache.py).
    kept_keys: Callable[[SimpleNamespace], tuple[int, int] | None] | None = None
    # evicted_groups(attention module, opts) -> (bool [Hkv], sinks, window) or None: the KV groups of this layer that
    # no later query reads beyond the first `sinks` real tokens and the last `window` keys; cached inference keeps
    # only those keys of them (streaming_cache.GroupEvictingLayer) and the mechanism reads them there.
    evicted_groups: Callable[[Any, SimpleNamespace], tuple[Any, int, int] | None] | None = None
    # check(opts) raises OptionError for a combination of options each valid alone (e.g. a pool that does not divide
    # the block): set_attention refuses it before changing the model; a config holding it fails at its first forward,
    # where every option is validated.
    check: Callable[[SimpleNamespace], None] | None = None

    def __post_init__(self) -> None:
        if (self.select is None) == (self.attend is None):
            raise ValueError(f"mechanism {self.name!r} must define exactly one of select or attend")
        if self.attend_has_kernel and (self.attend is None or self.kernel is not None):
            raise ValueError(f"mechanism {self.name!r}: attend_has_kernel is for attend mechanisms without `kernel`")

    @property
    def has_kernel(self) -> bool:
        return self.kernel is not None or self.attend_has_kernel

    @property
    def attn_implementation(self) -> str:
        return PREFIX + self.name

    @property
    def schema(self) -> tuple[Option, ...]:
        return self.options + COMMON_OPTIONS

    def resolve_options(self, given: Mapping[str, Any] | None) -> SimpleNamespace:
        opts = SimpleNamespace(**validate(self.name, self.schema, given))
        if self.check is not None:
            self.check(opts)
        return opts


_MECHANISMS: dict[str, Mechanism] = {}


def register(mechanism: Mechanism) -> Mechanism:
    if mechanism.name in _MECHANISMS:
        raise ValueError(f"hf_attn_plus mechanism {mechanism.name!r} is registered twice")
    _MECHANISMS[mechanism.name] = mechanism
    return mechanism


def get_mechanism(name: str) -> Mechanism:
    """Look up by bare name ('topk') or attn_implementation name ('hf_attn_plus:topk')."""
    bare = name.removeprefix(PREFIX)
    if bare not in _MECHANISMS:
        raise OptionError(
            f"unknown hf_attn_plus mechanism {name!r}; available: {', '.join(sorted(_MECHANISMS))}"
        )
    return _MECHANISMS[bare]


def all_mechanisms() -> list[Mechanism]:
    return [_MECHANISMS[name] for name in sorted(_MECHANISMS)]


def mechanisms() -> list[dict[str, Any]]:
    """Each mechanism's name, family, options with defaults and rules, and whether it needs training."""
    return [
        {
            "name": m.name,
            "attn_implementation": m.attn_implementation,
            "family": m.family,
            "summary": m.summary,
            "training_free": m.training_free,
            "kernel": m.has_kernel,
            "options": {o.name: {"default": o.default, "allowed": o.allowed, "doc": o.doc} for o in m.schema},
        }
        for m in all_mechanisms()
    ]


def mechanism_option(
    name: str,
    owner: str,
    doc: str,
    *,
    default: str = "dense",
    qualifies: Callable[[str], bool] | None = None,
    qualification: str = "",
) -> Option:
    """Option naming what a wrapper mechanism (`owner`) delegates to: `default` or another registered mechanism, one
    that `qualifies` (described by `qualification`, e.g. "without weights of its own") where given.
    Checked when options are validated, i.e. after every mechanism has registered."""

    def accepts(value: Any) -> bool:
        if value == default:
            return True
        named = isinstance(value, str) and value != owner and value in _MECHANISMS
        return named and (qualifies is None or qualifies(value))

    kind = f"a registered hf_attn_plus mechanism {qualification}," if qualification else "a registered hf_attn_plus mechanism"
    rule = f"{default!r} or the name of {kind} other than {owner!r} (see hf_attn_plus.mechanisms())"
    return Option(name, default, rule, accepts, doc)


def delegate(owner: str, name: str, options: Mapping[str, Any]) -> tuple[Mechanism, SimpleNamespace]:
    """The mechanism `name` and its validated `options`, for wrapper `owner`; errors name the wrapper."""
    try:
        return get_mechanism(name), _resolve_cached(name, json.dumps(dict(options), sort_keys=True))
    except OptionError as error:
        raise OptionError(f"hf_attn_plus mechanism {owner!r}: options for {name!r}: {error}") from None


@lru_cache(maxsize=256)
def _resolve_cached(name: str, options_json: str) -> SimpleNamespace:
    return get_mechanism(name).resolve_options(json.loads(options_json))


def in_dense_ends(opts: Any, attention: Any) -> bool:
    """Whether the common `dense_first` / `dense_last` options keep this layer on the model's own attention; refuses
    counts that leave no layer to the mechanism (that would be dense attention under a sparse name)."""
    first, last, count = opts.dense_first, opts.dense_last, attention.config.num_hidden_layers
    if first + last >= count:
        raise OptionError(
            f"hf_attn_plus options dense_first={first} and dense_last={last} leave none of the model's {count} layers "
            f"to the mechanism; allowed: dense_first + dense_last < {count}"
        )
    return attention.layer_idx < first or attention.layer_idx >= count - last


def options_from_config(mechanism: Mechanism, config: Any) -> SimpleNamespace:
    """Validated options for `mechanism` from `config.hf_attn_plus`; parsed once per distinct dict, not per layer."""
    given = getattr(config, "hf_attn_plus", None) or {}
    if not isinstance(given, Mapping):
        raise OptionError(f"config.hf_attn_plus must be a dict of options, got {type(given).__name__}: {given!r}")
    return _resolve_cached(mechanism.name, json.dumps(dict(given), sort_keys=True))
