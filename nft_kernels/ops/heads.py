"""Loss heads as Triton device functions.

A head maps the per-token log-probability ``logp`` (fp32) to the per-token loss and to
``g = d loss / d logp``.  Because the loss touches the logits only through ``logp``, ``g`` is all
the backward kernels need: ``dLoss/dz = g * (onehot - softmax) / T``.

These functions are inlined into the epilogue of ``fused_linear_forward_kernel`` and into the
elementwise ``loss_head_kernel``.  ``nft_kernels/heads.py`` holds the same math in PyTorch; the
float64 reference (``nft_kernels/reference.py``) derives gradients by autograd instead, so the
two hand-derived versions are checked against an independent one.

Equation numbers refer to arXiv 2505.18116 (NFT).
"""

import triton
import triton.language as tl

# Compile-time head selector shared by the kernels (the order of heads.HEAD_KINDS). Kernels may
# only read globals that are tl.constexpr instances.
HEAD_NONE = tl.constexpr(0)  # log-probs (and entropy) only
HEAD_NFT = tl.constexpr(1)  # NFT / RFT (Eq. 8; RFT is neg_weight = 0)
HEAD_PPO = tl.constexpr(2)  # PPO-clip: GRPO, Dr. GRPO, DAPO (clip-higher)


@triton.jit
def _clamped_log_ratio(logp, old, max_log_ratio):
    # R = exp(min(logp - old, max_log_ratio)); the gradient is zero where the clamp is active,
    # as for torch.clamp(max=...), which passes gradient where x <= max.
    x = logp - old
    clamped = x > max_log_ratio
    log_ratio = tl.where(clamped, max_log_ratio, x)
    return log_ratio, clamped


@triton.jit
def nft_head(logp, old, reward, rate, neg_weight, clip_negative, rate_lo, rate_hi, max_log_ratio,
             NORMALIZE: tl.constexpr):
    """NFT loss per token and its derivative w.r.t. logp.

    loss = w * (r * pos + neg_weight * (1 - r) * neg) with
      pos = -log R                                        (Eq. 8, positive term)
      neg = -log max_st((1 - r_hat R) / (1 - r_hat), eps) (Eq. 8, implicit negative policy, Eq. 6)
    where max_st clips the value at eps but passes the gradient straight through (Sec. 4.1),
    and w is the prompt weight omega(q) of Sec. 4.3 / Fig. 9.
    """
    log_ratio, clamped = _clamped_log_ratio(logp, old, max_log_ratio)
    ratio = tl.exp(log_ratio)
    r_hat = tl.minimum(tl.maximum(rate, rate_lo), rate_hi)
    pos = -log_ratio
    q = (1.0 - r_hat * ratio) / (1.0 - r_hat)
    q_st = tl.maximum(q, clip_negative)  # value of max_st; the gradient below uses d q / d logp
    neg = -tl.log(q_st)
    if NORMALIZE == 0:
        w = tl.full(r_hat.shape, 1.0, tl.float32)
    elif NORMALIZE == 1:
        w = 1.0 - r_hat  # ~ Dr. GRPO (Prop. 4.2 with unscaled advantages)
    else:
        w = tl.sqrt((1.0 - r_hat) / r_hat)  # ~ GRPO (Prop. 4.2)
    loss = w * (reward * pos + neg_weight * (1.0 - reward) * neg)
    d_ratio = tl.where(clamped, 0.0, ratio)  # dR/dlogp
    d_pos = tl.where(clamped, 0.0, -1.0)
    d_neg = r_hat * d_ratio / ((1.0 - r_hat) * q_st)  # -(1/q_st) * dq/dlogp, straight-through
    g = w * (reward * d_pos + neg_weight * (1.0 - reward) * d_neg)
    return loss, g


@triton.jit
def ppo_clip_head(logp, old, advantage, clip_low, clip_high, clip_ratio_c, max_log_ratio):
    """PPO-clip per token (GRPO / Dr. GRPO / DAPO baselines of Table 1).

    loss = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)); with clip_ratio_c > 1 the
    dual clip bounds the loss of negative-advantage tokens at -A * clip_ratio_c.
    """
    log_ratio, clamped = _clamped_log_ratio(logp, old, max_log_ratio)
    ratio = tl.exp(log_ratio)
    unclipped = -advantage * ratio
    clipped = -advantage * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    loss = tl.maximum(unclipped, clipped)
    # The unclipped branch carries the gradient when it is the max (ties: both equal and the
    # clip is inactive, so the gradient is the same either way).
    g = tl.where((unclipped >= clipped) & (~clamped), -advantage * ratio, 0.0)
    dual = (clip_ratio_c > 1.0) & (advantage < 0.0) & (-advantage * clip_ratio_c < loss)
    loss = tl.where(dual, -advantage * clip_ratio_c, loss)
    g = tl.where(dual, 0.0, g)
    return loss, g


