"""Forward kernel: fused LM head + log-softmax + loss head, without the [N, V] logits.

One program owns BLOCK_N counted rows and streams the vocabulary in BLOCK_V tiles. For each tile
it computes the scaled logits x = (h W^T + b)/T with tl.dot over H, then updates an online fp32
accumulator per row:
    m  = running max of x
    s  = sum exp(x - m)
    t  = sum exp(x - m) (x - m)        (entropy: H = log s - t / s)
and picks the target logit. The epilogue gives logp = x_target - (m + log s) and runs the loss
head (ops/heads.py), writing loss_t and g_t = d loss_t / d logp_t for the backward kernels
(both times the token's weight, when given).
"""

import triton
import triton.language as tl

from .heads import HEAD_NONE, head_from_pointers
from .tiles import row_inv_temperature, scaled_logits_tile


@triton.jit
def fused_linear_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, target_ptr, rows_ptr,
    old_ptr, signal_ptr, correct_rate_ptr, token_weight_ptr, ref_ptr,
    logp_ptr, lse_ptr, entropy_ptr, loss_ptr, grad_ptr,
    n_rows, V, H,
    stride_hn, stride_hh, stride_wv, stride_wh,
    inv_temperature, softcap, inv_t_ptr,
    neg_weight, clip_negative, rate_lo, rate_hi, clip_low, clip_high, clip_ratio_c, max_log_ratio,
    beta,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, PER_TOKEN_T: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr,
    HEAD: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_TOKEN_WEIGHTS: tl.constexpr, KL: tl.constexpr,
    KL_RATIO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=row_ok, other=0)
    target = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    inv_t = row_inv_temperature(inv_t_ptr, rows, row_ok, inv_temperature, PER_TOKEN_T)

    # Start the running max at -inf; every tile holds at least one real column, so m is finite
    # after the first tile.
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    x_target = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        x = scaled_logits_tile(hidden_ptr, weight_ptr, bias_ptr, rows, row_ok, offs_v, V, H,
                               stride_hn, stride_hh, stride_wv, stride_wh, inv_t,
                               softcap, HAS_BIAS, SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32,
                               IEEE)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new[:, None])
        if COMPUTE_ENTROPY:
            # Rescale t to the new max: t' = alpha (t + s (m - m_new)). While m = -inf, s = 0;
            # substitute m_new there so no 0 * inf is formed.
            shift = s * (tl.where(s > 0.0, m, m_new) - m_new)
            centered = tl.where(e > 0.0, x - m_new[:, None], 0.0)
            t = alpha * (t + shift) + tl.sum(e * centered, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        x_target += tl.sum(tl.where(offs_v[None, :] == target[:, None], x, 0.0), axis=1)

    log_s = tl.log(s)
    lse = m + log_s
    logp = x_target - lse
    tl.store(logp_ptr + rows, logp, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if COMPUTE_ENTROPY:
        tl.store(entropy_ptr + rows, log_s - t / s, mask=row_ok)

    if HEAD != HEAD_NONE:
        loss, g = head_from_pointers(logp, rows, row_ok, old_ptr, signal_ptr, correct_rate_ptr,
                                     token_weight_ptr, ref_ptr, neg_weight, clip_negative,
                                     rate_lo, rate_hi, clip_low, clip_high, clip_ratio_c,
                                     max_log_ratio, beta, HEAD, NORMALIZE, HAS_TOKEN_WEIGHTS,
                                     KL, KL_RATIO)
        tl.store(loss_ptr + rows, loss, mask=row_ok)
        tl.store(grad_ptr + rows, g, mask=row_ok)
