"""Shared test helpers: random problems and dtype-justified tolerances."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, assume, settings

from nft_kernels.reference import reference_logprobs, reference_with_grads

# Gradient tolerance, as a fraction of the reference gradient's largest magnitude.
# fp32: fp32 accumulation over H and V (~1e-6) amplified by at most 1/eps of the negative
#       branch (eps >= 0.1 in the tests) -> 1e-4.
# fp16 / bf16: on the GPU dz is rounded to the input dtype before the two gradient GEMMs
#       (unit roundoff 2^-11 / 2^-8) and the result is rounded once more to the input dtype;
#       a few roundoffs -> 4e-3 / 2e-2. (The interpreter upcasts to fp32, so CPU runs are tighter.)
GRAD_RTOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
# Loss and log-probs are accumulated in fp32 from exact products whatever the input dtype.
LOSS_RTOL = 1e-4
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def property_settings(max_examples=20):
    """Hypothesis settings of the kernel property tests: reproducible draws (derandomized, no
    example database), no deadline (interpreted kernels are slow), fixtures allowed.
    ``NFT_PROPERTY_EXAMPLES`` caps the examples (the GPU acceptance run's short profile: each
    example compiles fresh Triton specialisations there)."""
    cap = int(os.environ.get("NFT_PROPERTY_EXAMPLES", "0") or 0)
    if cap > 0:
        max_examples = min(max_examples, cap)
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def assert_close_scaled(actual, expected, rtol, what, atol=0.0):
    """Max error within ``rtol`` of the reference's largest magnitude, plus ``atol`` (an
    absolute floor for terms whose fp32 rounding does not shrink with the result)."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    bound = rtol * max(scale, 1e-6) + atol
    assert err <= bound, f"{what}: max error {err:.3e} vs scale {scale:.3e} (bound {bound:.3e})"


def entropy_gradient_floors(hidden, weight, bias, temperature, coefficient):
    """fp32 floors for gradients of ``coefficient * entropy``: the kernels form
    d entropy / dx = -p (log p + H) with log p = x - lse, whose fp32 rounding is about
    eps * |lse| whatever the size of the result (large logits, nearly one-hot p: log p + H is
    a small difference of rounded terms). Summed with weights p (sum p = 1) into dH, dW, d bias.
    Returns (dH floor, dW floor, d bias floor)."""
    h = hidden.detach().double().cpu()
    w = weight.detach().double().cpu()
    x = h @ w.T
    if bias is not None:
        x = x + bias.detach().double().cpu()
    x = x / temperature
    eps = torch.finfo(torch.float32).eps
    per_logit = 16 * eps * abs(coefficient) * (1.0 + x.abs().max().item()) / temperature
    return (per_logit * w.abs().max().item(),
            per_logit * h.abs().max(dim=1).values.sum().item(),
            per_logit * h.shape[0])


