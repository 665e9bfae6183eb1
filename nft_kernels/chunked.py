"""The chunked mode (the default): vendor GEMMs on chunks of rows around one fused row kernel.

Per chunk of C counted rows (C from the workspace budget, ``rows_per_chunk``):
1. logits = h_c W^T by the vendor GEMM (cuBLAS through torch on CUDA, BLAS on CPU) into a
   reused fp32 workspace [C, V]; fp32 so that logp keeps its precision (a 0.004 error in logp
   is a 0.4% error in R, amplified by the negative branch: docs/design.md, section 4).
2. the row kernel (``ops/chunk_rows.py``; the same math in torch below for CPUs without the
   Triton interpreter): log-sum-exp, entropy, target logit, loss head -> loss_t and
   g_t = d loss_t / d logp_t, then dz = g (onehot - p) / T written over the logits in the
   dtype of the gradient GEMMs.
3. dH_c = dz W and dW += dz^T h_c by the vendor GEMM, dW accumulated in fp32 across chunks
   (bf16 accumulation diverges: Liger #512/#827).

For a scalar loss whose inputs need gradients, all of this runs in the forward (6NHV FLOPs)
and the backward only scales by the upstream scalar; for per-token upstream gradients the
forward stops after step 2's statistics and the backward recomputes steps 1-3 with the
forward's exact rows and chunks (8NHV).

Extra memory: the workspace (min(n, C) x V x 4 bytes), the returned gradients, an fp32 dW
(4 V H bytes, 16-bit weights only) and O(N) per-token vectors.
"""

from __future__ import annotations

import warnings

import torch

from .heads import HeadSpec, LogitScaling, head_loss_and_grad

DEFAULT_WORKSPACE_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}
# On CUDA the default grows with the device: 1/32 of its memory, between 1 and 8 GiB (4.4 GiB
# on an H200): fewer chunks, so fewer read-modify-writes of the fp32 dW (bench/cost_model.py).
CUDA_WORKSPACE_FRACTION, CUDA_WORKSPACE_MAX = 32, 8 << 30
# Rows of the torch row math processed together, so its temporaries stay in cache.
_TORCH_ROW_BLOCK_ELEMENTS = 1 << 19

_OUT_DTYPE_MM = any("dtype" in str(s) for s in torch._C._jit_get_schemas_for_operator("aten::mm"))


def addmm_takes_fp32_self(version: str) -> bool:
    """addmm(fp32 dW, 16-bit, 16-bit, out_dtype=fp32) works from torch 2.10 (pytorch PR
    #167931); 2.8 and 2.9 have the overload but raise for an fp32 accumulator."""
    return torch.torch_version.TorchVersion(version) >= "2.10"


_ADDMM_FP32_ACC = _OUT_DTYPE_MM and addmm_takes_fp32_self(torch.__version__)
_warned_no_out_dtype = False


