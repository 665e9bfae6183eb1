"""The chunked mode (the default): vendor GEMMs on chunks of rows around one fused row kernel.

Per chunk of C counted rows (C from the workspace budget, ``rows_per_chunk``):
1. logits = h_c W^T by the vendor GEMM (cuBLAS through torch on CUDA, BLAS on CPU) into a
   reused fp32 workspace [C, V]; fp32 so that logp keeps its precision (a 0.004 error in logp
   is a 0.4% error in R, amplified by the negative branch: docs/design.md, section 4).
2. the row kernel (``ops/chunk_rows.py``; the same math in torch, ``torch_rows.py``, for CPUs
   without the Triton interpreter): log-sum-exp, entropy, target logit, loss head -> loss_t and
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

from . import torch_rows, vocab_parallel
from .heads import HeadSpec, head_loss_and_grad
from .inputs import RowPass, RowPlan, TokenInputs

DEFAULT_WORKSPACE_BYTES = {"cuda": 1 << 30, "cpu": 128 << 20}
# On CUDA the default grows with the device: 1/32 of its memory, between 1 and 8 GiB (4.4 GiB
# on an H200): fewer chunks, so fewer read-modify-writes of the fp32 dW (bench/cost_model.py).
CUDA_WORKSPACE_FRACTION, CUDA_WORKSPACE_MAX = 32, 8 << 30

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


# ---- the driver ----------------------------------------------------------------------------
def _chunks(n, c):
    return [(c0, min(c0 + c, n)) for c0 in range(0, n, c)]


def run(hidden, weight, bias, plan: RowPlan, inputs: TokenInputs, spec: HeadSpec, *, row_op,
        workspace_bytes: int, write_grads, grad_scale=None, saved=None, g_logp=None,
        g_ent=None, entropy_coef=0.0, shard=None):
    """One pass of the chunked mode over the plan's counted rows.

    Without ``saved``: the forward (the row kernel's statistics and the head on ``inputs``);
    with ``saved`` = (rowmax, logsum, entropy): the backward's recompute with per-token
    ``g_logp`` / ``g_ent``. ``write_grads``: (dH, dW, d bias) wanted. ``entropy_coef``: the
    entropy bonus of a scalar loss (in its loss and its gradients). ``shard``: a
    ``vocab_parallel.VocabShard`` when ``weight`` is this rank's vocabulary shard (then the
    statistics are combined across ranks per chunk, ``VocabShard.chunk_pass``; dh is this
    rank's part, which the caller all-reduces).

    Returns (per-token outputs dict or None, dh, dw, db); dh in the input dtype (fp32 when
    sharded over several ranks, for the all-reduce), dw / db fp32.
    """
    n_total = hidden.shape[0]
    vocab = weight.shape[0]
    dev = hidden.device
    statistics = saved is None
    write_dz = any(write_grads)
    out = None
    if statistics:
        out = {k: torch.zeros(n_total, dtype=torch.float32, device=dev)
               for k in ("logp", "rowmax", "logsum", "entropy", "loss", "g")}
    rows, mask = plan.rows, plan.device_mask
    n = n_total if rows is None else rows.numel()
    gemm_dtype = _gemm_dtype(hidden)
    grads = _Gradients(hidden, weight, write_grads, n, gemm_dtype, rows is None,
                       partial_dh=shard is not None and shard.world > 1)
    if n == 0:
        return out, grads.dh, grads.dw, grads.db

    bias32 = None if bias is None else bias.float()
    if grad_scale is None:
        grad_scale = torch.ones((), dtype=torch.float32, device=dev)
    # The row kernel writes 16-bit dz in the first half of each fp32 row of the workspace (row
    # stride 2V); the torch row math writes fp32 dz over the logits.
    dz_dtype = hidden.dtype if row_op != "torch" else torch.float32
    # 16-bit dz carries no scale (``torch_rows.unit_max_gradients``): the forward's reduction
    # scale and the backward's per-token gradients are applied to the GEMMs' results instead.
    weight_max = None
    if write_dz and dz_dtype != torch.float32:
        if statistics:
            grads.post_scale = grad_scale
            grad_scale = torch.ones((), dtype=torch.float32, device=dev)
            if inputs.token_weights is not None:  # an aggregation's 1 / (global tokens) too
                unit, weight_max = _unit_max_weights(inputs.token_weights, rows, mask)
                inputs = inputs.with_token_weights(unit)
                grads.post_scale = grads.post_scale * weight_max
        else:
            g_logp, g_ent, grads.post_scale = torch_rows.unit_max_gradients(g_logp, g_ent)
    # Sharded: every rank sizes its chunks by the largest shard, so that all ranks take the
    # same number of chunks (and of per-chunk all-reduces).
    c = rows_per_chunk(workspace_bytes, vocab if shard is None else shard.max_size, n)
    workspace = torch.empty((c, vocab), dtype=torch.float32, device=dev)
    row_pass_spec = RowPass(
        target=plan.target, mask=mask, inputs=inputs, spec=spec, scaling=plan.scaling,
        scale=grad_scale, out=out, statistics=statistics,
        compute_entropy=plan.compute_entropy, write_dz=write_dz, entropy_coef=entropy_coef,
        saved=saved, g_logp=g_logp, g_ent=g_ent)
    # A vocab shard, or a user-defined head with the Triton row kernel (which cannot run it):
    # each chunk takes the statistics pass, the head in torch, then the dz pass.
    two_pass = None
    if shard is not None or (spec.custom and row_op != "torch"):
        vocab_part = shard if shard is not None else vocab_parallel.WHOLE_VOCAB
        t_stats, t_dz, owned = vocab_part.targets(plan.target)
        row_pass_spec = row_pass_spec.changed(target=t_dz)  # the backward: local columns
        if statistics:
            two_pass = TwoPassChunks(vocab_part, row_pass_spec, t_stats, owned, n_total, dev,
                                     torch_row_math=row_op == "torch")

    def row_pass(ws, dz, rows_c, p: RowPass):
        if row_op == "torch":
            torch_rows.chunk_rows(ws, rows_c, bias32, p)
        else:
            from . import triton_launch  # noqa: PLC0415 - Triton only when it runs

            triton_launch.chunk_rows(ws, dz, rows_c, bias, p)

    row_ids = plan.row_ids(n_total, dev)
    for c0, c1 in _chunks(n, c):
        rows_c = row_ids[c0:c1]
        h_c = hidden[c0:c1] if rows is None else hidden.index_select(0, rows_c)
        if h_c.dtype != gemm_dtype:
            h_c = h_c.to(gemm_dtype)
        ws = workspace[: c1 - c0]
        _logits_into(ws, h_c, grads.w_gemm)
        dz = ws if dz_dtype == torch.float32 else ws.view(dz_dtype)[:, :vocab]
        if two_pass is not None:
            two_pass.chunk(row_pass, ws, dz, rows_c)
        else:
            row_pass(ws, dz, rows_c, row_pass_spec)
        if write_dz:
            if mask is not None and grads.dw is not None:  # padded rows left in place: dz
                h_c = h_c.masked_fill(~mask.index_select(0, rows_c)[:, None], 0.0)  # is 0
            grads.add_chunk(dz, h_c, rows_c, c0, c1)  # there, h may be NaN
    grads.finish()
    if weight_max is not None:  # the per-token outputs of the actual token weights
        out["loss"].mul_(weight_max)
        out["g"].mul_(weight_max)
    return out, grads.dh, grads.dw, grads.db


class _Gradients:
    """dH, dW and d bias of one chunked pass, accumulated chunk by chunk by the vendor GEMMs
    (dW and d bias in fp32). ``post_scale``: a factor of the fp32 results that 16-bit dz
    could not carry (``torch_rows.unit_max_gradients``)."""

    def __init__(self, hidden, weight, wanted, n_rows, gemm_dtype, every_row, partial_dh):
        want_dh, want_dw, want_db = wanted
        dev = hidden.device
        self.gemm_dtype, self.every_row, self.post_scale = gemm_dtype, every_row, None
        # CPU 16-bit only: BLAS has no 16-bit GEMM with an fp32 result.
        self.w_gemm = weight if weight.dtype == gemm_dtype else weight.to(gemm_dtype)
        self.dh = None
        if want_dh:  # a vocab shard's part of dH is all-reduced in fp32
            self.dh = torch.zeros(hidden.shape, device=dev,
                                  dtype=torch.float32 if partial_dh else hidden.dtype)
        self.dw = None
        if want_dw:  # the first chunk's GEMM writes it whole (no rows: zeros)
            self.dw = (torch.zeros if n_rows == 0 else torch.empty)(
                weight.shape, dtype=torch.float32, device=dev)
        self.db = torch.zeros(weight.shape[0], dtype=torch.float32, device=dev) if want_db \
            else None

    def add_chunk(self, dz, h_c, rows_c, c0, c1):
        if dz.dtype != self.gemm_dtype:  # CPU, 16-bit dz (interpreted kernel): GEMMs in fp32
            dz = dz.to(self.gemm_dtype)
        if self.db is not None:
            self.db += dz.sum(dim=0, dtype=torch.float32)
        if self.dh is not None:
            if self.every_row and self.dh.dtype == self.gemm_dtype and self.post_scale is None:
                torch.mm(dz, self.w_gemm, out=self.dh[c0:c1])
            else:
                dh_c = _mm_fp32(dz, self.w_gemm)
                if self.post_scale is not None:
                    dh_c.mul_(self.post_scale)
                self.dh.index_copy_(0, rows_c, dh_c.to(self.dh.dtype))
        if self.dw is not None:
            _add_weight_grad(self.dw, dz, h_c, first=c0 == 0)

    def finish(self):
        if self.post_scale is not None:  # fp32 accumulators
            for grad in (self.dw, self.db):
                if grad is not None:
                    grad.mul_(self.post_scale)


def _unit_max_weights(token_weights, rows, mask):
    """(token_weights / m, m) with m = their largest value on counted rows (device scalar)."""
    counted = token_weights if rows is None else token_weights.index_select(0, rows)
    if mask is not None and rows is None:
        counted = torch.where(mask, counted, torch.zeros_like(counted))
    m = torch_rows.largest_magnitude(counted)
    return token_weights / m, m


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result (16-bit operands accumulate and return in fp32)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    return torch.mm(a, b, out_dtype=torch.float32)


class TwoPassChunks:
    """The forward of each chunk in two row passes around a head in torch: the row kernel's
    statistics pass (logits kept), the combination across the ranks of a vocab shard (two
    all-reduces of the chunk's rows, ``VocabShard.combine``; nothing for a whole
    vocabulary), the loss head on the combined values, then the row kernel's dz pass with the
    global log-normalizer (the backward's recompute mode, on the logits still in the
    workspace: gradients stay in the forward, 6NHV, or 6NHV / tp per rank).

    ``p``: the pass with its targets as this part's columns (-1 where another rank holds the
    target); ``t_stats``: the same clamped into the part, for the statistics."""

    def __init__(self, vocab_part, p: RowPass, t_stats, owned, n_total, device,
                 torch_row_math: bool):
        self.vocab_part, self.p, self.t_stats, self.owned = vocab_part, p, t_stats, owned
        self.bonus = p.entropy_coef != 0.0
        self.need_entropy = p.compute_entropy or self.bonus
        # The torch row math without entropy or soft cap leaves e = exp(x - m) in the
        # workspace after its statistics; then p = e / s needs no second exp.
        self.from_exp = (torch_row_math and not self.need_entropy
                         and p.scaling.softcap is None)
        # The per-token gradients handed to the dz pass (written chunk by chunk).
        self.g_buf = self.ge_buf = None
        if p.write_dz:
            self.g_buf = torch.zeros(n_total, dtype=torch.float32, device=device)
            if self.bonus:
                self.ge_buf = torch.zeros_like(self.g_buf)

    def chunk(self, row_pass, ws, dz, rows_c):
        p, out = self.p, self.p.out
        row_pass(ws, dz, rows_c, p.changed(
            target=self.t_stats, spec=HeadSpec(), write_dz=False,
            compute_entropy=self.need_entropy, entropy_coef=0.0,
            keep_logits=not self.from_exp))

        def of_chunk(t):
            return t.index_select(0, rows_c)

        logsum_r = of_chunk(out["logsum"])
        logp, delta, entropy = self.vocab_part.combine(
            of_chunk(out["logp"]), of_chunk(out["rowmax"]) + logsum_r,
            of_chunk(out["entropy"]) if self.need_entropy else None, of_chunk(self.owned))
        counted = None if p.mask is None else of_chunk(p.mask)
        zero = torch.zeros_like(logp)

        def where_counted(v):
            return v if counted is None else torch.where(counted, v, zero)

        logsum = where_counted(logsum_r + delta)
        out["logp"][rows_c] = where_counted(logp)
        out["logsum"][rows_c] = logsum
        if self.need_entropy:
            out["entropy"][rows_c] = where_counted(entropy)
        g, g_ent = zero, None
        if p.spec.kind != "none":
            inputs = p.inputs.select(rows_c)
            loss, g = head_loss_and_grad(p.spec, logp, inputs, counted)
            if self.bonus:  # - c w H per token, as the row kernel's ENT_BONUS
                ent_weight = p.entropy_coef * (1.0 if inputs.token_weights is None
                                               else inputs.token_weights)
                loss = loss - ent_weight * entropy
                g_ent = where_counted(-ent_weight * p.scale + zero)
            out["loss"][rows_c] = where_counted(loss)
            out["g"][rows_c] = where_counted(g)
        if not p.write_dz:
            return
        g = where_counted(g) * p.scale
        if self.from_exp:  # ws holds e = exp(x - m): p = e / exp(global log s)
            torch_rows.write_dz_(ws, ws, g=g, target=of_chunk(p.target),
                                 p_divisor=torch.exp(logsum), inv_t=p.scaling.inv(rows_c),
                                 counted=counted)
            return
        self.g_buf[rows_c] = g
        if g_ent is not None:
            self.ge_buf[rows_c] = g_ent
        row_pass(ws, dz, rows_c, p.changed(
            spec=HeadSpec(), statistics=False, write_dz=True, compute_entropy=False,
            entropy_coef=0.0, saved=(out["rowmax"], out["logsum"], out["entropy"]),
            g_logp=self.g_buf, g_ent=self.ge_buf))
