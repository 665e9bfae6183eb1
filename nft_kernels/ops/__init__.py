"""Triton kernels, one per file (import only when Triton is usable: a CUDA device, or CPU
tensors under TRITON_INTERPRET=1). Users import ``nft_kernels``, not this package."""