def default_workspace_bytes(device: torch.device) -> int:
    floor = DEFAULT_WORKSPACE_BYTES.get(device.type, DEFAULT_WORKSPACE_BYTES["cuda"])
    if device.type != "cuda" or not torch.cuda.is_available():
        return floor
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    return int(min(max(floor, total // CUDA_WORKSPACE_FRACTION), CUDA_WORKSPACE_MAX))


def rows_per_chunk(workspace_bytes: int, vocab: int, n_rows: int) -> int:
    """Rows of one chunk: as few chunks as the workspace allows (it holds C fp32 logit rows),
    all of about the same size, a multiple of 128 rows where the budget allows (64 past 128
    rows otherwise), never more than there are rows. Equal chunks leave no small tail chunk,
    whose GEMMs would leave most of the GPU idle."""
    c = workspace_bytes // (4 * vocab)
    if c < 1:
        raise ValueError(f"workspace_bytes={workspace_bytes} cannot hold one row of fp32 logits "
                         f"(4 * V = {4 * vocab} bytes); raise it or use mode='lean'")
    if c > 128:
        c -= c % 64
    c = max(1, min(c, n_rows))
    chunks = -(-n_rows // c)
    if chunks > 1:
        even = -(-n_rows // chunks)
        if even > 128:
            even = min(c, -(-even // 128) * 128)
        c = even
    return c


def workspace_bytes_needed(n_rows: int, vocab: int, workspace_bytes: int) -> int:
    """The workspace the chunked mode allocates for ``n_rows`` counted rows."""
    if n_rows == 0:
        return 0
    return rows_per_chunk(workspace_bytes, vocab, n_rows) * vocab * 4


# ---- GEMMs ---------------------------------------------------------------------------------
def _gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """dtype of the gradient GEMMs' operands: the input dtype where the vendor GEMM can return
    fp32 from 16-bit operands (CUDA); fp32 otherwise (CPU BLAS has no such GEMM)."""
    global _warned_no_out_dtype
    if hidden.dtype == torch.float32:
        return torch.float32
    if hidden.is_cuda and _OUT_DTYPE_MM:
        return hidden.dtype
    if hidden.is_cuda and not _warned_no_out_dtype:
        _warned_no_out_dtype = True
        warnings.warn("this torch has no torch.mm(..., out_dtype=): the chunked mode runs its "
                      "GEMMs in fp32 (correct but slow); torch >= 2.8 avoids this", stacklevel=3)
    return torch.float32


def _logits_into(out: torch.Tensor, h_c: torch.Tensor, weight: torch.Tensor) -> None:
    """out[:] = h_c W^T in fp32."""
    if h_c.dtype == torch.float32:
        torch.mm(h_c, weight.t(), out=out)
    else:
        torch.mm(h_c, weight.t(), out_dtype=torch.float32, out=out)


def _add_weight_grad(dw: torch.Tensor, dz: torch.Tensor, h_c: torch.Tensor,
                     first: bool = False) -> None:
    """dw (fp32) += dz^T h_c; ``first``: dw = dz^T h_c (dw is uninitialised: no zero-fill and
    no read of it, 8VH bytes saved)."""
    if first:
        if dz.dtype == torch.float32:
            torch.mm(dz.t(), h_c, out=dw)
        else:
            torch.mm(dz.t(), h_c, out_dtype=torch.float32, out=dw)
    elif dz.dtype == torch.float32:
        dw.addmm_(dz.t(), h_c)
    elif _ADDMM_FP32_ACC:
        torch.addmm(dw, dz.t(), h_c, out_dtype=torch.float32, out=dw)
    else:  # torch 2.8 / 2.9: an fp32 product, then the add (one [V, H] temporary)
        dw.add_(_mm_fp32(dz.t(), h_c))


def unit_max_gradients(g_logp: torch.Tensor, g_ent: torch.Tensor | None):
    """(g_logp / s, g_ent / s, s) with s = max |g| (a device scalar, no synchronisation).

    16-bit dz never carries a scale: an upstream 1 / n (a mean over 15k tokens) times
    p ~ 1 / V is below fp16's smallest subnormal, and the -p part of dH and dW would be
    flushed to zero. Gradient passes that write 16-bit dz take per-token gradients of unit
    maximum, and multiply their fp32 results by s afterwards."""
    s = _largest(g_logp)
    if g_ent is not None:
        s = torch.maximum(s, _largest(g_ent))
    return g_logp / s, None if g_ent is None else g_ent / s, s


def _largest(t: torch.Tensor) -> torch.Tensor:
    """max |t| as an fp32 device scalar, never below fp32's smallest normal (a divisor)."""
    m = t.abs().amax().float() if t.numel() else torch.ones((), device=t.device)
    return m.clamp(min=torch.finfo(torch.float32).tiny)


# ---- the torch row math (CPUs without the Triton interpreter) -----------------------------
def torch_rows(ws, rows_c, *, bias32, target, mask, old, reward, rate, token_weights, ref, scale,
               spec: HeadSpec, scaling: LogitScaling, compute_entropy, stats, write_dz, out,
               saved=None, g_logp=None, g_ent=None, entropy_coef=0.0, keep_logits=False):
    """What ``ops/chunk_rows.py`` does, in torch, on an fp32 chunk ``ws`` [c, V] of logits.

    Writes the per-token outputs at ``rows_c`` into ``out`` (logp, rowmax, logsum, entropy,
    loss, g) and, with ``write_dz``, dz over ``ws`` in place (fp32). Processes a few rows at a
    time so that its temporaries stay in cache. ``saved``: (rowmax, logsum, entropy) [N] for
    the backward's recompute (``stats=False``), where a target of -1 matches no column (held
    by another rank of a vocab-parallel group). ``keep_logits``: leave ``ws`` as it was (the
    vocab-parallel statistics pass, whose dz pass follows on the same logits).
    """
    c, vocab = ws.shape
    bonus = stats and entropy_coef != 0.0  # the entropy bonus of a scalar loss
    compute_entropy = compute_entropy or bonus
    block = max(1, _TORCH_ROW_BLOCK_ELEMENTS // vocab)
    for r0 in range(0, c, block):
        r1 = min(r0 + block, c)
        x = ws[r0:r1].clone() if keep_logits else ws[r0:r1]
        idx = rows_c[r0:r1]
        counted = None if mask is None else mask.index_select(0, idx)
        tgt = target.index_select(0, idx).long()
        if counted is not None:
            tgt = torch.where(counted, tgt, torch.zeros_like(tgt))
        if bias32 is not None:
            x.add_(bias32)
        scaling.apply_(x, idx)
        inv_t = scaling.inv(idx)  # 1 / T: a float, or this block's column of per-token values
        # The soft cap's derivative, kept while x still holds the scaled logits.
        cap_d = (scaling.cap_derivative(x, idx) if scaling.softcap is not None and write_dz
                 else None)
        if stats:
            x_t = x.gather(1, tgt[:, None]).squeeze(1)
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
            logp = (x_t - m) - log_s
            zero = torch.zeros_like(logp)
            keep = (lambda v: v) if counted is None else (lambda v: torch.where(counted, v, zero))
            out["logp"][idx] = keep(logp)
            out["rowmax"][idx] = keep(m)
            out["logsum"][idx] = keep(log_s)
            if compute_entropy:
                ent = log_s - t / s
                out["entropy"][idx] = keep(ent)
            pick = lambda t: None if t is None else t.index_select(0, idx).float()  # noqa
            if spec.kind != "none":
                loss, g = head_loss_and_grad(spec, logp, pick(old), pick(reward), pick(rate),
                                             pick(token_weights), pick(ref))
                if bonus:  # - c w H per token; its gradient below through g_ent = -c w
                    ent_weight = entropy_coef * (1.0 if token_weights is None
                                                 else pick(token_weights))
                    loss = loss - ent_weight * ent
                out["loss"][idx] = keep(loss)
                out["g"][idx] = keep(g)
                g = keep(g) * scale
            else:
                g = zero
            if write_dz and bonus:
                # dz = (g (onehot - p) - g_ent p (log p + H)) / T with g_ent = -c w, in place.
                ge = keep(-ent_weight * scale + zero)
                x.sub_(log_s[:, None]).add_(ent[:, None]).mul_(ge[:, None]).add_(g[:, None])
                x.mul_(e).div_(s[:, None]).neg_()
                x.scatter_add_(1, tgt[:, None], g[:, None])
                x.mul_(inv_t)
            elif write_dz:
                # dz = g (onehot - e / s) / T, formed over the chunk in place.
                coef = g[:, None] * inv_t
                if compute_entropy:
                    x.copy_(e)
                x.mul_(-coef / s[:, None])
                x.scatter_add_(1, tgt[:, None], coef)
        else:
            rowmax, logsum, entropy = saved
            g = g_logp.index_select(0, idx)
            x.sub_(rowmax.index_select(0, idx)[:, None])
            x.sub_(logsum.index_select(0, idx)[:, None])  # log p = (x - m) - log s
            if g_ent is not None:
                ge = g_ent.index_select(0, idx)[:, None]
                ent = entropy.index_select(0, idx)[:, None]
                p = torch.exp(x)
                x.add_(ent).mul_(ge).add_(g[:, None]).mul_(p).neg_()  # -p (g + ge (log p + H))
            else:
                x.exp_().mul_(-g[:, None])
            own = tgt >= 0  # -1: the target is another rank's column
            x.scatter_add_(1, tgt.clamp(min=0)[:, None],
                           torch.where(own, g, torch.zeros_like(g))[:, None])
            if not isinstance(inv_t, float) or inv_t != 1.0:
                x.mul_(inv_t)
        if cap_d is not None:
            x.mul_(cap_d)
        if write_dz and counted is not None:
            x.masked_fill_(~counted[:, None], 0.0)  # padded rows: exactly 0, NaN-proof


# ---- the driver ----------------------------------------------------------------------------
def _row_ids(rows, n_total, device):
    return rows if rows is not None else torch.arange(n_total, device=device)


def _chunks(n, c):
    return [(c0, min(c0 + c, n)) for c0 in range(0, n, c)]


def run(hidden, weight, bias, target, rows, mask, old, reward, rate, token_weights, ref,
        spec: HeadSpec, scaling: LogitScaling, compute_entropy: bool, *, row_op,
        workspace_bytes: int,
        stats: bool, write_grads, grad_scale=None, saved=None, g_logp=None, g_ent=None,
        entropy_coef=0.0, shard=None):
    """One pass of the chunked mode over the counted rows.

    ``rows``: int64 indices of the counted rows (None: every row of ``hidden``), ``mask``: a
    device mask still to apply (rows past it are computed but count 0; used when the number of
    counted rows is not known on the host). ``stats``: run the row kernel's pass 1 and the
    head (forward); otherwise the backward's recompute with ``saved`` = (rowmax, logsum,
    entropy) and per-token ``g_logp`` / ``g_ent``. ``write_grads``: (dH, dW, d bias) wanted.
    ``entropy_coef``: the entropy bonus of a scalar loss (in its loss and its gradients).
    ``shard``: a ``vocab_parallel.VocabShard`` when ``weight`` is this rank's vocabulary shard
    (then the statistics are combined across ranks per chunk, ``_sharded_chunk``; dh is this
    rank's part, which the caller all-reduces).

    Returns (per-token outputs dict or None, dh, dw, db); dh in the input dtype (fp32 when
    sharded over several ranks, for the all-reduce), dw / db fp32.
    """
    n_total, width = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    want_dh, want_dw, want_db = write_grads
    write_dz = want_dh or want_dw or want_db
    out = None
    if stats:
        out = {k: torch.zeros(n_total, dtype=torch.float32, device=dev)
               for k in ("logp", "rowmax", "logsum", "entropy", "loss", "g")}
    partial_dh = shard is not None and shard.world > 1
    dh = None
    if want_dh:
        dh = torch.zeros(hidden.shape, dtype=torch.float32 if partial_dh else hidden.dtype,
                         device=dev)
    n = n_total if rows is None else rows.numel()
    dw = None
    if want_dw:  # the first chunk's GEMM writes it whole (no rows: zeros)
        dw = (torch.zeros if n == 0 else torch.empty)(weight.shape, dtype=torch.float32,
                                                      device=dev)
    db = torch.zeros(vocab, dtype=torch.float32, device=dev) if want_db else None
    if n == 0:
        return out, dh, dw, db

    gemm_dtype = _gemm_dtype(hidden)
    w_g = weight if weight.dtype == gemm_dtype else weight.to(gemm_dtype)  # CPU 16-bit only
    bias32 = None if bias is None else bias.float()
    if grad_scale is None:
        grad_scale = torch.ones((), dtype=torch.float32, device=dev)
    row_ids = _row_ids(rows, n_total, dev)
    # The row kernel writes 16-bit dz in the first half of each fp32 row of the workspace (row
    # stride 2V); the torch row math writes fp32 dz over the logits.
    dz_dtype = hidden.dtype if row_op != "torch" else torch.float32
    # 16-bit dz carries no scale (``unit_max_gradients``): the forward's reduction scale and
    # the backward's per-token gradients are applied to the GEMMs' results instead.
    post_scale, weight_max = None, None
    if write_dz and dz_dtype != torch.float32:
        if stats:
            post_scale = grad_scale
            grad_scale = torch.ones((), dtype=torch.float32, device=dev)
            if token_weights is not None:  # an aggregation's 1 / (global tokens) is a scale too
                token_weights, weight_max = _unit_max_weights(token_weights, rows, mask)
                post_scale = post_scale * weight_max
        else:
            g_logp, g_ent, post_scale = unit_max_gradients(g_logp, g_ent)
    # Sharded: every rank sizes its chunks by the largest shard, so that all ranks take the
    # same number of chunks (and of per-chunk all-reduces).
    c = rows_per_chunk(workspace_bytes, vocab if shard is None else shard.max_size, n)
    workspace = torch.empty((c, vocab), dtype=torch.float32, device=dev)
    common = dict(target=target, mask=mask, old=old, reward=reward, rate=rate,
                  token_weights=token_weights, ref=ref, scale=grad_scale, spec=spec,
                  scaling=scaling, compute_entropy=compute_entropy,
                  stats=stats, write_dz=write_dz, out=out, saved=saved, g_logp=g_logp,
                  g_ent=g_ent, entropy_coef=entropy_coef)
    sharded = None
    if shard is not None:
        t_stats, t_dz, owned = shard.targets(target)
        common["target"] = t_dz  # the backward's recompute: no onehot off the shard
        if stats:
            sharded = _ShardedRows(shard, t_stats, t_dz, owned, n_total, dev,
                                   write_dz, entropy_coef, common, row_op)

    def row_pass(ws, dz, rows_c, **changes):
        args = dict(common, **changes)
        if row_op == "torch":
            torch_rows(ws, rows_c, bias32=bias32, **args)
        else:
            from . import triton_launch  # noqa: PLC0415 - Triton only when it runs

            triton_launch.chunk_rows(ws, dz, rows_c, bias=bias, **args)

    for c0, c1 in _chunks(n, c):
        rows_c = row_ids[c0:c1]
        h_c = hidden[c0:c1] if rows is None else hidden.index_select(0, rows_c)
        if h_c.dtype != gemm_dtype:
            h_c = h_c.to(gemm_dtype)
        ws = workspace[: c1 - c0]
        _logits_into(ws, h_c, w_g)
        dz = ws if dz_dtype == torch.float32 else ws.view(dz_dtype)[:, :vocab]
        if sharded is not None:
            sharded.chunk(row_pass, ws, dz, rows_c)
        else:
            row_pass(ws, dz, rows_c)
        if not write_dz:
            continue
        if dz.dtype != gemm_dtype:  # CPU, 16-bit dz (interpreted kernel): GEMMs in fp32
            dz = dz.to(gemm_dtype)
        if want_db:
            db += dz.sum(dim=0, dtype=torch.float32)
        if want_dh:
            if rows is None and dh.dtype == gemm_dtype and post_scale is None:
                torch.mm(dz, w_g, out=dh[c0:c1])
            else:
                dh_c = _mm_fp32(dz, w_g)
                if post_scale is not None:
                    dh_c.mul_(post_scale)
                dh.index_copy_(0, rows_c, dh_c.to(dh.dtype))
        if want_dw:
            if mask is not None:  # padded rows left in place: dz is 0 there, h may be NaN
                h_c = h_c.masked_fill(~mask.index_select(0, rows_c)[:, None], 0.0)
            _add_weight_grad(dw, dz, h_c, first=c0 == 0)
    if post_scale is not None:  # fp32 accumulators
        for grad in (dw, db):
            if grad is not None:
                grad.mul_(post_scale)
    if weight_max is not None:  # the per-token outputs of the actual token weights
        out["loss"].mul_(weight_max)
        out["g"].mul_(weight_max)
    return out, dh, dw, db


def _unit_max_weights(token_weights, rows, mask):
    """(token_weights / m, m) with m = their largest value on counted rows (device scalar)."""
    counted = token_weights if rows is None else token_weights.index_select(0, rows)
    if mask is not None and rows is None:
        counted = torch.where(mask, counted, torch.zeros_like(counted))
    m = _largest(counted)
    return token_weights / m, m


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (16-bit operands accumulate and return in fp32)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    return torch.mm(a, b, out_dtype=torch.float32)


class _ShardedRows:
    """The forward of one chunk when the weight is a vocabulary shard (``vocab_parallel.py``):
    the row kernel's statistics pass on this shard (logits kept), the combination across
    ranks (two all-reduces of the chunk's rows), the loss head on the shared values, then the
    row kernel's dz pass with the global log-normalizer (the backward's recompute mode, on
    the logits still in the workspace: gradients stay in the forward, 6NHV / tp per rank)."""

    def __init__(self, shard, t_stats, t_dz, owned, n_total, dev, write_dz, entropy_coef,
                 common, row_op):
        self.shard, self.t_stats, self.t_dz, self.owned = shard, t_stats, t_dz, owned
        self.write_dz, self.entropy_coef, self.common = write_dz, entropy_coef, common
        self.out = common["out"]
        self.bonus = entropy_coef != 0.0
        self.need_entropy = common["compute_entropy"] or self.bonus
        # The torch row math without entropy or soft cap leaves e = exp(x - m) in the
        # workspace after its statistics; then p = e exp(-log s) needs no second exp.
        self.from_exp = (row_op == "torch" and not self.need_entropy
                         and common["scaling"].softcap is None)
        self.g_buf = torch.zeros(n_total, dtype=torch.float32, device=dev) if write_dz else None
        self.ge_buf = (torch.zeros(n_total, dtype=torch.float32, device=dev)
                       if write_dz and self.bonus else None)

    def chunk(self, row_pass, ws, dz, rows_c):
        out, spec, common = self.out, self.common["spec"], self.common
        row_pass(ws, dz, rows_c, target=self.t_stats, spec=HeadSpec(), stats=True,
                 write_dz=False, compute_entropy=self.need_entropy, entropy_coef=0.0,
                 keep_logits=not self.from_exp)
        take = lambda t: None if t is None else t.index_select(0, rows_c)  # noqa: E731
        lse_r = take(out["rowmax"]) + take(out["logsum"])
        logp, delta, ent = self.shard.combine(take(out["logp"]), lse_r,
                                              take(out["entropy"]) if self.need_entropy
                                              else None, take(self.owned))
        counted = take(common["mask"])
        zero = torch.zeros_like(logp)
        keep = (lambda v: v) if counted is None else (lambda v: torch.where(counted, v, zero))
        out["logp"][rows_c] = keep(logp)
        out["logsum"][rows_c] = keep(take(out["logsum"]) + delta)
        if self.need_entropy:
            out["entropy"][rows_c] = keep(ent)
        g = zero
        if spec.kind != "none":
            pick = lambda t: None if t is None else take(t).float()  # noqa: E731
            loss, g = head_loss_and_grad(spec, logp, pick(common["old"]),
                                         pick(common["reward"]), pick(common["rate"]),
                                         pick(common["token_weights"]), pick(common["ref"]))
            if self.bonus:  # - c w H per token, as the row kernel's ENT_BONUS
                ent_weight = self.entropy_coef * (1.0 if common["token_weights"] is None
                                                  else pick(common["token_weights"]))
                loss = loss - ent_weight * ent
            out["loss"][rows_c] = keep(loss)
            out["g"][rows_c] = keep(g)
        if not self.write_dz:
            return
        scale = common["scale"]
        if self.from_exp:  # dz = g (onehot - e / s) / T over e in place, s the global sum
            inv_t = common["scaling"].inv(rows_c)
            coef = keep(g) * scale * (inv_t if isinstance(inv_t, float) else inv_t.reshape(-1))
            p_scale = torch.exp(-take(out["logsum"]))  # 1 / s: this row's e -> p
            ws.mul_((-coef * p_scale)[:, None])
            t_dz = take(self.t_dz)
            ws.scatter_add_(1, t_dz.clamp(min=0)[:, None],
                            torch.where(t_dz >= 0, coef, zero)[:, None])
            if counted is not None:
                ws.masked_fill_(~counted[:, None], 0.0)  # padded rows: exactly 0, NaN-proof
            return
        self.g_buf[rows_c] = keep(g) * scale
        if self.bonus:
            self.ge_buf[rows_c] = keep(-ent_weight * scale + zero)
        row_pass(ws, dz, rows_c, target=self.t_dz, spec=HeadSpec(), stats=False, write_dz=True,
                 compute_entropy=False, entropy_coef=0.0,
                 saved=(out["rowmax"], out["logsum"], out["entropy"]), g_logp=self.g_buf,
                 g_ent=self.ge_buf)
