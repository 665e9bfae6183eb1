"""Policy losses of 2025-2026 as user-defined heads (``fused_linear_policy_loss``).

Each is a factory: options in, a ``loss_fn(logp, **per_token) -> per-token loss`` out, a few
lines of torch that run fused with the LM head (6NHV in the chunked mode). Tested against the
float64 reference and, where Liger-Kernel 0.8 has the loss type, against
``LigerFusedLinearGRPOLoss`` (tests/test_user_heads.py)::

    loss = fused_linear_policy_loss(hidden, lm_head.weight, target, cispo(clip_max=5.0), mask,
                                    per_token={"old_logprobs": old, "advantages": adv},
                                    token_weights=mask / mask.sum(), reduction="sum")

``vespo`` reads a whole response, so it runs on fused log-probs (``policy_loss(...,
token_level=False)``) instead. The aggregation (token mean, response mean, ...) is the
caller's, through ``token_weights`` and ``reduction``, as for the built-in heads
(``nft_train.batch``).
"""

from __future__ import annotations

import math

import torch


def cispo(clip_max: float = 5.0):
    """CISPO (MiniMax-M1, arXiv 2506.13585; ScaleRL's eps_max, arXiv 2510.13786): REINFORCE
    weighted by the importance ratio clipped at ``clip_max`` and detached, so every token
    keeps a gradient: loss = -sg(min(R, clip_max)) A logp. ``clip_max`` is TRL's
    ``epsilon_high`` for ``loss_type="cispo"`` (recommended 5.0); Liger's ``epsilon_high``.
    per_token: ``old_logprobs``, ``advantages``."""
    if not clip_max > 0:
        raise ValueError(f"clip_max must be > 0, got {clip_max!r}")

    def cispo_loss(logp, old_logprobs, advantages):
        weight = torch.exp(logp - old_logprobs).clamp(max=clip_max).detach()
        return -weight * advantages * logp

    return cispo_loss


def sapo(temperature_pos: float = 1.0, temperature_neg: float = 1.05):
    """SAPO (Soft Adaptive Policy Optimization, arXiv 2511.20347): a smooth gate instead of
    the hard clip, loss = -A (4 / tau) sigmoid(tau (R - 1)), tau = ``temperature_pos`` where
    A > 0, else ``temperature_neg`` (TRL's and Liger's defaults 1.0 / 1.05). Its gradient
    -4 A sigma (1 - sigma) R fades smoothly as R leaves 1. per_token: ``old_logprobs``,
    ``advantages``."""
    for name, tau in (("temperature_pos", temperature_pos), ("temperature_neg", temperature_neg)):
        if not tau > 0:
            raise ValueError(f"{name} must be > 0, got {tau!r}")

    def sapo_loss(logp, old_logprobs, advantages):
        ratio = torch.exp(logp - old_logprobs)
        tau = torch.where(advantages > 0, temperature_pos, temperature_neg)
        return -advantages * torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau

    return sapo_loss


def w_reinforce(positive_weight: float = 0.1):
    """W-REINFORCE (Zhu et al., "The Surprising Effectiveness of Negative Reinforcement in
    LLM Reasoning", arXiv 2506.01347): lambda * PSR + NSR on binary rewards r in {0, 1},
    loss = -(lambda r - (1 - r)) logp, lambda = ``positive_weight`` (the paper's 0.1):
    wrong answers are pushed down at full weight, right ones pulled up at lambda. On-policy
    REINFORCE: no ratio, no clip. per_token: ``rewards``."""
    if not positive_weight >= 0:
        raise ValueError(f"positive_weight must be >= 0, got {positive_weight!r}")

    def w_reinforce_loss(logp, rewards):
        return -(positive_weight * rewards - (1.0 - rewards)) * logp

    return w_reinforce_loss


def nsr():
    """NSR (negative sample reinforcement, arXiv 2506.01347): learn from wrong answers only,
    loss = (1 - r) logp: ``w_reinforce(positive_weight=0)``. per_token: ``rewards``."""
    return w_reinforce(positive_weight=0.0)


def luspo_token_weights(mask: torch.Tensor) -> torch.Tensor:
    """LUSPO's aggregation (Length-Unbiased Sequence Policy Optimization, TRL / Liger
    ``loss_type="luspo"``) as token weights for the built-in PPO head: each response's
    per-token losses scaled by its length, over B x T: w = |o_i| / (B T) on counted tokens
    of a [B, T] ``mask``. Use with ``fused_linear_ppo_loss(..., token_weights=w,
    reduction="sum")`` (GSPO's ``importance_sampling_level="sequence"`` as TRL pairs it, or
    per token as Liger's default)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T] (one row per response), got {tuple(mask.shape)}")
    counted = (mask != 0).float()
    lengths = counted.sum(dim=1, keepdim=True)
    return counted * lengths / (mask.shape[0] * mask.shape[1])


def vespo(k_pos: float = 2.0, lambda_pos: float = 3.0, k_neg: float = 3.0,
          lambda_neg: float = 2.0):
    """VESPO (TRL's ``get_gamma_weights``, Liger's ``loss_type="vespo"``): REINFORCE weighted
    by a detached gamma-shaped function of the response's importance weight
    w = exp(clamp(sum of clamp(logp - old, -20, 20) over the response, log 1e-8, 20)):
    phi(w) = exp(lambda + k log w - lambda w) (phi(1) = 1), k and lambda by the sign of A
    (defaults as TRL and Liger), loss = -phi A logp. A sequence-level loss (w reads the whole
    response): take the two-pass route, ``policy_loss(fused_linear_logprobs(...), vespo(),
    per_token={"old_logprobs", "advantages", "sequence_ids"}, mask=mask, token_level=False)``.
    ``sequence_ids``: one number per token, equal within a response (as floats)."""
    for name, value in (("lambda_pos", lambda_pos), ("lambda_neg", lambda_neg)):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")

    def vespo_loss(logp, old_logprobs, advantages, sequence_ids, mask=None):
        index = torch.unique(sequence_ids, return_inverse=True)[1].reshape(-1)
        counted = torch.ones_like(logp) if mask is None else mask.to(logp.dtype)
        with torch.no_grad():  # phi scales the gradient; it is not differentiated
            log_ratio = (logp - old_logprobs).clamp(-20.0, 20.0) * counted
            total = torch.zeros(int(index.max()) + 1 if index.numel() else 0,
                                dtype=logp.dtype, device=logp.device)
            log_w = total.index_add(0, index, log_ratio).clamp(math.log(1e-8), 20.0)
            log_w = log_w.index_select(0, index)
            k = torch.where(advantages >= 0, k_pos, k_neg)
            lam = torch.where(advantages >= 0, lambda_pos, lambda_neg)
            phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
            phi = phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        return -phi * advantages * logp

    return vespo_loss
