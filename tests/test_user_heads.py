"""User-defined heads on the fused path (fused_linear_policy_loss): against float64 in every
engine (Triton / PyTorch x chunked / lean), against the built-in heads written as user heads,
the loss family (CISPO, SAPO, W-REINFORCE / NSR, LUSPO's weights) against Liger-Kernel 0.8's
fused GRPO loss, 6NHV kept, and the errors a wrong head gets."""

import importlib.util

import pytest
import torch
from helpers import (
    DTYPES,
    GRAD_RTOL,
    assert_close_scaled,
    check_against_reference,
    liger_grpo_problem,
    make_problem,
    property_settings,
)
from hypothesis import given
from hypothesis import strategies as st

from nft_kernels import (
    fused_linear_logprobs,
    fused_linear_nft_loss,
    fused_linear_policy_loss,
    fused_linear_ppo_loss,
    losses,
    policy_loss,
)
from nft_kernels.reference import (
    reference_logprobs,
    reference_policy_loss,
    reference_with_grads,
)

needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None,
                                 reason="liger-kernel is not installed")


def _family(p, gen):
    """(name, loss_fn, per_token) for each member of the family on a make_problem problem."""
    n = p["target"].numel()
    adv = torch.randn(n, generator=gen)
    ppo_like = {"old_logprobs": p["old"], "advantages": adv}
    return [
        ("cispo", losses.cispo(clip_max=1.5), ppo_like),
        ("sapo", losses.sapo(), ppo_like),
        ("w_reinforce", losses.w_reinforce(), {"rewards": p["rewards"]}),
        ("nsr", losses.nsr(), {"rewards": p["rewards"]}),
    ]


def _check_against_float64(p, loss, loss_fn, per_token, *, reduction="sum", token_weights=None,
                           entropy_coef=0.0, temperature=1.0, rtol=GRAD_RTOL[torch.float32]):
    def objective(h, w, target, mask, bias=None):
        return reference_policy_loss(h, w, target, loss_fn, per_token, mask, bias=bias,
                                     temperature=temperature, token_weights=token_weights,
                                     entropy_coef=entropy_coef, reduction=reduction)

    ref_loss, ref_dh, ref_dw, _ = reference_with_grads(objective, p["hidden"], p["weight"],
                                                       p["target"], p["mask"])
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * (1.0 + abs(ref_loss.item())), \
        (loss.item(), ref_loss.item())
    assert_close_scaled(p["hidden"].grad, ref_dh, rtol, "dH")
    assert_close_scaled(p["weight"].grad, ref_dw, rtol, "dW")


@pytest.mark.parametrize("member", ["cispo", "sapo", "w_reinforce", "nsr"])
def test_family_matches_float64_in_every_engine(engine, member):
    p = make_problem(37, 16, 50, torch.float32, "cpu", seed=11, log_ratio_range=(-0.6, 0.6))
    gen = torch.Generator().manual_seed(5)
    name, loss_fn, per_token = next(m for m in _family(p, gen) if m[0] == member)
    loss = fused_linear_policy_loss(p["hidden"], p["weight"], p["target"], loss_fn, p["mask"],
                                    per_token=per_token, reduction="mean", **engine)
    loss.backward()
    _check_against_float64(p, loss, loss_fn, per_token, reduction="mean")


