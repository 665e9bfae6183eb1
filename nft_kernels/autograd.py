"""The autograd Functions around the engines (``backend.py``).

``FusedLinearScalarLoss``: (hidden, weight, bias) -> a scalar loss (sum or mean of the
per-token loss) whose gradients the chunked mode computes in the forward (6NHV); its backward
only scales them by the upstream scalar.

``FusedLinearHead``: (hidden, weight, bias) -> per-token (loss, logp, entropy), for per-token
upstream gradients (``reduction="none"``, differentiable log-probs and entropy) and for the
lean mode. Its backward folds every upstream gradient into two per-token scalars,
g_logp = grad_loss * g + grad_logp and g_ent = grad_entropy (- grad_loss * c w with an entropy
bonus c), and hands them to the engine, which recomputes the logits.

``LossHead``: a head on log-probs the caller already has (``nft_loss``, ``ppo_clip_loss``).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .heads import HeadSpec
from .inputs import RowPlan, TokenInputs


def _cast(grad, like, needed):
    return grad.to(like.dtype) if needed and grad is not None else None


class FusedLinearScalarLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: RowPlan, inputs: TokenInputs, spec: HeadSpec,
                engine, grad_scale, want):
        loss_t, logp, entropy, dh, dw, db = engine.forward_with_grads(
            hidden, weight, bias, plan, inputs, spec, want, grad_scale)
        loss = loss_t.sum() * grad_scale
        # Cast the fp32 accumulators one at a time, dropping each before the next cast, so the
        # peak holds one fp32 buffer fewer. (For fp32 inputs .to() is a no-op.)
        grad_hidden = _cast(dh, hidden, want[0])
        del dh
        grad_weight = _cast(dw, weight, want[1])
        del dw
        grad_bias = _cast(db, bias, want[2])
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        ctx.mark_non_differentiable(logp, entropy)
        return loss, logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_logp, grad_entropy):
        del grad_logp, grad_entropy  # detached outputs (return_stats)
        if ctx.grads is None:
            raise RuntimeError(
                "backward ran twice through a chunked-mode loss (retain_graph=True): its "
                "gradients were computed in the forward and are handed out once; use "
                "mode='lean' to differentiate the same loss more than once")
        (grad_hidden, grad_weight, grad_bias), ctx.grads = ctx.grads, None
        # The gradients are of the loss itself; scale them in place by the upstream scalar.
        for g in (grad_hidden, grad_weight, grad_bias):
            if g is not None:
                g.mul_(grad_loss.to(g.dtype))
        # plan, inputs, spec, engine, grad_scale, want: no gradient
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


class FusedLinearHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: RowPlan, inputs: TokenInputs, spec: HeadSpec,
                engine):
        loss, logp, entropy, g, state = engine.forward(hidden, weight, bias, plan, inputs, spec)
        # Entropy bonus: loss_t - c w H_t (the engines computed H; its gradient goes through
        # g_ent in the backward). Padded rows hold H = 0.
        ctx.ent_weight = None
        if spec.entropy_coef != 0.0:
            weights = inputs.token_weights
            ctx.ent_weight = spec.entropy_coef * (1.0 if weights is None else weights.float())
            loss = loss - ctx.ent_weight * entropy
        ctx.save_for_backward(hidden, weight, bias, g, *state)
        ctx.plan, ctx.engine = plan, engine
        ctx.set_materialize_grads(False)  # unused outputs give None: no work, no sync
        if not plan.compute_entropy:
            ctx.mark_non_differentiable(entropy)
        return loss, logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, grad_logp, grad_entropy):
        hidden, weight, bias, g, *state = ctx.saved_tensors
        plan, mask = ctx.plan, ctx.plan.device_mask
        needs = ctx.needs_input_grad
        want = (needs[0], needs[1], bias is not None and needs[2])
        g_logp = torch.zeros_like(g)
        if grad_loss is not None:
            g_logp += grad_loss.float() * g
        if grad_logp is not None:
            g_logp += grad_logp.float()
        g_ent = None
        if plan.compute_entropy and grad_entropy is not None:
            g_ent = grad_entropy.float()
        if ctx.ent_weight is not None and grad_loss is not None:
            bonus = -grad_loss.float() * ctx.ent_weight * torch.ones_like(g)
            g_ent = bonus if g_ent is None else g_ent + bonus
        if mask is not None:  # padded rows: their outputs are constants (0)
            g_logp = torch.where(mask, g_logp, torch.zeros_like(g_logp))
            if g_ent is not None:
                g_ent = torch.where(mask, g_ent, torch.zeros_like(g_ent))
        if g_ent is not None:
            g_ent = g_ent.contiguous()
        with torch.autocast(hidden.device.type, enabled=False):
            dh, dw, db = ctx.engine.backward(hidden, weight, bias, plan, tuple(state),
                                             g_logp.contiguous(), g_ent, want)
        grad_hidden = _cast(dh, hidden, want[0])
        del dh
        grad_weight = _cast(dw, weight, want[1])
        del dw
        grad_bias = _cast(db, bias, want[2])
        # plan, inputs, spec, engine: no gradient
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


class LossHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, inputs: TokenInputs, mask, spec: HeadSpec, backend):
        loss, g = backend.head_forward(logp, inputs, mask, spec)
        ctx.save_for_backward(g)
        ctx.logp_dtype = logp.dtype
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (g,) = ctx.saved_tensors
        # inputs, mask, spec, backend: no gradient
        return (grad_loss.float() * g).to(ctx.logp_dtype), None, None, None, None
