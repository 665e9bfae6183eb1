"""16-bit dz never carries a scale (issue 19): a mean over many tokens, an aggregation's token
weights or a small upstream gradient times p ~ 1 / V falls below fp16's smallest subnormal
(6e-8), and the -p part of dH and dW would be flushed to zero. The Triton row kernel writes
16-bit dz in the interpreter too, so these run on the CPU.

The weight rows share a common direction w0, so that the -p part of dH (the softmax-weighted
mean of W, about w0) is as large as the onehot part: losing it is a large error."""

import pytest
import torch
from helpers import GRAD_RTOL, assert_close_scaled

from nft_kernels import chunked, fused_linear_logprobs, fused_linear_nft_loss
from nft_kernels.heads import HeadSpec, LogitScaling
from nft_kernels.inputs import RowPlan, TokenInputs
from nft_kernels.reference import reference_logprobs, reference_nft_loss

N, H, V = 24, 16, 4096


def _problem(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(H, generator=gen)
    hidden = torch.randn(N, H, generator=gen).to(dtype)
    weight = (w0 + 0.3 * torch.randn(V, H, generator=gen)).to(dtype)
    target = torch.randint(0, V, (N,), generator=gen)
    return hidden, weight, target


@pytest.mark.parametrize("mode", ["chunked", "lean"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_upstream_gradient_keeps_the_softmax_part(mode, dtype):
    """Per-token upstream gradients of 1e-4 (a mean over 10k tokens): dz = 1e-4 p with
    p ~ 1 / V = 2.4e-4 is below fp16's smallest subnormal; dH itself (~1e-4) is not."""
    hidden, weight, target = _problem(dtype)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp = fused_linear_logprobs(h, w, target, impl="triton", mode=mode)
    logp.backward(torch.full_like(logp, 1e-4))
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    want, _ = reference_logprobs(h64, w64, target)
    want.backward(torch.full_like(want, 1e-4))
    assert_close_scaled(h.grad, h64.grad, GRAD_RTOL[dtype], "dH")
    assert_close_scaled(w.grad, w64.grad, GRAD_RTOL[dtype], "dW")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_token_weights_keep_the_softmax_part(dtype):
    """The trainer's token-mean aggregation passes 1 / (global token count) as token weights:
    the gradients-in-the-forward path must not fold them into 16-bit dz either."""
    hidden, weight, target = _problem(dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    old = -4.0 - torch.rand(N, generator=gen)
    rewards = (torch.rand(N, generator=gen) < 0.5).float()
    rate = torch.full((N,), 0.5)
    weights = torch.full((N,), 1e-4) * (1 + torch.rand(N, generator=gen))
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    loss = fused_linear_nft_loss(h, w, target, old, rewards, rate, token_weights=weights,
                                 impl="triton", mode="chunked")
    loss.backward()
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    want = (reference_nft_loss(h64, w64, target, old, rewards, rate, None, reduction="none")
            * weights.double()).sum()
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-4 * abs(want.item())
    assert_close_scaled(h.grad, h64.grad, GRAD_RTOL[dtype], "dH")
    assert_close_scaled(w.grad, w64.grad, GRAD_RTOL[dtype], "dW")


def test_mean_scale_is_applied_after_the_gemms():
    """The row math of one chunked pass, checked directly with the reduction scale of a mean
    over 16384 tokens (the Qwen2.5-7B acceptance shape), fp16, the Triton row kernel."""
    hidden, weight, target = _problem(torch.float16, seed=3)
    gen = torch.Generator().manual_seed(4)
    old = -4.0 - torch.rand(N, generator=gen)
    rewards = (torch.rand(N, generator=gen) < 0.5).float()
    rate = torch.full((N,), 0.5)
    scale = torch.tensor(1.0 / 16384)
    _, dh, dw, _ = chunked.run(hidden, weight, None, RowPlan(target, LogitScaling()),
                               TokenInputs(old, rewards, rate), HeadSpec(kind="nft"),
                               row_op="triton", workspace_bytes=1 << 20,
                               write_grads=(True, True, False), grad_scale=scale)
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    want = reference_nft_loss(h64, w64, target, old, rewards, rate, None) * scale.double()
    want.backward()
    assert_close_scaled(dh, h64.grad, GRAD_RTOL[torch.float16], "dH")
    assert_close_scaled(dw, w64.grad, GRAD_RTOL[torch.float16], "dW")


def test_fp32_accumulating_addmm_is_gated_on_torch_2_10(monkeypatch):
    """torch 2.8 / 2.9 raise for addmm(fp32, bf16, bf16, out_dtype=fp32): the gate admits it
    from 2.10 only, and the fallback (an fp32 product, then add) gives the same dW. The 16-bit
    products run on CUDA only, so the fallback is exercised here with an fp32 emulation."""
    assert not chunked.addmm_takes_fp32_self("2.8.0+cu128")
    assert not chunked.addmm_takes_fp32_self("2.9.1")
    assert chunked.addmm_takes_fp32_self("2.10.0") and chunked.addmm_takes_fp32_self("2.13.0+cpu")
    calls = []

    def emulated(a, b):
        calls.append((a.dtype, b.dtype))
        return a.float() @ b.float()

    monkeypatch.setattr(chunked, "_ADDMM_FP32_ACC", False)
    monkeypatch.setattr(chunked, "_mm_fp32", emulated)
    gen = torch.Generator().manual_seed(5)
    dz = torch.randn(7, 11, generator=gen).bfloat16()
    h = torch.randn(7, 5, generator=gen).bfloat16()
    dw = torch.randn(11, 5, generator=gen)
    want = dw + dz.float().t() @ h.float()
    chunked._add_weight_grad(dw, dz, h)
    assert calls == [(torch.bfloat16, torch.bfloat16)]
    torch.testing.assert_close(dw, want, rtol=1e-6, atol=1e-6)
