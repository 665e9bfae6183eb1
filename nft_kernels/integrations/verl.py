"""NFT as a verl policy loss: ``actor_rollout_ref.actor.policy_loss.loss_mode=nft``.

Installing nft-kernels registers this module as a verl plugin (entry point group
``verl.plugins``), so every process that imports verl, Ray workers included, has the losses
``"nft"`` (the paper's defaults) and ``"rft"`` (positives only) in verl's policy-loss registry.
Where plugins are switched off (``VERL_USE_EXTERNAL_PLUGINS=none``), ``import
nft_kernels.integrations.verl`` in the worker does the same.

verl hands a policy loss advantages, not rewards. NFT needs, per response, the binary reward r
and its prompt's correct rate r_hat. Both are recoverable when the advantages are group
baselines without std scaling (Dr. GRPO style, A = r - r_hat):

    algorithm.adv_estimator=grpo  algorithm.norm_adv_by_std_in_grpo=False

then r = [A > 0] and r_hat = r - A, and a group whose answers all agree has A = 0 (no signal;
its tokens get zero loss but still count in the aggregation, as with verl's own losses). The
loss checks this at run time (A constant along each response, |A| < 1, and with
``actor.rollout_n`` = K: r_hat a multiple of 1/K in [1/K, 1 - 1/K]) and raises a ValueError
that names the two settings otherwise. Continuous rewards cannot be recovered from advantages;
use the fused loss (``nft_kernels.fused_linear_nft_loss``) in your own actor for those.

Other NFT settings: ``register("my_nft", clip_negative=4.0, normalize=2)`` in a module of your
own that your workers import (or your own ``verl.plugins`` entry point).

verl's memory path: with ``actor_rollout_ref.model.use_fused_kernels=True`` and
``actor_rollout_ref.model.fused_kernel_options.impl_backend=nft_kernels``, verl's patched model
forward computes the log-probs and entropy of text models with ``fused_linear_logprobs`` from
the final hidden states (the [tokens, vocab] logits are never formed), for any policy loss.
"""
from __future__ import annotations

import functools

import torch

from ._versions import check_version

VERL_VERSION = check_version("verl")

from verl.trainer.ppo.core_algos import (
    POLICY_LOSS_REGISTRY,
    agg_loss,
    register_policy_loss,
)

from ..api import nft_loss
from ..validation import nft_head
from . import NFT_LOSS_DEFAULTS

PAPER_DEFAULTS = dict(NFT_LOSS_DEFAULTS)
ADVICE = ("the nft policy loss needs binary rewards with Dr. GRPO advantages A = r - mean(r): "
          "set algorithm.adv_estimator=grpo and algorithm.norm_adv_by_std_in_grpo=False")


def rewards_from_advantages(advantages: torch.Tensor, response_mask: torch.Tensor,
                            group_size: int | None = None, atol: float = 1e-4):
    """Per response: (r, r_hat, signal) from Dr. GRPO advantages, after checking their form."""
    mask = response_mask.bool()
    if advantages.shape != mask.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} and response_mask "
                         f"{tuple(mask.shape)} must have the same shape")
    adv = advantages.detach().float()
    big = torch.finfo(torch.float32).max
    a_max = torch.where(mask, adv, -big).amax(dim=-1)
    a_min = torch.where(mask, adv, big).amin(dim=-1)
    has_tokens = mask.any(dim=-1)
    a = torch.where(has_tokens, a_max, torch.zeros_like(a_max))
    if not torch.isfinite(adv[mask]).all():
        raise ValueError(f"advantages contain NaN or inf; {ADVICE}")
    spread = torch.where(has_tokens, a_max - a_min, torch.zeros_like(a_max))
    if (spread > atol).any():
        raise ValueError(f"advantages vary along a response (by up to {spread.max().item():.3g}); "
                         f"NFT needs one outcome advantage per response ({ADVICE})")
    if (a.abs() >= 1 - atol).any():
        raise ValueError(f"advantage {a.abs().max().item():.4g} is outside (-1, 1), so it is not "
                         f"r - mean(r) for a binary r ({ADVICE})")
    signal = has_tokens & (a.abs() > atol)
    r = (a > 0).float()
    rate = (r - a).clamp(0.0, 1.0)
    if group_size and group_size > 1 and signal.any():
        k = float(group_size)
        scaled = rate[signal] * k
        off_grid = (scaled - scaled.round()).abs() > atol * k
        out_of_range = (scaled.round() < 1) | (scaled.round() > k - 1)
        if (off_grid | out_of_range).any():
            bad = rate[signal][off_grid | out_of_range][0].item()
            raise ValueError(f"recovered correct rate r_hat = r - A = {bad:.6g} is not one of "
                             f"1/{group_size}, ..., {group_size - 1}/{group_size} "
                             f"(actor.rollout_n={group_size}); {ADVICE}")
    return r, rate, signal


