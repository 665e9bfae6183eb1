"""Float64 reference: materialized logits, autograd for every gradient.

Used by the tests and the bench as ground truth. It shares no gradient code with the kernels:
the straight-through max of Eq. 8 is written as ``q + (max(q, eps) - q).detach()`` and autograd
does the rest, so the hand-derived g of ``heads.py`` / ``ops/heads.py`` is checked against an
independent derivation. Memory is O(N * V): for tests and bench slices only.
"""

from __future__ import annotations

import torch


def reference_logprobs(hidden, weight, target, *, bias=None, temperature=1.0, softcap=None):
    """(logp, entropy) per token in float64; differentiable w.r.t. the inputs. ``softcap``:
    Gemma's logit soft-capping, c tanh(z / c), before the temperature."""
    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    if isinstance(temperature, torch.Tensor):  # one temperature per token
        temperature = temperature.double().unsqueeze(-1)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    logp = log_probs.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def _reduce(loss_t, mask, reduction):
    if mask is not None:
        loss_t = torch.where(mask.bool(), loss_t, torch.zeros_like(loss_t))
    if reduction == "none":
        return loss_t
    total = loss_t.sum()
    if reduction == "mean":
        count = loss_t.numel() if mask is None else int(mask.bool().sum())
        return total / max(count, 1)
    return total


def reference_kl(logp, ref_logprobs, estimator="k3"):
    """Per-token KL(pi || pi_ref) estimate in float64, written as verl's ``kl_penalty`` and
    TRL's ``per_token_kl`` write it (torch.clamp for verl's clips); autograd differentiates."""
    logp, ref = logp.double(), ref_logprobs.double()
    estimator = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}.get(estimator, estimator)
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return 0.5 * (logp - ref).square()
    kl = ref - logp
    if estimator == "k3_unclipped":
        return torch.exp(kl) - kl - 1
    kl = torch.clamp(kl, min=-20, max=20)
    return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)


def _with_kl(loss_t, logp, ref_logprobs, beta, kl_estimator, bias_correction, ratio):
    """``ratio``: the importance ratio the policy term uses (the token's, or with GSPO its
    response's), which TRL's use_bias_correction_kl multiplies the estimate by."""
    if beta == 0:
        return loss_t
    kl = reference_kl(logp, ref_logprobs, kl_estimator)
    if bias_correction:
        kl = kl * ratio
    return loss_t + beta * kl


def reference_nft_from_logprobs(logp, old_logprobs, rewards, correct_rate, mask=None, *,
                                neg_weight=1.0, normalize=1, clip_negative=1.0,
                                rate_clamp=(0.02, 0.98), max_log_ratio=10.0, ref_logprobs=None,
                                beta=0.0, kl_estimator="k3", kl_bias_correction=False,
                                reduction="sum"):
    logp = logp.double()
    log_ratio = torch.clamp(logp - old_logprobs.double(), max=max_log_ratio)
    ratio = torch.exp(log_ratio)
    r_hat = correct_rate.double().clamp(*rate_clamp)
    r = rewards.double()
    q = (1 - r_hat * ratio) / (1 - r_hat)
    q_st = q + (q.clamp(min=clip_negative) - q).detach()  # max_st: value clipped, gradient not
    weight = {0: torch.ones_like(r_hat), 1: 1 - r_hat,
              2: torch.sqrt((1 - r_hat) / r_hat)}[normalize]
    loss_t = weight * (r * -log_ratio + neg_weight * (1 - r) * -torch.log(q_st))
    loss_t = _with_kl(loss_t, logp, ref_logprobs, beta, kl_estimator, kl_bias_correction, ratio)
    return _reduce(loss_t, mask, reduction)


