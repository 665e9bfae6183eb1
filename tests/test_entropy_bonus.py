"""The entropy bonus (``entropy_coef``) of the fused losses, against the float64 reference.

loss_t - c * H_t per counted token (times its weight), in both implementations and both
execution modes: the scalar losses of the chunked mode form its gradient in the forward (the
row kernel's ENT_BONUS), the per-token path through the entropy's upstream gradient.
"""

import pytest
import torch
from helpers import (
    DTYPES,
    check_fused_against_reference,
    fused_head_loss,
    make_problem,
    property_settings,
)
from hypothesis import given
from hypothesis import strategies as st

from nft_kernels import fused_linear_nft_loss, torch_rows

PROPERTY = property_settings()


@PROPERTY
@given(
    n=st.integers(1, 30), h=st.sampled_from([4, 16, 23]), v=st.sampled_from([1, 31, 97]),
    dtype=st.sampled_from(DTYPES), bias=st.booleans(), head=st.sampled_from(["nft", "ppo"]),
    coef=st.sampled_from([0.01, 0.5, -0.2]), temperature=st.sampled_from([1.0, 0.7]),
    logit_scale=st.sampled_from([1.0, 20.0]), reduction=st.sampled_from(["sum", "mean", "none"]),
    weighted=st.booleans(), chunk=st.sampled_from([None, 1, 5]), validate=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_entropy_bonus_matches_float64_reference(engine, device, n, h, v, dtype, bias, head,
                                                 coef, temperature, logit_scale, reduction,
                                                 weighted, chunk, validate, seed):
    p = make_problem(n, h, v, dtype, device, seed=seed, bias=bias, temperature=temperature,
                     logit_scale=logit_scale)
    gen = torch.Generator().manual_seed(seed + 2)
    upstream = torch.rand(n, generator=gen).to(device)
    weights = torch.rand(n, generator=gen).to(device) if weighted else None
    advantages = torch.randn(n, generator=gen).to(device)
    common = dict(bias=p["bias"], temperature=temperature, token_weights=weights,
                  entropy_coef=coef, reduction=reduction, validate=validate,
                  workspace_bytes=None if chunk is None else 4 * v * chunk, **engine)
    loss, reference, per_token_args = fused_head_loss(head, p, advantages, **common)
    if reduction == "none":
        loss = (loss * upstream).sum()
    loss.backward()

    check_fused_against_reference(p, loss, reference, per_token_args, dtype=dtype,
                                  reduction=reduction, upstream=upstream, weights=weights,
                                  temperature=temperature, entropy_coef=coef)


def test_a_zero_coefficient_does_no_entropy_work(monkeypatch):
    """entropy_coef = 0 (the default) computes no entropy and no entropy gradient (verl #1720):
    the row math is asked for neither, and the result equals the call without the option."""
    seen = []
    real = torch_rows.chunk_rows

    def spy(ws, rows_c, bias32, p):
        seen.append((p.compute_entropy, p.entropy_coef, p.g_ent))
        return real(ws, rows_c, bias32, p)

    monkeypatch.setattr(torch_rows, "chunk_rows", spy)
    p = make_problem(20, 16, 40, torch.float32, "cpu", seed=4)
    args = (p["hidden"], p["weight"], p["target"], p["old"], p["rewards"], p["rate"], p["mask"])
    plain = fused_linear_nft_loss(*args, impl="torch", mode="chunked")
    zero = fused_linear_nft_loss(*args, impl="torch", mode="chunked", entropy_coef=0.0)
    assert torch.equal(plain, zero)
    assert seen and all(entry == (False, 0.0, None) for entry in seen)
    seen.clear()
    fused_linear_nft_loss(*args, impl="torch", mode="chunked", entropy_coef=0.1)
    assert seen and all(entry[:2] == (True, 0.1) for entry in seen)


@pytest.mark.parametrize("value, error, message", [
    (float("inf"), ValueError, "entropy_coef must be finite"),
    ("0.1", TypeError, "entropy_coef must be a number"),
])
def test_bad_entropy_coef_is_named(value, error, message):
    p = make_problem(6, 8, 20, torch.float32, "cpu", seed=0)
    with pytest.raises(error, match=message):
        fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                              p["rate"], entropy_coef=value)
