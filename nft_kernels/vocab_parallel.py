"""Vocab-parallel LM head: the fused losses when ``lm_head.weight`` is sharded over the
vocabulary across a tensor-parallel group (Megatron's vocab-parallel head, torch's
``ColwiseParallel`` + ``loss_parallel``, verl's Megatron backend).

Each rank holds rows [start, start + V_r) of W (and of the bias) and the same hidden states,
targets and per-token inputs. Per token, each rank computes from its shard alone the
log-normalizer lse_r = log sum_{j in shard} exp(x_j), the entropy H_r of the softmax restricted
to the shard and, on the rank that holds the target, logp_r = x_target - lse_r (other ranks
treat the target like padding). One all-reduce of the maximum and one of the sums give every
rank the same values:

    L = max_r lse_r,  S = sum_r exp(lse_r - L),  lse = L + log S,
    logp = logp_owner - (lse - lse_owner),
    H = sum_r P_r (H_r - log P_r),  P_r = exp(lse_r - lse)   (the shard's probability mass),

so the loss head (Eq. 8, or PPO-clip) runs on identical values on every rank. The gradient
dz = g (onehot - p) / T of a rank's columns needs only the global lse (and H), so each rank
forms its own dW shard; dH = sum_r dz_r W_r takes one all-reduce of [N, H]. Communication is
O(N) values per all-reduce (the chunked mode's gradients-in-the-forward path takes the two per
chunk of rows) plus the [N, H] dH, never O(N V). At one rank all of this reduces exactly to
the values of the unsharded computation.

Collectives must be taken in the same order on every rank, so an input error found on one rank
alone would leave the others waiting. ``GroupCall`` runs the checks of a call as agreement
rounds (one small all_gather each): an error on any rank is raised on every rank, naming the
argument and the rank.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .validation import (MODES, check_dtensor_weight, check_process_group,
                         check_replicated)

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without DTensor
    DTensor = None

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Round 1's per-rank numbers: what each rank holds, and settings every rank must share.
_META = ("vocab", "hidden_size", "tokens", "dtype", "bias", "vocab_start", "grad_hidden",
         "grad_weight", "grad_bias", "validate", "mode", "workspace_bytes")
_SHARED = {
    "hidden_size": "weight: the shards' hidden sizes H differ across ranks",
    "tokens": "hidden: the number of tokens differs across ranks (every rank of the "
              "tensor-parallel group takes the same hidden states and per-token inputs)",
    "dtype": "weight: the shards' dtypes differ across ranks",
    "bias": "bias: given on some ranks and not on others",
    "grad_hidden": "hidden: requires_grad differs across ranks",
    "grad_weight": "weight: requires_grad differs across ranks",
    "grad_bias": "bias: requires_grad differs across ranks",
    "validate": "validate differs across ranks",
    "mode": "mode differs across ranks",
    "workspace_bytes": "workspace_bytes differs across ranks",
}
_FIELDS = len(_META)  # numbers per rank in a round (round 1 sends them all, round 2 three)
# validate=False: the shard layout found by a call's round 1, reused by later calls on the
# same head so that they take no agreement round (no host synchronisation). Whether a call
# takes round 1 must be decided alike on every rank, or the collectives mismatch and the call
# hangs; a rank's own shard size cannot decide it (two heads of 301 and 302 rows over 3 ranks
# share the shard sizes of ranks 0 and 1). So the key is what every rank agrees on: for a
# DTensor weight its global vocabulary size, for plain shards the weight tensor itself (every
# rank passes the same head again, or a new one: a new tensor object takes round 1 anew).
# Key -> (weak reference to the plain shard or None, (start, total, largest)).
_LAYOUTS: dict[tuple, tuple] = {}
# The checksums of round 2 (mask, targets) are taken modulo this prime, in int64.
_CHECKSUM_PRIME = 2_147_483_647


def head_identity(weight):
    """What names the head a call's weight belongs to, alike on every rank (see _LAYOUTS):
    a DTensor's global vocabulary size, or the plain shard tensor itself."""
    return ("dtensor", int(weight.shape[0])) if is_dtensor(weight) else ("tensor", weight)