@property_settings(20)
@given(
    n=st.integers(1, 40), h=st.sampled_from([1, 7, 16, 23]), v=st.sampled_from([1, 31, 97]),
    dtype=st.sampled_from(DTYPES), member=st.sampled_from(["cispo", "sapo", "w_reinforce"]),
    temperature=st.sampled_from([1.0, 0.6]), bias=st.booleans(),
    mask_kind=st.sampled_from(["random", "all"]), reduction=st.sampled_from(["sum", "mean"]),
    chunk=st.sampled_from([None, 1, 7]), validate=st.booleans(), weighted=st.booleans(),
    entropy_coef=st.sampled_from([0.0, 0.05]), seed=st.integers(0, 2**16),
)
def test_user_heads_match_float64_property(engine, device, n, h, v, dtype, member, temperature,
                                           bias, mask_kind, reduction, chunk, validate,
                                           weighted, entropy_coef, seed):
    """Random shapes (primes, chunks of 1 and 7 rows crossing every boundary), dtypes,
    masks left on the device (validate=False), token weights, the entropy bonus: the user
    head's loss and gradients against float64 autograd through the same loss_fn."""
    p = make_problem(n, h, v, dtype, device, seed=seed, bias=bias, temperature=temperature,
                     mask_kind=mask_kind, log_ratio_range=(-1.0, 1.0))
    gen = torch.Generator().manual_seed(seed)
    _, loss_fn, per_token = next(m for m in _family(p, gen) if m[0] == member)
    per_token = {k: t.to(device) for k, t in per_token.items()}
    weights = None
    if weighted:
        weights = (2 * torch.rand(n, generator=gen) * (torch.rand(n, generator=gen) > 0.25))
        weights = weights.to(device)
    loss = fused_linear_policy_loss(
        p["hidden"], p["weight"], p["target"], loss_fn, p["mask"], per_token=per_token,
        bias=p["bias"], temperature=temperature, token_weights=weights,
        entropy_coef=entropy_coef, reduction=reduction, validate=validate,
        workspace_bytes=None if chunk is None else 4 * v * chunk, **engine)
    loss.backward()
    cpu_inputs = {k: t.cpu() for k, t in per_token.items()}

    def objective(hh, ww, target, mask, bias=None):
        return reference_policy_loss(hh, ww, target, loss_fn, cpu_inputs, mask, bias=bias,
                                     temperature=temperature, token_weights=None if weights
                                     is None else weights.cpu(), entropy_coef=entropy_coef,
                                     reduction=reduction)

    mask = None if p["mask"] is None else p["mask"].cpu()
    ref = reference_with_grads(objective, p["hidden"], p["weight"], p["target"].cpu(), mask,
                               bias=p["bias"])
    detached = [None if t is None else t.detach().cpu() for t in (p["hidden"], p["weight"],
                                                                  p["bias"])]
    per_token_loss = reference_policy_loss(detached[0], detached[1], p["target"].cpu(),
                                           loss_fn, cpu_inputs, mask, bias=detached[2],
                                           temperature=temperature, reduction="none")
    check_against_reference(p, loss, ref, dtype, per_token_loss.abs().sum().item())


@pytest.mark.parametrize("options", [
    dict(temperature=0.7, entropy_coef=0.05),
    dict(token_weights="random", reduction="sum"),
    dict(reduction="none"),
])
def test_user_head_options_match_float64(engine, options):
    """Temperature, the entropy bonus, token weights and per-token upstream gradients
    (reduction="none": the logits recomputed in the backward)."""
    p = make_problem(29, 16, 40, torch.float32, "cpu", seed=3, temperature=0.7)
    gen = torch.Generator().manual_seed(8)
    options = dict(options)
    weights = None
    if options.get("token_weights") == "random":
        weights = options["token_weights"] = torch.rand(29, generator=gen)
    loss_fn = losses.sapo(temperature_pos=1.3, temperature_neg=0.9)
    per_token = {"old_logprobs": p["old"], "advantages": torch.randn(29, generator=gen)}
    loss = fused_linear_policy_loss(p["hidden"], p["weight"], p["target"], loss_fn, p["mask"],
                                    per_token=per_token, **options, **engine)
    upstream = torch.rand(29, generator=gen)
    (loss * upstream).sum().backward() if loss.dim() else loss.backward()
    temperature = options.get("temperature", 1.0)
    coef = options.get("entropy_coef", 0.0)
    if loss.dim():  # "none": compare the upstream-weighted sum
        ref_fn = lambda x, **kw: loss_fn(x, **kw) * upstream.double()  # noqa: E731
        _check_against_float64(p, (loss * upstream).sum(), ref_fn, per_token,
                               temperature=temperature)
    else:
        _check_against_float64(p, loss, loss_fn, per_token, reduction=options.get(
            "reduction", "sum"), token_weights=weights, entropy_coef=coef,
            temperature=temperature)


