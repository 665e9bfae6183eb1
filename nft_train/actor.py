"""The trained policy: a causal LM whose forward returns the loss, computed by nft_kernels from the
final hidden states, so the [tokens, vocab] logits are never formed.

With several processes the model is sharded with FSDP2 (``fully_shard``) per decoder block and at
the root, this wrapper; the lm_head belongs to the root, so it is unsharded inside ``forward``
where the fused loss reads it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

import nft_kernels

from .config import AlgoConfig, ModelConfig


# ---- processes ---------------------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """One process, or the torchrun group (gloo on CPU, nccl on CUDA)."""
    use_cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistInfo(device=torch.device("cuda" if use_cuda else "cpu"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return DistInfo(rank, world, device)


# ---- model -------------------------------------------------------------------------------------
def load_model_and_tokenizer(cfg: ModelConfig, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(cfg.path):
        raise FileNotFoundError(f"model.path {cfg.path!r} is not a local model folder")
    tokenizer = AutoTokenizer.from_pretrained(cfg.path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype)
    if device.type == "cuda" and cfg.liger_patches:
        _apply_liger(model)
    return model.to(device), tokenizer


def _apply_liger(model) -> None:
    """Liger's fused RMSNorm / RoPE / SwiGLU on CUDA; its loss patches stay off (ours is used)."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        return
    _apply_liger_kernel_to_instance(model=model, rms_norm=True, rope=True, swiglu=True,
                                    cross_entropy=False, fused_linear_cross_entropy=False)


class PolicyWithLoss(nn.Module):
    """``forward(batch)`` -> (loss, stats) for training, or (logprobs, entropy) with
    ``logprobs_only=True`` (old log-probs, recomputed with the same kernel, so on-policy R = 1)."""

    def __init__(self, lm: nn.Module, algo: AlgoConfig, impl: str = "auto"):
        super().__init__()
        self.lm, self.algo, self.impl = lm, algo, impl

    def _hidden(self, input_ids, attention_mask):
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False)
        return out.last_hidden_state[:, :-1]          # position t predicts token t + 1

    def forward(self, batch: dict, logprobs_only: bool = False):
        hidden = self._hidden(batch["input_ids"], batch["attention_mask"])
        weight = self.lm.get_output_embeddings().weight
        target = batch["input_ids"][:, 1:]
        mask = batch["loss_mask"]
        if logprobs_only:
            return nft_kernels.fused_linear_logprobs(hidden, weight, target, mask=mask,
                                                     return_entropy=True, impl=self.impl)
        a = self.algo
        if a.loss == "nft":
            loss_t, stats = nft_kernels.fused_linear_nft_loss(
                hidden, weight, target, batch["old_logprobs"], batch["rewards"],
                batch["correct_rate"], mask, neg_weight=a.neg_weight, normalize=a.normalize,
                clip_negative=a.clip_negative, rate_clamp=tuple(a.rate_clamp),
                max_log_ratio=a.max_log_ratio, reduction="none", impl=self.impl,
                return_stats=True)
        else:
            loss_t, stats = nft_kernels.fused_linear_ppo_loss(
                hidden, weight, target, batch["old_logprobs"], batch["advantages"], mask,
                clip_low=a.clip_low, clip_high=a.clip_high, max_log_ratio=a.max_log_ratio,
                reduction="none", impl=self.impl, return_stats=True)
        # The aggregation weights already hold the global normalizer (see loop.token_weights).
        return (loss_t * batch["token_weight"]).sum(), stats


def shard(policy: PolicyWithLoss, info: DistInfo) -> PolicyWithLoss:
    """FSDP2 per decoder block, then the root (which owns embeddings, final norm and lm_head)."""
    if info.world == 1:
        return policy
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    for block in policy.lm.get_decoder().layers:
        fully_shard(block, mesh=mesh)
    fully_shard(policy, mesh=mesh)
    return policy


def full_state_dict(policy: PolicyWithLoss, info: DistInfo, cpu: bool = False) -> dict:
    """The LM's whole, unsharded weights on every rank (plain tensors), for sampling engines."""
    if info.world == 1:
        sd = policy.lm.state_dict()
        return {k: v.detach().to("cpu") if cpu else v.detach() for k, v in sd.items()}
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(policy.lm, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=cpu,
                                                                   broadcast_from_rank0=False))


def set_gradient_sync(policy: nn.Module, enabled: bool) -> None:
    """FSDP2 reduce-scatters at every backward by default; skip it for all but the last
    micro-batch of an optimizer step."""
    if hasattr(policy, "set_requires_gradient_sync"):
        policy.set_requires_gradient_sync(enabled)
