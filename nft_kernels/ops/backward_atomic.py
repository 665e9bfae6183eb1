"""Backward kernel (default): one program per (row tile, vocab tile), fp32 atomics.

Recomputes the scaled logits of its tile, forms dz = g (onehot - softmax) / T (+ the entropy
term when entropy is differentiated), then for each H chunk adds dz @ W into dH and dz^T @ h
into dW. Both accumulate in fp32 buffers (bf16 accumulation of dW diverges: Liger #512/#827).
Cost: 2NHV (recompute) + 4NHV (the two gradient GEMMs). Row tiles whose g is all zero
(RFT negatives, clipped PPO tokens) skip everything; with filtering, tiles whose
|onehot - p| < filter_eps skip the 4NHV part.

Atomics make the summation order, and so the last bits of dH and dW, vary between runs; the
deterministic pair (backward_dh.py + backward_dw.py) avoids them.
"""

import triton
import triton.language as tl

from .tiles import (
    _dot,
    dlogits_tile,
    load_row_state,
    row_inv_temperature,
    scaled_logits_tile,
    tile_is_negligible,
)


@triton.jit
def fused_linear_backward_atomic_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr, rows_ptr,
    lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr,
    dh_ptr, dw_ptr, db_ptr,
    n_rows, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    inv_temperature, filter_eps, softcap, inv_t_ptr,
    HAS_BIAS: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, FILTER: tl.constexpr,
    SOFTCAP: tl.constexpr, PER_TOKEN_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    # 1-D grid with a group swizzle (a 2-D grid overflows grid-y at 65,536: Liger PR #1294):
    # GROUP consecutive programs share one W tile while walking GROUP row tiles.
    pid = tl.program_id(0)
    num_n = tl.cdiv(n_rows, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP * num_v
    first_n = (pid // per_group) * GROUP
    group_size = tl.minimum(num_n - first_n, GROUP)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, row_ok, target, lse, g_logp, g_ent, entropy, active = load_row_state(
        rows_ptr, target_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, offs_n, n_rows,
        HAS_ENT_GRAD)
    inv_t = row_inv_temperature(inv_t_ptr, rows, row_ok, inv_temperature, PER_TOKEN_T)
    if not active:
        return

    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    offs_v64 = offs_v.to(tl.int64)
    x = scaled_logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, V, H,
                           stride_hn, stride_hh, stride_wv, stride_wh, inv_t,
                           softcap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
                           IEEE)
    if FILTER:
        if tile_is_negligible(x, offs_v, target, lse, g_logp, g_ent, filter_eps):
            return
    dz = dlogits_tile(x, offs_v, target, lse, g_logp, g_ent, entropy, inv_t,
                      softcap, HAS_ENT_GRAD, SOFTCAP)
    if HAS_BIAS:
        tl.atomic_add(db_ptr + offs_v64, tl.sum(dz, axis=0), mask=col_ok)
    if not DOT_FP32:
        dz = dz.to(hidden_ptr.dtype.element_ty)  # tensor-core operand; accumulation stays fp32

    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_ok = offs_h < H
        offs_h64 = offs_h.to(tl.int64)
        w = tl.load(weight_ptr + offs_v64[:, None] * stride_wv + offs_h64[None, :] * stride_wh,
                    mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        dh = _dot(dz, w, tl.zeros((BLOCK_N, BLOCK_H), tl.float32), DOT_FP32, IEEE)
        tl.atomic_add(dh_ptr + rows[:, None] * H + offs_h64[None, :], dh,
                      mask=row_ok[:, None] & h_ok[None, :])
        a = tl.load(hidden_ptr + rows[:, None] * stride_hn + offs_h64[None, :] * stride_hh,
                    mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        dw = _dot(tl.trans(dz), a, tl.zeros((BLOCK_V, BLOCK_H), tl.float32), DOT_FP32, IEEE)
        tl.atomic_add(dw_ptr + offs_v64[:, None] * H + offs_h64[None, :], dw,
                      mask=col_ok[:, None] & h_ok[None, :])
