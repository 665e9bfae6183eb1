"""What real checkpoints bring that the demo's model does not, on a tiny model built in code:
a chat template (with a default system prompt), tied embeddings, two end-of-sequence ids, the
Llama architecture, and bf16 mixed precision."""

import json

import pytest
import torch
import train_helpers as th
from transformers import AutoModelForCausalLM, AutoTokenizer

from nft_kernels import fused_linear_nft_loss
from nft_train.actor import PolicyWithLoss, resolve_compute_dtype
from nft_train.config import ConfigError, load_config
from nft_train.data import Problem, encode_problems
from nft_train.batch import collate
from nft_train.loop import Trainer
from nft_train.rollout import HFRollout, eos_ids
from nft_train.tiny import DEFAULT_SYSTEM, IM_END, build_chat_tokenizer, build_tokenizer


def test_chat_template_prompts_are_token_ids_with_the_system_prompt():
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); every
    prompt must come out as a list of ints (it once became ('input_ids', 'attention_mask'))."""
    tok = build_chat_tokenizer()
    problems = [Problem("12+34=", "046"), Problem("1+1=", "002")]
    encoded, too_long = encode_problems(problems, tok, 256)
    assert too_long == 0 and len(encoded) == 2
    for e in encoded:
        assert all(isinstance(i, int) for i in e.prompt_ids)
        text = tok.decode(list(e.prompt_ids))
        assert DEFAULT_SYSTEM in text and e.problem.prompt in text
        assert text.endswith("<|im_start|>assistant\n")
    custom, _ = encode_problems(problems, tok, 256, system_prompt="Answer in digits only.")
    text = tok.decode(list(custom[0].prompt_ids))
    assert "Answer in digits only." in text and DEFAULT_SYSTEM not in text
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        encode_problems(problems, build_tokenizer(), 256, system_prompt="x")
    assert load_config(overrides=["data.system_prompt=Be brief."]).data.system_prompt == \
        "Be brief."
    with pytest.raises(ConfigError, match="model.compute_dtype"):
        load_config(overrides=["model.compute_dtype=fp8"])


def test_every_eos_id_of_the_generation_config_ends_an_answer():
    model, tok = th.tiny_model(0, arch="llama")
    im_end = tok.convert_tokens_to_ids(IM_END)
    assert eos_ids(model, tok) == [im_end, tok.eos_token_id]
    engine = HFRollout(model, tok, torch.device("cpu"))
    # The engine's model says <|im_end|> (the generation config's eos, not the tokenizer's)
    # after two tokens: every answer stops there, and is not truncated.
    real_forward = engine.model.forward
    calls = []

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 2:  # one decoding step per call
            out.logits[..., im_end] += 1e4
        return out

    engine.model.forward = forward
    samples = engine.generate([[5, 6, 7]], 3, 1.0, 1.0, 8, seed=0)
    assert len(samples) == 3
    for s in samples:
        assert s.response_ids[-1] == im_end and not s.truncated
        assert len(s.response_ids) == 2


def test_tied_llama_trains_keeps_its_tie_and_exports(tmp_path):
    model, tok = th.tiny_model(0, arch="llama")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cfg = th.tiny_config(tmp_path / "run", algo={"dynamic_sampling": False},
                         train={"lr": 1e-2, "steps": 1},
                         data={"system_prompt": "Add the numbers."})
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    try:
        prompt = trainer.stream.problems[0].prompt_ids
        assert "Add the numbers." in tok.decode(list(prompt))
        before = model.model.embed_tokens.weight.detach().clone()
        trainer.train_step()
        lm = trainer.policy.lm
        assert lm.lm_head.weight is lm.model.embed_tokens.weight       # still one tensor
        assert not torch.equal(lm.model.embed_tokens.weight, before)   # and it moved
        engine_lm = trainer.engine.model                               # pushed to the sampler
        assert torch.equal(engine_lm.lm_head.weight, lm.lm_head.weight)
        assert engine_lm.lm_head.weight is engine_lm.model.embed_tokens.weight
        trainer.export(tmp_path / "exported")
    finally:
        trainer.close()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert back.config.tie_word_embeddings and back.lm_head.weight is back.model.embed_tokens.weight
    torch.testing.assert_close(back.lm_head.weight, trainer.policy.lm.lm_head.weight.detach())
    assert AutoTokenizer.from_pretrained(tmp_path / "exported").chat_template
    assert json.loads((tmp_path / "exported" / "generation_config.json").read_text())[
        "eos_token_id"] == eos_ids(model, tok)


def test_fused_loss_under_autocast_runs_in_bf16_with_fp32_gradients():
    from helpers import make_problem

    p = make_problem(40, 32, 100, torch.float32, torch.device("cpu"), seed=0)
    args = (p["target"], p["old"], p["rewards"], p["rate"], p["mask"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_nft_loss(p["hidden"], p["weight"], *args)
    loss.backward()
    assert p["hidden"].grad.dtype == torch.float32 and p["weight"].grad.dtype == torch.float32
    h16 = p["hidden"].detach().bfloat16().requires_grad_(True)
    w16 = p["weight"].detach().bfloat16().requires_grad_(True)
    expected = fused_linear_nft_loss(h16, w16, *args)
    expected.backward()
    assert loss.item() == expected.item()
    torch.testing.assert_close(p["weight"].grad, w16.grad.float())


def test_bf16_mixed_precision_policy_close_to_fp32():
    model, tok = th.tiny_model(0, arch="llama")
    groups = th.fixed_groups(tok, n_groups=3)
    seqs = [s for g in groups for s in g]
    for s in seqs:
        s.weight = 1.0 / len(seqs)
    batch = collate(seqs, tok.pad_token_id, torch.device("cpu"))
    losses, grads = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        policy = PolicyWithLoss(model, th.tiny_config("unused").algo, "torch", dtype)
        with torch.no_grad():
            batch["old_logprobs"], _ = policy(batch, logprobs_only=True)
        model.zero_grad(set_to_none=True)
        loss, _ = policy(batch)
        loss.backward()
        losses[dtype] = loss.item()
        grads[dtype] = model.lm_head.weight.grad.clone()
        assert model.lm_head.weight.grad.dtype == torch.float32  # fp32 master weights
    assert losses[torch.float32] == pytest.approx(losses[torch.bfloat16], abs=1e-3)
    scale = grads[torch.float32].abs().max()
    assert (grads[torch.bfloat16] - grads[torch.float32]).abs().max() <= 0.05 * scale
    assert resolve_compute_dtype("float32", torch.device("cpu")) == torch.float32
    assert resolve_compute_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
