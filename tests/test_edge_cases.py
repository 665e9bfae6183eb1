"""Empty inputs, extreme ratios, no_grad, torch.compile, shapes and the module forms."""

import pytest
import torch
from helpers import make_problem

from nft_kernels import (
    FusedLinearNFTLoss,
    FusedLinearPPOLoss,
    NFTLoss,
    fused_linear_logprobs,
    fused_linear_nft_loss,
    nft_loss,
)
from nft_kernels import backend
from nft_kernels.reference import reference_nft_loss


def _args(p):
    return (p["hidden"], p["weight"], p["target"], p["old"], p["rewards"], p["rate"])


def test_triton_impl_really_runs_the_kernels(device):
    assert backend.resolve_impl("triton", device) == "triton"
    assert backend.resolve_impl("auto", device) == "triton"
    if device.type == "cpu":
        from nft_kernels import triton_launch

        assert triton_launch.INTERPRET


def test_no_tokens_and_no_counted_tokens_give_zero_loss_and_zero_grads(engine, device):
    for n, mask_kind in ((0, "all"), (5, "none")):
        p = make_problem(n, 8, 30, torch.float32, device, seed=0, mask_kind=mask_kind)
        for reduction in ("sum", "mean"):
            loss = fused_linear_nft_loss(*_args(p), p["mask"], **engine, reduction=reduction)
            assert loss.item() == 0.0
            loss.backward()
            assert p["hidden"].grad is not None and p["weight"].grad is not None
            assert (p["hidden"].grad == 0).all() and (p["weight"].grad == 0).all()
            p["hidden"].grad = p["weight"].grad = None


def test_extreme_ratios_and_rates_stay_finite(engine, device):
    """Log-ratios far past max_log_ratio, old = -inf, rates at 0 and 1, tiny eps."""
    p = make_problem(32, 16, 40, torch.float32, device, seed=4, log_ratio_range=(-60.0, 60.0),
                     rate_range=(0.0, 1.0), logit_scale=50.0)
    p["old"][0] = float("-inf")
    p["rate"][1], p["rate"][2] = 0.0, 1.0
    loss = fused_linear_nft_loss(*_args(p), **engine, clip_negative=1e-3, normalize=2)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(p["hidden"].grad).all() and torch.isfinite(p["weight"].grad).all()


def test_no_grad_and_on_policy_ratio_is_exactly_one(engine, device):
    p = make_problem(20, 16, 50, torch.float32, device, seed=6)
    with torch.no_grad():
        old = fused_linear_logprobs(p["hidden"], p["weight"], p["target"], **engine)
        loss = fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], old, p["rewards"],
                                     p["rate"], **engine, reduction="none")
    assert not loss.requires_grad
    logp = fused_linear_logprobs(p["hidden"], p["weight"], p["target"], **engine)
    assert torch.equal(logp.detach(), old)  # R = exp(0) = 1 exactly
    # On-policy the positive term is -log 1 = 0 and the negative term is -log 1 = 0.
    assert (loss == 0).all()


def test_leading_dimensions_and_int32_targets(engine, device):
    p = make_problem(24, 12, 45, torch.float32, device, seed=7, mask_kind="all")
    flat = fused_linear_nft_loss(*_args(p), **engine, reduction="none")
    shaped = fused_linear_nft_loss(
        p["hidden"].reshape(4, 6, 12), p["weight"], p["target"].reshape(4, 6).int(),
        p["old"].reshape(4, 6), p["rewards"].reshape(4, 6), p["rate"].reshape(4, 6),
        **engine, reduction="none")
    assert shaped.shape == (4, 6)
    torch.testing.assert_close(shaped.reshape(-1), flat)


def test_non_contiguous_inputs(engine, device):
    p = make_problem(20, 16, 40, torch.float32, device, seed=8, mask_kind="all")
    hidden_t = p["hidden"].detach().T.contiguous().T  # column-major [N, H]
    weight_wide = torch.randn(40, 32, device=device)[:, ::2]  # strided view
    old = torch.stack([p["old"], p["old"]], 1)[:, 0]  # stride 2
    loss = fused_linear_nft_loss(hidden_t, weight_wide, p["target"], old, p["rewards"],
                                 p["rate"], **engine)
    ref = reference_nft_loss(hidden_t, weight_wide, p["target"], old, p["rewards"], p["rate"])
    assert abs(loss.item() - ref.item()) <= 1e-4 * (1 + abs(ref.item()))