@pytest.mark.parametrize("extra", ["softcap", "kl"])
def test_user_head_with_softcap_or_kl_matches_float64(engine, extra):
    """The soft cap (Gemma's c tanh(z / c)) and the KL term to a reference policy (k3 as TRL,
    beta 0.1) around a user head: the same as adding them to loss_fn in float64."""
    p = make_problem(23, 16, 40, torch.float32, "cpu", seed=12, bias=True, logit_scale=4.0)
    gen = torch.Generator().manual_seed(3)
    loss_fn = losses.cispo(clip_max=1.3)
    per_token = {"old_logprobs": p["old"], "advantages": torch.randn(23, generator=gen)}
    ref = p["old"] + 0.3 * torch.randn(23, generator=gen)
    options = dict(softcap=2.0) if extra == "softcap" else dict(
        ref_logprobs=ref, beta=0.1, kl_estimator="k3_unclipped")
    loss = fused_linear_policy_loss(p["hidden"], p["weight"], p["target"], loss_fn, p["mask"],
                                    per_token=per_token, bias=p["bias"], **options, **engine)
    loss.backward()

    def with_kl(logp, **inputs):
        out = loss_fn(logp, **inputs)
        if extra == "kl":
            x = ref.double() - logp
            out = out + 0.1 * (torch.exp(x) - x - 1.0)
        return out

    def objective(hh, ww, target, mask, bias=None):
        logp, _ = reference_logprobs(hh, ww, target, bias=bias,
                                     softcap=options.get("softcap"))
        out = with_kl(logp, **{k: v.double() for k, v in per_token.items()})
        return torch.where(mask, out, torch.zeros_like(out)).sum()

    ref_loss, ref_dh, ref_dw, ref_db = reference_with_grads(
        objective, p["hidden"], p["weight"], p["target"], p["mask"], bias=p["bias"])
    assert abs(loss.item() - ref_loss.item()) <= 1e-4 * (1.0 + abs(ref_loss.item()))
    assert_close_scaled(p["hidden"].grad, ref_dh, GRAD_RTOL[torch.float32], "dH")
    assert_close_scaled(p["weight"].grad, ref_dw, GRAD_RTOL[torch.float32], "dW")
    assert_close_scaled(p["bias"].grad, ref_db, GRAD_RTOL[torch.float32], "d bias")


@pytest.mark.parametrize("head", ["nft", "ppo"])
def test_builtin_heads_written_as_user_heads_give_the_same_gradients(engine, head):
    """NFT (Eq. 8) and PPO-clip written in ten lines of torch equal the built-in kernels'
    heads: the user-head route is the same math, only the head is evaluated by autograd."""
    p = make_problem(41, 16, 60, torch.float32, "cpu", seed=21, log_ratio_range=(-1.0, 1.0))
    gen = torch.Generator().manual_seed(2)
    adv = torch.randn(41, generator=gen)

    def nft(logp, old_logprobs, rewards, correct_rate):  # omega = 1 - r_hat, eps = 1
        log_ratio = (logp - old_logprobs).clamp(max=10.0)
        r_hat = correct_rate.clamp(0.02, 0.98)
        q = (1 - r_hat * log_ratio.exp()) / (1 - r_hat)
        q_st = q + (q.clamp(min=1.0) - q).detach()  # max_st: value clipped, gradient through
        return (1 - r_hat) * (-rewards * log_ratio - (1 - rewards) * torch.log(q_st))

    def ppo(logp, old_logprobs, advantages):
        ratio = (logp - old_logprobs).clamp(max=10.0).exp()
        return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.28))

    runs = []
    for builtin in (True, False):
        h = p["hidden"].detach().clone().requires_grad_(True)
        w = p["weight"].detach().clone().requires_grad_(True)
        args = (h, w, p["target"])
        if head == "nft" and builtin:
            loss = fused_linear_nft_loss(*args, p["old"], p["rewards"], p["rate"], p["mask"],
                                         **engine)
        elif head == "nft":
            loss = fused_linear_policy_loss(*args, nft, p["mask"], per_token=dict(
                old_logprobs=p["old"], rewards=p["rewards"], correct_rate=p["rate"]), **engine)
        elif builtin:
            loss = fused_linear_ppo_loss(*args, p["old"], adv, p["mask"], clip_high=0.28,
                                         **engine)
        else:
            loss = fused_linear_policy_loss(*args, ppo, p["mask"], per_token=dict(
                old_logprobs=p["old"], advantages=adv), **engine)
        loss.backward()
        runs.append((loss, h.grad, w.grad))
    (l1, dh1, dw1), (l2, dh2, dw2) = runs
    assert abs(l1.item() - l2.item()) <= 1e-5 * (1 + abs(l1.item()))
    assert_close_scaled(dh2, dh1, 1e-5, "dH")
    assert_close_scaled(dw2, dw1, 1e-5, "dW")


