"""The TRL adapter, for real: TRL's own GRPOTrainer machinery (sampling, rewards, batching,
optimizer) on a tiny Qwen2 built in code, with NFTTrainer's loss swapped in."""
import math

import pytest
import torch

trl = pytest.importorskip("trl", reason="the TRL adapter tests need `pip install 'nft-kernels[trl]'`")
datasets = pytest.importorskip("datasets")

from transformers import TrainerCallback

from nft_kernels.integrations import _versions
from nft_kernels.integrations.trl import NFTConfig, NFTTrainer
from nft_train.data import synthetic_problems, synthetic_reward
from nft_train.demo import sft_warm_start
from nft_train.tiny import build_tiny_model, build_tokenizer

K = 4  # completions per prompt


def _dataset(n=16):
    train, _ = synthetic_problems(2, 400, 10)
    return datasets.Dataset.from_dict({"prompt": [p.prompt for p in train[:n]],
                                       "answer": [p.answer for p in train[:n]]})


def exact_sum(completions, answer, **_):
    return [synthetic_reward(c, a) for c, a in zip(completions, answer)]


def digit_credit(completions, answer, **_):
    """Continuous reward in [0, 1]: the share of the answer's digits in place (an untrained
    model earns some, so groups disagree from the first step)."""
    return [sum(x == y for x, y in zip(c, a)) / len(a) for c, a in zip(completions, answer)]


def _args(tmp_path, config_cls, **overrides):
    settings = {"output_dir": str(tmp_path / "out"), "per_device_train_batch_size": 8,
                "num_generations": K, "max_completion_length": 6, "learning_rate": 1e-3,
                "max_steps": 3, "logging_steps": 1, "report_to": "none", "use_cpu": True,
                "save_strategy": "no", "seed": 0, "temperature": 1.0, "bf16": False,
                "fp16": False, "disable_tqdm": True}
    if config_cls is NFTConfig:
        settings["nft_impl"] = "torch"
    settings.update(overrides)
    return config_cls(**settings)


def _model(seed=0):
    tokenizer = build_tokenizer()
    return build_tiny_model(tokenizer, seed=seed), tokenizer


