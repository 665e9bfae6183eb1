"""Row kernel of the chunked mode: one chunk of logits -> log-softmax stats, loss head, dz.

The chunked mode (``nft_kernels/chunked.py``) computes a chunk of C rows of logits with the
vendor GEMM into an fp32 workspace; this kernel then does everything else that touches them,
one program per row, streaming the row in BLOCK_V blocks:

pass 1 (STATS): x = cap(logits + b) / T (cap: soft-capping, when on); online fp32 max m,
    s = sum exp(x - m) and t = sum exp(x - m)(x - m) (entropy H = log s - t / s); the target
    logit; then
    logp = x_target - m - log s and the loss head of Eq. 8 (NFT) or PPO-clip, which gives
    loss_t and g_t = d loss_t / d logp_t (both times the token's weight, when given); with
    ENT_BONUS, loss_t - c w H and, for the gradient in the forward, g_ent = -c w.
pass 2 (WRITE_DZ): dz = g (onehot - p) / T  (- g_ent p (log p + H) / T when the entropy is
    differentiated; times the cap's derivative 1 - tanh^2 with soft-capping), with
    log p = (x - m) - log s formed from the row max so that it keeps its precision at large
    logits. dz is written over the row's own logits, in the dtype of the
    gradient GEMMs (bf16/fp16 for 16-bit inputs: the first half of the row's fp32 bytes). The
    two gradient products dH = dz W and dW += dz^T h are then vendor GEMMs on the chunk.

In the forward of a scalar loss both passes run back to back (gradients computed in the
forward: 6NHV in all); with per-token upstream gradients the forward runs pass 1 only and the
backward recomputes the logits and runs pass 2 with the saved (m, log s) and the given g.

Rows whose mask is 0 get loss, g, logp and dz exactly 0 (their logits may be anything).
"""

import triton
import triton.language as tl

from .heads import HEAD_NONE, head_from_pointers
from .tiles import soft_cap, soft_cap_derivative


