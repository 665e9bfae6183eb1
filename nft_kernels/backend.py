"""What runs: an implementation (Triton kernels or PyTorch) in an execution mode.

``impl``: ``"auto"`` picks Triton for CUDA tensors, and for CPU tensors when
``TRITON_INTERPRET=1`` was set before the kernels were first used (the Triton interpreter);
otherwise PyTorch. ``"triton"`` / ``"torch"`` force one.

``mode``:
- ``"chunked"`` (what ``"auto"`` picks): vendor GEMMs on chunks of rows around one fused row
  kernel (``chunked.py``); gradients of a scalar loss are computed in the forward (6NHV).
  Extra memory: the workspace (``workspace_bytes``, default on CUDA 1/32 of the GPU's
  memory (1 to 8 GiB), 128 MiB on CPU, never more than the counted rows need) + an fp32 dW
  for 16-bit weights + O(N).
- ``"lean"``: the tile kernels (``ops/forward.py`` and the backward kernels), which never hold
  more than a tile of logits; the backward recomputes them (8NHV). Extra memory: fp32 dH and
  dW accumulators + O(N). ``filter_eps`` (gradient filtering per tile) needs this mode, so
  ``"auto"`` picks it when ``filter_eps`` is given.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import chunked, lean_torch, validation, vocab_parallel
from .heads import HeadSpec, LogitScaling
from .inputs import NO_TOKEN_INPUTS, RowPlan, TokenInputs


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_module():
    from . import triton_launch  # noqa: PLC0415 - imported on first use on purpose

    return triton_launch


def resolve_impl(impl: str, device: torch.device) -> str:
    """``"triton"`` or ``"torch"``: the implementation that will run on ``device``."""
    validation.check_impl(impl)
    if impl == "torch":
        return "torch"
    usable = triton_installed() and (device.type == "cuda" or interpreter_requested())
    if impl == "triton" and not usable:
        why = ("Triton is not installed" if not triton_installed() else
               f"tensors are on {device.type} and TRITON_INTERPRET=1 is not set "
               "(set it before importing Triton to run the kernels on CPU)")
        raise ValueError(f"impl='triton' cannot run here: {why}")
    if not usable:
        return "torch"
    if device.type != "cuda" and not _triton_module().INTERPRET:
        if impl == "triton":
            raise ValueError("impl='triton' on CPU needs TRITON_INTERPRET=1 set before "
                             "nft_kernels first launched a kernel")
        return "torch"
    return "triton"


def head_module(impl: str, device: torch.device, spec: HeadSpec | None = None):
    """The module whose ``head_forward`` runs a loss head on given log-probs (a user-defined
    head always runs in torch)."""
    if spec is not None and spec.custom:
        return lean_torch
    return _triton_module() if resolve_impl(impl, device) == "triton" else lean_torch


def resolve_mode(mode: str, filter_eps) -> str:
    validation.check_mode(mode, filter_eps)
    if mode == "auto":
        return "lean" if filter_eps is not None else "chunked"
    return mode


def workspace_budget(workspace_bytes, device: torch.device) -> int:
    """The chunked mode's workspace in bytes: the given one, or the device's default."""
    validation.check_workspace_bytes(workspace_bytes)
    if workspace_bytes is None:
        return chunked.default_workspace_bytes(device)
    return workspace_bytes


class ChunkedEngine:
    """``mode="chunked"``: see ``chunked.py``."""

    mode = "chunked"
    grads_in_forward = True
    takes_device_mask = True

    def __init__(self, impl: str, workspace_bytes: int, shard=None):
        self.impl, self.workspace_bytes, self.shard = impl, workspace_bytes, shard

    def _run(self, *args, **kwargs):
        return chunked.run(*args, row_op=self.impl, workspace_bytes=self.workspace_bytes,
                           shard=self.shard, **kwargs)

    def _full_dh(self, dh):
        """A vocabulary shard's dH is its part of the sum over ranks: all-reduce it."""
        return dh if self.shard is None else self.shard.reduce_hidden_grad(dh)

    def forward(self, hidden, weight, bias, plan: RowPlan, inputs: TokenInputs, spec: HeadSpec):
        """Per-token (loss, logp, entropy, g) and the state the backward needs."""
        out, _, _, _ = self._run(hidden, weight, bias, plan, inputs, spec,
                                 write_grads=(False, False, False))
        return (out["loss"], out["logp"], out["entropy"], out["g"],
                (out["rowmax"], out["logsum"], out["entropy"]))

    def forward_with_grads(self, hidden, weight, bias, plan: RowPlan, inputs: TokenInputs,
                           spec: HeadSpec, want, grad_scale):
        """Per-token (loss, logp, entropy) and the gradients of sum(loss) * grad_scale."""
        out, dh, dw, db = self._run(hidden, weight, bias, plan, inputs, spec, write_grads=want,
                                    grad_scale=grad_scale, entropy_coef=spec.entropy_coef)
        return out["loss"], out["logp"], out["entropy"], self._full_dh(dh), dw, db

    def backward(self, hidden, weight, bias, plan: RowPlan, state, g_logp, g_ent, want):
        _, dh, dw, db = self._run(hidden, weight, bias, plan.changed(compute_entropy=False),
                                  NO_TOKEN_INPUTS, HeadSpec(), write_grads=want, saved=state,
                                  g_logp=g_logp, g_ent=g_ent)
        return self._full_dh(dh), dw, db


