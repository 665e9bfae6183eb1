"""GSPO's sequence-level importance ratio (``importance_sampling_level="sequence"``).

Against the float64 reference (which forms each response's ratio one response at a time), in
both implementations and both execution modes with chunks that cut responses; one-token
responses give token-level PPO; and against Liger's fused GRPO loss with
``importance_sampling_level="sequence"``.
"""

import importlib.util

import pytest
import torch
from helpers import (
    DTYPES,
    GRAD_RTOL,
    assert_close_scaled,
    check_fused_against_reference,
    liger_grpo_problem,
    make_problem,
    property_settings,
)
from hypothesis import given
from hypothesis import strategies as st

from nft_kernels import fused_linear_ppo_loss, ppo_clip_loss
from nft_kernels.reference import reference_ppo_from_logprobs, reference_ppo_loss

PROPERTY = property_settings()


def _sequence_ids(n, n_seq, gen):
    """Responses of random lengths laid end to end, with ids that are neither 0-based nor
    consecutive (any integers name a response)."""
    cuts = torch.sort(torch.randperm(max(n - 1, 1), generator=gen)[: n_seq - 1] + 1).values
    ids = torch.zeros(n, dtype=torch.int64)
    for c in cuts.tolist():
        ids[c:] += 1
    return ids * 7 + 100


@PROPERTY
@given(
    n=st.integers(1, 30), h=st.sampled_from([4, 16]), v=st.sampled_from([5, 31, 97]),
    dtype=st.sampled_from(DTYPES), bias=st.booleans(), n_seq=st.integers(1, 6),
    clips=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (3e-4, 4e-4)]),
    clip_ratio_c=st.sampled_from([None, 3.0]), log_ratio_range=st.sampled_from([(-0.1, 0.1),
                                                                               (-1.0, 1.0)]),
    beta=st.sampled_from([0.0, 0.1]), entropy_coef=st.sampled_from([0.0, 0.05]),
    reduction=st.sampled_from(["sum", "mean", "none"]), weighted=st.booleans(),
    chunk=st.sampled_from([None, 1, 4]), seed=st.integers(0, 2**16),
)
def test_sequence_level_ratio_matches_float64_reference(engine, device, n, h, v, dtype, bias,
                                                        n_seq, clips, clip_ratio_c,
                                                        log_ratio_range, beta, entropy_coef,
                                                        reduction, weighted, chunk, seed):
    p = make_problem(n, h, v, dtype, device, seed=seed, bias=bias,
                     log_ratio_range=log_ratio_range)
    gen = torch.Generator().manual_seed(seed + 3)
    seq = _sequence_ids(n, min(n_seq, n), gen)
    seq_adv = torch.randn(int(seq.max()) + 1, generator=gen)
    advantages = seq_adv[seq]  # one advantage per response
    ref_lp = p["old"].cpu() + 0.3 * torch.randn(n, generator=gen)
    weights = torch.rand(n, generator=gen) if weighted else None
    upstream = torch.rand(n, generator=gen)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    opts = dict(clip_low=clips[0], clip_high=clips[1], clip_ratio_c=clip_ratio_c)
    loss = fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], p["old"],
                                 to(advantages), p["mask"], bias=p["bias"], **engine, **opts,
                                 importance_sampling_level="sequence", sequence_ids=to(seq),
                                 ref_logprobs=to(ref_lp), beta=beta, entropy_coef=entropy_coef,
                                 token_weights=to(weights), reduction=reduction,
                                 workspace_bytes=None if chunk is None else 4 * v * chunk)
    if reduction == "none":
        assert loss.shape == (n,)
        loss = (loss * to(upstream)).sum()
    loss.backward()

    check_fused_against_reference(p, loss, reference_ppo_loss, (p["old"], advantages),
                                  dtype=dtype, reduction=reduction, upstream=upstream,
                                  weights=weights, **opts, sequence_ids=seq,
                                  ref_logprobs=ref_lp, beta=beta, entropy_coef=entropy_coef)


