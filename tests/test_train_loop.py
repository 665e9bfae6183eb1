"""The training loop: global loss normalizer (micro-batch and world-size invariance), the
Prop. 4.2 link between the NFT and GRPO presets inside the trainer, non-finite losses,
checkpoints that survive failed writes, and exact resume after a kill."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import train_helpers as th

from nft_train import checkpoint as ckpt
from nft_train.batch import group_advantages, token_weights
from nft_train.loop import Trainer, TrainingStopped
from nft_train.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]


def _trainer(tmp_path, preset="nft", seed=0, **sections):
    model, tok = th.tiny_model(seed)
    cfg = th.tiny_config(tmp_path / "run", preset, **sections)
    return Trainer(cfg, model=model, tokenizer=tok)


def test_advantages_and_aggregation_weights():
    assert group_advantages([1, 0, 0, 1], "dr_grpo") == [0.5, -0.5, -0.5, 0.5]
    assert group_advantages([1, 0, 0, 1], "grpo") == [1.0, -1.0, -1.0, 1.0]
    assert group_advantages([1, 1, 1], "grpo") == [0.0, 0.0, 0.0]
    lengths = [3, 1, 4]
    for mode, total in [("token-mean", 1.0), ("seq-mean-token-mean", 1.0),
                        ("seq-mean-token-sum", 8 / 3), ("token-sum-norm", 8 / 30)]:
        w = token_weights(lengths, mode, max_new_tokens=10)
        assert sum(wi * n for wi, n in zip(w, lengths)) == pytest.approx(total), mode
    per_seq = token_weights(lengths, "seq-mean-token-mean", 10)
    assert [w * n for w, n in zip(per_seq, lengths)] == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("preset", ["nft", "dapo", "dr_grpo", "w_reinforce"])
def test_gradient_does_not_depend_on_micro_batching(tmp_path, preset):
    grads = []
    for micro in (24, 6):                    # 24 sequences: one micro-batch, then four
        trainer = _trainer(tmp_path / str(micro), preset,
                           train={"micro_batch_size": micro, "grad_clip": 0.0})
        groups = th.fixed_groups(trainer.tokenizer, advantage=trainer.cfg.algo.advantage)
        # A first update moves the policy off the sampler, so R != 1 on the second one.
        trainer._update(groups)
        trainer._update(groups)
        grads.append(th.grads_of(trainer.policy))
        trainer.close()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert any(g.abs().max() > 0 for g in grads[0].values())


def test_nft_normalize_2_equals_grpo_in_the_trainer_on_policy(tmp_path):
    """Prop. 4.2 end to end: same groups, on-policy, seq-mean-token-mean for both."""
    grads = {}
    for preset, extra in [("grpo", {}), ("nft", {"normalize": 2, "loss_agg": "seq-mean-token-mean",
                                                 "rate_clamp": [1e-6, 1 - 1e-6]})]:
        trainer = _trainer(tmp_path / preset, preset, train={"grad_clip": 0.0}, algo=extra)
        trainer._update(th.fixed_groups(trainer.tokenizer, advantage="grpo"))
        grads[preset] = th.grads_of(trainer.policy)
        trainer.close()
    for name, g in grads["grpo"].items():
        torch.testing.assert_close(grads["nft"][name], g, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("user_head, ppo_preset", [("cispo", "dapo"), ("sapo", "grpo")])
def test_user_head_presets_equal_their_ppo_relatives_on_policy(tmp_path, user_head, ppo_preset):
    """The presets whose heads are user-defined (nft_kernels.losses) run in the trainer: on
    policy (R = 1) CISPO's gradient -sg(min(R, C)) A d logp is -A d logp, DAPO's; SAPO's
    gate -A 4 sigma(0)(1 - sigma(0)) R d logp is -A d logp too, GRPO's (same aggregations)."""
    grads = {}
    for preset in (user_head, ppo_preset):
        trainer = _trainer(tmp_path / preset, preset, train={"grad_clip": 0.0})
        trainer._update(th.fixed_groups(trainer.tokenizer, advantage="grpo"))
        grads[preset] = th.grads_of(trainer.policy)
        trainer.close()
    for name, g in grads[ppo_preset].items():
        torch.testing.assert_close(grads[user_head][name], g, rtol=1e-4, atol=1e-7, msg=name)
    assert any(g.abs().max() > 0 for g in grads[user_head].values())


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_world_size_two_matches_one_process(tmp_path, arch):
    """torchrun with 2 CPU processes (gloo, FSDP2) gives the gradient of one process; with
    tied embeddings (llama) the shared weight gets both its head and its embedding parts."""
    model, tok = th.tiny_model(0, arch=arch)
    one = Trainer(th.tiny_config(tmp_path / "one", train={"grad_clip": 0.0}), model=model,
                  tokenizer=tok)
    groups = th.fixed_groups(one.tokenizer, n_groups=5)   # odd: one rank gets a padding row
    one._update(groups)
    expected = th.grads_of(one.policy)
    one.close()
    out = tmp_path / "two.pt"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29533", str(ROOT / "tests" / "dist_grad_check.py"), str(out),
           str(tmp_path / "two"), arch]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = torch.load(out)
    assert set(got) == set(expected)
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_non_finite_loss_skips_the_update_and_stops_after_max_bad_steps(tmp_path, monkeypatch,
                                                                        capsys):
    trainer = _trainer(tmp_path, train={"max_bad_steps": 2})
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    real_forward = type(trainer.policy).forward

    def nan_loss(self, batch, logprobs_only=False):
        out = real_forward(self, batch, logprobs_only)
        return out if logprobs_only else (out[0] * float("nan"), out[1])

    monkeypatch.setattr(type(trainer.policy), "forward", nan_loss)
    groups = th.fixed_groups(trainer.tokenizer)
    metrics = trainer._update(groups)
    assert metrics["train/skipped_updates"] == 1 and "train/loss" not in metrics
    with pytest.raises(TrainingStopped, match="max_bad_steps=2"):
        trainer._update(groups)
    for k, v in trainer.policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "non-finite loss" in capsys.readouterr().out
    trainer.close()


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, checkpoint={"keep_last": 2})
    for step in (1, 2, 3):
        trainer.step = step
        assert trainer.save() is not None
    assert [s for s, _ in ckpt.list_checkpoints(trainer.out_dir)] == [2, 3]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    trainer.step = 4
    assert trainer.save() is None
    monkeypatch.undo()
    found = ckpt.list_checkpoints(trainer.out_dir)
    assert [s for s, _ in found] == [2, 3]
    assert not list(ckpt.checkpoint_dir(trainer.out_dir).glob("*.tmp"))
    payload = torch.load(found[-1][1], weights_only=False)
    assert payload["step"] == 3 and "optimizer" in payload and "data" in payload
    trainer.close()


