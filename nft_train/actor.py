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

from .config import USER_HEAD_LOSSES, AlgoConfig, ModelConfig


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


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are fast here: CUDA with bf16, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """model.compute_dtype -> the dtype of the forward's matmuls."""
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return torch.bfloat16 if name == "bfloat16" else torch.float32


class PolicyWithLoss(nn.Module):
    """``forward(batch)`` -> (loss, stats) for training, or (logprobs, entropy) with
    ``logprobs_only=True`` (old log-probs, recomputed with the same kernel, so on-policy R = 1).

    With a bf16 ``compute_dtype`` and fp32 parameters the forward runs under autocast (mixed
    precision: bf16 matmuls, fp32 master weights and optimizer state); the fused loss then
    runs its GEMMs on bf16 copies of the hidden states and the head, keeping fp32 log-probs."""

    def __init__(self, lm: nn.Module, algo: AlgoConfig, impl: str = "auto",
                 compute_dtype: torch.dtype = torch.float32, mode: str = "auto",
                 temperature: float = 1.0):
        super().__init__()
        self.lm, self.algo, self.impl, self.mode = lm, algo, impl, mode
        self.compute_dtype = compute_dtype
        # The sampler's temperature: every log-prob (old, updated) is of the policy that drew
        # the tokens, softmax(z / T), as TRL and verl score them (TRL #4159).
        self.temperature = float(temperature)

    def _hidden(self, input_ids, attention_mask):
        out = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                    use_cache=False)
        return out.last_hidden_state[:, :-1]          # position t predicts token t + 1

    def forward(self, batch: dict, logprobs_only: bool = False):
        device_type = batch["input_ids"].device.type
        mixed = self.compute_dtype != torch.float32 and \
            self.lm.get_output_embeddings().weight.dtype == torch.float32
        with torch.autocast(device_type, dtype=self.compute_dtype, enabled=mixed):
            return self._forward(batch, logprobs_only)

    def _forward(self, batch: dict, logprobs_only: bool):
        hidden = self._hidden(batch["input_ids"], batch["attention_mask"])
        weight = self.lm.get_output_embeddings().weight
        target = batch["input_ids"][:, 1:]
        mask = batch["loss_mask"]
        if logprobs_only:
            return nft_kernels.fused_linear_logprobs(hidden, weight, target, mask=mask,
                                                     return_entropy=True, impl=self.impl,
                                                     mode=self.mode,
                                                     temperature=self.temperature)
        entropy = None
        if "old_logprobs" not in batch:
            # Strictly on-policy (the trainer's shortcut): pi_old is this forward's own policy.
            # Its log-probs from the same hidden states and the same kernel as the loss's are
            # what a separate no-grad pass would give, bit for bit, so R = 1 exactly.
            with torch.no_grad():
                batch["old_logprobs"], entropy = nft_kernels.fused_linear_logprobs(
                    hidden.detach(), weight.detach(), target, mask=mask, return_entropy=True,
                    impl=self.impl, mode=self.mode, temperature=self.temperature)
        loss, stats = self._loss(hidden, weight, target, mask, batch)
        if entropy is not None:
            stats["old_entropy"] = entropy
        return loss, stats

    def _loss(self, hidden, weight, target, mask, batch: dict):
        a = self.algo
        # The aggregation weights hold the global normalizer (see loop.token_weights); as the
        # loss's token weights they make it one scalar whose gradients the chunked mode
        # computes in the forward (6NHV instead of 8NHV for the LM head).
        common = dict(token_weights=batch["token_weight"], reduction="sum", impl=self.impl,
                      mode=self.mode, return_stats=True, max_log_ratio=a.max_log_ratio,
                      temperature=self.temperature)
        if a.loss == "nft":
            return nft_kernels.fused_linear_nft_loss(
                hidden, weight, target, batch["old_logprobs"], batch["rewards"],
                batch["correct_rate"], mask, neg_weight=a.neg_weight, normalize=a.normalize,
                clip_negative=a.clip_negative, rate_clamp=tuple(a.rate_clamp), **common)
        if a.loss in USER_HEAD_LOSSES:
            loss_fn, per_token = _user_head(a, batch)
            del common["max_log_ratio"]
            return nft_kernels.fused_linear_policy_loss(hidden, weight, target, loss_fn, mask,
                                                        per_token=per_token, **common)
        return nft_kernels.fused_linear_ppo_loss(
            hidden, weight, target, batch["old_logprobs"], batch["advantages"], mask,
            clip_low=a.clip_low, clip_high=a.clip_high, **common)


def _user_head(a: AlgoConfig, batch: dict):
    """(loss_fn, per-token inputs) of the algo.loss values that are user-defined heads."""
    if a.loss == "cispo":
        return (nft_kernels.losses.cispo(a.cispo_clip_max),
                {"old_logprobs": batch["old_logprobs"], "advantages": batch["advantages"]})
    if a.loss == "sapo":
        return (nft_kernels.losses.sapo(a.sapo_temperature_pos, a.sapo_temperature_neg),
                {"old_logprobs": batch["old_logprobs"], "advantages": batch["advantages"]})
    return nft_kernels.losses.w_reinforce(a.positive_weight), {"rewards": batch["rewards"]}


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
