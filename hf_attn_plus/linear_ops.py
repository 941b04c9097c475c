"""Linear-attention math in plain PyTorch: feature maps and the three forms every kernel must equal.

Per head, with features phi: o_t = phi(q_t)ᵀ S_t / (phi(q_t)ᵀ z_t + EPS), S_t = Σ_{s≤t} phi(k_s) v_sᵀ, z_t = Σ phi(k_s).
- `quadratic_*`: the definition, an explicit [q, kv] weight matrix under a visibility mask (O(L²), for tests).
- `chunked_*`: exact within chunks, a running state across them (O(L·C)); prefill and training.
- `recurrent_*`: one token at a time on a fixed-size state; decode.
Layout follows transformers: query features [B, Hq, q, F], key features [B, Hkv, kv, F], values [B, Hkv, kv, Dv]; query
head h reads KV head h // (Hq // Hkv). The state (S [B, Hkv, F, Dv], z [B, Hkv, F]) is kept per KV head: with GQA it
is Hq / Hkv times smaller than a per-query-head state. Everything is computed in at least fp32 and returned in v's
dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .masking import AttentionContext
from .reference import grouped_weighted_sum
from .selection import grouped_scores

# Added to every normaliser: keeps rows that see no key (left padding) at exactly zero and relu features finite.
EPS = 1e-6

LinearState = tuple[torch.Tensor, torch.Tensor]  # (S [B, Hkv, F, Dv], z [B, Hkv, F])


# ----------------------------------------------------------------------------------------------------------------------
# Feature maps: x [B, H, L, D] -> [B, H, L, F]; per-head weights are [H, D, m].


def elu_features(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def relu_features(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[softmax(Wx); softmax(-Wx)] (Hedgehog / LoLCATs): positive, and with W trained it mimics softmax weights."""
    proj = torch.einsum("bhld,hdm->bhlm", x, weight.to(x.dtype))
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1)


def gaussian_rf_features(x: torch.Tensor, weight: torch.Tensor, normalise_rows: bool) -> torch.Tensor:
    """Positive random features exp(Wx - |x|²/2)/sqrt(m) (Performer FAVOR+): E[phi(q)·phi(k)] = exp(q·k).

    `normalise_rows` subtracts each row's max before the exponential: allowed for queries only, where the factor
    cancels between numerator and normaliser; a key-side shift would change the weights between keys.
    """
    proj = torch.einsum("bhld,hdm->bhlm", x, weight.to(x.dtype)) - x.pow(2).sum(-1, keepdim=True) / 2
    if normalise_rows:
        proj = proj - proj.amax(-1, keepdim=True).detach()
    return torch.exp(proj) / math.sqrt(weight.shape[-1])


