"""The per-call state that travels from the front door to the engines, as two small objects.

``TokenInputs``: the per-token tensors a loss head reads. ``RowPlan``: which rows a fused call
computes and how their logits are formed. Beside them: ``heads.HeadSpec`` (what the head does
with a token's log-prob) and ``heads.LogitScaling`` (cap and temperature, held by the plan).
Every tensor here is already checked and flattened to [N] by ``validation.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .heads import HeadSpec, LogitScaling


@dataclass(frozen=True, eq=False)
class TokenInputs:
    """Per-token inputs of a loss head, [N] each, None where the call has none.

    ``signal`` is what the head weighs a token's log-prob by: NFT's reward r in [0, 1], the
    PPO head's advantage A. ``correct_rate`` is NFT's r_hat before ``HeadSpec``'s clamp."""
    old_logprobs: torch.Tensor | None = None
    signal: torch.Tensor | None = None
    correct_rate: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    # A user-defined head's per-token inputs by the names its loss_fn takes (heads.py).
    named: dict | None = None

    def tensors(self) -> tuple:
        """The five tensors in the kernels' argument order (old, signal, rate, weights, ref)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name != "named")

    def _map(self, fn) -> TokenInputs:
        named = None if self.named is None else {k: fn(v) for k, v in self.named.items()}
        return TokenInputs(*(None if t is None else fn(t) for t in self.tensors()), named=named)

    def select(self, rows: torch.Tensor) -> TokenInputs:
        """The inputs of ``rows`` (int64 indices), in fp32: what a head evaluates on."""
        return self._map(lambda t: t.index_select(0, rows).float())

    def as_float(self) -> TokenInputs:
        return self._map(lambda t: t.float())

    def kernel_pointers(self, dummy: torch.Tensor) -> tuple:
        """The tensors with ``dummy`` where absent (Triton needs a pointer; the HEAD, KL and
        HAS_TOKEN_WEIGHTS flags say which are read)."""
        return tuple(dummy if t is None else t for t in self.tensors())

    def with_token_weights(self, token_weights: torch.Tensor | None) -> TokenInputs:
        return replace(self, token_weights=token_weights)


NO_TOKEN_INPUTS = TokenInputs()


@dataclass(frozen=True, eq=False)
class RowPlan:
    """The rows of one fused call and how their logits are formed.

    ``rows``: int64 indices of the counted rows (None: every row). ``device_mask``: a [N] bool
    mask still to apply on the device (the number of counted rows was not read back: rows
    past it are computed and count 0). ``target``: [N] vocabulary ids (a vocab shard's engines
    replace them by their local columns)."""
    target: torch.Tensor
    scaling: LogitScaling
    rows: torch.Tensor | None = None
    device_mask: torch.Tensor | None = None
    compute_entropy: bool = False

    def row_ids(self, n_total: int, device) -> torch.Tensor:
        """The counted rows' indices (every row when none were dropped)."""
        return self.rows if self.rows is not None else torch.arange(n_total, device=device)

    def changed(self, **changes) -> RowPlan:
        return replace(self, **changes)


@dataclass(frozen=True, eq=False)
class RowPass:
    """What one pass of the chunked mode's row kernel does on a chunk of fp32 logits
    (``torch_rows.chunk_rows`` or the Triton ``ops/chunk_rows.py``).

    ``statistics``: the forward's pass (log-sum-exp, entropy, the head on ``inputs``, outputs
    into ``out``); otherwise the backward's recompute from ``saved`` = (rowmax, logsum,
    entropy) with the per-token gradients ``g_logp`` / ``g_ent``. ``write_dz``: form
    dz = g (onehot - p) / T over the chunk (with the entropy bonus ``entropy_coef`` of a scalar
    loss, its part too). ``scale``: the reduction scale (fp32 device scalar) folded into g.
    ``keep_logits``: leave the logits as they were (a vocab shard's statistics pass, which
    its dz pass follows on the same logits). ``target`` of -1 matches no column (the column
    is another rank's)."""
    target: torch.Tensor
    mask: torch.Tensor | None
    inputs: TokenInputs
    spec: HeadSpec
    scaling: LogitScaling
    scale: torch.Tensor
    out: dict | None = None
    statistics: bool = True
    compute_entropy: bool = False
    write_dz: bool = False
    entropy_coef: float = 0.0
    saved: tuple | None = None
    g_logp: torch.Tensor | None = None
    g_ent: torch.Tensor | None = None
    keep_logits: bool = False

    @property
    def entropy_bonus(self) -> bool:
        """The scalar loss's entropy bonus is applied in this pass (loss and dz)."""
        return self.statistics and self.entropy_coef != 0.0

    def changed(self, **changes) -> RowPass:
        return replace(self, **changes)