@triton.jit
def chunk_rows_kernel(
    logits_ptr, dz_ptr, stride_logits, stride_dz,
    bias_ptr, target_ptr, rows_ptr, mask_ptr,
    old_ptr, signal_ptr, correct_rate_ptr, token_weight_ptr, ref_ptr, scale_ptr,
    logp_ptr, rowmax_ptr, logsum_ptr, entropy_ptr, loss_ptr, g_ptr,
    g_logp_ptr, g_ent_ptr,
    V, inv_temperature, softcap, inv_t_ptr,
    neg_weight, clip_negative, rate_lo, rate_hi, clip_low, clip_high, clip_ratio_c, max_log_ratio,
    beta, entropy_coef,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, PER_TOKEN_T: tl.constexpr,
    HAS_MASK: tl.constexpr, STATS: tl.constexpr,
    WRITE_DZ: tl.constexpr, HEAD: tl.constexpr, NORMALIZE: tl.constexpr,
    COMPUTE_ENTROPY: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, HAS_TOKEN_WEIGHTS: tl.constexpr,
    KL: tl.constexpr, KL_RATIO: tl.constexpr, ENT_BONUS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + pid)  # the token's index in the caller's [N] tensors
    if PER_TOKEN_T:  # this token's own 1 / T
        inv_temperature = tl.load(inv_t_ptr + row)
    logits_row = logits_ptr + pid * stride_logits
    counted = True
    if HAS_MASK:
        counted = tl.load(mask_ptr + row) != 0
    cols0 = tl.arange(0, BLOCK_V)

    if STATS:
        # Start the running max at -inf (verl #2656: a 0 start leaks exp(0) into the sum); every
        # block holds at least one real column, so m is finite after the first block.
        m = tl.max(tl.full((BLOCK_V,), float("-inf"), tl.float32), axis=0)
        s = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
        t = tl.sum(tl.zeros((BLOCK_V,), tl.float32), axis=0)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            ok = cols < V
            x = tl.load(logits_row + cols, mask=ok, other=float("-inf"))
            if HAS_BIAS:
                x = x + tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            x = soft_cap(x, softcap, SOFTCAP) * inv_temperature
            if SOFTCAP:  # padded columns stay -inf (the cap maps -inf to -c)
                x = tl.where(ok, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            alpha = tl.exp(m - m_new)
            e = tl.exp(x - m_new)  # padded columns: exp(-inf) = 0
            if COMPUTE_ENTROPY:
                # t' = alpha (t + s (m - m_new)); while m = -inf, s = 0: no 0 * inf.
                shift = s * (tl.where(s > 0.0, m, m_new) - m_new)
                t = alpha * (t + shift) + tl.sum(e * tl.where(ok, x - m_new, 0.0), axis=0)
            s = alpha * s + tl.sum(e, axis=0)
            m = m_new
        log_s = tl.log(s)
        # The target logit, formed exactly as in the loop (same operations, same rounding).
        target = tl.load(target_ptr + row, mask=counted, other=0).to(tl.int64)
        x_t = tl.load(logits_row + target, mask=counted, other=0.0)
        if HAS_BIAS:
            x_t = x_t + tl.load(bias_ptr + target, mask=counted, other=0.0).to(tl.float32)
        x_t = soft_cap(x_t, softcap, SOFTCAP) * inv_temperature
        logp = (x_t - m) - log_s
        entropy = log_s - t / s
        tl.store(logp_ptr + row, tl.where(counted, logp, 0.0))
        tl.store(rowmax_ptr + row, tl.where(counted, m, 0.0))
        tl.store(logsum_ptr + row, tl.where(counted, log_s, 0.0))
        if COMPUTE_ENTROPY:
            tl.store(entropy_ptr + row, tl.where(counted, entropy, 0.0))
        loss, g = head_from_pointers(logp, row, counted, old_ptr, signal_ptr, correct_rate_ptr,
                                     token_weight_ptr, ref_ptr, neg_weight, clip_negative,
                                     rate_lo, rate_hi, clip_low, clip_high, clip_ratio_c,
                                     max_log_ratio, beta, HEAD, NORMALIZE, HAS_TOKEN_WEIGHTS,
                                     KL, KL_RATIO)
        # Entropy bonus (needs COMPUTE_ENTROPY and HAS_ENT_GRAD): - c w H, d / dH = - c w.
        ent_weight = entropy_coef
        if ENT_BONUS:
            if HAS_TOKEN_WEIGHTS:
                ent_weight = ent_weight * tl.load(token_weight_ptr + row, mask=counted,
                                                  other=0.0).to(tl.float32)
            loss = loss - ent_weight * entropy
        if HEAD != HEAD_NONE:
            tl.store(loss_ptr + row, tl.where(counted, loss, 0.0))
            tl.store(g_ptr + row, tl.where(counted, g, 0.0))
        # Gradient of the scalar loss: the per-call scale (1, or 1 / counted tokens for "mean").
        scale = tl.load(scale_ptr)
        g_logp = g * scale
        g_ent = g_logp * 0.0
        if ENT_BONUS:
            g_ent = -ent_weight * scale
    else:
        target = tl.load(target_ptr + row, mask=counted, other=0).to(tl.int64)
        m = tl.load(rowmax_ptr + row)
        log_s = tl.load(logsum_ptr + row)
        entropy = tl.load(entropy_ptr + row) if HAS_ENT_GRAD else 0.0
        g_logp = tl.load(g_logp_ptr + row)
        g_ent = tl.load(g_ent_ptr + row) if HAS_ENT_GRAD else 0.0

    if WRITE_DZ:
        g_logp = tl.where(counted, g_logp, 0.0)
        g_ent = tl.where(counted, g_ent, 0.0)
        dz_row = dz_ptr + pid * stride_dz
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            ok = cols < V
            x = tl.load(logits_row + cols, mask=ok, other=float("-inf"))
            if HAS_BIAS:
                x = x + tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            x = soft_cap(x, softcap, SOFTCAP) * inv_temperature
            if SOFTCAP:
                x = tl.where(ok, x, float("-inf"))
            log_p = (x - m) - log_s
            p = tl.exp(log_p)
            onehot = tl.where(cols == target, 1.0, 0.0)
            dz = g_logp * (onehot - p)  # d logp / dz = (onehot - p) / T
            if HAS_ENT_GRAD:
                dz = dz - g_ent * p * (tl.where(ok, log_p, 0.0) + entropy)  # d H / dz
            if SOFTCAP:  # the cap's derivative 1 - tanh^2
                dz = dz * soft_cap_derivative(x, inv_temperature, softcap)
            dz = tl.where(counted, dz * inv_temperature, 0.0)  # masked rows: NaN-proof zero
            # dz may alias this row's logits (16-bit dz fills the first half of the row's fp32
            # bytes): every thread must have read this block before any thread overwrites it.
            # Earlier blocks were read in earlier iterations; later blocks lie past the writes.
            tl.debug_barrier()
            tl.store(dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=ok)
