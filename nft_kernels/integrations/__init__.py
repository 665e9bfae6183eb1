"""Adapters that put the NFT loss into trainers people already run.

- ``nft_kernels.integrations.trl``: ``NFTTrainer`` / ``NFTConfig``, drop-in for TRL's
  ``GRPOTrainer`` / ``GRPOConfig`` (``pip install 'nft-kernels[trl]'``).
- ``nft_kernels.integrations.verl``: the policy loss ``"nft"`` in verl's policy-loss registry
  (``pip install 'nft-kernels[verl]'``).

Each checks, on import, that the peer package is installed in the version range it was tested
with, and says so in one line when it is not.
"""

import inspect

from ..api import nft_loss

# The NFT loss settings an adapter exposes, with nft_loss's own defaults (the paper's).
NFT_LOSS_DEFAULTS = {name: inspect.signature(nft_loss).parameters[name].default
                     for name in ("neg_weight", "normalize", "clip_negative", "rate_clamp",
                                  "max_log_ratio")}
