"""GSPO (Zheng et al. 2025): PPO-clip with a sequence-level importance ratio, on log-probs.

A response's ratio needs all its tokens, so this head runs on per-token log-probs (the fused
``fused_linear_logprobs``, whose logits are recomputed in the backward: 8NHV, or log-probs the
caller has) and is differentiated by autograd: O(N) work. ``api.py`` routes
``importance_sampling_level="sequence"`` here.
"""

from __future__ import annotations

import torch

from . import validation as val
from . import vocab_parallel as vp
from .heads import HeadSpec, kl_penalty, ppo_loss_and_grad, reduce_loss


def sequence_ppo(logp, entropy, named: dict, mask, sequence_ids, spec: HeadSpec, *,
                 reduction: str, validate: bool, check_logprobs: bool, call=None):
    """The GSPO loss of ``logp`` [...] (differentiable) with ``entropy`` [...] or None (the
    entropy bonus, ``spec.entropy_coef``), the named per-token inputs (old_logprobs,
    advantages, token_weights, ref_logprobs) and ``sequence_ids``. ``call``: the
    ``vocab_parallel.GroupCall`` when the log-probs came from a vocab-sharded head, whose
    backward takes collectives: the checks then end in one agreement round, so that an error
    on one rank is raised on all of them (a shape error would otherwise strand the others in
    the backward's all-reduce). ``check_logprobs``: the log-probs were given by the caller."""
    with vp.agreement(call):
        flat, counted, index, n_seq = val.check_sequence_inputs(
            logp, named, mask, sequence_ids, validate=validate, check_logprobs=check_logprobs,
            group=call)
    dev = logp.device
    # As on the token-level path: padded tokens are never read (whatever they hold: NaN
    # included, which autograd would otherwise carry into a response's mean through 0 * NaN),
    # and the per-token inputs are constants (no gradient flows to them).
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    flat = {name: torch.where(counted, t.detach().float(), zero) for name, t in flat.items()}
    logp_flat = torch.where(counted, logp.reshape(-1).float(), 0.0)
    loss_t = sequence_ppo_loss(logp_flat, flat["old_logprobs"], flat["advantages"], index,
                               n_seq, counted, spec, ref=flat.get("ref_logprobs"))
    if entropy is not None and spec.entropy_coef != 0.0:
        loss_t = loss_t - spec.entropy_coef * torch.where(counted, entropy.reshape(-1),
                                                          torch.zeros_like(loss_t))
    if "token_weights" in flat:
        loss_t = loss_t * flat["token_weights"]
    n_counted = counted.sum() if mask is not None else logp.numel()
    return reduce_loss(loss_t, n_counted, reduction, tuple(logp.shape))


def sequence_ppo_loss(logp, old, advantage, sequence_index, n_sequences, counted,
                      spec: HeadSpec, ref=None):
    """PPO-clip with GSPO's sequence-level ratio (Zheng et al. 2025), per token, differentiable
    by autograd (O(N) work on log-probs the fused kernels computed).

    s = exp(min(mean over the response's counted tokens of (logp - old), max_log_ratio)); each
    counted token of the response gets loss max(-A s, -A clip(s, 1 - clip_low, 1 + clip_high))
    (the dual clip as per token), so a token-level aggregation weighs each response by its
    counted tokens, as TRL's and Liger's ``importance_sampling_level="sequence"`` do.
    ``sequence_index``: [N] int64 in [0, n_sequences); ``counted``: [N] bool. The KL term
    (``spec.beta``, ``ref``) stays per token; with ``kl_bias_correction`` it is multiplied by
    the response's ratio s (TRL broadcasts the sequence-level weight onto the per-token KL;
    Liger multiplies by exp of the sequence's log importance weight).
    """
    diff = torch.where(counted, logp - old, torch.zeros_like(logp))
    total = torch.zeros(n_sequences, dtype=logp.dtype, device=logp.device)
    total = total.index_add(0, sequence_index, diff)
    count = torch.zeros(n_sequences, dtype=logp.dtype, device=logp.device)
    count = count.index_add(0, sequence_index, counted.to(logp.dtype))
    response_log_ratio = (total / count.clamp(min=1.0)).index_select(0, sequence_index)
    # The token-level PPO-clip head on each token's response-level log-ratio (old = 0); its
    # loss is written in torch ops, so autograd differentiates it through the mean.
    loss, _ = ppo_loss_and_grad(response_log_ratio, torch.zeros_like(response_log_ratio),
                                advantage, spec)
    if spec.kl_code:  # bias correction: the response's ratio, as TRL and Liger do
        loss = loss + kl_penalty(spec, logp, ref, response_log_ratio)
    return torch.where(counted, loss, torch.zeros_like(loss))
