"""Bad input fails early with an error that names the argument."""

import pytest
import torch
from helpers import make_problem

from nft_kernels import fused_linear_nft_loss, fused_linear_ppo_loss, nft_loss


@pytest.fixture
def problem(device):
    return make_problem(6, 8, 20, torch.float32, device, seed=0)


def call(p, impl="auto", **overrides):
    args = dict(hidden=p["hidden"], weight=p["weight"], target=p["target"],
                old_logprobs=p["old"], rewards=p["rewards"], correct_rate=p["rate"],
                mask=p["mask"])
    options = {k: v for k, v in overrides.items() if k not in args}
    args.update({k: v for k, v in overrides.items() if k in args})
    return fused_linear_nft_loss(**args, impl=impl, **options)


CASES = [
    (dict(hidden=torch.randn(6, 9)), ValueError, "hidden has H=9"),
    (dict(weight=torch.randn(20, 8, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(hidden=torch.randn(6, 8).int()), TypeError, "hidden must be float32"),
    (dict(weight=torch.randn(20)), ValueError, "weight must have shape"),
    (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, "target must have shape"),
    (dict(target=torch.zeros(6)), TypeError, "target must be an int64 or int32"),
    (dict(old_logprobs=torch.zeros(7)), ValueError, "old_logprobs must have shape"),
    (dict(rewards=torch.ones(6, dtype=torch.long)), TypeError, "rewards must be a floating"),
    (dict(mask=torch.ones(6)), TypeError, "mask must be a bool"),
    (dict(rewards=[1.0] * 6), TypeError, "rewards must be a torch.Tensor"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be finite"),
    (dict(normalize=3), ValueError, "normalize must be one of"),
    (dict(clip_negative=0.0), ValueError, "clip_negative must be > 0"),
    (dict(neg_weight=-1.0), ValueError, "neg_weight must be >= 0"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(rate_clamp=(0.5, 0.2)), ValueError, "rate_clamp must satisfy"),
    (dict(filter_eps=-1.0), ValueError, "filter_eps must be >= 0"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
    (dict(bias=torch.zeros(19)), ValueError, "bias must have shape"),
    (dict(token_weights=torch.ones(5)), ValueError, "token_weights must have shape"),
    (dict(mode="fast"), ValueError, "mode must be one of"),
    (dict(mode="chunked", filter_eps=1e-3), ValueError, "filter_eps .* does not apply"),
    (dict(workspace_bytes=1.5), TypeError, "workspace_bytes must be an int"),
    (dict(workspace_bytes=0), ValueError, "workspace_bytes must be >= 1"),
    (dict(mode="chunked", workspace_bytes=79), ValueError,
     r"workspace_bytes=79 cannot hold one row"),
]


@pytest.mark.parametrize("overrides, error, message", CASES)
def test_bad_argument_is_named(problem, overrides, error, message):
    overrides = {k: (v.to(problem["hidden"].device) if isinstance(v, torch.Tensor) else v)
                 for k, v in overrides.items()}
    with pytest.raises(error, match=message):
        call(problem, **overrides)


@pytest.mark.parametrize("name, value, message", [
    ("target", 20, r"target must lie in \[0, 20\)"),
    ("target", -1, r"target must lie in \[0, 20\)"),
    ("rewards", 1.5, r"rewards must lie in \[0, 1\]"),
    ("rewards", float("nan"), r"rewards must lie in \[0, 1\]"),
    ("correct_rate", -0.1, r"correct_rate must lie in \[0, 1\]"),
    ("old_logprobs", float("nan"), "old_logprobs must be log-probabilities"),
    ("old_logprobs", float("inf"), "old_logprobs must be log-probabilities"),
    ("token_weights", -0.5, "token_weights must be finite and >= 0"),
    ("token_weights", float("nan"), "token_weights must be finite and >= 0"),
    ("hidden", float("inf"), "hidden contains NaN or Inf"),
    ("weight", float("nan"), "weight contains NaN or Inf"),
])
def test_bad_values_are_named(problem, impl, name, value, message):
    key = {"old_logprobs": "old", "correct_rate": "rate"}.get(name, name)
    if key == "token_weights":
        problem[key] = torch.ones_like(problem["old"])
    tensor = problem[key].detach().clone()
    tensor.view(-1)[0] = value
    mask = torch.ones(6, dtype=torch.bool, device=tensor.device)
    with pytest.raises(ValueError, match=message):
        call(problem, impl=impl, mask=mask, **{name: tensor})


def test_bad_values_on_uncounted_tokens_are_ignored(problem, impl):
    target = problem["target"].clone()
    rewards = problem["rewards"].clone()
    mask = torch.ones(6, dtype=torch.bool, device=target.device)
    mask[0] = False
    target[0], rewards[0] = 10_000, 7.0
    loss = call(problem, impl=impl, mask=mask, target=target, rewards=rewards)
    assert torch.isfinite(loss)


def test_validate_false_skips_value_checks_but_not_shapes(problem):
    rewards = problem["rewards"].clone()
    rewards[0] = 1.5  # outside [0, 1]: accepted without validation
    assert torch.isfinite(call(problem, rewards=rewards, validate=False))
    with pytest.raises(ValueError, match="old_logprobs must have shape"):
        call(problem, old_logprobs=torch.zeros(3, device=rewards.device), validate=False)


def test_ppo_and_logprob_entry_points_validate(problem):
    p = problem
    with pytest.raises(ValueError, match="clip_low must be < 1"):
        fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                              clip_low=1.0)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                              clip_ratio_c=0.5)
    with pytest.raises(ValueError, match="advantages contains NaN or Inf"):
        fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], p["old"],
                              torch.full_like(p["old"], float("inf")))
    with pytest.raises(ValueError, match=r"correct_rate must lie in \[0, 1\]"):
        nft_loss(p["old"], p["old"], p["rewards"], p["rate"] + 2)
    with pytest.raises(TypeError, match="logprobs must be a torch.Tensor"):
        nft_loss([0.0], p["old"], p["rewards"], p["rate"])


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from nft_kernels import backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' cannot run here"):
        backend.resolve_impl("triton", torch.device("cpu"))
    assert backend.resolve_impl("auto", torch.device("cpu")) == "torch"


def test_device_mismatch_is_named(problem):
    p = problem
    with pytest.raises(ValueError, match="weight is on meta"):
        fused_linear_nft_loss(p["hidden"], p["weight"].detach().to("meta"), p["target"],
                              p["old"], p["rewards"], p["rate"])
    with pytest.raises(ValueError, match="rewards is on meta"):
        fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"],
                              p["rewards"].to("meta"), p["rate"])
