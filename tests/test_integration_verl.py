"""The verl adapter against verl itself: its policy-loss registry, its ActorConfig, its GRPO
advantage estimator (Dr. GRPO form), its loss aggregation; the numbers against nft_loss."""
import importlib.metadata

import pytest
import torch

verl = pytest.importorskip("verl", reason="the verl adapter tests need `pip install 'nft-kernels[verl]'`")

from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig, PolicyLossConfig

from nft_kernels import nft_loss
from nft_kernels.integrations import _versions
from nft_kernels.integrations import verl as nft_verl

K = 8


def _actor_config(loss_mode="nft", loss_agg_mode="token-mean"):
    return ActorConfig(strategy="fsdp", rollout_n=K, ppo_mini_batch_size=4,
                       ppo_micro_batch_size_per_gpu=4, loss_agg_mode=loss_agg_mode,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode))


def _batch(groups=4, length=7, seed=0, all_agree=True, norm_by_std=False):
    """Binary rewards for ``groups`` prompts x K answers, advantages from verl's own GRPO
    estimator, ragged response masks and log-probs with a small off-policy drift."""
    g = torch.Generator().manual_seed(seed)
    n = groups * K
    rewards = (torch.rand(n, generator=g) < 0.5).float()
    if all_agree:
        rewards[:K] = 1.0                      # one group all right: no signal
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    scores = torch.zeros(n, length)
    scores[torch.arange(n), lengths - 1] = rewards          # verl puts the score on the last token
    index = [f"prompt{i // K}" for i in range(n)]
    import numpy as np
    adv, _ = core_algos.compute_grpo_outcome_advantage(scores, mask, np.array(index, dtype=object),
                                                       norm_adv_by_std_in_grpo=norm_by_std)
    old = -torch.rand(n, length, generator=g) * 3
    logp = (old + 0.2 * torch.randn(n, length, generator=g)).clamp(max=0).requires_grad_(True)
    return {"rewards": rewards, "mask": mask, "adv": adv, "old": old, "logp": logp}


def test_nft_is_registered_under_verl_names():
    assert core_algos.get_policy_loss_fn("nft").nft_settings == nft_verl.PAPER_DEFAULTS
    rft = core_algos.get_policy_loss_fn("rft").nft_settings
    assert rft["neg_weight"] == 0.0 and rft["normalize"] == 0


def test_plugin_entry_point_is_installed():
    """`pip install nft-kernels` makes every process that imports verl register the losses."""
    eps = importlib.metadata.entry_points(group="verl.plugins")
    assert any(ep.value == "nft_kernels.integrations.verl" for ep in eps)


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean",
                                           "seq-mean-token-sum"])
