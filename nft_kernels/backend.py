"""Which implementation runs: the Triton kernels or the chunked PyTorch path.

``impl="auto"`` picks Triton for CUDA tensors, and for CPU tensors when ``TRITON_INTERPRET=1``
was set before the kernels were first used (the Triton interpreter); otherwise the chunked
PyTorch path. ``impl="triton"`` / ``impl="torch"`` force one.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import chunked_torch

IMPLS = ("auto", "triton", "torch")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_module():
    from . import triton_launch  # noqa: PLC0415 - imported on first use on purpose

    return triton_launch


def resolve(impl: str, device: torch.device):
    """The module (``triton_launch`` or ``chunked_torch``) that will run on ``device``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return chunked_torch
    usable = triton_installed() and (device.type == "cuda" or interpreter_requested())
    if impl == "triton" and not usable:
        why = ("Triton is not installed" if not triton_installed() else
               f"tensors are on {device.type} and TRITON_INTERPRET=1 is not set "
               "(set it before importing Triton to run the kernels on CPU)")
        raise ValueError(f"impl='triton' cannot run here: {why}")
    if not usable:
        return chunked_torch
    module = _triton_module()
    if device.type != "cuda" and not module.INTERPRET:
        if impl == "triton":
            raise ValueError("impl='triton' on CPU needs TRITON_INTERPRET=1 set before "
                             "nft_kernels first launched a kernel")
        return chunked_torch
    return module
