"""Logit soft-capping (``softcap``, Gemma 2/3): z -> c tanh(z / c) before the temperature.

Against the float64 reference in both implementations, both execution modes and the
deterministic lean backward, with logit scales that saturate the cap; the value must change
with the cap (Cut Cross-Entropy once shipped a soft-cap that was silently not applied, CCE #48).
"""

import pytest
import torch
from helpers import (
    DTYPES,
    LOSS_RTOL,
    assert_close_scaled,
    check_fused_against_reference,
    fused_head_loss,
    make_problem,
    property_settings,
)
from hypothesis import given
from hypothesis import strategies as st

from nft_kernels import fused_linear_logprobs, fused_linear_nft_loss
from nft_kernels.reference import (
    reference_logprobs,
    reference_with_grads,
)

PROPERTY = property_settings()


@PROPERTY
@given(
    n=st.integers(1, 30), h=st.sampled_from([4, 16, 23]), v=st.sampled_from([1, 31, 97]),
    dtype=st.sampled_from(DTYPES), bias=st.booleans(), head=st.sampled_from(["nft", "ppo"]),
    softcap=st.sampled_from([0.5, 5.0, 30.0]), temperature=st.sampled_from([1.0, 0.6]),
    logit_scale=st.sampled_from([1.0, 40.0]), reduction=st.sampled_from(["sum", "mean", "none"]),
    entropy_coef=st.sampled_from([0.0, 0.1]), deterministic=st.booleans(),
    chunk=st.sampled_from([None, 1, 5]), seed=st.integers(0, 2**16),
)
def test_softcap_matches_float64_reference(engine, device, n, h, v, dtype, bias, head, softcap,
                                           temperature, logit_scale, reduction, entropy_coef,
                                           deterministic, chunk, seed):
    p = make_problem(n, h, v, dtype, device, seed=seed, bias=bias, temperature=temperature,
                     logit_scale=logit_scale, log_ratio_range=(-0.5, 0.5))
    gen = torch.Generator().manual_seed(seed + 2)
    upstream = torch.rand(n, generator=gen)
    advantages = torch.randn(n, generator=gen)
    common = dict(bias=p["bias"], temperature=temperature, softcap=softcap,
                  entropy_coef=entropy_coef, reduction=reduction, deterministic=deterministic,
                  workspace_bytes=None if chunk is None else 4 * v * chunk, **engine)
    loss, reference, per_token_args = fused_head_loss(head, p, advantages, **common)
    if reduction == "none":
        loss = (loss * upstream.to(device)).sum()
    loss.backward()

    check_fused_against_reference(p, loss, reference, per_token_args, dtype=dtype,
                                  reduction=reduction, upstream=upstream,
                                  temperature=temperature, softcap=softcap,
                                  entropy_coef=entropy_coef)


def test_softcap_logprobs_and_entropy_are_capped(engine, device):
    """The cap is applied (not silently skipped): log-probs and entropy equal the capped
    reference, differ from the uncapped one, and their gradients match float64."""
    p = make_problem(24, 16, 60, torch.float32, device, seed=9, bias=True, logit_scale=30.0)
    logp, entropy = fused_linear_logprobs(p["hidden"], p["weight"], p["target"], bias=p["bias"],
                                          softcap=3.0, return_entropy=True, **engine)
    ref_logp, ref_ent = reference_logprobs(p["hidden"].detach().cpu(), p["weight"].detach().cpu(),
                                           p["target"].cpu(), bias=p["bias"].detach().cpu(),
                                           softcap=3.0)
    plain_logp, _ = reference_logprobs(p["hidden"].detach().cpu(), p["weight"].detach().cpu(),
                                       p["target"].cpu(), bias=p["bias"].detach().cpu())
    scale = 1 + ref_logp.abs().max().item()
    assert (logp.double().cpu() - ref_logp).abs().max().item() <= LOSS_RTOL * scale
    assert (entropy.double().cpu() - ref_ent).abs().max().item() <= LOSS_RTOL * scale
    assert (plain_logp - ref_logp).abs().max().item() > 1.0  # the cap matters at this scale
    (logp.sum() + 0.3 * entropy.sum()).backward()

    def objective(h, w, target, bias=None):
        lp, ent = reference_logprobs(h, w, target, bias=bias, softcap=3.0)
        return lp.sum() + 0.3 * ent.sum()

    _, ref_dh, ref_dw, ref_db = reference_with_grads(objective, p["hidden"], p["weight"],
                                                     p["target"].cpu(), bias=p["bias"])
    assert_close_scaled(p["hidden"].grad.cpu(), ref_dh, 1e-4, "dH")
    assert_close_scaled(p["weight"].grad.cpu(), ref_dw, 1e-4, "dW")
    assert_close_scaled(p["bias"].grad.cpu(), ref_db, 1e-4, "d bias")


@pytest.mark.parametrize("value, error, message", [
    (0.0, ValueError, "softcap must be > 0"),
    (-1.0, ValueError, "softcap must be > 0"),
    (float("inf"), ValueError, "softcap must be finite"),
    ("30", TypeError, "softcap must be a number"),
])
def test_bad_softcap_is_named(value, error, message):
    p = make_problem(6, 8, 20, torch.float32, "cpu", seed=0)
    with pytest.raises(error, match=message):
        fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                              p["rate"], softcap=value)
