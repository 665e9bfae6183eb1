"""Test set-up: run the real Triton kernels everywhere.

On a machine without CUDA the kernels run in the Triton interpreter, which must be switched on
before Triton is imported: that is why this happens at the top of conftest. With CUDA the
kernels are compiled and the same tests run on the GPU.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["triton", "torch"]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture
def device():
    return DEVICE