def _layout_key(call, head, vocab, vocab_start):
    kind, what = head
    ident = what if kind == "dtensor" else id(what)
    return (id(call.group), call.world, call.rank, kind, ident, vocab, vocab_start)


def _cached_layout(key, head):
    entry = _LAYOUTS.get(key)
    if entry is None:
        return None
    ref, layout = entry
    if ref is not None and ref() is not head[1]:  # the id of a tensor since freed
        del _LAYOUTS[key]
        return None
    return layout


def _remember_layout(key, head, layout):
    for stale in [k for k, (ref, _) in _LAYOUTS.items() if ref is not None and ref() is None]:
        del _LAYOUTS[stale]
    _LAYOUTS[key] = (weakref.ref(head[1]) if head[0] == "tensor" else None, layout)


def agreement_checksums(checks, target, mask):
    """Round 2's cheap fingerprints of the targets and the mask ([N] each, mask may be None),
    added to ``checks`` as values: every rank must take the same tokens, and the number of
    counted tokens alone does not show two masks that count different tokens. Position
    weighted sums modulo a prime, in int64 (exact, no overflow for N < 2^31)."""
    n = target.numel()
    position = torch.arange(1, n + 1, dtype=torch.int64, device=target.device)
    weight = (position * 40503) % _CHECKSUM_PRIME + 1
    ids = target.long() + 1
    if mask is not None:
        ids = torch.where(mask, ids, torch.zeros_like(ids))
    target_sum = ((ids * weight) % _CHECKSUM_PRIME).sum() % _CHECKSUM_PRIME
    slots = {}  # the mask first: targets are compared on counted tokens
    if mask is not None:
        mask_sum = torch.where(mask, weight, torch.zeros_like(weight)).sum() % _CHECKSUM_PRIME
        slots["mask"] = checks.value(mask_sum)
    slots["target"] = checks.value(target_sum)
    return slots


def is_dtensor(value) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def tensor_parallel_group(weight, process_group):
    """The group that shards ``weight`` over the vocabulary, or None for a whole weight.

    A DTensor weight names its own group: the mesh dimension where it is ``Shard(0)``. Plain
    tensors are local shards of the group given as ``process_group``."""
    if is_dtensor(weight):
        dim = check_dtensor_weight(weight, process_group)
        return weight.device_mesh.get_group(dim)
    if process_group is None:
        return None
    check_process_group(process_group)
    return process_group


def local_part(name: str, value, shard_dim0: bool):
    """The local tensor of a DTensor argument (differentiable: gradients flow back to the
    DTensor with its placements); plain tensors pass through. ``shard_dim0``: the weight and
    bias (Shard(0) on the tensor-parallel dimension); other arguments must be replicated."""
    if not is_dtensor(value):
        return value
    if not shard_dim0:
        check_replicated(name, value)
    return value.to_local()


def local_parts(hidden, weight, bias):
    """(hidden, weight, bias) as this rank's tensors: a DTensor ``hidden`` must be
    replicated, a DTensor weight and bias Shard(0) on the tensor-parallel dimension."""
    return (local_part("hidden", hidden, shard_dim0=False),
            local_part("weight", weight, shard_dim0=True),
            local_part("bias", bias, shard_dim0=True))