class LeanEngine:
    """``mode="lean"``: the tile kernels (Triton) or their PyTorch equivalent."""

    mode = "lean"
    grads_in_forward = False

    def __init__(self, impl: str, filter_eps, deterministic: bool, shard=None):
        self.impl, self.filter_eps, self.deterministic = impl, filter_eps, deterministic
        self.shard = shard
        self.module = _triton_module() if impl == "triton" else lean_torch
        # The tile kernels can leave padded rows in place (g = 0 there); the PyTorch path
        # compacts them on the host.
        self.takes_device_mask = impl == "triton"

    def forward(self, hidden, weight, bias, plan: RowPlan, inputs: TokenInputs, spec: HeadSpec):
        if self.shard is not None or (spec.custom and self.impl == "triton"):
            return self._forward_then_head(hidden, weight, bias, plan, inputs, spec)
        row_ids = plan.row_ids(hidden.shape[0], hidden.device)
        logp, lse, entropy, loss, g = self.module.forward(hidden, weight, bias, plan, row_ids,
                                                          inputs, spec)
        mask = plan.device_mask
        if mask is not None:  # padded rows left in place: their values count for nothing
            logp, lse, entropy, loss, g = (torch.where(mask, t, torch.zeros_like(t))
                                           for t in (logp, lse, entropy, loss, g))
        return loss, logp, entropy, g, (lse, entropy)

    def _forward_then_head(self, hidden, weight, bias, plan: RowPlan, inputs: TokenInputs,
                           spec: HeadSpec):
        """The statistics by the forward kernel, combined across the ranks of a vocabulary
        shard (``vocab_parallel.py``: two all-reduces; nothing for a whole vocabulary), then
        the loss head on the shared values (a user-defined head in torch). The saved lse is
        the global one, for the backward's recompute."""
        n_total, dev = hidden.shape[0], hidden.device
        vocab_part = self.shard if self.shard is not None else vocab_parallel.WHOLE_VOCAB
        t_stats, _, owned = vocab_part.targets(plan.target)
        row_ids = plan.row_ids(n_total, dev)
        logp_r, lse_r, ent_r, _, _ = self.module.forward(
            hidden, weight, bias, plan.changed(target=t_stats), row_ids, NO_TOKEN_INPUTS,
            HeadSpec())
        logp, delta, entropy = vocab_part.combine(
            logp_r, lse_r, ent_r if plan.compute_entropy else None, owned)
        entropy = ent_r if entropy is None else entropy
        counted = torch.zeros(n_total, dtype=torch.bool, device=dev).index_fill_(0, row_ids, True)
        if plan.device_mask is not None:
            counted &= plan.device_mask
        zero = torch.zeros_like(logp)
        logp, lse, entropy = (torch.where(counted, t, zero) for t in (logp, lse_r + delta, entropy))
        loss, g = zero, zero
        if spec.kind != "none":
            loss, g = head_module(self.impl, dev, spec).head_forward(logp, inputs, counted, spec)
        return loss, logp, entropy, g, (lse, entropy)

    def backward(self, hidden, weight, bias, plan: RowPlan, state, g_logp, g_ent, want):
        del want  # g_logp / g_ent are already 0 on padded rows
        if self.shard is not None:  # no onehot where another rank holds the target
            plan = plan.changed(target=self.shard.targets(plan.target)[1])
        dh, dw, db = self.module.backward(hidden, weight, bias, plan,
                                          plan.row_ids(hidden.shape[0], hidden.device), state,
                                          g_logp, g_ent, self.filter_eps, self.deterministic)
        if self.shard is not None:
            self.shard.reduce_hidden_grad(dh)
        return dh, dw, db


def engine(impl: str, mode: str, device: torch.device, vocab: int, *, filter_eps=None,
           deterministic: bool = False, workspace_bytes=None, shard=None):
    """The engine that runs a fused call: ``ChunkedEngine`` or ``LeanEngine``. ``"auto"``
    falls back to the lean mode when the workspace cannot hold one row of logits (of the
    largest shard, with a vocab-parallel ``shard``: every rank takes the same mode)."""
    which = resolve_impl(impl, device)
    chosen = resolve_mode(mode, filter_eps)
    budget = workspace_budget(workspace_bytes, device)
    if chosen == "chunked" and budget < 4 * vocab:
        if mode == "chunked":
            validation.refuse_small_workspace(budget, vocab)
        chosen = "lean"
    if chosen == "chunked":
        return ChunkedEngine(which, budget, shard)
    return LeanEngine(which, filter_eps, deterministic, shard)


