"""Per-token temperature: ``temperature`` as a tensor with one value per token.

Against the float64 reference in both implementations, both execution modes and the
deterministic lean backward, with extreme temperatures, soft-capping and padded tokens whose
temperature is invalid (never read); a constant tensor equals the float.
"""

import pytest
import torch
from helpers import (
    DTYPES,
    LOSS_RTOL,
    check_fused_against_reference,
    fused_head_loss,
    make_problem,
    property_settings,
)
from hypothesis import given
from hypothesis import strategies as st

from nft_kernels import fused_linear_logprobs, fused_linear_nft_loss
from nft_kernels.reference import reference_logprobs

PROPERTY = property_settings()


def _temperatures(n, kind, mask, gen):
    if kind == "spread":
        temps = 0.3 + 1.7 * torch.rand(n, generator=gen)
    else:  # extreme: from very sharp to very flat softmaxes
        temps = torch.tensor([0.05, 20.0, 1.0])[torch.randint(0, 3, (n,), generator=gen)]
    if mask is not None:  # padded tokens: an invalid temperature that must never be read
        temps = torch.where(mask.cpu(), temps, torch.zeros_like(temps))
    return temps


@PROPERTY
@given(
    n=st.integers(1, 30), h=st.sampled_from([4, 16, 23]), v=st.sampled_from([1, 31, 97]),
    dtype=st.sampled_from(DTYPES), bias=st.booleans(), head=st.sampled_from(["nft", "ppo"]),
    kind=st.sampled_from(["spread", "extreme"]), softcap=st.sampled_from([None, 5.0]),
    reduction=st.sampled_from(["sum", "mean", "none"]), entropy_coef=st.sampled_from([0.0, 0.1]),
    deterministic=st.booleans(), validate=st.booleans(), chunk=st.sampled_from([None, 1, 5]),
    seed=st.integers(0, 2**16),
)
def test_per_token_temperature_matches_float64_reference(engine, device, n, h, v, dtype, bias,
                                                         head, kind, softcap, reduction,
                                                         entropy_coef, deterministic, validate,
                                                         chunk, seed):
    p = make_problem(n, h, v, dtype, device, seed=seed, bias=bias, log_ratio_range=(-0.5, 0.5))
    gen = torch.Generator().manual_seed(seed + 4)
    temps = _temperatures(n, kind, p["mask"], gen)
    upstream = torch.rand(n, generator=gen)
    advantages = torch.randn(n, generator=gen)
    common = dict(bias=p["bias"], temperature=temps.to(device), softcap=softcap,
                  entropy_coef=entropy_coef, reduction=reduction, deterministic=deterministic,
                  validate=validate, workspace_bytes=None if chunk is None else 4 * v * chunk,
                  **engine)
    loss, reference, per_token_args = fused_head_loss(head, p, advantages, **common)
    if reduction == "none":
        loss = (loss * upstream.to(device)).sum()
    loss.backward()

    mask_cpu = None if p["mask"] is None else p["mask"].cpu()
    # The reference computes every token; padded ones get a harmless temperature there.
    ref_temps = temps if mask_cpu is None else torch.where(mask_cpu, temps, torch.ones_like(temps))
    # T = 0.05 multiplies the logits, and with them the fp32 rounding of x - lse in every
    # exp(x - lse), by 20: the fp32 gradient tolerance widens by 4 (to 4e-4) for those draws.
    grad_rtol = 4e-4 if kind == "extreme" and dtype == torch.float32 else None
    check_fused_against_reference(p, loss, reference, per_token_args, dtype=dtype,
                                  grad_rtol=grad_rtol, reduction=reduction, upstream=upstream,
                                  temperature=ref_temps, softcap=softcap,
                                  entropy_coef=entropy_coef)


def test_a_constant_tensor_equals_the_float(engine, device):
    p = make_problem(20, 16, 50, torch.float32, device, seed=5, bias=True)
    args = (p["hidden"], p["weight"], p["target"])
    as_float = fused_linear_logprobs(*args, bias=p["bias"], temperature=0.7, **engine)
    as_tensor = fused_linear_logprobs(*args, bias=p["bias"],
                                      temperature=torch.full((20,), 0.7, device=device),
                                      **engine)
    torch.testing.assert_close(as_tensor, as_float, rtol=1e-6, atol=1e-6)
    ref, _ = reference_logprobs(*(t.detach().cpu() for t in args), bias=p["bias"].detach().cpu(),
                                temperature=torch.linspace(0.2, 3.0, 20))
    per_token = fused_linear_logprobs(*args, bias=p["bias"],
                                      temperature=torch.linspace(0.2, 3.0, 20).to(device),
                                      **engine)
    assert (per_token.double().cpu() - ref).abs().max().item() <= LOSS_RTOL * (
        1 + ref.abs().max().item())


@pytest.mark.parametrize("temperature, error, message", [
    (torch.ones(5), ValueError, "temperature must have shape"),
    (torch.ones(6, dtype=torch.long), TypeError, "temperature must be a floating"),
    (torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0]), ValueError,
     "temperature must be finite and > 0 on counted tokens"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]), ValueError,
     "temperature must be finite and > 0"),
])
def test_bad_temperature_tensor_is_named(temperature, error, message):
    p = make_problem(6, 8, 20, torch.float32, "cpu", seed=0, mask_kind="all")
    with pytest.raises(error, match=message):
        fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                              p["rate"], temperature=temperature)