def test_train_run_writes_metrics_samples_curves_and_evaluates(tmp_path):
    # An untrained model solves nothing: without dynamic sampling every group is still trained on.
    trainer = _trainer(tmp_path, eval={"every": 1}, algo={"dynamic_sampling": False})
    final = trainer.run()
    trainer.close()
    out = trainer.out_dir
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # step 0: the evaluation before training (eval.before_train), then steps and the final one
    assert [r["step"] for r in rows] == [0, 1, 2, 2]
    assert "eval/accuracy" in rows[0] and "time/eval" in rows[0]
    for key in ("train/accuracy", "train/kept_fraction", "train/entropy",
                "train/response_length", "train/truncation_rate", "time/generate",
                "eval/accuracy"):
        assert key in rows[1], key
    assert 0.0 <= final["eval/accuracy"] <= 1.0
    assert (out / "config.yaml").is_file() and (out / "curves.png").is_file()
    assert (out / "final_model" / "config.json").is_file()
    assert list((out / "samples").glob("step_*.jsonl"))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]


def test_before_train_evaluation_can_be_skipped(tmp_path):
    trainer = _trainer(tmp_path, eval={"before_train": False},
                       algo={"dynamic_sampling": False}, train={"steps": 1})
    trainer.run()
    trainer.close()
    rows = [json.loads(x) for x in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1]


