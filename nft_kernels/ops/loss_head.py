"""Elementwise kernel: a loss head applied to log-probs a trainer already has.

Serves ``nft_loss`` / ``ppo_clip_loss``: reads logp, old log-probs and the per-token reward
(or advantage), correct rate, optional token weight and reference log-prob (KL term),
writes loss_t and
g_t = d loss_t / d logp_t (ops/heads.py).
Masked tokens get loss 0 and g 0.
"""

import triton
import triton.language as tl

from .heads import head_from_pointers


@triton.jit
def loss_head_kernel(
    logp_ptr, old_ptr, signal_ptr, correct_rate_ptr, token_weight_ptr, ref_ptr, mask_ptr, loss_ptr,
    grad_ptr, n,
    neg_weight, clip_negative, rate_lo, rate_hi, clip_low, clip_high, clip_ratio_c, max_log_ratio,
    beta,
    HEAD: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_TOKEN_WEIGHTS: tl.constexpr, KL: tl.constexpr, KL_RATIO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    logp = tl.load(logp_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    loss, g = head_from_pointers(logp, offs, ok, old_ptr, signal_ptr, correct_rate_ptr, token_weight_ptr,
                                 ref_ptr, neg_weight, clip_negative, rate_lo, rate_hi, clip_low,
                                 clip_high, clip_ratio_c, max_log_ratio, beta, HEAD, NORMALIZE,
                                 HAS_TOKEN_WEIGHTS, KL, KL_RATIO)
    if HAS_MASK:
        counted = tl.load(mask_ptr + offs, mask=ok, other=0) != 0
        loss = tl.where(counted, loss, 0.0)
        g = tl.where(counted, g, 0.0)
    tl.store(loss_ptr + offs, loss, mask=ok)
    tl.store(grad_ptr + offs, g, mask=ok)
