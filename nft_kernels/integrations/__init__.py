"""Adapters that put the NFT loss into trainers people already run.

- ``nft_kernels.integrations.trl``: ``NFTTrainer`` / ``NFTConfig``, drop-in for TRL's
  ``GRPOTrainer`` / ``GRPOConfig`` (``pip install 'nft-kernels[trl]'``).
- ``nft_kernels.integrations.verl``: the policy loss ``"nft"`` in verl's policy-loss registry
  (``pip install 'nft-kernels[verl]'``).

Each checks, on import, that the peer package is installed in the version range it was tested
with, and says so in one line when it is not.
"""