def make_problem(n, h, v, dtype, device, *, seed, bias=False, temperature=1.0,
                 reward_kind="binary", mask_kind="random", log_ratio_range=(-2.0, 2.0),
                 rate_range=(0.0, 1.0), logit_scale=1.0):
    """A random fused-loss problem whose old log-probs sit a chosen log-ratio away."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * (logit_scale / max(h, 1) ** 0.5)
    b = torch.randn(v, generator=gen) * 0.5 if bias else None
    target = torch.randint(0, v, (n,), generator=gen)
    if reward_kind == "binary":
        rewards = (torch.rand(n, generator=gen) < 0.5).float()
    elif reward_kind == "positive":
        rewards = torch.ones(n)
    elif reward_kind == "negative":
        rewards = torch.zeros(n)
    else:
        rewards = torch.rand(n, generator=gen)
    lo, hi = rate_range
    rate = lo + (hi - lo) * torch.rand(n, generator=gen)
    if mask_kind == "all":
        mask = None
    elif mask_kind == "none":
        mask = torch.zeros(n, dtype=torch.bool)
    else:
        mask = torch.rand(n, generator=gen) < 0.75
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    b = None if b is None else b.to(dtype)
    logp, _ = reference_logprobs(hidden, weight, target, bias=b, temperature=temperature)
    a, z = log_ratio_range
    old = (logp - (a + (z - a) * torch.rand(n, generator=gen, dtype=torch.float64))).float()
    to = dict(device=device)
    return dict(
        hidden=hidden.to(**to).requires_grad_(True), weight=weight.to(**to).requires_grad_(True),
        bias=None if b is None else b.to(**to).requires_grad_(True), target=target.to(**to),
        old=old.to(**to), rewards=rewards.to(**to), rate=rate.to(**to),
        mask=None if mask is None else mask.to(**to),
    )


def check_against_reference(p, loss, ref, dtype, loss_scale, grad_rtol=None):
    """A fused loss (after backward) against ``reference_with_grads``: the loss to LOSS_RTOL of
    ``loss_scale`` (the sum of |per-token loss|), gradients to the dtype's GRAD_RTOL (or
    ``grad_rtol``, where a test justifies a wider one)."""
    rtol = GRAD_RTOL[dtype] if grad_rtol is None else grad_rtol
    ref_loss, ref_dh, ref_dw, ref_db = ref
    # A true gradient beyond the input dtype's range (fp16: 65504; reachable with R near e^10,
    # r_hat near 0.98 and normalize=0) cannot be returned in that dtype: it overflows to inf as
    # in any fp16 autograd op. Such draws are outside what can be checked.
    biggest = max(t.abs().max().item() for t in (ref_dh, ref_dw) if t.numel())
    assume(biggest < 0.5 * torch.finfo(dtype).max)
    assert torch.isfinite(loss).all()
    assert abs(loss.item() - ref_loss.item()) <= LOSS_RTOL * (1.0 + loss_scale), \
        f"loss {loss.item()} vs reference {ref_loss.item()}"
    assert_close_scaled(p["hidden"].grad, ref_dh, rtol, "dH")
    assert_close_scaled(p["weight"].grad, ref_dw, rtol, "dW")
    if p["bias"] is not None:
        assert_close_scaled(p["bias"].grad, ref_db, rtol, "d bias")


def check_fused_against_reference(p, loss, reference, per_token_args, *, dtype, reduction,
                                  upstream=None, weights=None, grad_rtol=None, **options):
    """After ``loss.backward()`` on a ``make_problem`` problem: compare ours with the float64
    ``reference`` (``reference_nft_loss`` / ``reference_ppo_loss``) reduced the same way, per-token
    ``weights`` first, then the counted-token sum or mean, or for ``reduction="none"`` the
    ``upstream``-weighted sum that was differentiated. ``options`` go to the reference."""
    n = p["target"].numel()
    mask = None if p["mask"] is None else p["mask"].cpu()
    args = [t.cpu() for t in per_token_args]

    def objective(*a, **kw):
        out = reference(*a, **{**kw, "reduction": "none"})
        if weights is not None:
            out = out * weights.double().cpu()
        if reduction == "none":
            return (out * upstream.double().cpu()).sum()
        count = n if mask is None else int(mask.sum())
        return out.sum() / max(count, 1) if reduction == "mean" else out.sum()

    ref = reference_with_grads(objective, p["hidden"], p["weight"], p["target"].cpu(), *args,
                               mask, bias=p["bias"], **options)
    detached = [None if t is None else t.detach().cpu() for t in (p["hidden"], p["weight"],
                                                                  p["bias"])]
    per_token = reference(detached[0], detached[1], p["target"].cpu(), *args, mask,
                          bias=detached[2], reduction="none", **options)
    check_against_reference(p, loss, ref, dtype, per_token.abs().sum().item(), grad_rtol)


def fused_head_loss(head, p, advantages, **options):
    """One fused loss call on a ``make_problem`` problem: ``head`` "nft" (its rewards and rates)
    or "ppo" (``advantages``). Returns (loss, the matching float64 reference, its per-token
    arguments) for ``check_fused_against_reference``."""
    from nft_kernels import fused_linear_nft_loss, fused_linear_ppo_loss
    from nft_kernels.reference import reference_nft_loss, reference_ppo_loss

    args = (p["hidden"], p["weight"], p["target"], p["old"])
    if head == "nft":
        loss = fused_linear_nft_loss(*args, p["rewards"], p["rate"], p["mask"], **options)
        return loss, reference_nft_loss, (p["old"], p["rewards"], p["rate"])
    advantages = advantages.to(p["old"].device)
    loss = fused_linear_ppo_loss(*args, advantages, p["mask"], **options)
    return loss, reference_ppo_loss, (p["old"], advantages)


def liger_grpo_problem(seed, b, t, h=16, v=40):
    """A [b, t] batch for the comparisons with Liger's fused GRPO loss: hidden, weight, target,
    mask, one advantage per sequence and the float64 log-probs; returns the generator too, so
    that a test draws its old / reference log-probs from the same stream."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) / 4
    target = torch.randint(0, v, (b, t), generator=gen)
    mask = torch.rand(b, t, generator=gen) < 0.8
    seq_adv = torch.randn(b, generator=gen)
    with torch.no_grad():
        logp, _ = reference_logprobs(hidden, weight, target)
    return gen, hidden, weight, target, mask, seq_adv, logp