def test_a_scalar_loss_keeps_its_gradients_in_the_forward(monkeypatch):
    """6NHV: in the chunked mode a user head's "sum" loss computes dH and dW in the forward
    (three GEMMs per chunk, none in the backward), like the built-in heads."""
    from nft_kernels import chunked

    calls = []
    real = chunked._logits_into
    monkeypatch.setattr(chunked, "_logits_into",
                        lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    p = make_problem(40, 16, 50, torch.float32, "cpu", seed=1)
    per_token = {"old_logprobs": p["old"], "advantages": torch.randn(40)}
    loss = fused_linear_policy_loss(p["hidden"], p["weight"], p["target"], losses.cispo(),
                                    p["mask"], per_token=per_token, impl="torch",
                                    mode="chunked")
    forward_gemms = len(calls)
    assert p["hidden"].grad is None
    loss.backward()
    assert forward_gemms >= 1 and len(calls) == forward_gemms  # no logits recomputed


@needs_liger
@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo"])
@pytest.mark.parametrize("mode", ["chunked", "lean"])
def test_family_matches_liger(loss_type, mode):
    """Liger-Kernel 0.8's LigerFusedLinearGRPOLoss with the same loss_type (beta 0): loss and
    gradients. Its aggregations as token weights: cispo (as dapo) 1 / counted tokens; sapo
    (as grpo) 1 / (B |o_i|); luspo |o_i| / (B T) with the PPO-clip head (no padding: Liger's
    luspo sums padded positions too)."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b, t = 4, 7
    gen, hidden, weight, target, mask, seq_adv, logp = liger_grpo_problem(9, b, t)
    if loss_type == "luspo":
        mask = torch.ones_like(mask)
    old = (logp + 0.3 * torch.randn(b, t, generator=gen, dtype=torch.float64)).float()
    eps_high = 1.2 if loss_type == "cispo" else 0.28
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type=loss_type,
                                     epsilon_low=0.2, epsilon_high=eps_high, compiled=False)
    out = liger(h1, w1, target, mask.long(), seq_adv, old_per_token_logps=old)
    liger_loss = out[0] if isinstance(out, tuple) else out
    liger_loss.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    adv = seq_adv[:, None].expand(b, t).contiguous()
    counted = mask.float()
    if loss_type == "luspo":
        loss = fused_linear_ppo_loss(h2, w2, target, old, adv, mask, clip_low=0.2,
                                     clip_high=0.28, mode=mode,
                                     token_weights=losses.luspo_token_weights(mask))
    else:
        if loss_type == "cispo":
            loss_fn, weights = losses.cispo(clip_max=eps_high), counted / counted.sum()
        else:
            lengths = counted.sum(dim=1, keepdim=True).clamp(min=1)
            loss_fn, weights = losses.sapo(), counted / (lengths * b)
        loss = fused_linear_policy_loss(h2, w2, target, loss_fn, mask, mode=mode,
                                        per_token={"old_logprobs": old, "advantages": adv},
                                        token_weights=weights)
    loss.backward()
    assert abs(loss.item() - liger_loss.item()) <= 1e-5 * (1 + abs(liger_loss.item())), \
        (loss.item(), liger_loss.item())
    assert_close_scaled(h2.grad, h1.grad, GRAD_RTOL[torch.float32], "dH")
    assert_close_scaled(w2.grad, w1.grad, GRAD_RTOL[torch.float32], "dW")


@needs_liger
def test_vespo_by_the_two_pass_route_matches_liger():
    """VESPO's weight reads the whole response: refused on the fused path, and through
    fused_linear_logprobs + policy_loss(token_level=False) equal to Liger's "vespo"."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    b, t = 4, 7
    gen, hidden, weight, target, mask, seq_adv, logp = liger_grpo_problem(13, b, t)
    old = (logp + 0.2 * torch.randn(b, t, generator=gen, dtype=torch.float64)).float()
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, loss_type="vespo",
                                     compiled=False)
    out = liger(h1, w1, target, mask.long(), seq_adv, old_per_token_logps=old)
    liger_loss = out[0] if isinstance(out, tuple) else out
    liger_loss.backward()

    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    per_token = {"old_logprobs": old, "advantages": seq_adv[:, None].expand(b, t),
                 "sequence_ids": torch.arange(b)[:, None].expand(b, t).float()}
    with pytest.raises(ValueError, match="depends on other tokens"):
        fused_linear_policy_loss(h2, w2, target, losses.vespo(), mask, per_token=per_token)
    ours = policy_loss(fused_linear_logprobs(h2, w2, target, mask=mask), losses.vespo(), mask,
                       per_token=per_token, token_level=False, reduction="mean")
    ours.backward()
    assert abs(ours.item() - liger_loss.item()) <= 1e-5 * (1 + abs(liger_loss.item())), \
        (ours.item(), liger_loss.item())
    assert_close_scaled(h2.grad, h1.grad, GRAD_RTOL[torch.float32], "dH")
    assert_close_scaled(w2.grad, w1.grad, GRAD_RTOL[torch.float32], "dW")