def test_torch_compile_caller_gives_the_same_result(engine, device):
    """A compiled training step graph-breaks cleanly around the loss and matches eager."""
    torch.manual_seed(0)
    n, h, v = 16, 16, 32
    body = torch.nn.Linear(h, h).to(device)
    head = torch.nn.Linear(h, v, bias=False).to(device)
    x = torch.randn(n, h, device=device)
    p = make_problem(n, h, v, torch.float32, device, seed=9)

    def step(inputs):
        hidden = torch.tanh(body(inputs))
        return fused_linear_nft_loss(hidden, head.weight, p["target"], p["old"], p["rewards"],
                                     p["rate"], p["mask"], **engine)

    eager = step(x)
    eager_grad = torch.autograd.grad(eager, body.weight)[0]
    compiled = torch.compile(step, backend="aot_eager")(x)
    compiled_grad = torch.autograd.grad(compiled, body.weight)[0]
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_module_forms_match_functions(device):
    p = make_problem(18, 8, 33, torch.float32, device, seed=10, bias=True)
    module = FusedLinearNFTLoss(normalize=2, clip_negative=0.5)
    expected = fused_linear_nft_loss(*_args(p), p["mask"], bias=p["bias"], normalize=2,
                                     clip_negative=0.5)
    torch.testing.assert_close(module(*_args(p), p["mask"], bias=p["bias"]), expected)
    assert "normalize=2" in repr(module)
    logp = fused_linear_logprobs(p["hidden"], p["weight"], p["target"], bias=p["bias"])
    torch.testing.assert_close(
        NFTLoss(normalize=0)(logp, p["old"], p["rewards"], p["rate"], p["mask"]),
        nft_loss(logp, p["old"], p["rewards"], p["rate"], p["mask"], normalize=0))
    ppo = FusedLinearPPOLoss(clip_high=0.28)(p["hidden"], p["weight"], p["target"], p["old"],
                                             p["rewards"] - 0.5, p["mask"], bias=p["bias"])
    assert torch.isfinite(ppo)


def test_return_stats_gives_logprobs_and_entropy(engine, device):
    p = make_problem(12, 8, 21, torch.float32, device, seed=12, mask_kind="all")
    loss, stats = fused_linear_nft_loss(*_args(p), **engine, return_stats=True)
    logp, entropy = fused_linear_logprobs(p["hidden"], p["weight"], p["target"],
                                          return_entropy=True, **engine)
    torch.testing.assert_close(stats["logprobs"], logp.detach())
    torch.testing.assert_close(stats["entropy"], entropy.detach())
    assert not stats["logprobs"].requires_grad and loss.requires_grad


def test_single_token_vocabulary_has_exactly_zero_gradient(engine, device):
    """V = 1: logp = 0 whatever the weights, so every gradient is 0 even where g is huge
    (log-ratios near the clamp). Regression: the torch path once recomputed the logits with a
    different row set, and 1 - exp(x - lse) was a few ulps off, times g ~ 1e4."""
    p = make_problem(5, 7, 1, torch.float32, device, seed=0, log_ratio_range=(8.0, 12.0),
                     mask_kind="random")
    loss = fused_linear_nft_loss(*_args(p), p["mask"], **engine, normalize=0)
    loss.backward()
    assert (p["hidden"].grad == 0).all() and (p["weight"].grad == 0).all()


def test_validate_false_reads_nothing_back_to_the_host(engine, device, monkeypatch):
    """A CPU stand-in for the GPU test of no synchronisation: with validate=False no value is
    read back (``item``, ``tolist``, truth value, ``nonzero``) anywhere in the call, forward and
    backward, in either mode (the lean PyTorch path compacts padding on the host by design)."""
    if engine["impl"] == "torch" and engine["mode"] == "lean":
        pytest.skip("the lean PyTorch path (a CPU fallback) compacts padding on the host")
    p = make_problem(30, 16, 70, torch.float32, device, seed=13)

    def refuse(*args, **kwargs):
        raise AssertionError("a host read in a validate=False call")

    loss_fn = lambda: fused_linear_nft_loss(*_args(p), p["mask"], validate=False,  # noqa: E731
                                            reduction="mean", **engine)
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "nonzero"):
            m.setattr(torch.Tensor, name, refuse)
        m.setattr(torch, "nonzero", refuse)
        loss = loss_fn()
        loss.backward()
    expected = fused_linear_nft_loss(*_args(p), p["mask"], reduction="mean", **engine)
    torch.testing.assert_close(loss, expected)
