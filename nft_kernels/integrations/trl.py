"""NFT in TRL: ``NFTTrainer`` and ``NFTConfig``, drop-in for ``GRPOTrainer`` / ``GRPOConfig``.

    from nft_kernels.integrations.trl import NFTConfig, NFTTrainer

    args = NFTConfig(output_dir="out", num_generations=8, nft_normalize=1)   # was GRPOConfig
    trainer = NFTTrainer(model=model, reward_funcs=verifier, args=args,      # was GRPOTrainer
                         train_dataset=dataset)
    trainer.train()

TRL samples, scores and batches exactly as for GRPO; only the loss changes. Per completion the
trainer keeps its reward r (the reward functions' weighted sum, which must lie in [0, 1]) and the
mean reward r_hat of its group, and the loss is ``fused_linear_nft_loss`` (paper Eq. 8) on the
policy's final hidden states and ``lm_head`` weight: the [tokens, vocab] logits of the loss pass
are never formed. Aggregation over tokens follows ``loss_type`` exactly as TRL's GRPO does
("grpo", "bnpo", "dr_grpo", "dapo"), so with ``nft_normalize=2`` the first (on-policy) step's
gradient is GRPO's (Prop. 4.2), up to TRL's unbiased std; see tests/test_integration_trl.py.

TRL has no dynamic sampling: a group whose answers all score the same gets zero weight (GRPO
gives it zero advantage) and, as in TRL, still counts in the token normalizer.

``beta != 0`` adds TRL's KL penalty to the reference model, beta * (e^x - x - 1) with
x = ref - logp per token (``kl_estimator="k3_unclipped"``; times the token's ratio with TRL's
``use_bias_correction_kl``, its default), aggregated like the loss; TRL computes the reference
log-probs as for GRPO. One difference: with vLLM's importance-sampling
correction on, that weight multiplies the KL term too (TRL applies it to the policy term only).
Tokens of groups whose answers all agree carry no NFT signal (GRPO: A = 0) but do carry the KL
penalty and the entropy bonus, as in TRL: they go through a second fused call whose policy term
is exactly zero (r = 0 with neg_weight = 0), so the KL and entropy terms cover every completion
token, as TRL's do.

``entropy_coef`` (TRL's entropy bonus, - c times the token mean of the entropy) works with
``loss_type`` "dapo", "bnpo" and "dr_grpo" without vLLM's importance-sampling correction (then
every token's weight is one multiple of the token mean's, and the coefficient is rescaled).

Logged beside TRL's own keys, meaning what GRPOTrainer's mean: ``entropy`` (over every
completion token), ``kl`` (with ``beta != 0``), and ``clip_ratio/*`` for NFT's own clips:
``clip_ratio/negative_mean`` (negative tokens whose implicit negative policy is held at
epsilon), ``clip_ratio/max_log_ratio_mean`` (tokens whose log-ratio reached
``nft_max_log_ratio``), ``clip_ratio/region_mean`` (either); ``nft/signal_fraction`` is the
share of completions in groups with mixed rewards. On-policy steps (``num_iterations=1``, the
first iteration otherwise) log ``loss`` 0: R = 1 and -log 1 = 0, while the gradient is not
zero (a note says so once).

Not supported (a clear error at construction): the entropy bonus with ``loss_type="grpo"`` or
with vLLM's importance-sampling correction, the adaptive entropy controller, high-entropy token
masks, ``importance_sampling_level="sequence"`` (NFT's ratio is per token), the
off-policy mask, two-sided clipping (``delta``), loss types other than the four above,
DeepSpeed ZeRO-3, reward weights whose weighted sum can leave [0, 1].
GRPO-only knobs (``epsilon``, ``epsilon_high``, ``scale_rewards``) have no effect on NFT: set
to anything but their defaults they draw one warning at construction.
"""
from __future__ import annotations

import functools
import re
import types
import warnings
from dataclasses import dataclass, field

import torch

from ._versions import check_version

TRL_VERSION = check_version("trl")

from trl import GRPOConfig, GRPOTrainer

from ..api import fused_linear_logprobs, fused_linear_nft_loss
from ..validation import nft_head
from . import NFT_LOSS_DEFAULTS

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# the loss's argument -> the NFTConfig field that sets it (for error messages)
CONFIG_FIELDS = {"neg_weight": "nft_neg_weight", "normalize": "nft_normalize",
                 "clip_negative": "nft_clip_negative", "rate_clamp": "nft_rate_clamp",
                 "max_log_ratio": "nft_max_log_ratio"}
