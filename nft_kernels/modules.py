"""nn.Module forms of the losses, holding their options (as Liger-Kernel's modules do)."""

from __future__ import annotations

from torch import nn

from .api import (fused_linear_nft_loss, fused_linear_policy_loss, fused_linear_ppo_loss,
                  nft_loss, ppo_clip_loss)


class _OptionsModule(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.options = options

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearNFTLoss(_OptionsModule):
    """``loss = FusedLinearNFTLoss(normalize=1)(hidden, lm_head.weight, target, old, r, r_hat,
    mask, bias=lm_head.bias)``; options as in ``fused_linear_nft_loss``; the per-token
    ``token_weights`` and ``ref_logprobs`` are given per call."""

    def forward(self, hidden, weight, target, old_logprobs, rewards, correct_rate, mask=None,
                bias=None, token_weights=None, ref_logprobs=None):
        return fused_linear_nft_loss(hidden, weight, target, old_logprobs, rewards,
                                     correct_rate, mask, bias=bias, token_weights=token_weights,
                                     ref_logprobs=ref_logprobs, **self.options)


class FusedLinearPPOLoss(_OptionsModule):
    """PPO-clip (GRPO / Dr. GRPO / DAPO) on hidden states; options as in
    ``fused_linear_ppo_loss``."""

    def forward(self, hidden, weight, target, old_logprobs, advantages, mask=None, bias=None,
                token_weights=None, ref_logprobs=None):
        return fused_linear_ppo_loss(hidden, weight, target, old_logprobs, advantages, mask,
                                     bias=bias, token_weights=token_weights,
                                     ref_logprobs=ref_logprobs, **self.options)


class FusedLinearPolicyLoss(_OptionsModule):
    """A user-defined per-token loss fused with the LM head:
    ``FusedLinearPolicyLoss(losses.cispo(5.0), reduction="mean")(hidden, lm_head.weight,
    target, mask, per_token={"old_logprobs": old, "advantages": adv})``; options as in
    ``fused_linear_policy_loss``."""

    def __init__(self, loss_fn, **options):
        super().__init__(**options)
        self.loss_fn = loss_fn

    def forward(self, hidden, weight, target, mask=None, per_token=None, bias=None,
                token_weights=None, ref_logprobs=None):
        return fused_linear_policy_loss(hidden, weight, target, self.loss_fn, mask,
                                        per_token=per_token, bias=bias,
                                        token_weights=token_weights, ref_logprobs=ref_logprobs,
                                        **self.options)


class NFTLoss(_OptionsModule):
    """NFT on given log-probs; options as in ``nft_loss``."""

    def forward(self, logprobs, old_logprobs, rewards, correct_rate, mask=None,
                token_weights=None, ref_logprobs=None):
        return nft_loss(logprobs, old_logprobs, rewards, correct_rate, mask,
                        token_weights=token_weights, ref_logprobs=ref_logprobs, **self.options)


class PPOClipLoss(_OptionsModule):
    """PPO-clip on given log-probs; options as in ``ppo_clip_loss``."""

    def forward(self, logprobs, old_logprobs, advantages, mask=None, token_weights=None,
                ref_logprobs=None):
        return ppo_clip_loss(logprobs, old_logprobs, advantages, mask,
                             token_weights=token_weights, ref_logprobs=ref_logprobs,
                             **self.options)
