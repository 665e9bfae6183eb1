"""Deterministic backward, part 2: dW (and d bias), one program per vocab tile, no atomics.

The program owns a BLOCK_V slice of dW and walks all row tiles in order, recomputing the
logits and adding dz^T @ h with a plain load/add/store: bit-identical run to run.
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
def fused_linear_backward_dw_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr, rows_ptr,
    lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr,
    dw_ptr, db_ptr,
    n_rows, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    inv_temperature, filter_eps, softcap, inv_t_ptr,
    HAS_BIAS: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, FILTER: tl.constexpr,
    SOFTCAP: tl.constexpr, PER_TOKEN_T: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_v = tl.program_id(0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    offs_v64 = offs_v.to(tl.int64)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        rows, row_ok, target, lse, g_logp, g_ent, entropy, active = load_row_state(
            rows_ptr, target_ptr, lse_ptr, entropy_ptr, g_logp_ptr, g_ent_ptr, offs_n, n_rows,
            HAS_ENT_GRAD)
        inv_t = row_inv_temperature(inv_t_ptr, rows, row_ok, inv_temperature,
                                    PER_TOKEN_T)
        if active:
            x = scaled_logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, V, H,
                                   stride_hn, stride_hh, stride_wv, stride_wh, inv_t,
                                   softcap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
                                   IEEE)
            skip = False
            if FILTER:
                skip = tile_is_negligible(x, offs_v, target, lse, g_logp, g_ent, filter_eps)
            if not skip:
                dz = dlogits_tile(x, offs_v, target, lse, g_logp, g_ent, entropy,
                                  inv_t, softcap, HAS_ENT_GRAD, SOFTCAP)
                db += tl.sum(dz, axis=0)
                if not DOT_FP32:
                    dz = dz.to(hidden_ptr.dtype.element_ty)
                dz_t = tl.trans(dz)
                for h0 in range(0, H, BLOCK_H):
                    offs_h = h0 + tl.arange(0, BLOCK_H)
                    h_ok = offs_h < H
                    offs_h64 = offs_h.to(tl.int64)
                    a = tl.load(hidden_ptr + rows[:, None] * stride_hn
                                + offs_h64[None, :] * stride_hh,
                                mask=row_ok[:, None] & h_ok[None, :], other=0.0)
                    ptrs = dw_ptr + offs_v64[:, None] * H + offs_h64[None, :]
                    ok = col_ok[:, None] & h_ok[None, :]
                    acc = tl.load(ptrs, mask=ok, other=0.0)
                    acc = _dot(dz_t, a, acc, DOT_FP32, IEEE)
                    tl.store(ptrs, acc, mask=ok)
    if HAS_BIAS:
        tl.store(db_ptr + offs_v64, db, mask=col_ok)
