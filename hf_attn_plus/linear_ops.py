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


def per_head_map(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D] through head h's own [D, m] matrix -> [B, H, L, m]."""
    return torch.einsum("bhld,hdm->bhlm", x, weight.to(x.dtype))


def hedgehog_features(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[softmax(Wx); softmax(-Wx)] (Hedgehog / LoLCATs): positive, and with W trained it mimics softmax weights."""
    proj = per_head_map(x, weight)
    return torch.cat([proj.softmax(-1), (-proj).softmax(-1)], dim=-1)


def gaussian_rf_features(x: torch.Tensor, weight: torch.Tensor, normalise_rows: bool) -> torch.Tensor:
    """Positive random features exp(Wx - |x|²/2)/sqrt(m) (Performer FAVOR+): E[phi(q)·phi(k)] = exp(q·k).

    `normalise_rows` subtracts each row's max before the exponential: allowed for queries only, where the factor
    cancels between numerator and normaliser; a key-side shift would change the weights between keys.
    """
    proj = per_head_map(x, weight) - x.pow(2).sum(-1, keepdim=True) / 2
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
    num, den, state = chunked_linear_terms(phi_q, phi_k, value, state, chunk_size)
    return (num / (den + EPS)).to(value.dtype), state


def chunked_linear_terms(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    value: torch.Tensor,
    state: LinearState | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, LinearState]:
    """Numerator [B, Hq, L, Dv] and normaliser [B, Hq, L, 1] of `chunked_linear_attention`, and the final state."""
    kv_heads, length = phi_k.shape[1], phi_k.shape[2]
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
    final = (state_kv + chunk_kv.sum(2), state_k + chunk_k.sum(2))
    return _ungroup(num.flatten(3, 4))[:, :, :length], _ungroup(den.flatten(3, 4))[:, :, :length], final


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


# ----------------------------------------------------------------------------------------------------------------------
# Hybrid (LoLCATs): exact softmax on the last `window` keys, linear attention on older ones, one normaliser:
# o_t = (Σ_win e^{τq·k - m_t} v + γ_h Σ_old phi(q)·phi(k) v) / (Σ_win e^{τq·k - m_t} + γ_h Σ_old phi(q)·phi(k)), m_t the
# largest window logit of the row. The shift m_t is part of the definition (as in LoLCATs): without it e^{τq·k}
# overflows, and the softmax terms are not invariant to it once linear terms share the normaliser.


def quadratic_hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    visible: torch.Tensor,
    in_window: torch.Tensor,
    scaling: float,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """The definition on explicit [q, kv] weights; `in_window` marks the softmax keys (e.g. the core's window)."""
    window = visible & in_window
    logits = (grouped_scores(_acc(query), _acc(key)) * scaling).masked_fill(~window, torch.finfo(_acc(query).dtype).min)
    soft = torch.exp(logits - logits.amax(-1, keepdim=True)) * window
    linear = grouped_scores(_acc(phi_q), _acc(phi_k)) * (visible & ~in_window) * gamma.view(1, -1, 1, 1)
    weights = soft + linear
    out = grouped_weighted_sum(weights, _acc(value)) / (weights.sum(-1, keepdim=True) + EPS)
    return out.to(value.dtype)


def chunked_hybrid_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    key_mask: torch.Tensor,
    scaling: float,
    gamma: torch.Tensor,
    window: int,
    state: LinearState | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, LinearState]:
    """Hybrid attention in O(L·(C + window)): a banded softmax and a chunked linear part on keys delayed by `window`.

    Keys are the `kv - q` slots kept from earlier calls (at most `window`, the decode cache) followed by the queries'
    own tokens; `key_mask` [B, 1, kv, 1] zeroes padding. `state` holds every key older than those slots. Returns the
    output and the state after the keys that have now left every query's window. Windows count slots, which equal
    real positions for left or right padding (padding mid-sequence would differ from the definition).
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    kept = kv_len - q_len
    if kept > window:
        raise ValueError(f"hybrid attention got {kept} cached slots for a window of {window}")
    real_k = _acc(phi_k) * key_mask
    real_v = _acc(value) * key_mask
    # Linear part: query i sits at slot kept + i and reads the keys at slots <= kept + i - window.
    delay = window - kept
    delayed_k = F.pad(real_k, (0, 0, delay, 0))[:, :, :q_len]
    delayed_v = F.pad(real_v, (0, 0, delay, 0))[:, :, :q_len]
    lin_num, lin_den, state = chunked_linear_terms(phi_q, delayed_k, delayed_v, state, chunk_size)
    soft_num, soft_den = _banded_softmax_terms(query, key, real_v, key_mask, scaling, window, kept, chunk_size)
    gamma = gamma.view(1, -1, 1, 1)
    out = (soft_num + gamma * lin_num) / (soft_den + gamma * lin_den + EPS)
    return out.to(value.dtype), state


def _banded_softmax_terms(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor,
    scaling: float,
    window: int,
    kept: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_win e^{τq·k - m} v and Σ_win e^{τq·k - m}: each chunk of C queries against its C + window - 1 keys."""
    batch, kv_heads, kv_len, _ = key.shape
    q_len = query.shape[2]
    chunks = -(-q_len // chunk_size)
    span = chunk_size + window - 1

    def bands(x: torch.Tensor) -> torch.Tensor:
        # Key slot j of chunk c, position u in its band, is slot kept + c*C + u - (window - 1) of `x`.
        lead = window - 1 - kept
        x = F.pad(x, (0, 0, lead, chunks * chunk_size + window - 1 - lead - kv_len))
        return x.unfold(2, span, chunk_size).transpose(-1, -2)  # [B, Hkv, n, span, D]

    q = _group(F.pad(_acc(query), (0, 0, 0, chunks * chunk_size - q_len)), kv_heads).unflatten(3, (chunks, chunk_size))
    k, v, real = bands(_acc(key)), bands(value), bands(key_mask.expand(batch, kv_heads, kv_len, 1))
    r = torch.arange(chunk_size, device=key.device)[:, None]
    u = torch.arange(span, device=key.device)[None, :]
    inside = (u >= r) & (u < r + window) & real.squeeze(-1).unsqueeze(-2).bool()  # [B, Hkv, n, C, span]
    logits = (q @ k.unsqueeze(2).transpose(-1, -2)) * scaling  # [B, Hkv, G, n, C, span]
    logits = logits.masked_fill(~inside.unsqueeze(2), torch.finfo(logits.dtype).min)
    soft = torch.exp(logits - logits.amax(-1, keepdim=True)) * inside.unsqueeze(2)
    num = _ungroup((soft @ v.unsqueeze(2)).flatten(3, 4))[:, :, :q_len]
    den = _ungroup(soft.sum(-1, keepdim=True).flatten(3, 4))[:, :, :q_len]
    return num, den


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


# ----------------------------------------------------------------------------------------------------------------------
# Gated delta rule (Gated DeltaNet): with the state S [Dk, Dv] per KV head, keys and queries L2-normalised,
#   S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,   o_t = S_tᵀ q_t.
# `recurrent_gated_delta` is the definition. The parallel form rests on the pseudo-values u_t = β_t (v_t - α_t S_{t-1}ᵀ k_t):
# within a span starting from S0, with g_t the product of the span's gates up to t,
#   S_t = g_t S0 + Σ_{s≤t} (g_t/g_s) k_s u_sᵀ,   U = (I + A)⁻¹ diag(β) (V - diag(g) K S0),  A_ts = β_t (g_t/g_s) k_t·k_s (s<t)
# (the UT transform: one unit-triangular solve per span). `chunked_gated_delta` applies it per chunk and passes S between
# chunks; with chunk_size >= length it is the whole-sequence quadratic form.


def recurrent_gated_delta(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token. query [B, Hq, L, Dk] (normalised and scaled), key [B, Hkv, L, Dk] (normalised), value
    [B, Hkv, L, Dv], log_alpha and beta [B, Hkv, L]. Returns (output [B, Hq, L, Dv], state [B, Hkv, Dk, Dv])."""
    kv_heads = key.shape[1]
    q, k, v = _group(_acc(query), kv_heads), _acc(key), _acc(value)
    alpha, beta = torch.exp(_acc(log_alpha)), _acc(beta)
    if state is None:
        state = k.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
    outputs = []
    for t in range(k.shape[2]):
        k_t, a_t, b_t = k[:, :, t], alpha[:, :, t, None, None], beta[:, :, t, None]
        decayed = a_t * state
        write = b_t * (v[:, :, t] - (k_t.unsqueeze(-2) @ decayed).squeeze(-2))  # u_t
        state = decayed + k_t.unsqueeze(-1) * write.unsqueeze(-2)
        outputs.append(q[:, :, :, t] @ state)  # [B, Hkv, G, Dv]
    return _ungroup(torch.stack(outputs, dim=3)).to(value.dtype), state


def chunked_gated_delta(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated delta rule by chunks (UT transform inside, state across); same conventions as the recurrent form."""
    kv_heads, length = key.shape[1], key.shape[2]
    chunk_size = min(chunk_size, length)
    chunks = -(-length // chunk_size)
    pad = chunks * chunk_size - length
    # Padded steps write nothing (β = 0) and keep the state (log α = 0).
    q = _group(F.pad(_acc(query), (0, 0, 0, pad)), kv_heads).unflatten(3, (chunks, chunk_size))
    k = F.pad(_acc(key), (0, 0, 0, pad)).unflatten(2, (chunks, chunk_size))
    v = F.pad(_acc(value), (0, 0, 0, pad)).unflatten(2, (chunks, chunk_size))
    log_g = F.pad(_acc(log_alpha), (0, pad)).unflatten(2, (chunks, chunk_size)).cumsum(-1)  # [B, Hkv, n, C]
    b = F.pad(_acc(beta), (0, pad)).unflatten(2, (chunks, chunk_size))
    if state is None:
        state = k.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])

    idx = torch.arange(chunk_size, device=key.device)
    causal = idx[:, None] >= idx[None, :]
    # g_t / g_s for s <= t; masked before exp so the upper triangle cannot overflow.
    decay = torch.exp((log_g.unsqueeze(-1) - log_g.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
    kk = k @ k.transpose(-1, -2)
    strict = b.unsqueeze(-1) * decay * kk * (idx[:, None] > idx[None, :])  # A, [B, Hkv, n, C, C]
    eye = torch.eye(chunk_size, dtype=k.dtype, device=k.device)
    qk = (q @ k.unsqueeze(2).transpose(-1, -2)) * decay.unsqueeze(2)  # [B, Hkv, G, n, C, C]
    g = torch.exp(log_g)

    outputs = []
    for c in range(chunks):
        rhs = b[:, :, c, :, None] * (v[:, :, c] - g[:, :, c, :, None] * (k[:, :, c] @ state))
        u = torch.linalg.solve_triangular(eye + strict[:, :, c], rhs, upper=False, unitriangular=True)
        outputs.append(g[:, :, None, c, :, None] * (q[:, :, :, c] @ state.unsqueeze(2)) + qk[:, :, :, c] @ u.unsqueeze(2))
        to_end = torch.exp(log_g[:, :, c, -1:] - log_g[:, :, c])  # g_C / g_s
        state = g[:, :, c, -1, None, None] * state + (k[:, :, c] * to_end.unsqueeze(-1)).transpose(-1, -2) @ u
    out = _ungroup(torch.stack(outputs, dim=3).flatten(3, 4))[:, :, :length]
    return out.to(value.dtype), state


# ----------------------------------------------------------------------------------------------------------------------
# Momentum delta rule (MDN-style): the delta-rule correction u_t = β_t (v_t - α_t S_{t-1}ᵀ k_t) enters a momentum
#   M_t = μ_t M_{t-1} + k_t u_tᵀ,   S_t = α_t S_{t-1} + M_t,   o_t = S_tᵀ q_t;   μ = 0 is the gated delta rule.
# Within a span from (S0, M0), with G and P the running products of α and μ:
#   S_t = G_t S0 + a_t M0 + Σ_{r≤t} C_tr k_r u_rᵀ,  C = Dg·Dm (Dg_ts = G_t/G_s, Dm_sr = P_s/P_r, lower), a = Dg·P,
# and α_t S_{t-1} is the same with C - Dm and a - P, which again gives one unit-triangular solve per chunk for U.
# Padding steps (α = 1, β = 0, μ = 1) still add M to S: exact for left padding (M is zero there) and right padding.


def recurrent_momentum_delta(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    log_mu: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Token by token (the definition); conventions of `recurrent_gated_delta`, state (S, M)."""
    kv_heads = key.shape[1]
    q, k, v = _group(_acc(query), kv_heads), _acc(key), _acc(value)
    alpha, beta, mu = torch.exp(_acc(log_alpha)), _acc(beta), torch.exp(_acc(log_mu))
    if state is None:
        zeros = k.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
        state = (zeros, zeros)
    s, m = state
    outputs = []
    for t in range(k.shape[2]):
        k_t = k[:, :, t]
        decayed = alpha[:, :, t, None, None] * s
        write = beta[:, :, t, None] * (v[:, :, t] - (k_t.unsqueeze(-2) @ decayed).squeeze(-2))
        m = mu[:, :, t, None, None] * m + k_t.unsqueeze(-1) * write.unsqueeze(-2)
        s = decayed + m
        outputs.append(q[:, :, :, t] @ s)
    return _ungroup(torch.stack(outputs, dim=3)).to(value.dtype), (s, m)


def chunked_momentum_delta(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    log_alpha: torch.Tensor,
    beta: torch.Tensor,
    log_mu: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The momentum delta rule by chunks; same conventions as the recurrent form. The last chunk is shorter instead
    of padded: a padding step would still add M to S."""
    kv_heads, length = key.shape[1], key.shape[2]
    q, k, v = _group(_acc(query), kv_heads), _acc(key), _acc(value)
    log_alpha, beta, log_mu = _acc(log_alpha), _acc(beta), _acc(log_mu)
    if state is None:
        zeros = k.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
        state = (zeros, zeros)
    s, m = state
    outputs = []
    for start in range(0, length, chunk_size):
        span = slice(start, min(start + chunk_size, length))
        q_i, k_i, v_i, b_i = q[:, :, :, span], k[:, :, span], v[:, :, span], beta[:, :, span]
        log_g, log_p = log_alpha[:, :, span].cumsum(-1), log_mu[:, :, span].cumsum(-1)
        idx = torch.arange(k_i.shape[2], device=key.device)
        lower = idx[:, None] >= idx[None, :]
        # run_t / run_s for s <= t, else 0 (masked before exp so the upper triangle cannot overflow)
        dg = torch.exp((log_g.unsqueeze(-1) - log_g.unsqueeze(-2)).masked_fill(~lower, float("-inf")))
        dm = torch.exp((log_p.unsqueeze(-1) - log_p.unsqueeze(-2)).masked_fill(~lower, float("-inf")))
        g, p = torch.exp(log_g), torch.exp(log_p)
        c = dg @ dm
        a = (dg @ p.unsqueeze(-1)).squeeze(-1)
        strict = b_i.unsqueeze(-1) * (c - dm) * (k_i @ k_i.transpose(-1, -2)) * (idx[:, None] > idx[None, :])
        rhs = b_i.unsqueeze(-1) * (v_i - g.unsqueeze(-1) * (k_i @ s) - (a - p).unsqueeze(-1) * (k_i @ m))
        eye = torch.eye(k_i.shape[2], dtype=k.dtype, device=k.device)
        u = torch.linalg.solve_triangular(eye + strict, rhs, upper=False, unitriangular=True)
        outputs.append(
            g[:, :, None, :, None] * (q_i @ s.unsqueeze(2))
            + a[:, :, None, :, None] * (q_i @ m.unsqueeze(2))
            + ((q_i @ k_i.unsqueeze(2).transpose(-1, -2)) * c.unsqueeze(2)) @ u.unsqueeze(2)
        )
        s, m = (
            g[..., -1, None, None] * s + a[..., -1, None, None] * m + (k_i * c[..., -1, :, None]).transpose(-1, -2) @ u,
            p[..., -1, None, None] * m + (k_i * dm[..., -1, :, None]).transpose(-1, -2) @ u,
        )
    return _ungroup(torch.cat(outputs, dim=3)).to(value.dtype), (s, m)