def compact_rows(mask: torch.Tensor, count: int) -> torch.Tensor:
    """int64 indices of the ``count`` True entries of ``mask``, in order, without a host
    synchronisation (``torch.nonzero`` would wait for the device to learn the count)."""
    n = mask.numel()
    position = torch.cumsum(mask, 0) - 1
    slot = torch.where(mask, position, torch.full_like(position, count))  # others: a spare slot
    rows = torch.empty(count + 1, dtype=torch.int64, device=mask.device)
    rows.scatter_(0, slot, torch.arange(n, device=mask.device))
    return rows[:count]


def row_plan(call: validation.PreparedCall, counted: int | None, *, temperature, softcap,
             compute_entropy: bool) -> RowPlan:
    """The rows a call computes: with the number of counted tokens read back, only those
    (``compact_rows``: padded tokens are dropped before any GEMM); otherwise every row, the
    mask applied on the device. ``temperature``: the number (a per-token tensor is in
    ``call.temperatures``), applied with the soft cap as ``LogitScaling``."""
    cap = None if softcap is None else float(softcap)
    if call.temperatures is None:
        scaling = LogitScaling(inv_temperature=1.0 / float(temperature), softcap=cap)
    else:  # 1 / T per token; padded tokens get 1 (their temperature may be anything)
        inv_t = 1.0 / call.temperatures.float()
        if call.mask is not None:
            inv_t = torch.where(call.mask, inv_t, torch.ones_like(inv_t))
        scaling = LogitScaling(softcap=cap, inv_temperature_t=inv_t.contiguous())
    rows = device_mask = None
    if call.mask is not None:
        if counted is not None:
            rows = compact_rows(call.mask, counted)
        else:
            device_mask = call.mask
    return RowPlan(target=call.target, scaling=scaling, rows=rows, device_mask=device_mask,
                   compute_entropy=compute_entropy)


def extra_memory_bytes(n_tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype,
                       mode: str = "chunked", *, impl: str = "auto", device="cuda",
                       workspace_bytes=None, counted_tokens=None, bias: bool = False) -> int:
    """Upper bound of the memory one fused loss call with gradients allocates beyond its
    inputs, the returned gradients included: the formula the bench checks each mode against.

    grads = (N H + V H [+ V]) x itemsize of the inputs; O(N) = 64 N bytes of per-token vectors.
    chunked: grads + workspace + fp32 dW (16-bit weights) + gathered rows + O(N), where
        workspace = min(n, C) V x 4 bytes, C = workspace_bytes // (4 V) rows, n = counted tokens;
        fp32 dW = 4 (V H [+ V]) (fp32 weights accumulate into the returned gradient);
        gathered rows = min(n, C) H x itemsize (a chunk of counted rows, when a mask drops some);
        the PyTorch row math adds 16 MiB of temporaries, and on CPU 16-bit inputs add an fp32
        copy of the weight (4 V H).
    lean: grads + fp32 dH and dW accumulators (4 N H + 4 V H [+ 4 V]) + O(N); the PyTorch path
        adds 16 temporaries of [n, slice] fp32 logits (4 MiB each).
    A vocab-parallel call (``vocab_parallel.py``) takes V as its own shard's rows (the chunked
    workspace: the largest shard's) and, in the chunked mode over more than one rank with
    16-bit inputs, an fp32 dH (4 N H) for the all-reduce; its other extra buffers are O(N).
    """
    device = torch.device(device)
    which = resolve_impl(impl, device)
    item = torch.empty((), dtype=dtype).element_size()
    n = n_tokens if counted_tokens is None else counted_tokens
    grads = (n_tokens * hidden_size + vocab * hidden_size + (vocab if bias else 0)) * item
    per_token = 64 * n_tokens
    fp32_dw = 4 * (vocab * hidden_size + (vocab if bias else 0))
    if resolve_mode(mode, None) == "lean":
        total = grads + 4 * n_tokens * hidden_size + fp32_dw + per_token
        if which == "torch":
            total += 16 * 4 * lean_torch.CHUNK_ELEMENTS
        return total
    budget = workspace_budget(workspace_bytes, device)
    workspace = chunked.workspace_bytes_needed(n, vocab, budget)
    total = grads + workspace + per_token
    if n < n_tokens:
        total += workspace // (4 * vocab) * hidden_size * item
    if dtype != torch.float32:
        total += fp32_dw
        if device.type != "cuda":
            total += 4 * vocab * hidden_size
    if which == "torch":
        total += 16 << 20
    return total