def _train_cmd(model_dir, out_dir):
    return [sys.executable, "-m", "nft_train.cli", "train", f"model.path={model_dir}",
            f"out_dir={out_dir}", "data.format=synthetic", "data.synthetic_train_size=200",
            "rollout.n=4", "rollout.max_new_tokens=5", "train.prompts_per_step=8",
            "train.steps=6", "train.lr=1e-3", "train.impl=torch", "checkpoint.every=1",
            "checkpoint.keep_last=10", "eval.synthetic_size=8", "eval.max_new_tokens=5",
            "algo.dynamic_sampling=false", "log.progress=false",
            # off-policy mini-batches and a rollout correction: what a resume must restore
            # includes the sampler's log-probs of the interrupted step
            "train.mini_batches_per_step=2", "rollout_correction.mode=token_truncate",
            "rollout_correction.cap=1.001"]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    model_dir = save_tiny(tmp_path / "model")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    straight = subprocess.run(_train_cmd(model_dir, tmp_path / "a"), env=env,
                              capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    victim = subprocess.Popen(_train_cmd(model_dir, tmp_path / "b"), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (tmp_path / "b" / "checkpoints" / "step_00000003.pt").exists():
        assert victim.poll() is None and time.time() < deadline, "run ended before step 3"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    left = [s for s, _ in ckpt.list_checkpoints(tmp_path / "b")]
    assert 3 in left and 6 not in left, left
    resumed = subprocess.run(_train_cmd(model_dir, tmp_path / "b"), env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a = torch.load(ckpt.list_checkpoints(tmp_path / "a")[-1][1], weights_only=False)
    b = torch.load(ckpt.list_checkpoints(tmp_path / "b")[-1][1], weights_only=False)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["data"] == b["data"]
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all("rollout_correction/clipped_fraction" in r for r in rows if "train/loss" in r)
    # ...and training did move the weights, so the comparison means something.
    from safetensors.torch import load_file
    initial = load_file(model_dir / "model.safetensors")
    assert not torch.equal(a["model"]["lm.lm_head.weight"], initial["lm_head.weight"])


def test_cli_rejects_bad_config_with_the_key_named(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    bad = subprocess.run([sys.executable, "-m", "nft_train.cli", "train", "train.lr=-1"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'train.lr'" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "nft_train.cli", "train",
                              f"model.path={tmp_path / 'none'}"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "model.path" in missing.stderr


def test_trainer_scores_tokens_at_the_rollout_temperature(tmp_path):
    """The policy that sampled at T draws from softmax(z / T): the trainer's log-probs (old
    ones, and those of the update) are of that policy, not of T = 1 (TRL #4159)."""
    from nft_train.batch import collate

    trainer = _trainer(tmp_path, rollout={"temperature": 0.7})
    seqs = [s for g in th.fixed_groups(trainer.tokenizer) for s in g]
    batch = collate(seqs, trainer.pad_id, torch.device("cpu"))
    with torch.no_grad():
        logp, _ = trainer.policy(batch, logprobs_only=True)
        logits = trainer.policy.lm(input_ids=batch["input_ids"],
                                   attention_mask=batch["attention_mask"]).logits[:, :-1]
        want = torch.log_softmax(logits.double() / 0.7, -1).gather(
            -1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        at_one = torch.log_softmax(logits.double(), -1).gather(
            -1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["loss_mask"]
    torch.testing.assert_close(logp[mask].double(), want[mask], rtol=0, atol=2e-5)
    assert (at_one[mask] - want[mask]).abs().max() > 1e-2  # T matters for this model
    # The update's ratio is 1 on-policy: its log-probs are at the same temperature.
    batch["old_logprobs"] = logp
    _, stats = trainer.policy(batch)
    torch.testing.assert_close(stats["logprobs"][mask], logp[mask], rtol=0, atol=1e-6)
    trainer.close()


def test_top_p_training_rollouts_are_refused():
    from nft_train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="'rollout.top_p' must be 1 for training rollouts"):
        load_config(overrides=["rollout.top_p=0.9"])
    assert load_config(overrides=["eval.top_p=0.7"]).eval.top_p == 0.7
