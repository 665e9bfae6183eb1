"""The autograd Functions around the kernels.

``FusedLinearHead``: (hidden, weight, bias) -> per-token (loss, logp, entropy). Its backward
folds every upstream gradient into two per-token scalars, g_logp = grad_loss * g + grad_logp
and g_ent = grad_entropy, and hands them to one backward kernel; so the same Function serves
the NFT and PPO heads and plain log-probs (with an entropy bonus if a caller wants one).

``LossHead``: a head on log-probs the caller already has (``nft_loss``, ``ppo_clip_loss``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .heads import HeadSpec


class FusedLinearHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, rows, old, reward, rate, spec: HeadSpec,
                inv_temperature: float, compute_entropy: bool, backend, filter_eps,
                deterministic: bool):
        logp, lse, entropy, loss, g = backend.forward(
            hidden, weight, bias, target, rows, old, reward, rate, spec, inv_temperature,
            compute_entropy)
        ctx.save_for_backward(hidden, weight, bias, target, rows, lse, entropy, g)
        ctx.backend = backend
        ctx.inv_temperature = inv_temperature
        ctx.filter_eps = filter_eps
        ctx.deterministic = deterministic
        ctx.compute_entropy = compute_entropy
        if not compute_entropy:
            ctx.mark_non_differentiable(entropy)
        return loss, logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_logp, grad_entropy):
        hidden, weight, bias, target, rows, lse, entropy, g = ctx.saved_tensors
        g_logp = torch.zeros_like(lse)
        if grad_loss is not None:
            g_logp += grad_loss.float() * g
        if grad_logp is not None:
            g_logp += grad_logp.float()
        g_ent = None
        if ctx.compute_entropy and grad_entropy is not None and bool((grad_entropy != 0).any()):
            g_ent = grad_entropy.float().contiguous()
        dh, dw, db = ctx.backend.backward(
            hidden, weight, bias, target, rows, lse, entropy, g_logp, g_ent,
            ctx.inv_temperature, ctx.filter_eps, ctx.deterministic)
        # Cast the fp32 accumulators one at a time, dropping each before the next cast, so the
        # peak holds one fp32 buffer fewer. (For fp32 inputs .to() is a no-op.)
        needs = ctx.needs_input_grad
        grad_hidden = dh.to(hidden.dtype) if needs[0] else None
        del dh
        grad_weight = dw.to(weight.dtype) if needs[1] else None
        del dw
        grad_bias = db.to(bias.dtype) if bias is not None and needs[2] else None
        return (grad_hidden, grad_weight, grad_bias) + (None,) * 11


class LossHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, old, reward, rate, mask, spec: HeadSpec, backend):
        loss, g = backend.head_forward(logp, old, reward, rate, mask, spec)
        ctx.save_for_backward(g)
        ctx.logp_dtype = logp.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (g,) = ctx.saved_tensors
        return (grad_loss.float() * g).to(ctx.logp_dtype), None, None, None, None, None, None