# GRPO's knobs that NFT's loss does not read, with GRPOConfig's defaults
GRPO_ONLY = {"epsilon": 0.2, "epsilon_high": None, "scale_rewards": "group"}


def warn_grpo_only(args) -> list[str]:
    """One warning naming each GRPO-only setting changed from its default (a ported DAPO
    recipe's clip-higher or reward scaling would otherwise do nothing, silently)."""
    changed = [f"{name}={getattr(args, name)!r}" for name, default in GRPO_ONLY.items()
               if getattr(args, name, default) != default]
    if changed:
        warnings.warn(f"NFTTrainer: {', '.join(changed)} have no effect on the NFT loss (GRPO's "
                      "PPO clip and reward scaling; NFT's clip is nft_clip_negative and its "
                      "prompt weight nft_normalize)", UserWarning, stacklevel=3)
    return changed


def check_reward_weights(weights, names) -> None:
    """NFT needs each completion's reward in [0, 1]. With reward functions that return [0, 1]
    (binary verifiers), the weighted sum stays there only if no weight is negative and the
    weights sum to at most 1; refuse other weights now rather than mid-run."""
    weights = [float(w) for w in weights]
    listed = ", ".join(f"{n}: {w:g}" for n, w in zip(names, weights))
    if any(w < 0 for w in weights):
        raise ValueError(f"NFTTrainer: reward_weights must not be negative for NFT (rewards are "
                         f"in [0, 1], 1 = correct); got {listed}. Make the reward function "
                         f"return 1 - its value instead of weighting it negatively.")
    total = sum(weights)
    if total > 1 + 1e-6:
        fixed = ", ".join(f"{w / total:.3g}" for w in weights)
        raise ValueError(f"NFTTrainer: reward_weights sum to {total:g}, so the weighted reward "
                         f"can exceed 1 (NFT needs rewards in [0, 1]); got {listed}. Scale them "
                         f"to sum to 1: reward_weights=[{fixed}].")


@dataclass
class NFTConfig(GRPOConfig):
    """``GRPOConfig`` plus the NFT loss's settings (see ``nft_kernels.fused_linear_nft_loss``)."""

    nft_neg_weight: float = field(default=NFT_LOSS_DEFAULTS["neg_weight"], metadata={
        "help": "Weight of the negative (r=0) term: 1 = NFT, 0 = RFT."})
    nft_normalize: int = field(default=NFT_LOSS_DEFAULTS["normalize"], metadata={
        "help": "Prompt weight omega: 0 -> 1, 1 -> 1 - r_hat (~Dr. GRPO), 2 -> sqrt((1-r_hat)/r_hat) "
                "(~GRPO)."})
    nft_clip_negative: float = field(default=NFT_LOSS_DEFAULTS["clip_negative"], metadata={
        "help": "epsilon of max_st((1 - r_hat R)/(1 - r_hat), epsilon) in the negative term."})
    nft_rate_clamp: list[float] = field(
        default_factory=lambda: list(NFT_LOSS_DEFAULTS["rate_clamp"]), metadata={
        "help": "r_hat is clamped to this range."})
    nft_max_log_ratio: float = field(default=NFT_LOSS_DEFAULTS["max_log_ratio"], metadata={
        "help": "R = exp(min(logp - old_logp, this))."})
    nft_impl: str = field(default="auto", metadata={
        "help": "nft_kernels backend: auto | triton | torch."})

    def __post_init__(self):
        super().__post_init__()
        check_supported(self)