def test_registered_loss_equals_nft_loss(loss_agg_mode):
    b = _batch()
    cfg = _actor_config(loss_agg_mode=loss_agg_mode)
    fn = core_algos.get_policy_loss_fn(cfg.policy_loss.loss_mode)
    loss, metrics = fn(old_log_prob=b["old"], log_prob=b["logp"], advantages=b["adv"],
                       response_mask=b["mask"].bool(), loss_agg_mode=cfg.loss_agg_mode,
                       config=cfg, rollout_is_weights=None)
    (grad,) = torch.autograd.grad(loss, b["logp"])

    # The reference: nft_loss on the rewards themselves, r_hat the group mean.
    logp = b["logp"].detach().clone().requires_grad_(True)
    rate = b["rewards"].view(-1, K).mean(1).repeat_interleave(K)
    signal = (rate > 0) & (rate < 1)
    counted = b["mask"].bool() & signal[:, None]
    width = logp.shape[1]
    per_token = nft_loss(logp, b["old"], b["rewards"][:, None].expand(-1, width),
                         rate[:, None].expand(-1, width), counted, reduction="none")
    m = b["mask"]
    if loss_agg_mode == "token-mean":
        ref = per_token.sum() / m.sum()
    elif loss_agg_mode == "seq-mean-token-mean":
        ref = ((per_token * m).sum(1) / m.sum(1)).mean()
    else:
        ref = (per_token * m).sum(1).mean()
    (ref_grad,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert grad[:K].abs().max() == 0          # the all-right group carries no signal
    assert grad[K:].abs().max() > 0
    assert metrics["actor/nft_signal_fraction"] == pytest.approx(signal.float().mean().item())


def test_rollout_correction_weights_multiply_per_token():
    b = _batch(seed=1)
    cfg = _actor_config()
    fn = core_algos.get_policy_loss_fn("nft")
    weights = torch.rand(b["mask"].shape, generator=torch.Generator().manual_seed(5))
    plain, _ = fn(b["old"], b["logp"], b["adv"], b["mask"].bool(), "token-sum", cfg, None)
    (g_plain,) = torch.autograd.grad(plain, b["logp"])
    weighted, _ = fn(b["old"], b["logp"], b["adv"], b["mask"].bool(), "token-sum", cfg, weights)
    (g_weighted,) = torch.autograd.grad(weighted, b["logp"])
    torch.testing.assert_close(g_weighted, g_plain * weights, rtol=1e-5, atol=1e-7)


def test_std_normalized_advantages_are_refused_with_the_fix():
    b = _batch(norm_by_std=True, seed=2)
    fn = core_algos.get_policy_loss_fn("nft")
    with pytest.raises(ValueError, match="norm_adv_by_std_in_grpo=False"):
        fn(b["old"], b["logp"], b["adv"], b["mask"].bool(), "token-mean", _actor_config(), None)


def test_token_level_advantages_are_refused():
    b = _batch(seed=3)
    adv = b["adv"] + 0.01 * torch.arange(b["adv"].shape[1])[None, :] * b["mask"]
    with pytest.raises(ValueError, match="vary along a response"):
        core_algos.get_policy_loss_fn("nft")(b["old"], b["logp"], adv, b["mask"].bool(),
                                             "token-mean", _actor_config(), None)


def test_register_variants_and_refuse_bad_settings():
    fn = nft_verl.register("nft_eps4_test", clip_negative=4.0, normalize=2)
    assert core_algos.get_policy_loss_fn("nft_eps4_test") is fn
    with pytest.raises(ValueError, match="clip_negative"):
        nft_verl.register("nft_bad_test", clip_negative=-1.0)
    with pytest.raises(TypeError, match="unknown NFT setting"):
        nft_verl.register("nft_bad_test", epsilon=0.2)
    with pytest.raises(ValueError, match="not NFT's"):
        nft_verl.register("vanilla")


def test_untested_verl_version_is_one_clear_error(monkeypatch):
    monkeypatch.delenv(_versions.ESCAPE, raising=False)
    with pytest.raises(ImportError, match=r"tested with verl>=.*found verl 0\.4\.1.*nft-kernels\[verl\]"):
        _versions.check_version("verl", installed="0.4.1")
    assert _versions.check_version("verl") == verl.__version__


def test_verl_actor_loss_entry_point_dispatches_to_nft():
    """verl's own actor loss (`verl.workers.utils.losses.ppo_loss`, what its FSDP workers call)
    with `policy_loss.loss_mode=nft` in its ActorConfig: flat (unpadded) model log-probs in,
    the same loss and gradient as calling the registered function on padded tensors."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    b = _batch(groups=2, length=5, seed=4)
    n, width = b["mask"].shape
    prompt_len = 3
    response_lens = b["mask"].sum(1).long()
    # The model's output for each sequence: one log-prob per position, shifted by one token
    # (position prompt_len - 1 + j scores response token j), concatenated without padding.
    flat_parts = []
    for i in range(n):
        seq = torch.zeros(prompt_len + int(response_lens[i]))
        seq[prompt_len - 1: prompt_len - 1 + int(response_lens[i])] = \
            b["logp"].detach()[i, :int(response_lens[i])]
        flat_parts.append(seq)
    flat = torch.cat(flat_parts).requires_grad_(True)
    attention = torch.cat([torch.ones(n, prompt_len), b["mask"]], dim=1).long()
    data = TensorDict({"prompts": torch.ones(n, prompt_len, dtype=torch.long),
                       "responses": torch.ones(n, width, dtype=torch.long),
                       "attention_mask": attention, "response_mask": b["mask"].long(),
                       "old_log_probs": b["old"], "advantages": b["adv"]}, batch_size=[n])
    tu.assign_non_tensor(data, dp_size=1, batch_num_tokens=int(b["mask"].sum()),
                         global_batch_size=n)
    cfg = _actor_config()
    loss, metrics = ppo_loss(cfg, {"log_probs": flat}, data)
    (grad_flat,) = torch.autograd.grad(loss, flat)

    fn = core_algos.get_policy_loss_fn("nft")
    logp = b["logp"].detach().clone().requires_grad_(True)
    ref, _ = fn(b["old"], logp, b["adv"], b["mask"].bool(), "token-mean", _actor_config(), None)
    (ref_grad,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-7)
    got = torch.stack([torch.nn.functional.pad(
        grad_flat[sum(len(p) for p in flat_parts[:i]) + prompt_len - 1:][:int(response_lens[i])],
        (0, width - int(response_lens[i]))) for i in range(n)])
    torch.testing.assert_close(got, ref_grad, rtol=1e-5, atol=1e-8)
    assert ref_grad.abs().max() > 0
    assert "actor/nft_signal_fraction" in metrics


@pytest.fixture
def restore_model_forward(monkeypatch):
    """verl patches ``forward`` on the model class: put it back after the test. (verl 0.9.1's
    apply_monkey_patch also patches TRL's value-head model when TRL is importable, which TRL
    1.16, installed here for the TRL adapter, no longer has: that part is switched off.)"""
    from verl.models.transformers import monkey_patch

    monkeypatch.setattr(monkey_patch, "is_trl_available", lambda: False)
    saved = {}

    def remember(model):
        saved.setdefault(type(model), type(model).forward)
    yield remember
    for cls, forward in saved.items():
        cls.forward = forward


def _patched_outputs(model, backend, input_ids, attention_mask, position_ids, temperature):
    """verl's own model patching with fused kernels, then its patched forward: the log-probs
    and entropy of the next tokens and their gradients for a fixed mix of both."""
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True,
                       fused_kernels_backend=backend)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=False, return_dict=True, temperature=temperature)
    g = torch.Generator().manual_seed(1)
    u, w = torch.rand(input_ids.shape, generator=g), torch.rand(input_ids.shape, generator=g)
    ((out.log_probs * u).sum() + (out.entropy * w).sum()).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.log_probs.detach(), out.entropy.detach(), grads


def test_fused_kernels_backend_nft_kernels_equals_verls_torch_backend(restore_model_forward):
    """actor_rollout_ref.model.fused_kernel_options.impl_backend=nft_kernels: verl's patched
    forward of a tiny Qwen2 returns the log-probs and entropy of its own torch backend, with
    the same gradients, without forming the logits."""
    from nft_train.tiny import build_tiny_model, build_tokenizer

    model = build_tiny_model(build_tokenizer(), seed=0)
    restore_model_forward(model)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    position_ids = torch.arange(11).expand(3, 11)
    theirs = _patched_outputs(model, "torch", input_ids, attention_mask, position_ids, 0.7)
    ours = _patched_outputs(model, nft_verl.FUSED_BACKEND, input_ids, attention_mask,
                            position_ids, 0.7)
    assert type(model).forward is nft_verl.forward_with_nft_kernels
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-5)
    assert ours[2].keys() == theirs[2].keys() and "lm_head.weight" in ours[2]
    for name, grad in theirs[2].items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-4, atol=1e-5 * (1 + scale),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_unknown_fused_backends_still_reach_verl(restore_model_forward):
    """Only impl_backend=nft_kernels is ours: other names go to verl's own patching."""
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    from nft_train.tiny import build_tiny_model, build_tokenizer

    model = build_tiny_model(build_tokenizer(), seed=0)
    restore_model_forward(model)
    before = type(model).forward
    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True,
                       fused_kernels_backend="not-a-backend")  # verl skips it, as it always has
    assert type(model).forward is before
