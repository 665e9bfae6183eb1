"""The paper's propositions as tests (arXiv 2505.18116)."""

import math

import pytest
import torch
from helpers import make_problem

from nft_kernels import (
    fused_linear_logprobs,
    fused_linear_nft_loss,
    fused_linear_ppo_loss,
    nft_loss,
)


def _on_policy(p, engine):
    with torch.no_grad():  # old log-probs from the same kernel: R is exactly 1
        return fused_linear_logprobs(p["hidden"], p["weight"], p["target"], bias=p["bias"],
                                     **engine)


def _grads_of(loss, p):
    params = [p["hidden"], p["weight"]]
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("normalize, advantage", [
    (2, lambda r, rh: (r - rh) / torch.sqrt(rh * (1 - rh))),  # GRPO (std-normalized)
    (1, lambda r, rh: r - rh),                                 # Dr. GRPO (no std)
])
def test_prop_4_2_on_policy_nft_gradient_equals_grpo(engine, device, normalize, advantage):
    """Prop. 4.2: on-policy, the NFT gradient with omega = sqrt((1-r)/r) is GRPO's, and with
    omega = 1 - r_hat it is Dr. GRPO's (group advantage without std scaling)."""
    p = make_problem(48, 24, 90, torch.float32, device, seed=1, bias=True,
                     rate_range=(0.05, 0.95))
    old = _on_policy(p, engine)
    r, rate = p["rewards"], p["rate"]
    nft = fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], old, r, rate, p["mask"],
                                bias=p["bias"], normalize=normalize, **engine)
    ppo = fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], old, advantage(r, rate),
                                p["mask"], bias=p["bias"], **engine)
    for a, b in zip(_grads_of(nft, p), _grads_of(ppo, p)):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rft_gradient_equals_sft_on_positive_tokens(engine, device):
    """neg_weight = 0, omega = 1 (RFT): the gradient is maximum likelihood on positives, also
    off-policy (d(-log R)/dlogp = -1 while the ratio is not clamped)."""
    p = make_problem(40, 16, 70, torch.float32, device, seed=2, log_ratio_range=(-2.0, 2.0))
    rft = fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                                p["rate"], p["mask"], neg_weight=0.0, normalize=0, **engine)
    positive = p["mask"] & (p["rewards"] == 1)
    sft = -fused_linear_logprobs(p["hidden"], p["weight"], p["target"], mask=positive,
                                 **engine).sum()
    for a, b in zip(_grads_of(rft, p), _grads_of(sft, p)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_thm_3_1_negative_data_objective_is_minimized_by_positive_policy(impl, device):
    """Thm. 3.1: the negative-data likelihood of the implicit negative policy
    pi_minus_theta = (pi_old - r_hat pi_theta) / (1 - r_hat), over policies for which it is a
    valid distribution, is maximized exactly at pi_theta = pi_plus = pi_old r / r_hat.

    With R = pi_theta / pi_old, NFT's per-answer negative loss is -log(pi_minus_theta(a) /
    pi_old(a)), so its expectation over negatives drawn from pi_minus is
    KL(pi_minus || pi_minus_theta) + log(1 - r_hat): the constant is its minimum, reached only at
    pi_plus. Checked for a categorical policy over K answers: the loss equals that expression,
    attains the minimum at pi_plus and exceeds it at every other sampled valid policy.
    """
    gen = torch.Generator().manual_seed(0)
    k = 7
    pi_old = torch.softmax(torch.randn(k, generator=gen, dtype=torch.float64), 0)
    correct = torch.tensor([1, 0, 1, 0, 0, 1, 0], dtype=torch.float64)
    r_hat = float((pi_old * correct).sum())
    pi_plus = pi_old * correct / r_hat
    pi_minus = pi_old * (1 - correct) / (1 - r_hat)  # where negatives are drawn from

    def negative_objective(pi_theta):
        per_answer = nft_loss(pi_theta.log().float().to(device), pi_old.log().float().to(device),
                              torch.zeros(k, device=device),
                              torch.full((k,), r_hat, device=device), normalize=0,
                              clip_negative=1e-6, rate_clamp=(1e-3, 0.999), reduction="none",
                              impl=impl).double().cpu()
        return (pi_minus * per_answer).sum().item()

    minimum = math.log(1 - r_hat)
    assert negative_objective(pi_plus.clamp(min=1e-30)) == pytest.approx(minimum, abs=1e-5)
    # Valid policies: pi_theta <= pi_old / r_hat everywhere (pi_minus_theta >= 0).
    # Reweight pi_old at random and keep the valid ones.
    scale = torch.rand(4000, k, generator=gen, dtype=torch.float64)
    samples = pi_old * scale / (pi_old * scale).sum(dim=1, keepdim=True)
    valid = samples[(samples <= pi_old / r_hat).all(dim=1)][:50]
    assert len(valid) >= 20
    for pi_theta in valid:
        implicit = (pi_old - r_hat * pi_theta) / (1 - r_hat)
        neg = correct == 0
        kl = (pi_minus[neg] * (pi_minus[neg] / implicit[neg]).log()).sum().item()
        value = negative_objective(pi_theta)
        assert value == pytest.approx(kl + minimum, rel=1e-3, abs=1e-5)
        assert value > minimum + 1e-4