@triton.jit
def kl_penalty(logp, ref, KL: tl.constexpr):
    """Per-token KL(pi || pi_ref) estimate and its derivative w.r.t. logp (codes of
    heads.KL_ESTIMATORS): k1 = logp - ref; k2 = (logp - ref)^2 / 2; k3 = e^x - x - 1 with
    x = ref - logp, clipped (KL == 3) as verl clips "low_var_kl" (x to [-20, 20], the estimate
    to at most 10, zero gradient where a clip is active) or unclipped (KL == 4, TRL / Liger)."""
    if KL == 1:
        kl = logp - ref
        d_kl = tl.full(logp.shape, 1.0, tl.float32)
    elif KL == 2:
        diff = logp - ref
        kl = 0.5 * diff * diff
        d_kl = diff
    else:
        x = ref - logp
        if KL == 3:
            x_ok = (x >= -20.0) & (x <= 20.0)
            x = tl.minimum(tl.maximum(x, -20.0), 20.0)
        ex = tl.exp(x)
        kl = ex - x - 1.0
        d_kl = 1.0 - ex
        if KL == 3:
            d_kl = tl.where(x_ok & (kl <= 10.0), d_kl, 0.0)
            kl = tl.minimum(kl, 10.0)
    return kl, d_kl


@triton.jit
def head_from_pointers(logp, idx, ok, old_ptr, signal_ptr, correct_rate_ptr, token_weight_ptr, ref_ptr,
                       neg_weight, clip_negative, rate_lo, rate_hi, clip_low, clip_high,
                       clip_ratio_c, max_log_ratio, beta, HEAD: tl.constexpr,
                       NORMALIZE: tl.constexpr, HAS_TOKEN_WEIGHTS: tl.constexpr,
                       KL: tl.constexpr, KL_RATIO: tl.constexpr):
    """The selected head on tokens ``idx`` (where ``ok``), reading its per-token inputs, plus
    beta * KL to the reference log-probs when KL != 0 (times the token's ratio R with
    KL_RATIO, TRL's bias-corrected KL); with token weights, each token's loss
    and gradient are multiplied by its weight (importance corrections, masks, custom
    aggregation). Returns (loss, g), 0 for HEAD_NONE."""
    loss = tl.zeros_like(logp)
    g = tl.zeros_like(logp)
    if HEAD == HEAD_NFT:
        old = tl.load(old_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        reward = tl.load(signal_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        rate = tl.load(correct_rate_ptr + idx, mask=ok, other=0.5).to(tl.float32)
        loss, g = nft_head(logp, old, reward, rate, neg_weight, clip_negative, rate_lo, rate_hi,
                           max_log_ratio, NORMALIZE)
    elif HEAD == HEAD_PPO:
        old = tl.load(old_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        advantage = tl.load(signal_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        loss, g = ppo_clip_head(logp, old, advantage, clip_low, clip_high, clip_ratio_c,
                                max_log_ratio)
    if KL != 0:
        ref = tl.load(ref_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        kl, d_kl = kl_penalty(logp, ref, KL)
        if KL_RATIO:  # d (kl R) / d logp = R (d_kl + kl), or R d_kl where R is clamped
            old_kl = tl.load(old_ptr + idx, mask=ok, other=0.0).to(tl.float32)
            log_ratio, clamped = _clamped_log_ratio(logp, old_kl, max_log_ratio)
            ratio = tl.exp(log_ratio)
            if KL >= 3:  # k3: d_kl + kl = -x exactly where not clipped (no e^x cancellation)
                d_sum = tl.where(d_kl != 0.0, logp - ref, kl)
            else:
                d_sum = d_kl + kl
            d_kl = tl.where(clamped, d_kl, d_sum) * ratio
            kl = kl * ratio
        loss = loss + beta * kl
        g = g + beta * d_kl
    if HAS_TOKEN_WEIGHTS:
        w = tl.load(token_weight_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        loss = loss * w
        g = g * w
    return loss, g
