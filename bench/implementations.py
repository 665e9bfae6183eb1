"""The implementations the bench compares, on identical inputs.

Each entry builds a closure that runs forward + backward once and returns
(loss, d hidden, d weight). ``available()`` says why a peer cannot run here; the bench reports
that reason instead of dropping the row.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from nft_kernels import (fused_linear_nft_loss, fused_linear_policy_loss, fused_linear_ppo_loss,
                         losses, nft_loss, policy_loss)

# Cut Cross-Entropy's default filter for bf16 (eps / 32), used for our filtered mode too.
FILTER_EPS = 2.0**-7 / 32
DAPO_CLIP = dict(clip_low=0.2, clip_high=0.28)
# The user-defined head of the bench: CISPO (nft_kernels.losses.cispo), its cap on the ratio.
CISPO_CLIP = 5.0


@dataclass
class Impl:
    name: str
    loss: str  # "nft" or "ppo": which float64 reference it is checked against
    build: Callable  # inputs -> closure
    available: Callable[[torch.device], str | None] = lambda device: None  # None = runs
    mode: str | None = None  # ours: the execution mode, whose memory formula the bench checks
    compiles: bool = False   # torch.compile: minutes of compile time (left out of --quick)


def _leaves(inputs):
    h = inputs["hidden"].detach().clone().requires_grad_(True)
    w = inputs["weight"].detach().clone().requires_grad_(True)
    return h, w


def _nft_options():
    return dict(normalize=1, clip_negative=1.0, neg_weight=1.0)


def _ours(mode, filter_eps=None, sharded=False):
    def build(inputs):
        h, w = _leaves(inputs)
        group = _one_rank_group() if sharded else None

        def run():
            h.grad = w.grad = None
            loss = fused_linear_nft_loss(h, w, inputs["target"], inputs["old"], inputs["rewards"],
                                         inputs["rate"], inputs["mask"], filter_eps=filter_eps,
                                         mode=mode, process_group=group, **_nft_options())
            loss.backward()
            return loss, h.grad, w.grad
        return run
    return build


def _one_rank_group():
    """A one-process gloo group: the vocab-parallel code path at tp=1 (its agreement rounds,
    split row passes and shared-value head, with the collectives a group of one skips), to
    measure what the sharded path costs where it shards nothing."""
    import tempfile  # noqa: PLC0415

    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_initialized():
        store = dist.FileStore(tempfile.NamedTemporaryFile(delete=False).name, 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return dist.group.WORLD


def _distributed_available(device):
    import torch.distributed as dist  # noqa: PLC0415

    return None if dist.is_available() else "torch.distributed is not available in this build"


def _naive_logprobs(h, w, target):
    logits = (h @ w.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, target[:, None]).squeeze(1)


def _nft_on_logprobs(inputs, logprobs_fn, impl="auto"):
    """Closure: log-probs from ``logprobs_fn(h, w, target)``, then our NFT head on them."""
    h, w = _leaves(inputs)

    def run():
        h.grad = w.grad = None
        logp = logprobs_fn(h, w, inputs["target"])
        loss = nft_loss(logp, inputs["old"], inputs["rewards"], inputs["rate"], inputs["mask"],
                        impl=impl, validate=False, **_nft_options())
        loss.backward()
        return loss, h.grad, w.grad
    return run


def _naive(inputs):
    return _nft_on_logprobs(inputs, _naive_logprobs, impl="torch")


_compiled = {}
# Liger's fused GRPO loss compiles its chunk function by default (compiled=True), its normal
# use on a GPU; bench/loss_throughput.py --skip-compile turns that off too (minutes saved).
COMPILE_LIGER = True


def _compiled_naive(inputs):
    """The materialized logits under torch.compile (the whole [N, V] block at once)."""
    if "naive" not in _compiled:
        _compiled["naive"] = torch.compile(_naive_logprobs, dynamic=False)
    return _nft_on_logprobs(inputs, _compiled["naive"], impl="torch")


def _compiled_chunked(inputs, chunk_rows=1024):
    if "chunk" not in _compiled:
        _compiled["chunk"] = torch.compile(_naive_logprobs, dynamic=False)
    from torch.utils.checkpoint import checkpoint

    def chunked(h, w, target):  # checkpointed: each chunk's logits are recomputed in backward
        return torch.cat([checkpoint(_compiled["chunk"], h[i:i + chunk_rows], w,
                                     target[i:i + chunk_rows], use_reentrant=False)
                          for i in range(0, h.shape[0], chunk_rows)])
    return _nft_on_logprobs(inputs, chunked, impl="torch")


def _trl_available(device):
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction  # noqa: F401
    except ImportError:
        return "TRL >= 1.15 is not installed (trl.kernels.chunked_logprob; pip install trl)"
    return None


def _trl_logprobs_fn():
    """TRL's chunked LM-head log-probs as a function (h, w, target) -> logp."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as vocab_chunk
    except ImportError:
        # trl.trainer.utils needs `datasets`, absent on the offline GPU machine; its backward
        # imports one helper from there, a DeepSpeed ZeRO-3 gather that is a no-op otherwise.
        import contextlib
        import sys
        import types

        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
        vocab_chunk = 32768  # TRL 1.15-1.16's _CHUNKED_LOGPROB_CHUNK_SIZE

    def logprobs(h, w, target):
        return ChunkedLogProbFunction.apply(h, w, None, target, 1.0, vocab_chunk, None, 1.0,
                                            ("log_probs",))[0]
    return logprobs


