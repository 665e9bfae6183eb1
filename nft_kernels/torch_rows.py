"""The row math in PyTorch: the one torch implementation of what the Triton row kernels do.

Three executors of one math, no more: the Triton kernels (``ops/``), this module (every torch
path: the chunked mode's row pass, the lean mode's backward, a vocab shard's dz pass), and the
float64 reference (``reference.py``). The head (loss_t, g_t) is ``heads.head_loss_and_grad``;
the gradient w.r.t. the logits is ``write_dz_``:

    dz = (g (onehot - p) - g_ent p (log p + H)) / T   [x cap'(z) with a soft cap]

(docs/design.md, section 1: the loss touches the logits only through logp and H).
"""

from __future__ import annotations

import torch

from .heads import head_loss_and_grad
from .inputs import RowPass

# Rows processed together, so that the temporaries stay in cache.
ROW_BLOCK_ELEMENTS = 1 << 19


def write_dz_(x, e, *, g, target, p_divisor=None, g_ent=None, entropy=None, inv_t=1.0,
              cap_d=None, counted=None):
    """dz over ``x`` [r, cols] in place, fp32.

    p = e / ``p_divisor`` (per row; None: e is p). ``e`` may be ``x`` itself when ``g_ent`` is
    None; with ``g_ent`` (the entropy's per-token gradient) ``x`` must hold log p on entry.
    ``target``: each row's column, -1 where no column of ``x`` is the target (another rank
    holds it). ``inv_t``: 1 / T (a float or an [r, 1] column); ``cap_d``: the soft cap's
    derivative [r, cols] or None; ``counted``: [r] bool, other rows get exactly 0 (NaN-proof).
    """
    own = target >= 0
    column = target.clamp(min=0)[:, None]
    if g_ent is not None:  # -p (g + g_ent (log p + H)), then + g at the target, then / T
        x.add_(entropy[:, None]).mul_(g_ent[:, None]).add_(g[:, None]).mul_(e)
        if p_divisor is not None:
            x.div_(p_divisor[:, None])
        x.neg_()
        x.scatter_add_(1, column, torch.where(own, g, torch.zeros_like(g))[:, None])
        if not isinstance(inv_t, float) or inv_t != 1.0:
            x.mul_(inv_t)
    else:  # g (onehot - p) / T with one multiply over the row: coef = g / T
        coef = g[:, None] * inv_t
        factor = -coef if p_divisor is None else -coef / p_divisor[:, None]
        if e is x:
            x.mul_(factor)
        else:
            torch.mul(e, factor, out=x)
        x.scatter_add_(1, column, torch.where(own[:, None], coef, torch.zeros_like(coef)))
    if cap_d is not None:
        x.mul_(cap_d)
    if counted is not None:
        x.masked_fill_(~counted[:, None], 0.0)


