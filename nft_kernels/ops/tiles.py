"""Tile helpers shared by the forward and backward kernels (Triton device functions).

All offsets that multiply a stride are int64: N*V and V*H pass 2**31 at real sizes.
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    # DOT_FP32: upcast the operands first. The Triton interpreter computes bf16 tl.dot wrongly
    # (docs/design.md, section 4), so interpreted runs always take this branch.
    # IEEE: fp32 inputs get full fp32 products, not TF32, so fp32 callers get fp32 accuracy.
    if DOT_FP32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def tanh(u):
    """tanh accurate to fp32 for every u (no tl.tanh on every Triton version).

    |u| >= 1/4: sign(u) (1 - e^-2|u|) / (1 + e^-2|u|), which never overflows. Below that,
    1 - e^-2|u| cancels (relative error ~eps / |u|: 5e-4 in logp at a soft cap of 1e4, 0.04
    at 1e6, where z / c is tiny), so the odd Taylor series to u^9 is used instead; its first
    dropped term, 1382 u^11 / 155925, is < 1e-8 relative there."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    a2 = a * a
    near = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0
                                                                   + a2 * (62.0 / 2835.0)))))
    t = tl.where(a < 0.25, near, far)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def soft_cap(z, softcap, SOFTCAP: tl.constexpr):
    """Logit soft-capping (Gemma 2/3): c tanh(z / c), before the temperature."""
    if SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def soft_cap_derivative(x, inv_temperature, softcap):
    """d capped / d z = 1 - tanh^2, from the scaled capped logits x = c tanh(z / c) / T;
    0 on padded (-inf) columns, whose dz is 0 anyway (no 0 * inf)."""
    t = x / (inv_temperature * softcap)
    return tl.where(x == float("-inf"), 0.0, 1.0 - t * t)


@triton.jit
def row_inv_temperature(inv_t_ptr, rows, row_ok, inv_temperature, PER_TOKEN_T: tl.constexpr):
    """1 / T for a tile's rows: the scalar, or with PER_TOKEN_T each row's own ([BLOCK_N, 1],
    so that it broadcasts over the tile's columns)."""
    inv_t = inv_temperature
    if PER_TOKEN_T:
        inv_t = tl.load(inv_t_ptr + rows, mask=row_ok, other=1.0)[:, None]
    return inv_t


@triton.jit
def scaled_logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, V, H,
                       stride_hn, stride_hh, stride_wv, stride_wh, inv_temperature, softcap,
                       HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, DOT_FP32: tl.constexpr,
                       IEEE: tl.constexpr):
    """x = cap((h W^T + b)) / T for one [BLOCK_N, BLOCK_V] tile, fp32 (cap: soft-capping
    when SOFTCAP); columns >= V are -inf.

    ``rows`` are int64 row indices into ``hidden`` (the compacted list of counted tokens).
    """
    col_ok = offs_v < V
    offs_v64 = offs_v.to(tl.int64)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        offs_h64 = offs_h.to(tl.int64)
        a = tl.load(hidden_ptr + rows[:, None] * stride_hn + offs_h64[None, :] * stride_hh,
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        b = tl.load(weight_ptr + offs_v64[None, :] * stride_wv + offs_h64[:, None] * stride_wh,
                    mask=col_ok[None, :] & h_ok[:, None], other=0.0)
        acc = _dot(a, b, acc, DOT_FP32, IEEE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_v64, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    x = soft_cap(acc, softcap, SOFTCAP) * inv_temperature
    # Padded columns must be -inf (not 0): exp(0) would leak into the softmax (verl #2656).
    return tl.where(col_ok[None, :], x, float("-inf"))


@triton.jit
def dlogits_tile(x, offs_v, target, lse, g_logp, g_ent, entropy, inv_temperature, softcap,
                 HAS_ENT_GRAD: tl.constexpr, SOFTCAP: tl.constexpr):
    """dLoss/dz for one tile, from the recomputed scaled logits x.

    d logp / dz = (onehot - p) / T; d entropy / dz = -p (log p + H) / T with log p = x - lse;
    with soft-capping, times 1 - tanh^2 (the cap's derivative).
    """
    log_p = x - lse[:, None]
    p = tl.exp(log_p)  # -inf columns give 0
    onehot = offs_v[None, :] == target[:, None]
    dz = g_logp[:, None] * (tl.where(onehot, 1.0, 0.0) - p)
    carries = g_logp != 0.0
    if HAS_ENT_GRAD:
        safe_log_p = tl.where(p > 0.0, log_p, 0.0)  # avoid 0 * -inf on padded columns
        dz = dz - g_ent[:, None] * p * (safe_log_p + entropy[:, None])
        carries = carries | (g_ent != 0.0)
    if SOFTCAP:
        dz = dz * soft_cap_derivative(x, inv_temperature, softcap)
    # Rows that carry no gradient (padding left in place, RFT negatives) give exactly 0, even
    # where their logits are not finite.
    return tl.where(carries[:, None], dz * inv_temperature, 0.0)


@triton.jit
def load_row_state(rows_ptr, target_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, offs_n,
                   n_rows, HAS_ENT_GRAD: tl.constexpr):
    """Per-row inputs of the backward tiles: row ids, target, lse, entropy and the two grads.

    Rows past n_rows get g = 0, so their dz is exactly zero and they add nothing; the
    returned row mask is False for every row that carries no gradient.
    """
    row_ok = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=row_ok, other=0)
    target = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_logp = tl.load(g_logp_ptr + rows, mask=row_ok, other=0.0)
    if HAS_ENT_GRAD:
        g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
    else:
        g_ent = tl.zeros_like(g_logp)
        entropy = tl.zeros_like(g_logp)
    carries = (tl.abs(g_logp) + tl.abs(g_ent)) > 0.0
    active = tl.max(carries.to(tl.int32), axis=0) > 0
    # Rows without gradient (padding left in place with validate=False) are never read
    # again: their dz is 0 and 0 * NaN would still poison dW through a NaN hidden state.
    return rows, row_ok & carries, target, lse, g_logp, g_ent, entropy, active


@triton.jit
def tile_is_negligible(x, offs_v, target, lse, g_logp, g_ent, filter_eps):
    """Gradient filtering: the tile may be skipped when |onehot - p| < filter_eps everywhere
    for rows that carry a gradient (the criterion of Cut Cross-Entropy, made optional)."""
    p = tl.exp(x - lse[:, None])
    onehot = tl.where(offs_v[None, :] == target[:, None], 1.0, 0.0)
    carries = (tl.abs(g_logp) + tl.abs(g_ent)) > 0.0
    err = tl.where(carries[:, None], tl.abs(onehot - p), 0.0)
    return tl.max(tl.max(err, axis=1), axis=0) < filter_eps