class GroupCall:
    """Collective bookkeeping of one sharded call. ``round`` is an agreement round: every rank
    gives its numbers and whether its own checks failed, every rank gets all of them, and a
    failure anywhere is raised everywhere."""

    def __init__(self, group):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        backend = str(dist.get_backend(group)).lower()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend
                       else torch.device("cpu"))
        self.finished = False

    def round(self, numbers=(), failure: BaseException | None = None) -> list[list[int]]:
        row = torch.zeros(_FIELDS + 1, dtype=torch.int64)
        row[0] = failure is not None
        row[1:1 + len(numbers)] = torch.tensor([int(v) for v in numbers], dtype=torch.int64)
        row = row.to(self.device)
        gathered = [torch.empty_like(row) for _ in range(self.world)]
        dist.all_gather(gathered, row, group=self.group)
        rows = [r.tolist() for r in gathered]
        failed = [r for r in range(self.world) if rows[r][0]]
        if failed:
            self.finished = True  # no more rounds: every rank raises here
            mine = None if failure is None else (type(failure).__name__, str(failure))
            messages = [None] * self.world
            dist.all_gather_object(messages, mine, group=self.group)
            kind, text = messages[failed[0]]
            where = f"rank {failed[0]}" + (f" (and ranks {failed[1:]})" if failed[1:] else "")
            error = TypeError if kind == "TypeError" else ValueError
            raise error(f"{text} [{where} of the tensor-parallel group]") from failure
        return [r[1:] for r in rows]

    def shard(self, *, head, vocab, hidden_size, tokens, dtype, bias, vocab_start, want,
              validate, mode, workspace_bytes) -> VocabShard:
        """Round 1: every rank's shard size and settings. Returns this rank's ``VocabShard``;
        raises on every rank when the shards do not fit together. With ``validate=False`` the
        layout of a head seen before (``head``: ``head_identity(weight)``) is reused without
        the round (no collective, no synchronisation)."""
        layout_key = _layout_key(self, head, vocab, vocab_start)
        cached = None if validate else _cached_layout(layout_key, head)
        if cached is not None:
            self.finished = True
            start, total, largest = cached
            return VocabShard(self, start=start, size=vocab, total=total, max_size=largest)
        mine = dict(vocab=vocab, hidden_size=hidden_size, tokens=tokens,
                    dtype=_DTYPE_CODES[dtype], bias=bias,
                    vocab_start=-1 if vocab_start is None else vocab_start,
                    grad_hidden=want[0], grad_weight=want[1], grad_bias=want[2],
                    validate=validate, mode=MODES.index(mode) if mode in MODES else -1,
                    workspace_bytes=-1 if workspace_bytes is None else workspace_bytes)
        rows = self.round([mine[k] for k in _META])
        table = {k: [r[i] for r in rows] for i, k in enumerate(_META)}
        # Every rank sees the same table: an error below is raised on all of them at once
        # (no further round); otherwise round 2 (the value checks) follows with validate=True.
        self.finished = True
        for key, message in _SHARED.items():
            if len(set(table[key])) > 1:
                raise ValueError(f"{message}: {table[key]} on ranks 0..{self.world - 1}")
        sizes, starts = table["vocab"], table["vocab_start"]
        total = sum(sizes)
        derived = [sum(sizes[:r]) for r in range(self.world)]
        if all(s == -1 for s in starts):
            starts = derived
        else:
            spans = sorted(zip(starts, sizes))
            tiles = all(s >= 0 for s in starts) and spans[0][0] == 0 and all(
                a + n == b for (a, n), (b, _) in zip(spans, spans[1:]))
            if not tiles:
                raise ValueError(f"vocab_start: the shards [vocab_start, vocab_start + V_r) must "
                                 f"tile [0, {total}) without gaps or overlaps, got vocab_start "
                                 f"{table['vocab_start']} and V_r {sizes} on ranks "
                                 f"0..{self.world - 1} (leave vocab_start=None to place the "
                                 f"shards in rank order)")
        self.finished = not validate
        _remember_layout(layout_key, head, (starts[self.rank], total, max(sizes)))
        return VocabShard(self, start=starts[self.rank], size=sizes[self.rank], total=total,
                          max_size=max(sizes))

    def value_checks(self, checks, count_slot, checksum_slots=None) -> list[float]:
        """Round 2: the value checks of every rank (one all_gather), the number of counted
        tokens (the chunked mode takes one pair of all-reduces per chunk of counted rows) and
        the fingerprints of the targets and the mask (``agreement_checksums``), which must
        agree across ranks."""
        failure, host = checks.collect()
        slots = {"count": count_slot, **(checksum_slots or {})}
        names = list(slots)
        numbers = [-1 if slots[k] is None else int(host[slots[k]]) for k in names]
        rows = self.round(numbers, failure=None if failure is None else ValueError(failure))
        self.finished = True
        what = {"count": "mask: the number of counted tokens differs across ranks",
                "mask": "mask: the masks differ across ranks (same count, other tokens)",
                "target": "target: the target ids differ across ranks"}
        for i, key in enumerate(names):
            seen = [r[i] for r in rows]
            if len(set(seen)) > 1:
                shown = f" ({seen})" if key == "count" else ""
                raise ValueError(f"{what[key]}{shown}; every rank of the tensor-parallel group "
                                 f"takes the same hidden states, targets, mask and per-token "
                                 f"inputs")
        return host