def chunk_rows(ws, rows_c, bias32, p: RowPass) -> None:
    """What ``ops/chunk_rows.py`` does, on an fp32 chunk ``ws`` [c, V] of logits: writes the
    per-token outputs of ``rows_c`` into ``p.out`` (logp, rowmax, logsum, entropy, loss, g)
    and, with ``p.write_dz``, dz over ``ws`` in place (fp32). ``bias32``: fp32 bias or None."""
    c, vocab = ws.shape
    block = max(1, ROW_BLOCK_ELEMENTS // vocab)
    for r0 in range(0, c, block):
        r1 = min(r0 + block, c)
        x = ws[r0:r1].clone() if p.keep_logits else ws[r0:r1]
        rows = rows_c[r0:r1]
        counted = None if p.mask is None else p.mask.index_select(0, rows)
        target = p.target.index_select(0, rows).long()
        if counted is not None:
            target = torch.where(counted, target, torch.zeros_like(target))
        if bias32 is not None:
            x.add_(bias32)
        p.scaling.apply_(x, rows)
        inv_t = p.scaling.inv(rows)  # 1 / T: a float, or this block's column of values
        # The soft cap's derivative, kept while x still holds the scaled logits.
        cap_d = (p.scaling.cap_derivative(x, rows) if p.scaling.softcap is not None
                 and p.write_dz else None)
        if p.statistics:
            _statistics_pass(x, rows, target, counted, inv_t, cap_d, p)
        else:
            _recompute_pass(x, rows, target, counted, inv_t, cap_d, p)


def _where_counted(counted, value):
    """``value`` on counted rows, 0 on padded ones (whatever they hold)."""
    return value if counted is None else torch.where(counted, value, torch.zeros_like(value))


def _statistics_pass(x, rows, target, counted, inv_t, cap_d, p: RowPass) -> None:
    out = p.out
    bonus = p.entropy_bonus  # - c w H per token, in the loss and in dz (g_ent = -c w)
    compute_entropy = p.compute_entropy or bonus
    x_target = x.gather(1, target[:, None]).squeeze(1)
    m = x.amax(dim=1)
    x.sub_(m[:, None])  # x - m
    if compute_entropy:
        e = torch.exp(x)
        s = e.sum(dim=1)
        t = (e * x).sum(dim=1)
    else:
        e = x.exp_()  # in place: x - m is not needed again
        s = e.sum(dim=1)
    log_s = torch.log(s)
    logp = (x_target - m) - log_s
    out["logp"][rows] = _where_counted(counted, logp)
    out["rowmax"][rows] = _where_counted(counted, m)
    out["logsum"][rows] = _where_counted(counted, log_s)
    entropy = None
    if compute_entropy:
        entropy = log_s - t / s
        out["entropy"][rows] = _where_counted(counted, entropy)
    g, g_ent = torch.zeros_like(logp), None
    if p.spec.kind != "none":
        inputs = p.inputs.select(rows)
        loss, g = head_loss_and_grad(p.spec, logp, inputs, counted)
        if bonus:
            ent_weight = p.entropy_coef * (1.0 if inputs.token_weights is None
                                           else inputs.token_weights)
            loss = loss - ent_weight * entropy
            g_ent = _where_counted(counted, -ent_weight * p.scale + torch.zeros_like(logp))
        out["loss"][rows] = _where_counted(counted, loss)
        out["g"][rows] = _where_counted(counted, g)
        g = _where_counted(counted, g) * p.scale
    if not p.write_dz:
        return
    if g_ent is not None:
        x.sub_(log_s[:, None])  # x - m - log s = log p
    write_dz_(x, e, g=g, target=target, p_divisor=s, g_ent=g_ent, entropy=entropy,
              inv_t=inv_t, cap_d=cap_d, counted=counted)


def _recompute_pass(x, rows, target, counted, inv_t, cap_d, p: RowPass) -> None:
    rowmax, logsum, entropy = p.saved
    g = p.g_logp.index_select(0, rows)
    x.sub_(rowmax.index_select(0, rows)[:, None])
    x.sub_(logsum.index_select(0, rows)[:, None])  # log p = (x - m) - log s
    g_ent = None if p.g_ent is None else p.g_ent.index_select(0, rows)
    if g_ent is not None:
        e = torch.exp(x)
        entropy = entropy.index_select(0, rows)
    else:
        e, entropy = x.exp_(), None
    write_dz_(x, e, g=g, target=target, g_ent=g_ent, entropy=entropy, inv_t=inv_t,
              cap_d=cap_d, counted=counted)


def unit_max_gradients(g_logp: torch.Tensor, g_ent: torch.Tensor | None):
    """(g_logp / s, g_ent / s, s) with s = max |g| (a device scalar, no synchronisation).

    16-bit dz never carries a scale: an upstream 1 / n (a mean over 15k tokens) times
    p ~ 1 / V is below fp16's smallest subnormal, and the -p part of dH and dW would be
    flushed to zero. Gradient passes that write 16-bit dz take per-token gradients of unit
    maximum, and multiply their fp32 results by s afterwards (docs/design.md, section 4)."""
    s = largest_magnitude(g_logp)
    if g_ent is not None:
        s = torch.maximum(s, largest_magnitude(g_ent))
    return g_logp / s, None if g_ent is None else g_ent / s, s


def largest_magnitude(t: torch.Tensor) -> torch.Tensor:
    """max |t| as an fp32 device scalar, never below fp32's smallest normal (a divisor)."""
    m = t.abs().amax().float() if t.numel() else torch.ones((), device=t.device)
    return m.clamp(min=torch.finfo(torch.float32).tiny)