def test_sequence_level_loss_by_the_two_pass_route():
    """A loss that reads a whole response (GSPO's mean log-ratio) is refused on the fused
    path with the route to take, and that route (fused log-probs + policy_loss(...,
    token_level=False)) equals the built-in GSPO."""
    p = make_problem(24, 16, 40, torch.float32, "cpu", seed=4, mask_kind="all")
    seq = torch.arange(24) // 6
    adv = torch.randn(24, generator=torch.Generator().manual_seed(1))

    def gspo(logp, old_logprobs, advantages, sequence_ids):
        total = torch.zeros(4, dtype=logp.dtype).index_add(0, sequence_ids.long(), logp - old_logprobs)
        ratio = (total / 6).exp().index_select(0, sequence_ids.long())
        return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))

    per_token = {"old_logprobs": p["old"], "advantages": adv, "sequence_ids": seq.float()}
    with pytest.raises(ValueError, match="depends on other tokens.*token_level=False"):
        fused_linear_policy_loss(p["hidden"], p["weight"], p["target"], gspo,
                                 per_token=per_token)
    logp = fused_linear_logprobs(p["hidden"], p["weight"], p["target"])
    loss = policy_loss(logp, gspo, per_token=per_token, token_level=False, reduction="mean")
    loss.backward()
    h = p["hidden"].detach().clone().requires_grad_(True)
    w = p["weight"].detach().clone().requires_grad_(True)
    builtin = fused_linear_ppo_loss(h, w, p["target"], p["old"], adv, reduction="mean",
                                    importance_sampling_level="sequence", sequence_ids=seq)
    builtin.backward()
    assert abs(loss.item() - builtin.item()) <= 1e-5 * (1 + abs(builtin.item()))
    assert_close_scaled(p["hidden"].grad, h.grad, 1e-5, "dH")