def _trl_chunked(inputs):
    """What TRL >= 1.15 users get: TRL's chunked LM-head log-probs (cuBLAS tiles + a Triton
    online-LSE kernel, ``trl/kernels/chunked_logprob.py``), then the NFT head on them."""
    return _nft_on_logprobs(inputs, _trl_logprobs_fn())


def _trl_chunked_user_head(inputs):
    """A user-defined head (CISPO) on TRL's chunked log-probs: the route TRL is moving to
    (the logits recomputed in the backward, 8NHV)."""
    h, w = _leaves(inputs)
    logprobs = _trl_logprobs_fn()

    def run():
        h.grad = w.grad = None
        logp = logprobs(h, w, inputs["target"])
        loss = policy_loss(logp, losses.cispo(CISPO_CLIP), inputs["mask"], reduction="mean",
                           per_token=_cispo_inputs(inputs), validate=False)
        loss.backward()
        return loss, h.grad, w.grad
    return run


def _cispo_inputs(inputs):
    return {"old_logprobs": inputs["old"], "advantages": inputs["advantages"]}


def _ours_user_head(inputs):
    """A user-defined head (CISPO) on our fused path, checks on (validate=True, the default)."""
    h, w = _leaves(inputs)

    def run():
        h.grad = w.grad = None
        loss = fused_linear_policy_loss(h, w, inputs["target"], losses.cispo(CISPO_CLIP),
                                        inputs["mask"], per_token=_cispo_inputs(inputs),
                                        reduction="mean")
        loss.backward()
        return loss, h.grad, w.grad
    return run


def _cce_available(device):
    if importlib.util.find_spec("cut_cross_entropy") is None:
        return "cut-cross-entropy is not installed (pip install cut-cross-entropy)"
    return None


def _cce(inputs):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if inputs["hidden"].is_cuda else "torch_compile"  # its Triton impl needs a GPU
    return _nft_on_logprobs(inputs, lambda h, w, target: -linear_cross_entropy(
        h, w, target, reduction="none", impl=impl))


def _liger_available(device):
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def _liger_grpo(inputs, loss_type="dapo"):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    h, w = _leaves(inputs)
    b, t = inputs["batch_shape"]
    module = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type=loss_type,
                                      epsilon_low=DAPO_CLIP["clip_low"],
                                      epsilon_high=CISPO_CLIP if loss_type == "cispo"
                                      else DAPO_CLIP["clip_high"],
                                      compiled=h.is_cuda and COMPILE_LIGER)

    def run():
        h.grad = w.grad = None
        out = module(h.view(b, t, -1), w, inputs["target"].view(b, t),
                     inputs["mask"].view(b, t).long(), inputs["seq_advantages"],
                     old_per_token_logps=inputs["old"].view(b, t))
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
        return loss, h.grad, w.grad
    return run


def _ours_ppo(inputs):
    h, w = _leaves(inputs)

    def run():
        h.grad = w.grad = None
        loss = fused_linear_ppo_loss(h, w, inputs["target"], inputs["old"],
                                     inputs["advantages"], inputs["mask"], reduction="mean",
                                     **DAPO_CLIP)
        loss.backward()
        return loss, h.grad, w.grad
    return run


IMPLEMENTATIONS = [
    Impl("nft_kernels chunked", "nft", _ours("chunked"), mode="chunked"),
    Impl("nft_kernels lean", "nft", _ours("lean"), mode="lean"),
    Impl("nft_kernels lean filtered", "nft", _ours("lean", FILTER_EPS), mode="lean"),
    Impl("nft_kernels chunked tp=1", "nft", _ours("chunked", sharded=True),
         _distributed_available, mode="chunked"),
    Impl("nft_kernels lean tp=1", "nft", _ours("lean", sharded=True), _distributed_available,
         mode="lean"),
    Impl("torch naive", "nft", _naive),
    Impl("torch.compile naive", "nft", _compiled_naive, compiles=True),
    Impl("torch.compile chunked", "nft", _compiled_chunked, compiles=True),
    Impl("CCE + NFT", "nft", _cce, _cce_available),
    Impl("Liger GRPO (DAPO loss)", "ppo", _liger_grpo, _liger_available),
    Impl("TRL chunked logprob + NFT", "nft", _trl_chunked, _trl_available),
    Impl("nft_kernels PPO (DAPO loss)", "ppo", _ours_ppo, mode="chunked"),
    # A user-defined head (CISPO) three ways: fused (ours), on TRL's chunked log-probs, and
    # Liger's chunked loss with loss_type="cispo".
    Impl("nft_kernels user head (CISPO)", "cispo", _ours_user_head, mode="chunked"),
    Impl("TRL chunked logprob + CISPO", "cispo", _trl_chunked_user_head, _trl_available),
    Impl("Liger GRPO (CISPO loss)", "cispo", lambda inputs: _liger_grpo(inputs, "cispo"),
         _liger_available),
]