# ----------------------------------------------------------------------------------------------------------------------
# Linear attention


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: at least fp32 (sums over the whole context), fp64 stays fp64 (tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _group(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, ...] -> [B, Hkv, G, ...] (query heads grouped under their KV head)."""
    return x.reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _ungroup(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def empty_state(phi_k: torch.Tensor, value: torch.Tensor) -> LinearState:
    batch, kv_heads, _, features = phi_k.shape
    dtype = torch.promote_types(phi_k.dtype, torch.float32)
    state = phi_k.new_zeros(batch, kv_heads, features, value.shape[-1], dtype=dtype)
    return state, phi_k.new_zeros(batch, kv_heads, features, dtype=dtype)


def quadratic_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """The definition: weights phi(q_t)·phi(k_s) on the keys `visible` [B, 1|Hq, q, kv] allows, normalised by their sum."""
    weights = grouped_scores(_acc(phi_q), _acc(phi_k)) * visible
    out = grouped_weighted_sum(weights, _acc(value)) / (weights.sum(-1, keepdim=True) + EPS)
    return out.to(value.dtype)


def chunked_linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    value: torch.Tensor,
    state: LinearState | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, LinearState]:
    """Causal linear attention by chunks, continuing from `state`; returns (output, state after the last token).

    Query i and key i are the same position (queries are the newest tokens). Keys that must not count (padding) are
    expected as zero feature rows: they then add nothing to any state or normaliser.
    """
    batch, kv_heads, length, features = phi_k.shape
    dv = value.shape[-1]
    state_kv, state_k = empty_state(phi_k, value) if state is None else state
    chunks = -(-length // chunk_size)
    pad = chunks * chunk_size - length
    q = _group(F.pad(_acc(phi_q), (0, 0, 0, pad)), kv_heads).unflatten(3, (chunks, chunk_size))
    k = F.pad(_acc(phi_k), (0, 0, 0, pad)).unflatten(2, (chunks, chunk_size))
    v = F.pad(_acc(value), (0, 0, 0, pad)).unflatten(2, (chunks, chunk_size))

    chunk_kv = k.transpose(-1, -2) @ v  # [B, Hkv, n, F, Dv]
    chunk_k = k.sum(-2)  # [B, Hkv, n, F]
    # State before each chunk: what came in with `state` plus all earlier chunks (exclusive prefix sum).
    before_kv = state_kv.unsqueeze(2) + F.pad(chunk_kv.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :-1]
    before_k = state_k.unsqueeze(2) + F.pad(chunk_k.cumsum(2), (0, 0, 1, 0))[:, :, :-1]

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=phi_k.device).tril()
    within = (q @ k.unsqueeze(2).transpose(-1, -2)) * causal  # [B, Hkv, G, n, C, C]
    num = within @ v.unsqueeze(2) + q @ before_kv.unsqueeze(2)
    den = within.sum(-1, keepdim=True) + (q * before_k.unsqueeze(2).unsqueeze(-2)).sum(-1, keepdim=True)
    out = _ungroup((num / (den + EPS)).flatten(3, 4))[:, :, :length]
    final = (state_kv + chunk_kv.sum(2), state_k + chunk_k.sum(2))
    return out.to(value.dtype), final


def recurrent_linear_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, value: torch.Tensor, state: LinearState | None = None
) -> tuple[torch.Tensor, LinearState]:
    """Token by token on the state (S, z): the decode form. Same conventions as `chunked_linear_attention`."""
    kv_heads = phi_k.shape[1]
    state_kv, state_k = empty_state(phi_k, value) if state is None else state
    q = _group(_acc(phi_q), kv_heads)
    outputs = []
    for t in range(phi_k.shape[2]):
        k_t, v_t = _acc(phi_k[:, :, t]), _acc(value[:, :, t])
        state_kv = state_kv + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        state_k = state_k + k_t
        q_t = q[:, :, :, t]  # [B, Hkv, G, F]
        num = q_t @ state_kv  # [B, Hkv, G, Dv]
        den = (q_t * state_k.unsqueeze(2)).sum(-1, keepdim=True)
        outputs.append(num / (den + EPS))
    out = _ungroup(torch.stack(outputs, dim=3))
    return out.to(value.dtype), (state_kv, state_k)


def causal_key_mask(ctx: AttentionContext) -> torch.Tensor:
    """Which keys count, [B, 1, kv, 1] as 0/1, for the forms that are causal by index (chunked, recurrent).

    Raises unless `ctx.visible` is plain causal attention over the real (non-padding) keys, the newest kv positions
    being the queries: those forms could not follow another pattern (packed sequences, an indexer's choice).
    """
    visible = ctx.visible
    q_len, kv_len = visible.shape[-2:]
    real = ctx.key_pos >= 0
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=visible.device).tril(kv_len - q_len)
    if not torch.equal(visible, causal & real):
        raise ValueError(
            "hf_attn_plus linear-family mechanisms support causal attention with padding only; the mask given here "
            "has another pattern (packed sequences, a restricted key set, or right-aligned queries)"
        )
    return real.transpose(-1, -2).float()
