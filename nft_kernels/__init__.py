"""nft-kernels: fused Triton kernels for NFT (Negative-aware Fine-Tuning, arXiv 2505.18116)
and its baselines (RFT, GRPO, Dr. GRPO, DAPO), exact against a float64 reference."""

from . import losses
from .api import (
    fused_linear_logprobs,
    fused_linear_nft_loss,
    fused_linear_policy_loss,
    fused_linear_ppo_loss,
    nft_loss,
    policy_loss,
    ppo_clip_loss,
)
from .backend import extra_memory_bytes
from .heads import HeadSpec
from .modules import (
    FusedLinearNFTLoss,
    FusedLinearPolicyLoss,
    FusedLinearPPOLoss,
    NFTLoss,
    PPOClipLoss,
)

__version__ = "0.1.0"

__all__ = [
    "FusedLinearNFTLoss",
    "FusedLinearPolicyLoss",
    "FusedLinearPPOLoss",
    "HeadSpec",
    "NFTLoss",
    "PPOClipLoss",
    "extra_memory_bytes",
    "fused_linear_logprobs",
    "fused_linear_nft_loss",
    "fused_linear_policy_loss",
    "fused_linear_ppo_loss",
    "losses",
    "nft_loss",
    "policy_loss",
    "ppo_clip_loss",
]