def reference_ppo_from_logprobs(logp, old_logprobs, advantages, mask=None, *, clip_low=0.2,
                                clip_high=0.2, clip_ratio_c=None, max_log_ratio=10.0,
                                ref_logprobs=None, beta=0.0, kl_estimator="k3",
                                kl_bias_correction=False, sequence_ids=None, reduction="sum"):
    """With ``sequence_ids``: GSPO's sequence-level ratio, a response's exp(mean of its
    counted tokens' logp - old) for each of its tokens, formed one response at a time."""
    if sequence_ids is None:
        ratio = torch.exp(torch.clamp(logp.double() - old_logprobs.double(), max=max_log_ratio))
    else:
        log_ratio = logp.double() - old_logprobs.double()
        counted = torch.ones_like(log_ratio, dtype=torch.bool) if mask is None else mask.bool()
        ratio = torch.zeros_like(log_ratio)
        for sid in torch.unique(sequence_ids).tolist():
            here = sequence_ids == sid
            n_here = int((here & counted).sum())
            mean = log_ratio[here & counted].sum() / max(n_here, 1)
            ratio = torch.where(here, torch.exp(torch.clamp(mean, max=max_log_ratio)), ratio)
    adv = advantages.double()
    loss_t = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))
    if clip_ratio_c is not None:
        loss_t = torch.where(adv < 0, torch.minimum(loss_t, -adv * clip_ratio_c), loss_t)
    loss_t = _with_kl(loss_t, logp, ref_logprobs, beta, kl_estimator, kl_bias_correction, ratio)
    return _reduce(loss_t, mask, reduction)


def _with_entropy_bonus(loss_fn, logp, entropy, mask, entropy_coef, options):
    """loss_t - c H_t, reduced as the loss is (the bonus enters before the reduction)."""
    reduction = options.pop("reduction", "sum")
    loss_t = loss_fn(logp, reduction="none", **options)
    if entropy_coef != 0:
        loss_t = loss_t - entropy_coef * entropy
    return _reduce(loss_t, mask, reduction)


def reference_nft_loss(hidden, weight, target, old_logprobs, rewards, correct_rate, mask=None, *,
                       bias=None, temperature=1.0, softcap=None, entropy_coef=0.0,
                       **options):
    logp, entropy = reference_logprobs(hidden, weight, target, bias=bias,
                                       temperature=temperature, softcap=softcap)
    return _with_entropy_bonus(
        lambda x, **o: reference_nft_from_logprobs(x, old_logprobs, rewards, correct_rate, mask,
                                                   **o),
        logp, entropy, mask, entropy_coef, options)


def reference_ppo_loss(hidden, weight, target, old_logprobs, advantages, mask=None, *, bias=None,
                       temperature=1.0, softcap=None, entropy_coef=0.0, **options):
    logp, entropy = reference_logprobs(hidden, weight, target, bias=bias,
                                       temperature=temperature, softcap=softcap)
    return _with_entropy_bonus(
        lambda x, **o: reference_ppo_from_logprobs(x, old_logprobs, advantages, mask, **o),
        logp, entropy, mask, entropy_coef, options)


def reference_policy_loss(hidden, weight, target, loss_fn, per_token, mask=None, *, bias=None,
                          temperature=1.0, softcap=None, token_weights=None, entropy_coef=0.0,
                          reduction="sum"):
    """A user-defined head (``fused_linear_policy_loss``) in float64: ``loss_fn`` on the
    float64 log-probs and float64 ``per_token`` inputs, times ``token_weights``, minus the
    entropy bonus, reduced over counted tokens; differentiable by autograd."""
    logp, entropy = reference_logprobs(hidden, weight, target, bias=bias,
                                       temperature=temperature, softcap=softcap)
    loss_t = loss_fn(logp, **{k: v.double() for k, v in per_token.items()})
    if entropy_coef != 0:
        loss_t = loss_t - entropy_coef * entropy
    if token_weights is not None:
        loss_t = loss_t * token_weights.double()
    return _reduce(loss_t, mask, reduction)


def reference_with_grads(loss_fn, hidden, weight, *args, bias=None, **kwargs):
    """Run a reference loss on float64 leaf copies; return (loss, dH, dW, d bias).

    ``reduction`` must be scalar ("sum" or "mean"). Gradients are float64.
    """
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    b = None if bias is None else bias.detach().double().requires_grad_(True)
    loss = loss_fn(h, w, *args, bias=b, **kwargs)
    grads = torch.autograd.grad(loss, [t for t in (h, w, b) if t is not None], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g
             for t, g in zip([t for t in (h, w, b) if t is not None], grads)]
    return loss.detach(), grads[0], grads[1], (grads[2] if b is not None else None)
