"""Helpers for the trainer tests: tiny models, fixed groups, scorers that misbehave on purpose
(importable by name in spawned reward workers)."""
from __future__ import annotations

import os
import signal
import time

import torch

from nft_train.config import Config, apply_preset, validate
from nft_train.batch import Sequence, group_advantages
from nft_train.tiny import build_chat_tokenizer, build_tiny_model, build_tokenizer


def tiny_config(out_dir, preset: str = "nft", **sections) -> Config:
    """A small, fast, deterministic CPU config on the embedded task ({"train": {...}, ...})."""
    cfg = Config(out_dir=str(out_dir))
    apply_preset(cfg, preset)
    cfg.data.format = "synthetic"
    cfg.data.synthetic_train_size = 200
    cfg.eval.synthetic_size = 16
    cfg.eval.k = 2
    cfg.rollout.n = 4
    cfg.rollout.max_new_tokens = 5
    cfg.eval.max_new_tokens = 5
    cfg.train.prompts_per_step = 8
    cfg.train.micro_batch_size = 64
    cfg.train.lr = 1e-3
    cfg.train.steps = 2
    cfg.train.impl = "torch"
    cfg.log.progress = False
    cfg.log.sample_dump_every = 1
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return validate(cfg)


def tiny_model(seed: int = 0, arch: str = "qwen2"):
    """``arch="qwen2"``: the demo's model; ``"llama"``: tied embeddings, a ChatML chat template
    and two eos ids, as real checkpoints (SmolLM2-Instruct) bring."""
    tokenizer = build_chat_tokenizer() if arch == "llama" else build_tokenizer()
    return build_tiny_model(tokenizer, seed=seed, arch=arch), tokenizer


def fixed_groups(tokenizer, n_groups: int = 6, k: int = 4, seed: int = 0,
                 advantage: str = "grpo") -> list[list[Sequence]]:
    """Deterministic groups of answers of varied lengths, each group with mixed rewards."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for g in range(n_groups):
        prompt = tuple(tokenizer(f"{g + 10}+{g + 3}=", add_special_tokens=False)["input_ids"])
        rewards = [float(i % 2 == g % 2) for i in range(k)]
        rate = sum(rewards) / k
        adv = group_advantages(rewards, advantage)
        group = []
        for i in range(k):
            length = int(torch.randint(1, 6, (1,), generator=gen))
            resp = torch.randint(16, 26, (length,), generator=gen).tolist()
            group.append(Sequence(prompt, resp, rewards[i], rate, adv[i]))
        groups.append(group)
    return groups


def grads_of(policy) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in policy.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name.replace("_fsdp_wrapped_module.", "")] = None if g is None else g.detach().clone()
    return out


# ---- scorers that misbehave (run in reward worker processes) ----
def slow_scorer(response: str, answer: str) -> float:
    if "slow" in response:
        time.sleep(60)
    return float(response == answer)


def stuck_scorer(response: str, answer: str) -> float:
    """Ignores the worker's own timer, like a C extension that never returns to Python."""
    if "stuck" in response:
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(60)
    return float(response == answer)


def crashing_scorer(response: str, answer: str) -> float:
    if "crash" in response:
        os._exit(3)
    return float(response == answer)