def test_one_token_responses_are_token_level_ppo(engine, device):
    p = make_problem(25, 16, 40, torch.float32, device, seed=2, log_ratio_range=(-0.5, 0.5))
    advantages = torch.randn(25, generator=torch.Generator().manual_seed(0)).to(device)
    args = (p["hidden"], p["weight"], p["target"], p["old"], advantages, p["mask"])
    token = fused_linear_ppo_loss(*args, **engine, clip_high=0.28, reduction="none")
    sequence = fused_linear_ppo_loss(*args, **engine, clip_high=0.28, reduction="none",
                                     importance_sampling_level="sequence",
                                     sequence_ids=torch.arange(25, device=device))
    torch.testing.assert_close(sequence, token, rtol=1e-6, atol=1e-6)


def test_sequence_level_on_given_logprobs(impl, device):
    gen = torch.Generator().manual_seed(8)
    n = 200
    logp = -3 * torch.rand(n, generator=gen)
    old = logp + 0.3 * torch.randn(n, generator=gen)
    seq = _sequence_ids(n, 12, gen)
    advantages = torch.randn(int(seq.max()) + 1, generator=gen)[seq]
    mask = torch.rand(n, generator=gen) < 0.8
    x = logp.clone().to(device).requires_grad_(True)
    x64 = logp.double().requires_grad_(True)
    loss = ppo_clip_loss(x, old.to(device), advantages.to(device), mask.to(device), impl=impl,
                         clip_high=0.28, importance_sampling_level="sequence",
                         sequence_ids=seq.to(device), reduction="mean")
    ref = reference_ppo_from_logprobs(x64, old, advantages, mask, clip_high=0.28,
                                      sequence_ids=seq, reduction="mean")
    loss.backward()
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-6 * (1 + abs(ref.item()))
    assert_close_scaled(x.grad.cpu(), x64.grad, 1e-5, "d logprobs")


@pytest.mark.parametrize("overrides, error, message", [
    (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level must be"),
    (dict(importance_sampling_level="sequence", sequence_ids=None), ValueError,
     "sequence_ids is required"),
    (dict(importance_sampling_level="sequence", sequence_ids=torch.zeros(5, dtype=torch.long)),
     ValueError, "sequence_ids must have shape"),
    (dict(importance_sampling_level="sequence", sequence_ids=torch.zeros(6)), TypeError,
     "sequence_ids must be an int64 or int32"),
    (dict(importance_sampling_level="sequence", filter_eps=1e-3), ValueError,
     "filter_eps does not apply"),
])
def test_bad_sequence_arguments_are_named(overrides, error, message):
    p = make_problem(6, 8, 20, torch.float32, "cpu", seed=0)
    kwargs = {"sequence_ids": torch.zeros(6, dtype=torch.long), **overrides}
    with pytest.raises(error, match=message):
        fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                              p["mask"], **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                    reason="liger-kernel is not installed")
@pytest.mark.parametrize("mode", ["chunked", "lean"])
def test_matches_liger_grpo_sequence_level(mode):
    """Liger's fused GRPO loss with importance_sampling_level="sequence" (loss_type="dapo",
    beta 0): ours with sequence_ids = the batch row gives the same loss and gradients."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b, t = 4, 9
    gen, hidden, weight, target, mask, seq_adv, logp = liger_grpo_problem(6, b, t)
    old = (logp + 0.15 * torch.randn(b, t, generator=gen, dtype=torch.float64)).float()

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="dapo",
                                     epsilon_low=0.2, epsilon_high=0.28, compiled=False,
                                     importance_sampling_level="sequence")
    out = liger(h1, w1, target, mask.long(), seq_adv, old_per_token_logps=old)
    liger_loss = out[0] if isinstance(out, tuple) else out
    liger_loss.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused_linear_ppo_loss(h2, w2, target, old, seq_adv[:, None].expand(b, t).contiguous(),
                                 mask, clip_low=0.2, clip_high=0.28, reduction="mean", mode=mode,
                                 importance_sampling_level="sequence",
                                 sequence_ids=torch.arange(b)[:, None].expand(b, t))
    loss.backward()
    assert abs(loss.item() - liger_loss.item()) <= 1e-5 * (1 + abs(liger_loss.item()))
    assert_close_scaled(h2.grad, h1.grad, GRAD_RTOL[torch.float32], "dH")
    assert_close_scaled(w2.grad, w1.grad, GRAD_RTOL[torch.float32], "dW")