@contextlib.contextmanager
def agreement(call: GroupCall | None):
    """Around a sharded call's checks: an exception on this rank before the last agreement
    round joins the next round as a failure, so that every rank raises it (instead of the
    others waiting in a collective this rank never reaches)."""
    if call is None:
        yield
        return
    try:
        yield
    except Exception as err:
        if call.finished:
            raise
        call.round(failure=err)  # raises on every rank
        raise


@dataclass
class VocabShard:
    """This rank's rows [start, start + size) of a vocabulary of ``total`` rows."""
    call: GroupCall
    start: int
    size: int
    total: int
    max_size: int  # the largest shard: every rank sizes its chunks by it (same chunk count)

    @property
    def world(self) -> int:
        return self.call.world

    def targets(self, target: torch.Tensor):
        """(for the statistics pass: a column of the shard, clamped; for dz: the local column,
        or -1 where another rank holds the target, which matches no column; owned: bool)."""
        local = target.long() - self.start
        owned = (local >= 0) & (local < self.size)
        elsewhere = torch.full_like(local, -1)
        return local.clamp(0, self.size - 1), torch.where(owned, local, elsewhere), owned

    def _all_reduce(self, tensor, op=dist.ReduceOp.SUM):
        dist.all_reduce(tensor, op=op, group=self.call.group)
        return tensor

    def combine(self, logp_r, lse_r, entropy_r, owned):
        """Per token, from this rank's shard statistics, the values every rank shares:
        (logp, delta, entropy) with delta = lse - lse_r (what the rank adds to its own
        log-normalizer for the gradient pass). Two all-reduces; none at one rank."""
        if self.world == 1:
            return logp_r, torch.zeros_like(lse_r), entropy_r
        top = self._all_reduce(lse_r.clone(), dist.ReduceOp.MAX)
        rel = lse_r - top  # <= 0
        e = torch.exp(rel)
        zero = torch.zeros_like(rel)
        parts = [e, torch.where(owned, logp_r, zero), torch.where(owned, rel, zero)]
        if entropy_r is not None:
            parts += [e * entropy_r, e * rel]
        sums = self._all_reduce(torch.stack(parts))
        log_s = torch.log(sums[0])
        logp = sums[1] - (log_s - sums[2])  # logp_owner - (lse - lse_owner)
        entropy = None if entropy_r is None else (sums[3] - sums[4]) / sums[0] + log_s
        return logp, log_s - rel, entropy

    def reduce_hidden_grad(self, dh):
        """dH = sum over ranks of dz_r W_r (in place)."""
        if dh is not None and self.world > 1:
            self._all_reduce(dh)
        return dh


class WholeVocab:
    """A vocabulary held whole by this rank: the ``VocabShard`` interface without
    collectives, for the engines' two-pass route when a head runs in torch between the row
    kernel's passes (a user-defined head, ``chunked.TwoPassChunks``)."""
    world = 1

    @staticmethod
    def targets(target: torch.Tensor):
        local = target.long()
        return local, local, torch.ones_like(local, dtype=torch.bool)

    @staticmethod
    def combine(logp_r, lse_r, entropy_r, owned):
        del owned
        return logp_r, torch.zeros_like(lse_r), entropy_r

    @staticmethod
    def reduce_hidden_grad(dh):
        return dh


WHOLE_VOCAB = WholeVocab()