def test_module_form_equals_the_function():
    from nft_kernels import FusedLinearPolicyLoss

    p = make_problem(12, 8, 20, torch.float32, "cpu", seed=6)
    per_token = {"rewards": p["rewards"]}
    module = FusedLinearPolicyLoss(losses.w_reinforce(0.3), reduction="mean")
    assert "reduction='mean'" in repr(module)
    got = module(p["hidden"], p["weight"], p["target"], p["mask"], per_token=per_token)
    want = fused_linear_policy_loss(p["hidden"], p["weight"], p["target"],
                                    losses.w_reinforce(0.3), p["mask"], per_token=per_token,
                                    reduction="mean")
    assert torch.equal(got, want)


def test_policy_loss_on_given_logprobs_matches_autograd():
    gen = torch.Generator().manual_seed(0)
    logp = (-torch.rand(30, generator=gen) * 3).requires_grad_(True)
    old = -torch.rand(30, generator=gen) * 3
    adv = torch.randn(30, generator=gen)
    mask = torch.rand(30, generator=gen) < 0.7
    loss = policy_loss(logp, losses.sapo(), mask, per_token={"old_logprobs": old,
                                                              "advantages": adv})
    loss.backward()
    x = logp.detach().double().requires_grad_(True)
    want = torch.where(mask, losses.sapo()(x, old.double(), adv.double()), 0.0).sum()
    want.backward()
    assert abs(loss.item() - want.item()) < 1e-5 * (1 + abs(want.item()))
    assert torch.allclose(logp.grad.double(), x.grad, rtol=1e-5, atol=1e-6)


def _args():
    p = make_problem(10, 8, 20, torch.float32, "cpu", seed=0)
    return p, (p["hidden"], p["weight"], p["target"])


@pytest.mark.parametrize("loss_fn, per_token, error, message", [
    (lambda logp: logp.sum(), {}, ValueError, r"one floating-point loss per token \(shape"),
    (lambda logp: logp[:3], {}, ValueError, "one floating-point loss per token"),
    (lambda logp, x: torch.log(x) * logp, {"x": -torch.ones(10)}, ValueError,
     "non-finite loss or gradient on"),
    (lambda logp: logp - logp.mean(), {}, ValueError, "depends on other tokens"),
    ("not a function", {}, TypeError, "loss_fn must be callable"),
    (lambda logp, token_weights: logp, {"token_weights": torch.ones(10)}, ValueError,
     "arguments of their own"),
    (lambda logp, a: a * logp, {"a": torch.ones(9)}, ValueError, r"a must have shape \(10,\)"),
    (lambda logp, a: a * logp, {"a": torch.full((10,), float("nan"))}, ValueError,
     "a contains NaN or Inf"),
])
def test_a_wrong_head_gets_a_clear_error(engine, loss_fn, per_token, error, message):
    _, args = _args()
    with pytest.raises(error, match=message):
        fused_linear_policy_loss(*args, loss_fn, per_token=per_token, **engine)


def test_kl_bias_correction_needs_old_logprobs():
    p, args = _args()
    with pytest.raises(ValueError, match="kl_bias_correction=True .* old_logprobs"):
        fused_linear_policy_loss(*args, losses.nsr(), per_token={"rewards": p["rewards"]},
                                 ref_logprobs=p["old"], beta=0.1, kl_bias_correction=True)


def test_family_options_are_checked():
    with pytest.raises(ValueError, match="clip_max must be > 0"):
        losses.cispo(clip_max=0)
    with pytest.raises(ValueError, match="temperature_neg must be > 0"):
        losses.sapo(temperature_neg=-1)
    with pytest.raises(ValueError, match="positive_weight must be >= 0"):
        losses.w_reinforce(-0.5)
    with pytest.raises(ValueError, match="lambda_neg must be > 0"):
        losses.vespo(lambda_neg=0.0)
