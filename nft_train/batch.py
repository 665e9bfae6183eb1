"""What one rollout step trains on, as plain data and pure functions (no trainer state):
``Sequence`` (one answer with its reward, its group's r_hat and advantage, its aggregation
weight and the sampler's log-probs), group advantages, the aggregation's per-token weights,
``collate`` into padded tensors, and the rollout correction's importance weights.
Tested directly (tests/test_train_loop.py, tests/test_train_rollout_correction.py) and used by
the demo and the experiments as well as by ``loop.Trainer``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Sequence:
    prompt_ids: tuple[int, ...]
    response_ids: list[int]
    reward: float
    correct_rate: float    # r_hat of its prompt's group
    advantage: float       # for the PPO-clip baselines
    weight: float = 0.0    # per-token aggregation weight (set per mini-batch)
    rollout_logprobs: list[float] | None = None   # the sampler's, per response token


def group_advantages(rewards: list[float], kind: str) -> list[float]:
    """GRPO: (r - mean) / std with the population std (so that NFT with normalize=2 equals it
    on-policy, Prop. 4.2); Dr. GRPO: r - mean. A group with no spread gets 0."""
    mean = sum(rewards) / len(rewards)
    centered = [r - mean for r in rewards]
    if kind == "dr_grpo":
        return centered
    std = math.sqrt(sum(c * c for c in centered) / len(centered))
    return [c / std if std > 0 else 0.0 for c in centered]


def token_weights(lengths: list[int], mode: str, max_new_tokens: int) -> list[float]:
    """The weight of each token of sequence i, so that sum(loss_t * weight) is the aggregated
    loss over the whole mini-batch (verl's agg_loss modes; token-sum-norm is Dr. GRPO's constant)."""
    n_seq = len(lengths)
    n_tok = sum(lengths)
    if mode == "token-mean":
        return [1.0 / max(n_tok, 1)] * n_seq
    if mode == "seq-mean-token-mean":
        return [1.0 / (n_seq * max(n, 1)) for n in lengths]
    if mode == "seq-mean-token-sum":
        return [1.0 / n_seq] * n_seq
    if mode == "token-sum-norm":
        return [1.0 / (n_seq * max_new_tokens)] * n_seq
    raise ValueError(f"unknown loss_agg {mode!r}")


def collate(seqs: list[Sequence], pad_id: int, device) -> dict:
    """Right-padded [B, L] ids; per-token tensors are [B, L - 1], aligned with the targets
    ids[:, 1:], and count only the response's tokens."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in seqs)
    b = len(seqs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width - 1), dtype=torch.bool)
    per_seq = torch.tensor([[s.reward, s.correct_rate, s.advantage, s.weight] for s in seqs],
                           dtype=torch.float32)
    for row, s in enumerate(seqs):
        full = list(s.prompt_ids) + s.response_ids
        ids[row, :len(full)] = torch.tensor(full)
        attn[row, :len(full)] = 1
        mask[row, len(s.prompt_ids) - 1:len(full) - 1] = True
    expand = mask.float()
    batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": mask,
             "rewards": per_seq[:, 0:1] * expand, "correct_rate": per_seq[:, 1:2] * expand,
             "advantages": per_seq[:, 2:3] * expand, "token_weight": per_seq[:, 3:4] * expand}
    if all(s.rollout_logprobs is not None for s in seqs):
        rollout = torch.zeros((b, width - 1), dtype=torch.float32)
        for row, s in enumerate(seqs):
            rollout[row, len(s.prompt_ids) - 1:len(s.prompt_ids) - 1 + len(s.response_ids)] = \
                torch.tensor(s.rollout_logprobs, dtype=torch.float32)
        batch["rollout_logprobs"] = rollout
    return {k: v.to(device) for k, v in batch.items()}


def rollout_correction(batch: dict, mode: str, cap: float) -> dict:
    """Importance weights for the sampler-trainer mismatch, w = pi_old / pi_rollout per token
    (or its product over the response for the sequence modes), truncated at ``cap`` or masked
    above it, multiplied into ``batch["token_weight"]``; returns sums for the step's metrics:
    the k3 estimate of KL(pi_rollout || pi_old) and the weight's statistics."""
    counted = batch["loss_mask"] & (batch["token_weight"] > 0)
    log_w = torch.where(counted, batch["old_logprobs"] - batch["rollout_logprobs"], 0.0)
    sums = {"tokens": float(counted.sum()),
            "k3": float((torch.expm1(log_w) - log_w)[counted].sum())}   # (w - 1) - log w
    if mode == "off":
        return sums
    if mode.startswith("sequence"):
        log_w = log_w.sum(dim=1, keepdim=True).expand_as(log_w)
    w = torch.exp(log_w.clamp(max=80.0))   # a sequence product can overflow fp32: capped below
    over = counted & (w > cap)
    w_used = w.clamp(max=cap) if mode.endswith("truncate") else torch.where(over, 0.0, w)
    batch["token_weight"] = batch["token_weight"] * torch.where(counted, w_used, 1.0)
    sums.update(w_sum=float(w[counted].sum()), over=float(over.sum()),
                w_max=float(w[counted].max()) if counted.any() else 0.0)
    return sums


def split_even(items: list, parts: int) -> list[list]:
    size = math.ceil(len(items) / parts)
    return [items[i * size:(i + 1) * size] for i in range(parts)]
