"""What adversarial use found (issue 22, kernel API): each case gave a silent wrong number or a
crash deep inside before, and must now give the right number or an error naming the argument."""

import importlib.util

import pytest
import torch
from helpers import GRAD_RTOL, assert_close_scaled, liger_grpo_problem, make_problem

from nft_kernels import (
    fused_linear_logprobs,
    fused_linear_nft_loss,
    fused_linear_ppo_loss,
    nft_loss,
    ppo_clip_loss,
)
from nft_kernels.reference import reference_logprobs


def _nft_args(p):
    return dict(hidden=p["hidden"], weight=p["weight"], target=p["target"],
                old_logprobs=p["old"], rewards=p["rewards"], correct_rate=p["rate"],
                mask=p["mask"])


def _ppo_args(p):
    return dict(hidden=p["hidden"], weight=p["weight"], target=p["target"],
                old_logprobs=p["old"], advantages=p["rewards"] - 0.5, mask=p["mask"])


# ---- 1. a required per-token tensor given as None ------------------------------------------
@pytest.mark.parametrize("entry, missing", [
    ("nft", "old_logprobs"), ("nft", "rewards"), ("nft", "correct_rate"),
    ("ppo", "old_logprobs"), ("ppo", "advantages"), ("gspo", "advantages"),
    ("gspo", "old_logprobs"),
])
def test_missing_required_tensor_is_named(engine, device, entry, missing):
    p = make_problem(8, 16, 64, torch.float32, device, seed=1)
    if entry == "nft":
        args, call = _nft_args(p), fused_linear_nft_loss
    else:
        args, call = _ppo_args(p), fused_linear_ppo_loss
        if entry == "gspo":
            args.update(importance_sampling_level="sequence",
                        sequence_ids=torch.arange(8, device=device) // 3)
    args[missing] = None
    with pytest.raises(TypeError, match=f"{missing} is required"):
        call(**args, **engine)


@pytest.mark.parametrize("entry, missing", [("nft", "old_logprobs"), ("nft", "correct_rate"),
                                            ("ppo", "advantages"), ("gspo", "old_logprobs")])
def test_missing_required_tensor_on_logprobs_is_named(impl, device, entry, missing):
    p = make_problem(8, 16, 64, torch.float32, device, seed=2)
    logp = p["old"] + 0.1
    if entry == "nft":
        args = dict(old_logprobs=p["old"], rewards=p["rewards"], correct_rate=p["rate"])
        call = nft_loss
    else:
        args = dict(old_logprobs=p["old"], advantages=p["rewards"] - 0.5)
        call = ppo_clip_loss
        if entry == "gspo":
            args.update(importance_sampling_level="sequence",
                        sequence_ids=torch.arange(8, device=device) // 3)
    args[missing] = None
    with pytest.raises(TypeError, match=f"{missing} is required"):
        call(logp, mask=p["mask"], impl=impl, **args)


# ---- 2, 3. GSPO: padded tokens never read, per-token inputs are constants -------------------
def _gspo(p, advantages, mask, seq, engine, token_weights=None, old=None):
    return fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"],
                                 p["old"] if old is None else old, advantages, mask,
                                 token_weights=token_weights, importance_sampling_level="sequence",
                                 sequence_ids=seq, reduction="mean", **engine)


@pytest.mark.parametrize("poison", ["advantages", "token_weights", "old_logprobs"])
def test_gspo_ignores_nan_on_padded_tokens(engine, device, poison):
    n = 24
    p = make_problem(n, 16, 64, torch.float32, device, seed=3, log_ratio_range=(-0.5, 0.5))
    seq = torch.arange(n, device=device) // 6
    mask = torch.ones(n, dtype=torch.bool, device=device)
    mask[[2, 9, 10, 17]] = False  # padding inside responses
    adv = (p["rewards"] - 0.5).detach()
    weights = torch.rand(n, generator=torch.Generator().manual_seed(0)).to(device)
    clean = dict(advantages=adv, token_weights=weights, old=p["old"])
    dirty = {k: v.clone() for k, v in clean.items()}
    dirty[{"old_logprobs": "old"}.get(poison, poison)][~mask] = float("nan")
    grads = []
    for inputs in (clean, dirty):
        p["hidden"].grad = p["weight"].grad = None
        loss = _gspo(p, inputs["advantages"], mask, seq, engine, inputs["token_weights"],
                     inputs["old"])
        loss.backward()
        assert torch.isfinite(loss), f"NaN {poison} on padded tokens reached the loss"
        grads.append((loss.detach(), p["hidden"].grad.clone(), p["weight"].grad.clone()))
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_gspo_on_logprobs_ignores_nan_on_padded_tokens(impl, device):
    gen = torch.Generator().manual_seed(4)
    n = 30
    logp = (-3 * torch.rand(n, generator=gen)).to(device)
    old = logp + 0.2 * torch.randn(n, generator=gen).to(device)
    seq = (torch.arange(n) // 5).to(device)
    mask = (torch.rand(n, generator=gen) < 0.7).to(device)
    adv = torch.randn(n, generator=gen).to(device)
    results = []
    for poison in (False, True):
        x = torch.where(mask, logp, torch.full_like(logp, float("nan")) if poison else logp)
        x = x.clone().requires_grad_(True)
        a = torch.where(mask, adv, torch.full_like(adv, float("nan")) if poison else adv)
        loss = ppo_clip_loss(x, old, a, mask, impl=impl, importance_sampling_level="sequence",
                             sequence_ids=seq, beta=0.1, ref_logprobs=old - 0.1)
        loss.backward()
        results.append((loss.detach(), torch.where(mask, x.grad, 0.0)))
        assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_per_token_inputs_are_constants(engine, device, level):
    """old log-probs computed with grad (and advantages that require grad) get no gradient,
    and the policy's gradient is the one with them detached, at both levels alike."""
    n = 20
    p = make_problem(n, 16, 64, torch.float32, device, seed=5)
    seq = torch.arange(n, device=device) // 4
    options = dict(importance_sampling_level=level, sequence_ids=seq, reduction="sum", **engine)
    old = fused_linear_logprobs(p["hidden"], p["weight"], p["target"], **engine) - 0.3
    adv = (p["rewards"] - 0.4).clone().requires_grad_(True)
    loss = fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], old, adv, p["mask"],
                                 **options)
    loss.backward()
    attached = p["hidden"].grad.clone()
    assert adv.grad is None
    p["hidden"].grad = p["weight"].grad = None
    loss = fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], old.detach(),
                                 adv.detach(), p["mask"], **options)
    loss.backward()
    assert p["hidden"].grad.abs().sum() > 0
    torch.testing.assert_close(attached, p["hidden"].grad, rtol=1e-6, atol=1e-7)


