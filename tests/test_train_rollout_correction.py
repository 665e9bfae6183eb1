"""The trainer trains the policy that was sampled: the engine's own log-probs kept per token,
the sampler-trainer mismatch measured and (optionally) corrected through the loss's token
weights, and the on-policy shortcut that takes pi_old from the update's own forward."""
import math

import pytest
import torch
import train_helpers as th

from nft_train.config import ConfigError, load_config
from nft_train.batch import Sequence, collate, rollout_correction
from nft_train.loop import Trainer


def _trainer(tmp_path, preset="nft", **sections):
    model, tok = th.tiny_model(0)
    return Trainer(th.tiny_config(tmp_path, preset, **sections), model=model, tokenizer=tok)


def _trainer_logprobs(trainer, seqs):
    batch = collate(seqs, trainer.pad_id, trainer.info.device)
    with torch.no_grad():
        logp, _ = trainer.policy(batch, logprobs_only=True)
    mask = batch["loss_mask"]
    return [logp[i][mask[i]] for i in range(len(seqs))]


@pytest.mark.parametrize("preset", ["nft", "dapo"])
def test_on_policy_shortcut_gives_bit_identical_parameters(tmp_path, preset):
    params, metrics = [], []
    for shortcut in (False, True):
        trainer = _trainer(tmp_path / str(shortcut), preset,
                           train={"on_policy_shortcut": shortcut, "micro_batch_size": 8})
        groups = th.fixed_groups(trainer.tokenizer, advantage=trainer.cfg.algo.advantage)
        metrics.append(trainer._update(groups))
        params.append({k: v.detach().clone() for k, v in trainer.policy.named_parameters()})
        trainer.close()
    assert metrics[0]["train/on_policy_shortcut"] == 0.0
    assert metrics[1]["train/on_policy_shortcut"] == 1.0
    for name, p in params[0].items():
        assert torch.equal(params[1][name], p), name
    assert any(not torch.equal(p, q) for p, q in zip(
        params[0].values(), th.tiny_model(0)[0].state_dict().values()))   # the step moved them
    assert metrics[1]["train/entropy"] == metrics[0]["train/entropy"]
    assert metrics[1]["train/ratio_max"] == metrics[0]["train/ratio_max"] == 1.0


def test_off_policy_mini_batches_do_not_take_the_shortcut(tmp_path):
    trainer = _trainer(tmp_path, train={"mini_batches_per_step": 2, "prompts_per_step": 8})
    try:
        out = trainer._update(th.fixed_groups(trainer.tokenizer))
    finally:
        trainer.close()
    assert out["train/on_policy_shortcut"] == 0.0 and out["train/ratio_max"] > 1.0 - 1e-6


def _batch(old, rollout, lengths):
    """Rows of given response lengths, one token of prompt each, token weight 1."""
    seqs = [Sequence((1,), [2] * n, 1.0, 0.5, 0.0, 1.0, r[:n]) for n, r in zip(lengths, rollout)]
    batch = collate(seqs, 0, torch.device("cpu"))
    batch["old_logprobs"] = torch.zeros_like(batch["token_weight"])
    for i, n in enumerate(lengths):
        batch["old_logprobs"][i, :n] = torch.tensor(old[i][:n])
    return batch


def test_rollout_correction_weights_by_hand():
    old = [[-1.0, -2.0, -0.5], [-0.3, -0.1, 0.0]]
    rollout = [[-1.5, -1.0, -0.5], [-0.2, -0.9, 0.0]]
    lengths = [3, 2]
    w = [[math.exp(o - r) for o, r in zip(old[i][:n], rollout[i][:n])]
         for i, n in enumerate(lengths)]
    cap = 2.0
    seq_w = [math.prod(row) for row in w]
    expected = {
        "token_truncate": [[min(x, cap) for x in row] for row in w],
        "token_mask": [[x if x <= cap else 0.0 for x in row] for row in w],
        "sequence_truncate": [[min(seq_w[i], cap)] * n for i, n in enumerate(lengths)],
        "sequence_mask": [[seq_w[i] if seq_w[i] <= cap else 0.0] * n
                          for i, n in enumerate(lengths)],
    }
    k3 = sum((x - 1) - math.log(x) for row in w for x in row) / sum(lengths)
    for mode, want in expected.items():
        batch = _batch(old, rollout, lengths)
        sums = rollout_correction(batch, mode, cap)
        for i, n in enumerate(lengths):
            got = batch["token_weight"][i, :n].tolist()
            assert got == pytest.approx(want[i], rel=1e-6), mode
            assert batch["token_weight"][i, n:].abs().sum() == 0      # padding stays 0
        assert sums["k3"] / sums["tokens"] == pytest.approx(k3, rel=1e-5)
        flat = [x for row in (w if mode.startswith("token") else
                              [[seq_w[i]] * n for i, n in enumerate(lengths)]) for x in row]
        assert sums["over"] == sum(x > cap for x in flat), mode
        assert sums["w_max"] == pytest.approx(max(flat), rel=1e-6)
    off = _batch(old, rollout, lengths)
    before = off["token_weight"].clone()
    assert set(rollout_correction(off, "off", cap)) == {"tokens", "k3"}
    assert torch.equal(off["token_weight"], before)


def test_hf_engine_log_probs_equal_the_trainers_at_the_rollout_temperature(tmp_path):
    trainer = _trainer(tmp_path, rollout={"temperature": 0.7, "top_p": 1.0},
                       algo={"dynamic_sampling": False}, train={"steps": 1},
                       rollout_correction={"mode": "token_truncate"})
    try:
        prompt = trainer.tokenizer("12+34=", add_special_tokens=False)["input_ids"]
        for _ in range(2):                       # before and after a step's weight sync
            samples = trainer.engine.generate([prompt], 6, 0.7, 1.0, 5, seed=3)
            seqs = [Sequence(tuple(prompt), s.response_ids, 0.0, 0.5, 0.0, 1.0) for s in samples]
            for s, mine in zip(samples, _trainer_logprobs(trainer, seqs)):
                assert len(s.logprobs) == len(s.response_ids)
                torch.testing.assert_close(torch.tensor(s.logprobs), mine, atol=1e-4, rtol=0)
            metrics = trainer.train_step()
            assert metrics["rollout_correction/mismatch_kl_k3"] < 1e-6
            assert metrics["rollout_correction/is_ratio_mean"] == pytest.approx(1.0, abs=1e-3)
            assert metrics["rollout_correction/clipped_fraction"] == 0.0
    finally:
        trainer.close()


def test_rollout_correction_config_is_checked():
    with pytest.raises(ConfigError, match="rollout_correction.mode"):
        load_config(overrides=["rollout_correction.mode=token"])
    with pytest.raises(ConfigError, match="rollout_correction.cap"):
        load_config(overrides=["rollout_correction.cap=0"])
    assert load_config(overrides=["rollout_correction.mode=sequence_mask"]) \
        .rollout_correction.mode == "sequence_mask"