def check_supported(args) -> dict:
    """Refuse GRPO options that NFT does not have, naming the argument; return the loss kwargs."""
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"NFTTrainer supports loss_type in {LOSS_TYPES} (token aggregation as in "
                         f"GRPO), got loss_type={args.loss_type!r}")
    refusals = [
        ("importance_sampling_level", args.importance_sampling_level != "token",
         "NFT's ratio is per token; set importance_sampling_level='token'"),
        ("top_entropy_quantile", args.top_entropy_quantile < 1.0,
         "the high-entropy token mask is not supported; set top_entropy_quantile=1.0"),
        ("use_adaptive_entropy", getattr(args, "use_adaptive_entropy", False),
         "the adaptive entropy controller is not supported; set use_adaptive_entropy=False"),
        ("entropy_coef", args.entropy_coef != 0.0 and args.loss_type == "grpo",
         "with loss_type='grpo' the policy term's per-sequence weights differ from the entropy "
         "bonus's token mean; use loss_type='dapo', 'bnpo' or 'dr_grpo', or entropy_coef=0.0"),
        ("entropy_coef", args.entropy_coef != 0.0 and getattr(args, "use_vllm", False)
         and getattr(args, "vllm_importance_sampling_correction", False),
         "TRL does not importance-weight the entropy bonus, and one set of token weights cannot "
         "leave it out; set vllm_importance_sampling_correction=False or entropy_coef=0.0"),
        ("off_policy_mask_threshold", args.off_policy_mask_threshold is not None,
         "the off-policy sequence mask is not supported; leave it None"),
        ("delta", args.delta is not None, "two-sided clipping is a GRPO option; leave it None"),
    ]
    for name, bad, why in refusals:
        if bad:
            raise ValueError(f"NFTTrainer: {name}={getattr(args, name)!r} is not supported ({why})")
    if args.nft_impl not in ("auto", "triton", "torch"):
        raise ValueError(f"nft_impl must be one of auto, triton, torch, got {args.nft_impl!r}")
    rate_clamp = tuple(args.nft_rate_clamp)
    if len(rate_clamp) != 2:
        raise ValueError(f"nft_rate_clamp must be two numbers [low, high], got "
                         f"{args.nft_rate_clamp!r}")
    try:
        nft_head(neg_weight=args.nft_neg_weight, normalize=args.nft_normalize,
                 clip_negative=args.nft_clip_negative, rate_clamp=rate_clamp,
                 max_log_ratio=args.nft_max_log_ratio)
    except ValueError as err:   # the kernel names its argument; the user set the config field
        message = str(err)
        for kernel, config in CONFIG_FIELDS.items():
            message = re.sub(rf"(?<![\w.]){kernel}\b", config, message)
        raise ValueError(f"NFTConfig: {message}") from None
    return {"neg_weight": args.nft_neg_weight, "normalize": args.nft_normalize,
            "clip_negative": args.nft_clip_negative, "rate_clamp": rate_clamp,
            "max_log_ratio": args.nft_max_log_ratio}


def _install_hidden_state_head(model) -> None:
    """Let ``model(..., nft_head=fn)`` run the backbone and return ``fn(last_hidden_state,
    lm_head)``, so the fused loss runs inside the model's forward (DDP / FSDP hooks see it) and
    the logits are never formed. Without ``nft_head`` the forward is unchanged."""
    if getattr(model, "_nft_head_installed", False):
        return
    inner = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, nft_head=None, **kwargs):
        if nft_head is None:
            return inner(*args, **kwargs)
        kwargs["use_cache"] = False
        backbone = self.base_model(*args, **kwargs)
        return nft_head(backbone.last_hidden_state, self.get_output_embeddings())

    model.forward = types.MethodType(forward, model)
    model._nft_head_installed = True


