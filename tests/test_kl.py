"""The KL-to-reference term (``ref_logprobs``, ``beta``, ``kl_estimator``) on every entry point.

Against the float64 reference (autograd through verl's and TRL's formulas, torch.clamp for
verl's clips), in both implementations and both execution modes, with draws that reach the
clips of "k3" (|ref - logp| past 20, an estimate past 10); against verl's own ``kl_penalty``;
and against Liger's fused GRPO loss with beta > 0, which computes the same quantity.
"""

import importlib.util

import pytest
import torch
from helpers import (
    DTYPES,
    GRAD_RTOL,
    assert_close_scaled,
    check_fused_against_reference,
    fused_head_loss,
    liger_grpo_problem,
    make_problem,
    property_settings,
)
from hypothesis import given
from hypothesis import strategies as st

from nft_kernels import (
    fused_linear_nft_loss,
    fused_linear_ppo_loss,
    nft_loss,
    ppo_clip_loss,
)
from nft_kernels.reference import (
    reference_kl,
    reference_logprobs,
    reference_nft_from_logprobs,
    reference_ppo_from_logprobs,
)

ESTIMATORS = ["k1", "k2", "k3", "k3_unclipped", "low_var_kl"]
PROPERTY = property_settings()


def _ref_logprobs(p, gap, seed):
    """Reference log-probs ``gap`` (a range) away from the policy's own: the KL's argument
    x = ref - logp spans it (|x| > 20 and estimates > 10 reach verl's clips)."""
    gen = torch.Generator().manual_seed(seed + 1)
    logp, _ = reference_logprobs(p["hidden"].detach().cpu(), p["weight"].detach().cpu(),
                                 p["target"].cpu(),
                                 bias=None if p["bias"] is None else p["bias"].detach().cpu(),
                                 temperature=p.get("temperature", 1.0))
    lo, hi = gap
    x = lo + (hi - lo) * torch.rand(logp.shape, generator=gen, dtype=torch.float64)
    return (logp + x).float().to(p["old"].device)


@PROPERTY
@given(
    n=st.integers(1, 30), h=st.sampled_from([4, 16, 23]), v=st.sampled_from([1, 31, 97]),
    dtype=st.sampled_from(DTYPES), bias=st.booleans(), head=st.sampled_from(["nft", "ppo"]),
    estimator=st.sampled_from(ESTIMATORS), beta=st.sampled_from([0.0, 0.04, 1.0]),
    bias_correction=st.booleans(),
    gap=st.sampled_from([(-0.5, 0.5), (-3.0, 3.0), (-25.0, 25.0)]),
    reduction=st.sampled_from(["sum", "mean", "none"]), weighted=st.booleans(),
    chunk=st.sampled_from([None, 1, 5]), validate=st.booleans(), seed=st.integers(0, 2**16),
)
def test_fused_kl_matches_float64_reference(engine, device, n, h, v, dtype, bias, head,
                                            estimator, beta, bias_correction, gap, reduction,
                                            weighted, chunk, validate, seed):
    """``bias_correction``: the estimate times the token's ratio (TRL's default)."""
    # fp16 cannot hold the gradient of an unclipped k3 past e^11; bf16 / fp32 can.
    if dtype == torch.float16 and estimator == "k3_unclipped" and gap[1] > 10:
        gap = (-3.0, 3.0)
    p = make_problem(n, h, v, dtype, device, seed=seed, bias=bias)
    ref_lp = _ref_logprobs(p, gap, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    upstream = torch.rand(n, generator=gen).to(device)
    weights = torch.rand(n, generator=gen).to(device) if weighted else None
    advantages = torch.randn(n, generator=gen).to(device)
    kl = dict(ref_logprobs=ref_lp, beta=beta, kl_estimator=estimator,
              kl_bias_correction=bias_correction)
    common = dict(bias=p["bias"], token_weights=weights, reduction=reduction, validate=validate,
                  workspace_bytes=None if chunk is None else 4 * v * chunk, **engine, **kl)
    loss, reference, per_token_args = fused_head_loss(head, p, advantages, **common)
    if reduction == "none":
        loss = (loss * upstream).sum()
    loss.backward()

    check_fused_against_reference(p, loss, reference, per_token_args, dtype=dtype,
                                  reduction=reduction, upstream=upstream, weights=weights,
                                  **dict(kl, ref_logprobs=ref_lp.cpu()))


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("head", ["nft", "ppo"])
def test_kl_on_given_logprobs(impl, device, head, estimator, bias_correction):
    gen = torch.Generator().manual_seed(3)
    n = 300
    logp = -3 * torch.rand(n, generator=gen)
    old = logp + 0.3 * torch.randn(n, generator=gen)
    # Past verl's clips for some tokens; within 25 nats, where float64 autograd of
    # (e^x - x - 1) R still resolves its gradient -x R (its two terms cancel about e^x).
    ref_lp = logp + (12 * torch.randn(n, generator=gen)).clamp(-25, 25)
    rewards = (torch.rand(n, generator=gen) > 0.5).float()
    rate = torch.rand(n, generator=gen)
    advantages = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) < 0.8
    weights = torch.rand(n, generator=gen)
    to = lambda t: t.to(device)  # noqa: E731
    kl = dict(beta=0.3, kl_estimator=estimator, kl_bias_correction=bias_correction)
    x = to(logp.clone()).requires_grad_(True)
    x64 = logp.double().requires_grad_(True)
    if head == "nft":
        loss = nft_loss(x, to(old), to(rewards), to(rate), to(mask), impl=impl,
                        token_weights=to(weights), ref_logprobs=to(ref_lp), **kl)
        ref_t = reference_nft_from_logprobs(x64, old, rewards, rate, mask, reduction="none",
                                            ref_logprobs=ref_lp, **kl)
    else:
        loss = ppo_clip_loss(x, to(old), to(advantages), to(mask), impl=impl,
                             token_weights=to(weights), ref_logprobs=to(ref_lp), **kl)
        ref_t = reference_ppo_from_logprobs(x64, old, advantages, mask, reduction="none",
                                            ref_logprobs=ref_lp, **kl)
    ref_loss = (ref_t * weights.double()).sum()
    loss.backward()
    ref_loss.backward()
    scale = (ref_t * weights.double()).abs().sum().item()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * (1 + scale)
    assert_close_scaled(x.grad.cpu(), x64.grad, 1e-5, "d logprobs")