def compute_policy_loss_nft(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                            advantages: torch.Tensor, response_mask: torch.Tensor,
                            loss_agg_mode: str = "token-mean", config=None,
                            rollout_is_weights: torch.Tensor | None = None, *,
                            settings: dict | None = None):
    """verl's PolicyLossFn signature; returns (aggregated loss, metrics)."""
    settings = {**PAPER_DEFAULTS, **(settings or {})}
    group_size = getattr(config, "rollout_n", None) if config is not None else None
    if not isinstance(group_size, int):
        group_size = None
    mask = response_mask.bool()
    r, rate, signal = rewards_from_advantages(advantages, mask, group_size)
    counted = mask & signal[:, None]
    width = log_prob.shape[-1]
    loss_mat = nft_loss(log_prob, old_log_prob.detach(), r[:, None].expand(-1, width),
                        rate[:, None].expand(-1, width), counted, reduction="none", **settings)
    loss_mat = loss_mat.to(log_prob.dtype)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    batch_info = dict(getattr(config, "global_batch_info", None) or {}) if config is not None \
        else {}
    pg_loss = agg_loss(loss_mat=loss_mat, loss_mask=mask, loss_agg_mode=loss_agg_mode,
                       **batch_info)
    with torch.no_grad():
        log_ratio = (log_prob - old_log_prob).float()
        n = counted.sum().clamp(min=1)
        metrics = {
            "actor/ppo_kl": float((-log_ratio * mask).sum() / mask.sum().clamp(min=1)),
            "actor/nft_ratio_mean": float((log_ratio.exp() * counted).sum() / n),
            "actor/nft_signal_fraction": float(signal.float().mean()) if signal.numel() else 0.0,
        }
    return pg_loss, metrics


def register(name: str = "nft", **settings):
    """Register an NFT policy loss under ``name`` with these ``nft_loss`` settings (the paper's
    defaults otherwise); returns the registered function."""
    merged = {**PAPER_DEFAULTS, **settings}
    unknown = set(merged) - set(PAPER_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown NFT setting(s) {sorted(unknown)}; known: "
                        f"{sorted(PAPER_DEFAULTS)}")
    nft_head(neg_weight=merged["neg_weight"], normalize=merged["normalize"],   # ValueError
             clip_negative=merged["clip_negative"], rate_clamp=tuple(merged["rate_clamp"]),
             max_log_ratio=merged["max_log_ratio"])                        # naming it
    existing = POLICY_LOSS_REGISTRY.get(name)
    if existing is not None and getattr(existing, "nft_settings", None) is None:
        raise ValueError(f"verl already has a policy loss named {name!r} that is not NFT's; "
                         f"pick another name")
    fn = functools.partial(compute_policy_loss_nft, settings=merged)
    fn.nft_settings = merged
    return register_policy_loss(name)(fn)


register("nft")
register("rft", neg_weight=0.0, normalize=0)


# ---- verl's memory path: log-probs and entropy from hidden states, by nft-kernels -------------
FUSED_BACKEND = "nft_kernels"
# Multimodal models have their own patched forwards in verl; only text models are served here.
_MULTIMODAL = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5",
               "qwen3_5_moe", "kimi_vl")


def forward_with_nft_kernels(self, input_ids=None, attention_mask=None, position_ids=None,
                             past_key_values=None, inputs_embeds=None, labels=None,
                             use_cache=None, output_attentions=None, output_hidden_states=None,
                             return_dict=None, cache_position=None, logits_to_keep=0,
                             temperature=1.0, shift_labels=None, **loss_kwargs):
    """verl's fused-kernel forward (``forward_with_torch_backend`` in
    ``verl.models.transformers.dense_common``), with the log-probs and entropy of the next
    tokens computed by ``fused_linear_logprobs`` from the final hidden states: no logits."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    from ..api import fused_linear_logprobs

    del logits_to_keep, loss_kwargs
    outputs = forward_base_model(
        self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        cache_position=cache_position)
    if shift_labels is not None:        # labels already rolled by verl (Ulysses SP)
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("the nft_kernels fused forward needs labels or input_ids")
    head = self.get_output_embeddings()
    log_probs, entropy = fused_linear_logprobs(
        outputs[0], head.weight, rolled.to(torch.int64), bias=head.bias,
        temperature=temperature, return_entropy=True)
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy,
                                past_key_values=outputs.past_key_values,
                                hidden_states=outputs.hidden_states,
                                attentions=outputs.attentions)


def _install_fused_backend() -> None:
    """Accept ``fused_kernel_options.impl_backend=nft_kernels`` in verl's model patching (which
    otherwise skips, silently, any backend but triton / torch / liger)."""
    try:
        from verl.models.transformers import monkey_patch
    except ImportError:  # a verl without the fused-kernel path: nothing to extend
        return
    original = monkey_patch.patch_forward_with_backends
    if getattr(original, "nft_kernels", False):
        return

    @functools.wraps(original)
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if not (use_fused_kernels and fused_kernels_backend == FUSED_BACKEND):
            return original(model, use_fused_kernels=use_fused_kernels,
                            fused_kernels_backend=fused_kernels_backend)
        if model.config.model_type in _MULTIMODAL:
            raise ValueError(f"fused_kernels_backend={FUSED_BACKEND!r} serves text models; "
                             f"{model.config.model_type} has its own fused forward in verl: "
                             f"use impl_backend=torch or triton for it")
        model._verl_fused_kernels_backend = FUSED_BACKEND
        model.__class__.forward = forward_with_nft_kernels
        return None

    patch_forward_with_backends.nft_kernels = True
    monkey_patch.patch_forward_with_backends = patch_forward_with_backends


_install_fused_backend()