class NFTTrainer(GRPOTrainer):
    """``GRPOTrainer`` with the NFT loss. Takes ``NFTConfig`` (a plain ``GRPOConfig`` gets the
    NFT defaults)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, default in NFTConfig.__dataclass_fields__.items():
            if name.startswith("nft_") and not hasattr(self.args, name):
                value = default.default_factory() if callable(default.default_factory) \
                    else default.default
                setattr(self.args, name, value)
        self._nft_loss_kwargs = check_supported(self.args)
        warn_grpo_only(self.args)
        check_reward_weights(self.reward_weights.tolist(), self.reward_func_names)
        self._nft_noted_zero_loss = False
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
        if is_deepspeed_zero3_enabled():
            raise ValueError("NFTTrainer: DeepSpeed ZeRO-3 is not supported (the fused loss reads "
                             "lm_head.weight directly); use ZeRO-2 or FSDP")
        from accelerate.utils import is_peft_model
        _install_hidden_state_head(self.model.get_base_model() if is_peft_model(self.model)
                                   else self.model)
        self._nft_rewards_per_func = None

    # -- keep r and r_hat per completion (TRL itself keeps only the advantages) --
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        self._nft_rewards_per_func = rewards_per_func      # gathered over processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        per_func = self._nft_rewards_per_func
        self._nft_rewards_per_func = None
        weights = self.reward_weights.to(per_func.device)
        rewards = (per_func * weights).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan       # unscorable: no signal
        scored = rewards[~torch.isnan(rewards)]
        if scored.numel() and (scored.min() < 0 or scored.max() > 1):
            names = ", ".join(self.reward_func_names)
            raise ValueError(f"NFT needs rewards in [0, 1] (the reward functions' weighted sum; "
                             f"reward_funcs: {names}, reward_weights: {weights.tolist()}), got "
                             f"values in [{scored.min().item():.4g}, {scored.max().item():.4g}]")
        mode = "train" if self.model.training else "eval"
        k = self.num_generations if mode == "train" else self.num_generations_eval
        rate = torch.nanmean(rewards.view(-1, k), dim=1).repeat_interleave(k)
        n_local = output["prompt_ids"].size(0)
        local = slice(self.accelerator.process_index * n_local,
                      (self.accelerator.process_index + 1) * n_local)
        output["nft_rewards"] = rewards[local]
        output["nft_correct_rate"] = rate[local]
        return output

    # -- the loss --
    def _compute_loss(self, model, inputs):
        if "nft_rewards" not in inputs:
            raise RuntimeError("NFTTrainer: the batch has no rewards; was it made by "
                               "NFTTrainer._generate_and_score_completions?")
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        rewards, rate = inputs["nft_rewards"], inputs["nft_correct_rate"]
        # Groups whose answers all agree, and unscorable answers, carry no signal (GRPO: A = 0).
        signal = torch.isfinite(rewards) & (rate > 0) & (rate < 1)
        counted = mask.bool() & signal[:, None]
        width = completion_ids.size(1)
        per_token = {name: t[:, None].expand(-1, width).nan_to_num(0.5).float()
                     for name, t in (("rewards", rewards), ("rate", rate))}
        old = inputs.get("old_per_token_logps")
        loss_kwargs, impl, temperature = self._nft_loss_kwargs, self.args.nft_impl, self.temperature
        # TRL's aggregation (and vLLM's importance-sampling correction) as per-token weights, so
        # the fused loss is one weighted sum: its gradients are computed in the forward.
        weights = self._token_weights(mask, inputs)
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights = weights * inputs["importance_sampling_ratio"]
        weights = weights.expand_as(mask).float().contiguous()
        terms = {}  # TRL's entropy bonus and KL penalty, when on
        if self.args.entropy_coef != 0.0:
            # TRL's bonus is - c * (token mean of H) / accumulation. With loss_type dapo, bnpo or
            # dr_grpo (no IS correction: check_supported) every token's weight is the same
            # multiple of 1 / (tokens * accumulation), so a rescaled coefficient on our weights
            # gives exactly that term.
            total = float(weights[mask.bool()].sum())
            if total > 0:
                accumulation = (self.current_gradient_accumulation_steps
                                if self.model.training else 1.0)
                terms["entropy_coef"] = self.args.entropy_coef / (accumulation * total)
        if self.beta != 0.0:  # TRL's per_token_kl, k3 unclipped, against its reference model
            terms.update(ref_logprobs=inputs["ref_per_token_logps"].float(), beta=self.beta,
                         kl_estimator="k3_unclipped",
                         kl_bias_correction=bool(getattr(self.args, "use_bias_correction_kl",
                                                         False)))

        # Completion tokens of groups with no signal: no policy term (GRPO: A = 0), but TRL's
        # KL and entropy terms and its logged entropy cover them.
        silent = mask.bool() & ~signal[:, None]
        regularized = bool(terms)
        if old is None and not self._nft_noted_zero_loss and self.model.training:
            self._nft_noted_zero_loss = True
            print("NFTTrainer: on an on-policy step the NFT term of `loss` is 0 (R = 1 and "
                  "-log 1 = 0; `loss` then shows only the entropy / KL terms) while its gradient "
                  "is not - watch grad_norm, reward and nft/signal_fraction")

        def head(hidden, lm_head):
            hidden = hidden[:, -width - 1:-1]          # the positions that predict the completion
            weight, bias = lm_head.weight, lm_head.bias
            if hasattr(weight, "full_tensor"):         # FSDP2 shards: gather the head once
                weight = weight.full_tensor()
                bias = bias.full_tensor() if bias is not None else None
            common = dict(bias=bias, temperature=temperature, impl=impl)
            old_logp = old
            if old_logp is None:
                # on-policy: the same kernel on the same rows as each loss call, so R == 1
                with torch.no_grad():
                    old_logp = fused_linear_logprobs(hidden, weight, completion_ids,
                                                     mask=counted, **common)
                    if regularized and silent.any():
                        old_logp = torch.where(silent, fused_linear_logprobs(
                            hidden, weight, completion_ids, mask=silent, **common), old_logp)
            loss, stats = fused_linear_nft_loss(
                hidden, weight, completion_ids, old_logp, per_token["rewards"], per_token["rate"],
                counted, token_weights=weights, reduction="sum", return_stats=True, **common,
                **terms, **loss_kwargs)
            if silent.any():
                if regularized:   # r = 0 with neg_weight = 0: the policy term is exactly 0
                    extra, silent_stats = fused_linear_nft_loss(
                        hidden, weight, completion_ids, old_logp, torch.zeros_like(weights),
                        per_token["rate"], silent, token_weights=weights, reduction="sum",
                        return_stats=True, **common, **terms,
                        **dict(loss_kwargs, neg_weight=0.0, normalize=0))
                    loss = loss + extra
                else:             # only the logged entropy needs them: forward only
                    with torch.no_grad():
                        logp, entropy = fused_linear_logprobs(
                            hidden, weight, completion_ids, mask=silent, return_entropy=True,
                            **common)
                    silent_stats = {"logprobs": logp, "entropy": entropy}
                stats = {k: torch.where(silent, silent_stats[k], stats[k])
                         for k in ("logprobs", "entropy")}
            stats["old_logprobs"] = old_logp
            return loss, stats

        loss, stats = model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                            attention_mask=torch.cat([inputs["prompt_mask"],
                                                      inputs["completion_mask"]], dim=1),
                            nft_head=head)
        self._log_nft_metrics(stats, inputs, mask.bool(), counted, signal)
        return loss

    def _token_weights(self, mask, inputs):
        """Each token's weight in TRL's GRPO ``_compute_loss`` aggregation for the same
        ``loss_type``: the loss is sum(per_token_loss * weights)."""
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        mask = mask.float()
        if self.loss_type == "grpo":         # mean over sequences of the per-sequence mean
            per_seq = mask.sum(-1, keepdim=True).clamp(min=1.0)
            return mask / per_seq / mask.size(0) / accumulation
        if self.loss_type == "bnpo":
            return mask / mask.sum().clamp(min=1.0) / accumulation
        if self.loss_type == "dr_grpo":
            return mask / (mask.size(0) * self.max_completion_length) / accumulation
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * self.current_gradient_accumulation_steps \
                / self.args.steps_per_generation
        return mask / normalizer                                       # "dapo"

    def _log_nft_metrics(self, stats, inputs, mask, counted, signal) -> None:
        """TRL's keys with TRL's meaning (token means over every completion token of all
        processes), and NFT's clips under clip_ratio/."""
        mode = "train" if self.model.training else "eval"
        logp, old = stats["logprobs"].float(), stats["old_logprobs"].float()
        log_ratio = logp - old
        rewards = inputs["nft_rewards"].nan_to_num(0.5)[:, None]
        rate = inputs["nft_correct_rate"].nan_to_num(0.5)[:, None].clamp(
            *self._nft_loss_kwargs["rate_clamp"])
        ratio = torch.exp(log_ratio.clamp(max=self._nft_loss_kwargs["max_log_ratio"]))
        # Eq. 8's negative term holds (1 - r_hat R)/(1 - r_hat) at epsilon where it falls below
        negative = counted & (rewards < 1)
        held = negative & ((1 - rate * ratio) / (1 - rate) < self._nft_loss_kwargs["clip_negative"])
        capped = counted & (log_ratio >= self._nft_loss_kwargs["max_log_ratio"])
        parts = [(stats["entropy"] * mask).sum(), mask.sum().float(),
                 held.sum().float(), capped.sum().float(), (held | capped).sum().float(),
                 signal.float().sum(),
                 torch.tensor(float(signal.numel()), device=signal.device)]
        if self.beta != 0.0:   # TRL's per_token_kl: e^x - x - 1, x = ref - logp
            x = inputs["ref_per_token_logps"].float() - logp
            parts.append(((torch.exp(x) - x - 1) * mask).sum())
        sums = self.accelerator.reduce(torch.stack(parts), reduction="sum").tolist()
        metrics = self._metrics[mode]
        tokens = max(sums[1], 1.0)   # fractions of all completion tokens, as TRL's clip_ratio
        metrics["entropy"].append(sums[0] / tokens)
        metrics["clip_ratio/negative_mean"].append(sums[2] / tokens)
        metrics["clip_ratio/max_log_ratio_mean"].append(sums[3] / tokens)
        metrics["clip_ratio/region_mean"].append(sums[4] / tokens)
        metrics["nft/signal_fraction"].append(sums[5] / sums[6])
        if self.beta != 0.0:
            metrics["kl"].append(sums[7] / tokens)