def test_the_reference_kl_is_verls_kl_penalty():
    """Our float64 reference computes what verl's own function computes, clips included."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    gen = torch.Generator().manual_seed(0)
    logp = -5 * torch.rand(2000, generator=gen, dtype=torch.float64)
    ref_lp = logp + 30 * torch.randn(2000, generator=gen, dtype=torch.float64)
    for ours, theirs in (("k1", "kl"), ("k2", "mse"), ("k3", "low_var_kl"), ("k3", "k3")):
        expected = core_algos.kl_penalty(logp, ref_lp, theirs)
        torch.testing.assert_close(reference_kl(logp, ref_lp, ours), expected, rtol=0, atol=0)
    x = ref_lp - logp
    torch.testing.assert_close(reference_kl(logp, ref_lp, "k3_unclipped"),
                               torch.exp(x) - x - 1, rtol=0, atol=0)  # TRL's per_token_kl


def test_beta_zero_reads_no_reference(engine, device):
    """beta = 0 does no KL work: the result equals the call without ref_logprobs, even when
    the (unread) reference holds NaN."""
    p = make_problem(12, 16, 40, torch.float32, device, seed=1)
    nan_ref = torch.full_like(p["old"], float("nan"))
    args = (p["hidden"], p["weight"], p["target"], p["old"], p["rewards"], p["rate"], p["mask"])
    with torch.no_grad():
        plain = fused_linear_nft_loss(*args, **engine, reduction="none")
        zero = fused_linear_nft_loss(*args, **engine, reduction="none", ref_logprobs=nan_ref,
                                     beta=0.0)
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("overrides, message", [
    (dict(beta=-0.1), "beta must be >= 0"),
    (dict(beta=float("nan")), "beta must be finite"),
    (dict(beta=0.1, ref_logprobs=None), "ref_logprobs is required when beta > 0"),
    (dict(kl_estimator="k4"), "kl_estimator must be one of"),
    (dict(ref_logprobs="shape"), "ref_logprobs must have shape"),
    (dict(ref_logprobs="nan"), "ref_logprobs contains NaN or Inf"),
    (dict(ref_logprobs="-inf"), "ref_logprobs contains NaN or Inf"),
])
def test_bad_kl_arguments_are_named(device, overrides, message):
    p = make_problem(6, 8, 20, torch.float32, device, seed=0, mask_kind="all")
    overrides = dict(overrides)
    spelled = overrides.pop("ref_logprobs", "ok")
    ref_lp = None if spelled is None else p["old"].clone()
    if spelled == "shape":
        ref_lp = torch.zeros(5, device=device)
    elif spelled in ("nan", "-inf"):
        ref_lp[2] = float(spelled)
    kwargs = {"beta": 0.1, "kl_estimator": "k3", "ref_logprobs": ref_lp, **overrides}
    with pytest.raises(ValueError, match=message):
        fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                              p["rate"], **kwargs)
    with pytest.raises(ValueError, match=message):
        ppo_clip_loss(p["old"].clone().requires_grad_(True), p["old"], p["rewards"], **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                    reason="liger-kernel is not installed")
@pytest.mark.parametrize("mode", ["chunked", "lean"])
def test_matches_liger_grpo_with_beta(device, mode):
    """Liger's fused GRPO loss (loss_type="dapo": token-level mean) with beta > 0 adds
    beta * k3 (unclipped) per token: ours with the same estimator gives the same loss and
    gradients."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b, t = 3, 7
    gen, hidden, weight, target, mask, seq_adv, logp = liger_grpo_problem(5, b, t)
    old = (logp + 0.1 * torch.randn(b, t, generator=gen, dtype=torch.float64)).float()
    ref_lp = (logp + 0.5 * torch.randn(b, t, generator=gen, dtype=torch.float64)).float()
    beta = 0.04

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = LigerFusedLinearGRPOLoss(beta=beta, use_ref_model=True, loss_type="dapo",
                                     epsilon_low=0.2, epsilon_high=0.28, compiled=False)
    out = liger(h1, w1, target, mask.long(), seq_adv, ref_per_token_logps=ref_lp,
                old_per_token_logps=old)
    liger_loss = out[0] if isinstance(out, tuple) else out
    liger_loss.backward()

    h2 = hidden.clone().to(device).requires_grad_(True)
    w2 = weight.clone().to(device).requires_grad_(True)
    advantages = seq_adv[:, None].expand(b, t).contiguous()
    loss = fused_linear_ppo_loss(h2, w2, target.to(device), old.to(device),
                                 advantages.to(device), mask.to(device), clip_low=0.2,
                                 clip_high=0.28, ref_logprobs=ref_lp.to(device), beta=beta,
                                 kl_estimator="k3_unclipped", reduction="mean", mode=mode)
    loss.backward()
    assert abs(loss.item() - liger_loss.item()) <= 1e-5 * (1 + abs(liger_loss.item()))
    assert_close_scaled(h2.grad.cpu(), h1.grad, GRAD_RTOL[torch.float32], "dH")
    assert_close_scaled(w2.grad.cpu(), w1.grad, GRAD_RTOL[torch.float32], "dW")
