"""Launching the Triton kernels: buffers, grids and the tile table.

Imported lazily (``backend.py``) so that ``import nft_kernels`` works without Triton, and so
that ``TRITON_INTERPRET`` is read when the kernels are first needed.
"""

from __future__ import annotations

import os

import torch
import triton

from .heads import HeadSpec
from .inputs import RowPass, RowPlan, TokenInputs
from .ops.backward_atomic import fused_linear_backward_atomic_kernel
from .ops.backward_dh import fused_linear_backward_dh_kernel
from .ops.backward_dw import fused_linear_backward_dw_kernel
from .ops.chunk_rows import chunk_rows_kernel
from .ops.forward import fused_linear_forward_kernel
from .ops.loss_head import loss_head_kernel
from .torch_rows import unit_max_gradients

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile tables, per kernel and input width (16-bit: tensor-core wgmma; fp32: IEEE products on
# the FMA units, so smaller tiles). Chosen with bench/static_sm90.py, which compiles every
# variant for sm_90 as it is launched on real LM heads (unit inner strides, 16-aligned sizes)
# and reads registers and spills back from ptxas: the 16-bit variants use no local memory and
# use wgmma (a CI test), the fp32 figures are reported there. The interpreter uses small tiles
# (still >= 16 for tl.dot) so that property tests cross many tile boundaries quickly.
GPU_TILES = {
    ("forward", 16): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    ("backward", 16): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    ("forward", 32): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=2),
    ("backward", 32): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=2),
}
_INTERPRET_TILES = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16)
GROUP = 8
# Row kernel of the chunked mode: one program per row, the row streamed in BLOCK_V blocks
# (memory-bound; ~32 registers, so a full SM of rows in flight).
GPU_CHUNK_ROWS = dict(BLOCK_V=2048, num_warps=8, num_stages=1)
_INTERPRET_CHUNK_ROWS = dict(BLOCK_V=64)


def tiles(kind: str, dtype: torch.dtype) -> dict:
    """Launch configuration of the lean tile kernels (``kind``: "forward" or "backward")."""
    if INTERPRET:
        return dict(_INTERPRET_TILES)
    return dict(GPU_TILES[(kind, 32 if dtype == torch.float32 else 16)])


def _precision(dtype: torch.dtype) -> dict:
    # Interpreted tl.dot is wrong on bf16 operands: always upcast there.
    return dict(DOT_FP32=INTERPRET or dtype == torch.float32, IEEE=dtype == torch.float32)


def _dummy(device):
    return torch.empty(1, dtype=torch.float32, device=device)


def forward(hidden, weight, bias, plan: RowPlan, row_ids, inputs: TokenInputs, spec: HeadSpec):
    """The lean forward tile kernel on ``row_ids``: full-length fp32 (logp, lse, entropy,
    loss, g), 0 on other rows."""
    n_total, width = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    out = [torch.zeros(n_total, dtype=torch.float32, device=dev) for _ in range(5)]
    logp, lse, entropy, loss, g = out
    n = row_ids.numel()
    if n == 0:
        return tuple(out)
    dummy = _dummy(dev)
    config = tiles("forward", hidden.dtype)
    grid = (triton.cdiv(n, config["BLOCK_N"]),)
    scaling = plan.scaling
    fused_linear_forward_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, plan.target, row_ids,
        *inputs.kernel_pointers(dummy),
        logp, lse, entropy, loss, g,
        n, vocab, width,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        **scaling.kernel_args(dummy), **spec.kernel_scalars(),
        HAS_BIAS=bias is not None, **scaling.kernel_flags(),
        COMPUTE_ENTROPY=bool(plan.compute_entropy), HEAD=spec.code,
        NORMALIZE=int(spec.normalize), HAS_TOKEN_WEIGHTS=inputs.token_weights is not None,
        KL=spec.kl_code, KL_RATIO=spec.kl_ratio, **config, **_precision(hidden.dtype),
    )
    return tuple(out)