# ---- 4. GSPO + kl_bias_correction: the response's ratio, as TRL and Liger ------------------
def test_gspo_kl_bias_correction_uses_the_response_ratio(engine, device):
    n, seq_len = 24, 6
    p = make_problem(n, 16, 64, torch.float32, device, seed=6, log_ratio_range=(-0.4, 0.4))
    seq = torch.arange(n, device=device) // seq_len
    adv = (p["rewards"] - 0.5).detach()
    ref = p["old"] - 0.2 * torch.rand(n, generator=torch.Generator().manual_seed(1)).to(device)
    options = dict(beta=0.2, ref_logprobs=ref, kl_estimator="k3_unclipped",
                   kl_bias_correction=True)
    loss = fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], p["old"], adv, p["mask"],
                                 importance_sampling_level="sequence", sequence_ids=seq,
                                 reduction="sum", **options, **engine)
    loss.backward()
    h = p["hidden"].detach().cpu().double().requires_grad_(True)
    w = p["weight"].detach().cpu().double().requires_grad_(True)
    logp, _ = reference_logprobs(h, w, p["target"].cpu())
    counted = p["mask"].cpu()
    log_ratio = logp - p["old"].cpu().double()
    s = torch.zeros_like(logp)
    for sid in range(n // seq_len):  # each response's ratio, written out by hand
        here = seq.cpu() == sid
        mean = log_ratio[here & counted].sum() / max(int((here & counted).sum()), 1)
        s = torch.where(here, torch.exp(mean), s)
    a = adv.cpu().double()
    policy = torch.maximum(-a * s, -a * s.clamp(0.8, 1.2))
    x = ref.cpu().double() - logp
    kl = (torch.exp(x) - x - 1) * s  # the response's ratio, not the token's
    want = torch.where(counted, policy + 0.2 * kl, torch.zeros_like(kl)).sum()
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-5 * (1 + abs(want.item()))
    assert_close_scaled(p["hidden"].grad, h.grad, GRAD_RTOL[torch.float32], "dH")
    assert_close_scaled(p["weight"].grad, w.grad, GRAD_RTOL[torch.float32], "dW")


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                    reason="liger-kernel is not installed")
def test_gspo_kl_bias_correction_matches_liger():
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b, t = 4, 9
    gen, hidden, weight, target, mask, seq_adv, logp = liger_grpo_problem(7, b, t)
    old = (logp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)).float()
    ref = (logp + 0.2 * torch.randn(b, t, generator=gen, dtype=torch.float64)).float()

    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = LigerFusedLinearGRPOLoss(beta=0.1, use_ref_model=True, loss_type="dapo",
                                     epsilon_low=0.2, epsilon_high=0.28, compiled=False,
                                     importance_sampling_level="sequence",
                                     use_bias_correction_kl=True)
    out = liger(h1, w1, target, mask.long(), seq_adv, ref_per_token_logps=ref,
                old_per_token_logps=old)
    (out[0] if isinstance(out, tuple) else out).backward()
    liger_loss = out[0] if isinstance(out, tuple) else out

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss = fused_linear_ppo_loss(h2, w2, target, old, seq_adv[:, None].expand(b, t).contiguous(),
                                 mask, clip_low=0.2, clip_high=0.28, reduction="mean",
                                 beta=0.1, ref_logprobs=ref, kl_estimator="k3_unclipped",
                                 kl_bias_correction=True, importance_sampling_level="sequence",
                                 sequence_ids=torch.arange(b)[:, None].expand(b, t))
    loss.backward()
    assert abs(loss.item() - liger_loss.item()) <= 1e-5 * (1 + abs(liger_loss.item()))
    assert_close_scaled(h2.grad, h1.grad, GRAD_RTOL[torch.float32], "dH")
    assert_close_scaled(w2.grad, w1.grad, GRAD_RTOL[torch.float32], "dW")