@pytest.fixture(scope="module")
def warm_state():
    """A short SFT warm start, so that the model answers in digits and earns partial credit."""
    model, tokenizer = _model()
    train, _ = synthetic_problems(2, 400, 10)
    sft_warm_start(model, tokenizer, train, steps=150, batch_size=64, lr=1e-3, seed=0, impl="torch")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_nft_trainer_trains_for_real(tmp_path, warm_state):
    model, tokenizer = _model()
    model.load_state_dict(warm_state)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = NFTTrainer(model=model, reward_funcs=[exact_sum, digit_credit],
                         args=_args(tmp_path, NFTConfig, reward_weights=[0.5, 0.5]),
                         train_dataset=_dataset(), processing_class=tokenizer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    # On-policy the NFT loss value is 0 (R = 1, and the negative term is clipped at eps = 1);
    # its gradient is not.
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert all(math.isfinite(h["grad_norm"]) for h in logs) and any(h["grad_norm"] > 0 for h in logs)
    assert all(0.0 <= h["nft/signal_fraction"] <= 1.0 for h in logs)
    assert any(h["nft/signal_fraction"] > 0 for h in logs)
    moved = [n for n, p in trainer.model.named_parameters()
             if not torch.equal(p.detach(), before[n])]
    assert "lm_head.weight" in moved and len(moved) > len(before) // 2


class FirstGradient(TrainerCallback):
    """The gradient right before the first optimizer step (clipping is off in these runs)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None}


def positional_reward(completions, **_):
    """Groups alternate between 1 of 4 and 3 of 4 right, by position: every group then has the
    same std, so TRL's unbiased std differs from the population std by one known factor."""
    pattern = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    return [pattern[i % len(pattern)] for i in range(len(completions))]


def _first_gradient(tmp_path, trainer_cls, config_cls, name, **overrides):
    model, tokenizer = _model(seed=3)
    catcher = FirstGradient()
    args = _args(tmp_path / name, config_cls, max_steps=1, max_grad_norm=0.0, **overrides)
    trainer = trainer_cls(model=model, reward_funcs=positional_reward, args=args,
                          train_dataset=_dataset(), processing_class=tokenizer,
                          callbacks=[catcher])
    trainer.train()
    return catcher.grads


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_first_step_gradient_equals_trl_grpo(tmp_path, loss_type):
    """Prop. 4.2 against TRL's own GRPO: on-policy, NFT with omega = sqrt((1 - r_hat)/r_hat)
    has GRPO's gradient with A = (r - r_hat)/std_population. TRL divides by the unbiased std
    + 1e-4, so its gradient is ours times std_population / (std_unbiased + 1e-4)."""
    grpo = _first_gradient(tmp_path, trl.GRPOTrainer, trl.GRPOConfig, "grpo",
                           loss_type=loss_type, scale_rewards="group")
    nft = _first_gradient(tmp_path, NFTTrainer, NFTConfig, "nft", loss_type=loss_type,
                          nft_normalize=2)
    std_pop = math.sqrt(0.25 * 0.75)                   # r_hat = 1/4 or 3/4, K = 4
    std_unbiased = std_pop * math.sqrt(K / (K - 1))
    factor = (std_unbiased + 1e-4) / std_pop
    assert grpo.keys() == nft.keys() and len(nft) > 0
    scale = max(g.abs().max().item() for g in grpo.values())
    assert scale > 0
    for name, g in grpo.items():
        # fp32 sums over a few hundred tokens: agreement to ~1e-6 of the largest entry
        torch.testing.assert_close(nft[name], g * factor, rtol=1e-4, atol=2e-6 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # The correction is not a no-op: without it the gradients differ by ~15 %.
    lm = "lm_head.weight"
    assert not torch.allclose(nft[lm], grpo[lm], rtol=1e-2, atol=0.0)


def _first_gradient_with_reference(tmp_path, trainer_cls, config_cls, name, beta,
                                   reward=None, logs=None, **overrides):
    """The first gradient with TRL's KL penalty against a reference model 0.05 away from the
    policy (TRL builds its reference from the policy's path; it is then perturbed the same way
    for every run, so the KL and its gradient are not zero). ``logs``: a list that receives the
    first step's logged metrics."""
    model, tokenizer = _model(seed=3)
    path = tmp_path / "policy"
    model.save_pretrained(path)
    catcher = FirstGradient()
    args = _args(tmp_path / name, config_cls, max_steps=1, max_grad_norm=0.0, beta=beta,
                 loss_type="dapo", **overrides)
    trainer = trainer_cls(model=str(path), reward_funcs=reward or positional_reward, args=args,
                          train_dataset=_dataset(), processing_class=tokenizer,
                          callbacks=[catcher])
    if trainer.ref_model is not None:
        gen = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for p in trainer.ref_model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    trainer.train()
    if logs is not None:
        logs.append(next(h for h in trainer.state.log_history if "loss" in h))
    return catcher.grads


def no_answer_right(completions, **_):
    """Every group's answers all score 0: no group carries a policy signal."""
    return [0.0] * len(completions)


def some_groups_silent(completions, **_):
    """Groups of 4: one right, none right, three right, all right - half without signal."""
    pattern = [1.0, 0.0, 0.0, 0.0] + [0.0] * 4 + [1.0, 1.0, 1.0, 0.0] + [1.0] * 4
    return [pattern[i % len(pattern)] for i in range(len(completions))]


def test_groups_without_signal_keep_trls_entropy_bonus_and_kl(tmp_path):
    """A step where no group has signal: GRPOTrainer's gradient is its entropy bonus and KL
    penalty alone (A = 0), and so is NFTTrainer's now (it was zero); the logged loss, entropy
    and kl agree too."""
    logs, grads = {}, {}
    for cls, cfg in ((trl.GRPOTrainer, trl.GRPOConfig), (NFTTrainer, NFTConfig)):
        found = []
        grads[cls.__name__] = _first_gradient_with_reference(
            tmp_path, cls, cfg, cls.__name__, 0.2, reward=no_answer_right, logs=found,
            entropy_coef=0.05)
        logs[cls.__name__] = found[0]
    theirs, ours = grads["GRPOTrainer"], grads["NFTTrainer"]
    scale = max(g.abs().max().item() for g in theirs.values())
    assert scale > 1e-4
    for name, g in theirs.items():
        torch.testing.assert_close(ours[name], g, rtol=1e-3, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")
    grpo, nft = logs["GRPOTrainer"], logs["NFTTrainer"]
    assert nft["nft/signal_fraction"] == 0.0
    for key in ("loss", "entropy", "kl"):
        assert nft[key] == pytest.approx(grpo[key], rel=1e-4, abs=1e-7), key
    assert grpo["loss"] != 0.0


def test_entropy_bonus_covers_groups_without_signal(tmp_path):
    """Half the groups without signal: the entropy part of the first gradient (two
    coefficients' difference) is still TRL's own, and the logged entropy is TRL's (every
    completion token)."""
    runs, logs = {}, {}
    for cls, cfg in ((trl.GRPOTrainer, trl.GRPOConfig), (NFTTrainer, NFTConfig)):
        for coef in (0.1, 0.3):
            found = []
            runs[cls.__name__, coef] = _first_gradient_with_reference(
                tmp_path, cls, cfg, f"{cls.__name__}-{coef}", 0.0, reward=some_groups_silent,
                logs=found, entropy_coef=coef)
            logs[cls.__name__, coef] = found[0]
    _assert_entropy_parts_equal(runs)
    nft, grpo = logs["NFTTrainer", 0.1], logs["GRPOTrainer", 0.1]
    assert nft["nft/signal_fraction"] == pytest.approx(0.5)
    assert nft["entropy"] == pytest.approx(grpo["entropy"], rel=1e-5)
    for key in ("clip_ratio/region_mean", "clip_ratio/negative_mean",
                "clip_ratio/max_log_ratio_mean"):
        assert nft[key] == 0.0, key          # on-policy: R = 1, nothing is clipped


def test_kl_penalty_gradient_equals_trl_grpo(tmp_path):
    """beta != 0: the KL part of the first gradient is TRL's own (the difference between two
    betas, so the policy parts, which follow Prop. 4.2 as above, cancel; both runs build the
    reference model, so they sample the same completions)."""
    runs = {(cls.__name__, beta): _first_gradient_with_reference(
                tmp_path, cls, cfg, f"{cls.__name__}-{beta}", beta)
            for cls, cfg in ((trl.GRPOTrainer, trl.GRPOConfig), (NFTTrainer, NFTConfig))
            for beta in (0.25, 0.5)}
    grpo_kl = {n: runs["GRPOTrainer", 0.5][n] - g for n, g in runs["GRPOTrainer", 0.25].items()}
    nft_kl = {n: runs["NFTTrainer", 0.5][n] - g for n, g in runs["NFTTrainer", 0.25].items()}
    scale = max(g.abs().max().item() for g in grpo_kl.values())
    assert scale > 1e-4  # the perturbed reference makes the KL gradient real
    for name, g in grpo_kl.items():
        torch.testing.assert_close(nft_kl[name], g, rtol=1e-3, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_entropy_bonus_gradient_equals_trl_grpo(tmp_path, loss_type="dapo"):
    """entropy_coef != 0: the entropy part of the first gradient (the difference between two
    coefficients, so the policy parts cancel) is TRL's own."""
    runs = {(cls.__name__, coef): _first_gradient(tmp_path, cls, cfg, f"{cls.__name__}-{coef}",
                                                  loss_type=loss_type, entropy_coef=coef)
            for cls, cfg in ((trl.GRPOTrainer, trl.GRPOConfig), (NFTTrainer, NFTConfig))
            for coef in (0.1, 0.3)}
    _assert_entropy_parts_equal(runs)


def _assert_entropy_parts_equal(runs) -> None:
    """The entropy part of each trainer's first gradient (coefficient 0.3's minus 0.1's, so the
    policy parts cancel) is the same. A difference of two gradients keeps the rounding of the
    whole ones (fp32 sums, ~1e-7 of their size): compare each parameter's part norm-wise."""
    theirs = {n: runs["GRPOTrainer", 0.3][n] - g for n, g in runs["GRPOTrainer", 0.1].items()}
    ours = {n: runs["NFTTrainer", 0.3][n] - g for n, g in runs["NFTTrainer", 0.1].items()}
    assert max(g.abs().max().item() for g in theirs.values()) > 1e-5
    for name, g in theirs.items():
        error = (ours[name] - g).norm().item()
        assert error <= 1e-3 * g.norm().item() + 1e-9, f"{name}: {error} vs {g.norm().item()}"


@pytest.mark.parametrize("field, value, needle", [
    ("loss_type", "cispo", "loss_type"),
    ("importance_sampling_level", "sequence", "importance_sampling_level"),
    ("use_adaptive_entropy", True, "use_adaptive_entropy"), ("nft_normalize", 3, "normalize"),
    ("nft_clip_negative", 0.0, "clip_negative"), ("nft_impl", "cuda", "nft_impl"),
    ("nft_rate_clamp", [0.5], "nft_rate_clamp"),
])
def test_unsupported_settings_name_the_argument(tmp_path, field, value, needle):
    with pytest.raises(ValueError, match=needle):
        _args(tmp_path, NFTConfig, **{field: value})


def test_entropy_bonus_refused_where_it_cannot_be_exact(tmp_path):
    with pytest.raises(ValueError, match="entropy_coef.*loss_type='grpo'"):
        _args(tmp_path, NFTConfig, entropy_coef=0.01, loss_type="grpo")


def test_nft_field_errors_name_the_config_field(tmp_path):
    with pytest.raises(ValueError, match=r"nft_normalize must be one of \(0, 1, 2\), got 3"):
        _args(tmp_path, NFTConfig, nft_normalize=3)
    with pytest.raises(ValueError, match="nft_clip_negative"):
        _args(tmp_path, NFTConfig, nft_clip_negative=-1.0)


def test_grpo_only_settings_warn_once_naming_each(tmp_path):
    model, tokenizer = _model()
    args = _args(tmp_path, NFTConfig, epsilon=0.3, epsilon_high=0.28, scale_rewards="none")
    with pytest.warns(UserWarning) as caught:
        NFTTrainer(model=model, reward_funcs=exact_sum, args=args, train_dataset=_dataset(),
                   processing_class=tokenizer)
    ours = [str(w.message) for w in caught if "NFTTrainer" in str(w.message)]
    assert len(ours) == 1
    for needle in ("epsilon=0.3", "epsilon_high=0.28", "scale_rewards='none'"):
        assert needle in ours[0]


@pytest.mark.parametrize("weights, needle", [
    ([1.0, 1.0], r"sum to 2.*reward_weights=\[0.5, 0.5\]"),
    ([1.0, -0.5], "must not be negative"),
])
def test_reward_weights_that_can_leave_the_unit_interval_are_refused_at_construction(
        tmp_path, weights, needle):
    model, tokenizer = _model()
    with pytest.raises(ValueError, match=needle):
        NFTTrainer(model=model, reward_funcs=[exact_sum, digit_credit],
                   args=_args(tmp_path, NFTConfig, reward_weights=weights),
                   train_dataset=_dataset(), processing_class=tokenizer)


def test_rewards_outside_unit_interval_are_refused(tmp_path):
    model, tokenizer = _model()

    def five_points(completions, **_):
        return [5.0] * len(completions)

    trainer = NFTTrainer(model=model, reward_funcs=five_points, args=_args(tmp_path, NFTConfig),
                         train_dataset=_dataset(), processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"rewards in \[0, 1\].*five_points"):
        trainer.train()


def test_untested_trl_version_is_one_clear_error(monkeypatch):
    monkeypatch.delenv(_versions.ESCAPE, raising=False)
    with pytest.raises(ImportError, match=r"tested with trl>=.*found trl 0\.9\.6.*nft-kernels\[trl\]"):
        _versions.check_version("trl", installed="0.9.6")
    monkeypatch.setenv(_versions.ESCAPE, "1")
    with pytest.warns(UserWarning, match="tested with trl"):
        assert _versions.check_version("trl", installed="0.9.6") == "0.9.6"
    assert _versions.check_version("trl") == trl.__version__


def test_nft_trainer_with_a_lora_adapter(tmp_path, warm_state):
    """TRL's usual PEFT path: only the adapter trains, the fused head still sees lm_head."""
    peft = pytest.importorskip("peft")
    model, tokenizer = _model()
    model.load_state_dict(warm_state)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           task_type="CAUSAL_LM")
    trainer = NFTTrainer(model=model, reward_funcs=[exact_sum, digit_credit],
                         args=_args(tmp_path, NFTConfig, reward_weights=[0.5, 0.5],
                                    learning_rate=1e-2),
                         train_dataset=_dataset(), processing_class=tokenizer, peft_config=lora)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert any(h["nft/signal_fraction"] > 0 for h in logs)
    assert any(h["grad_norm"] > 0 for h in logs)
    changed = {n for n, p in trainer.model.named_parameters()
               if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_two_processes_slice_rewards_per_rank_and_stay_in_sync(tmp_path):
    """torchrun, 2 processes, gloo on CPU (tests/trl_ddp_check.py): each rank's batch carries
    its own completions' rewards and group rates, and DDP keeps the replicas identical."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=str(here.parent))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29541", str(here / "trl_ddp_check.py"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    assert "rank 0: ok" in proc.stdout and "rank 1: ok" in proc.stdout