def backward(hidden, weight, bias, plan: RowPlan, row_ids, saved, g_logp, g_ent,
             filter_eps, deterministic: bool):
    """The lean backward tile kernels: fp32 (dH, dW, d bias or None) from the forward's
    ``saved`` = (lse, entropy) and the per-token gradients of logp and entropy."""
    lse, entropy = saved
    target, scaling = plan.target, plan.scaling
    n_total, width = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    dh = torch.zeros((n_total, width), dtype=torch.float32, device=dev)
    dw = torch.zeros((vocab, width), dtype=torch.float32, device=dev)
    db = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=dev)
    n = row_ids.numel()
    if n == 0:
        return dh, dw, db
    # dz goes to 16-bit before the tensor-core products: it carries no scale (the upstream
    # 1 / n of a mean would flush its -p part to zero in fp16), the fp32 results get it.
    post_scale = None
    if hidden.dtype != torch.float32:
        g_logp, g_ent, post_scale = unit_max_gradients(g_logp, g_ent)
    dummy = _dummy(dev)
    config = tiles("backward", hidden.dtype)
    common = dict(
        HAS_BIAS=bias is not None, HAS_ENT_GRAD=g_ent is not None,
        FILTER=filter_eps is not None, **scaling.kernel_flags(), **config,
        **_precision(hidden.dtype),
    )
    row_args = (hidden, weight, bias if bias is not None else dummy, target, row_ids, lse,
                entropy, g_logp, g_ent if g_ent is not None else dummy)
    sizes = (n, vocab, width, hidden.stride(0), hidden.stride(1), weight.stride(0),
             weight.stride(1), float(scaling.inv_temperature),
             float(filter_eps) if filter_eps is not None else 0.0,
             float(scaling.softcap or 1.0), scaling.kernel_args(dummy)["inv_t_ptr"])
    num_n = triton.cdiv(n, config["BLOCK_N"])
    num_v = triton.cdiv(vocab, config["BLOCK_V"])
    if deterministic:
        fused_linear_backward_dh_kernel[(num_n,)](*row_args, dh, *sizes, **common)
        fused_linear_backward_dw_kernel[(num_v,)](
            *row_args, dw, db if db is not None else dummy, *sizes, **common)
    else:
        fused_linear_backward_atomic_kernel[(num_n * num_v,)](
            *row_args, dh, dw, db if db is not None else dummy, *sizes, GROUP=GROUP, **common)
    if post_scale is not None:
        for grad in (dh, dw, db):
            if grad is not None:
                grad.mul_(post_scale)
    return dh, dw, db


def head_forward(logp, inputs: TokenInputs, mask, spec: HeadSpec):
    """A loss head on given log-probs: fp32 (loss_t, g_t), 0 where ``mask`` is False."""
    n = logp.numel()
    loss = torch.empty(n, dtype=torch.float32, device=logp.device)
    g = torch.empty_like(loss)
    if n == 0:
        return loss, g
    dummy = _dummy(logp.device)
    block = 1024
    loss_head_kernel[(triton.cdiv(n, block),)](
        logp, *inputs.kernel_pointers(dummy),
        mask if mask is not None else dummy, loss, g, n, **spec.kernel_scalars(),
        HEAD=spec.code, NORMALIZE=int(spec.normalize), HAS_MASK=mask is not None,
        HAS_TOKEN_WEIGHTS=inputs.token_weights is not None, KL=spec.kl_code,
        KL_RATIO=spec.kl_ratio, BLOCK=block,
    )
    return loss, g


def chunk_rows(ws, dz, rows_c, bias, p: RowPass, launch=None):
    """The chunked mode's row kernel on one chunk (see ops/chunk_rows.py and ``RowPass``);
    the bias is read in its own dtype. ``p.keep_logits`` needs nothing here: only the dz pass
    writes over the logits. ``launch``: another launch configuration (BLOCK_V, num_warps,
    num_stages) than GPU_CHUNK_ROWS, for the acceptance run's sweep."""
    bonus = p.entropy_bonus
    c = ws.shape[0]
    if c == 0:
        return
    dev = ws.device
    dummy = _dummy(dev)
    if p.statistics:
        per_token = [p.out[k] for k in ("logp", "rowmax", "logsum", "entropy", "loss", "g")]
    else:
        rowmax, logsum, entropy = p.saved
        per_token = [dummy, rowmax, logsum, entropy if entropy is not None else dummy,
                     dummy, dummy]

    def pointer(t):
        return t if t is not None else dummy

    config = dict(_INTERPRET_CHUNK_ROWS if INTERPRET else (launch or GPU_CHUNK_ROWS))
    spec, scaling = p.spec, p.scaling
    chunk_rows_kernel[(c,)](
        ws, dz, ws.stride(0), dz.stride(0),
        pointer(bias), p.target, rows_c, pointer(p.mask), *p.inputs.kernel_pointers(dummy),
        p.scale, *per_token, pointer(p.g_logp), pointer(p.g_ent),
        ws.shape[1], **scaling.kernel_args(dummy), **spec.kernel_scalars(),
        entropy_coef=float(p.entropy_coef),
        HAS_BIAS=bias is not None, **scaling.kernel_flags(),
        HAS_MASK=p.mask is not None, STATS=bool(p.statistics),
        WRITE_DZ=bool(p.write_dz), HEAD=spec.code, NORMALIZE=int(spec.normalize),
        COMPUTE_ENTROPY=bool(p.compute_entropy) or bonus,
        HAS_ENT_GRAD=p.g_ent is not None or bonus,
        HAS_TOKEN_WEIGHTS=p.inputs.token_weights is not None, KL=spec.kl_code,
        KL_RATIO=spec.kl_ratio, ENT_BONUS=bonus, **config,
    )
