"""The lean mode in pure PyTorch: the tile kernels' math for CPUs without Triton.

Same algorithm as the lean Triton kernels: an online fp32 log-sum-exp (and entropy) over
vocabulary slices, so no [N, V] tensor exists; the backward recomputes each slice's logits. The
extra memory is one [n, slice] block, where the slice narrows as the number of counted rows n
grows. (The chunked mode, ``chunked.py``, is the faster default; this one is for
``mode="lean"``.)
"""

from __future__ import annotations

import torch

from .heads import HeadSpec, LogitScaling, head_loss_and_grad
from .inputs import RowPlan, TokenInputs
from .torch_rows import write_dz_

# Elements of one fp32 [n, chunk] logits block (4 MiB).
CHUNK_ELEMENTS = 1 << 20


def _vocab_chunk(n_rows: int, vocab: int) -> int:
    return max(64, min(vocab, CHUNK_ELEMENTS // max(n_rows, 1)))


def _scaled_logits(h32, weight, bias, v0, v1, scaling: LogitScaling, rows):
    x = h32 @ weight[v0:v1].float().T
    if bias is not None:
        x = x + bias[v0:v1].float()
    return scaling.apply_(x, rows)


def forward(hidden, weight, bias, plan: RowPlan, rows, inputs: TokenInputs, spec: HeadSpec):
    """Full-length fp32 (logp, lse, entropy, loss, g) of ``rows``; other rows hold 0."""
    target, scaling, compute_entropy = plan.target, plan.scaling, plan.compute_entropy
    n_total, vocab = hidden.shape[0], weight.shape[0]
    out = [torch.zeros(n_total, dtype=torch.float32, device=hidden.device) for _ in range(5)]
    logp_out, lse_out, ent_out, loss_out, g_out = out
    n = rows.numel()
    if n == 0:
        return tuple(out)
    h32 = hidden.index_select(0, rows).float()
    tgt = target.index_select(0, rows).long()
    m = torch.full((n,), float("-inf"), device=hidden.device)
    s = torch.zeros(n, device=hidden.device)
    t = torch.zeros(n, device=hidden.device)
    x_target = torch.zeros(n, device=hidden.device)
    chunk = _vocab_chunk(n, vocab)
    for v0 in range(0, vocab, chunk):
        v1 = min(v0 + chunk, vocab)
        x = _scaled_logits(h32, weight, bias, v0, v1, scaling, rows)
        m_new = torch.maximum(m, x.max(dim=1).values)
        alpha = torch.exp(m - m_new)
        e = torch.exp(x - m_new[:, None])
        if compute_entropy:
            shift = s * (torch.where(s > 0, m, m_new) - m_new)  # no 0 * inf while m = -inf
            t = alpha * (t + shift) + (e * (x - m_new[:, None])).sum(dim=1)
        s = alpha * s + e.sum(dim=1)
        m = m_new
        here = (tgt >= v0) & (tgt < v1)
        idx = (tgt - v0).clamp(0, v1 - v0 - 1)
        x_target += torch.where(here, x.gather(1, idx[:, None]).squeeze(1), torch.zeros_like(m))
    lse = m + torch.log(s)
    logp = x_target - lse
    logp_out[rows] = logp
    lse_out[rows] = lse
    if compute_entropy:
        ent_out[rows] = torch.log(s) - t / s
    if spec.kind != "none":
        loss, g = head_loss_and_grad(spec, logp, inputs.select(rows))
        loss_out[rows] = loss
        g_out[rows] = g
    return tuple(out)


def backward(hidden, weight, bias, plan: RowPlan, rows, saved, g_logp, g_ent, filter_eps,
             deterministic: bool):
    """fp32 (dH [N, H], dW [V, H], d bias [V] or None) from the forward's ``saved`` =
    (lse, entropy). Always deterministic on CPU (chunked matmuls sum in a fixed order)."""
    del deterministic
    lse, entropy = saved
    target, scaling = plan.target, plan.scaling
    vocab, width = weight.shape
    dh = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros((vocab, width), dtype=torch.float32, device=weight.device)
    db = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=bias.device)
    if rows.numel() == 0:
        return dh, dw, db
    g = g_logp.index_select(0, rows)
    ge = None if g_ent is None else g_ent.index_select(0, rows)
    carries = g != 0 if ge is None else (g != 0) | (ge != 0)
    if not bool(carries.any()):
        return dh, dw, db
    # Recompute with exactly the rows and chunks of the forward: a BLAS call on another shape
    # can round x differently, and onehot - exp(x - lse) cancels when p -> 1, so a one-ulp
    # difference times a large g would be a visible gradient error.
    h32 = hidden.index_select(0, rows).float()
    tgt = target.index_select(0, rows).long()
    row_lse = lse.index_select(0, rows)
    row_ent = None if ge is None else entropy.index_select(0, rows)
    dh_rows = torch.zeros_like(h32)
    chunk = _vocab_chunk(rows.numel(), vocab)
    for v0 in range(0, vocab, chunk):
        v1 = min(v0 + chunk, vocab)
        x = _scaled_logits(h32, weight, bias, v0, v1, scaling, rows)
        cap_d = scaling.cap_derivative(x, rows) if scaling.softcap is not None else None
        here = (tgt >= v0) & (tgt < v1)
        column = torch.where(here, tgt - v0, torch.full_like(tgt, -1))  # -1: not this slice
        x.sub_(row_lse[:, None])  # log p
        p = torch.exp(x) if ge is not None or filter_eps is not None else x.exp_()
        if filter_eps is not None and _largest_onehot_gap(p, column, carries) < filter_eps:
            continue
        write_dz_(x, p, g=g, target=column, g_ent=ge, entropy=row_ent,
                  inv_t=scaling.inv(rows), cap_d=cap_d)
        dh_rows += x @ weight[v0:v1].float()
        dw[v0:v1] = x.T @ h32
        if db is not None:
            db[v0:v1] = x.sum(dim=0)
    dh[rows] = dh_rows
    return dh, dw, db


def _largest_onehot_gap(p, column, carries):
    """max |onehot - p| over the rows that carry a gradient (the tile filter's measure)."""
    gap = p.masked_fill(~carries[:, None], 0.0)
    own = column >= 0
    at_target = gap.gather(1, column.clamp(min=0)[:, None]).squeeze(1)
    gap.scatter_(1, column.clamp(min=0)[:, None],
                 torch.where(own & carries, 1.0 - at_target, at_target)[:, None])
    return gap.amax()


def head_forward(logp, inputs: TokenInputs, mask, spec: HeadSpec):
    """Loss head on given log-probs (nft_loss / ppo_clip_loss): fp32 (loss_t, g_t)."""
    loss, g = head_loss_and_grad(spec, logp.float(), inputs.as_float(), mask)
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros_like(loss))
        g = torch.where(mask, g, torch.zeros_like(g))
    return loss, g