# ---- 5. bias stride; soft-capping at large caps --------------------------------------------
def test_strided_bias_equals_its_contiguous_copy(engine, device):
    p = make_problem(12, 16, 64, torch.float32, device, seed=8)
    wide = torch.randn(128, generator=torch.Generator().manual_seed(2)).to(device)
    losses = []
    for bias in (wide[::2], wide[::2].contiguous()):
        losses.append(fused_linear_nft_loss(**_nft_args(p), bias=bias, **engine).detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    logp = fused_linear_logprobs(p["hidden"], p["weight"], p["target"], bias=wide[::2],
                                 **engine)
    want, _ = reference_logprobs(p["hidden"].detach().cpu(), p["weight"].detach().cpu(),
                                 p["target"].cpu(), bias=wide[::2].cpu())
    torch.testing.assert_close(logp.cpu().double(), want, rtol=0, atol=2e-5)


@pytest.mark.parametrize("cap", [30.0, 1e4, 1e6])
def test_soft_cap_is_accurate_for_large_caps(engine, device, cap):
    """c tanh(z / c) -> z as c grows: fp32 logp within 2e-5 of float64 for every cap (the
    exp form of tanh lost 5e-4 at c = 1e4 and 0.04 at c = 1e6), and dH too."""
    p = make_problem(16, 16, 96, torch.float32, device, seed=9, logit_scale=4.0)
    logp = fused_linear_logprobs(p["hidden"], p["weight"], p["target"], softcap=cap, **engine)
    h = p["hidden"].detach().cpu().double().requires_grad_(True)
    want, _ = reference_logprobs(h, p["weight"].detach().cpu(), p["target"].cpu(), softcap=cap)
    torch.testing.assert_close(logp.detach().cpu().double(), want.detach(), rtol=0, atol=2e-5)
    logp.sum().backward()
    want.sum().backward()
    assert_close_scaled(p["hidden"].grad, h.grad, GRAD_RTOL[torch.float32], "dH")


# ---- 6. bias dtype; validate=False with NaN on padded rows ---------------------------------
def test_bias_of_another_dtype_is_named(device):
    p = make_problem(6, 8, 20, torch.float32, device, seed=10)
    with pytest.raises(TypeError, match="bias dtype torch.float64 does not match weight"):
        fused_linear_nft_loss(**_nft_args(p), bias=torch.zeros(20, dtype=torch.float64,
                                                                device=device))


@pytest.mark.parametrize("head", ["nft", "logprobs"])
def test_validate_false_never_reads_padded_hidden_states(engine, device, head):
    """Padded tokens stay in the GEMMs with validate=False: a NaN hidden state there must
    still give zero gradient, not a NaN dW."""
    p = make_problem(20, 16, 64, torch.float32, device, seed=11, bias=True)
    mask = p["mask"]
    results = []
    for poison in (False, True):
        hidden = p["hidden"].detach().clone()
        if poison:
            hidden[~mask] = float("nan")
        hidden.requires_grad_(True)
        weight = p["weight"].detach().clone().requires_grad_(True)
        bias = p["bias"].detach().clone().requires_grad_(True)
        if head == "nft":
            loss = fused_linear_nft_loss(hidden, weight, p["target"], p["old"], p["rewards"],
                                         p["rate"], mask, bias=bias, validate=False,
                                         reduction="mean", **engine)
        else:
            logp = fused_linear_logprobs(hidden, weight, p["target"], bias=bias, mask=mask,
                                         validate=False, **engine)
            loss = (logp * torch.linspace(0.5, 1.5, 20, device=device)).sum()
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(weight.grad).all() and torch.isfinite(bias.grad).all()
        results.append((loss.detach(), weight.grad, bias.grad, hidden.grad[mask]))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_infinite_old_logprobs_are_refused(engine, device):
    p = make_problem(6, 8, 20, torch.float32, device, seed=12, mask_kind="all")
    old = p["old"].clone()
    old[3] = float("inf")
    with pytest.raises(ValueError, match="old_logprobs must be log-probabilities"):
        fused_linear_nft_loss(**{**_nft_args(p), "old_logprobs": old}, **engine)
    with pytest.raises(ValueError, match="old_logprobs must be log-probabilities"):
        ppo_clip_loss(p["old"] + 0.1, old, p["rewards"], impl=engine["impl"])
    old[3] = float("-inf")  # probability 0 is a valid log-probability
    loss = fused_linear_ppo_loss(**{**_ppo_args(p), "old_logprobs": old}, **engine)
    assert torch.isfinite(loss)
