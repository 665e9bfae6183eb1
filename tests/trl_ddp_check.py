"""Run under torchrun (2 processes, gloo, CPU): NFTTrainer's per-process slice of rewards and
correct rates, and DDP's gradient sync. Exits non-zero on any mismatch."""
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(__file__))

from test_integration_trl import K, NFTConfig, NFTTrainer, _args, _dataset, _model

RANK_PATTERNS = {0: [1.0, 0.0, 0.0, 0.0], 1: [1.0, 1.0, 1.0, 0.0]}   # r_hat 1/4 vs 3/4


def rank_reward(completions, **_):
    """Each process scores its own completions with its own pattern, so a wrong slice of the
    gathered rewards shows up as the other rank's correct rate."""
    pattern = RANK_PATTERNS[int(os.environ["RANK"])]
    return [pattern[i % K] for i in range(len(completions))]


SEEN: list = []   # (rewards, correct rates) of every batch this rank trained on


class Recording(NFTTrainer):
    def _compute_loss(self, model, inputs):
        SEEN.append((inputs["nft_rewards"].clone(), inputs["nft_correct_rate"].clone()))
        return super()._compute_loss(model, inputs)


def main(out_dir):
    rank = int(os.environ["RANK"])
    model, tokenizer = _model(seed=5)
    args = _args(Path(out_dir), NFTConfig, per_device_train_batch_size=K,
                 max_steps=2)
    trainer = Recording(model=model, reward_funcs=rank_reward, args=args,
                        train_dataset=_dataset(), processing_class=tokenizer)
    trainer.train()
    expected_rate = sum(RANK_PATTERNS[rank]) / K
    for rewards, rate in SEEN:
        assert torch.allclose(rate, torch.full_like(rate, expected_rate)), (rank, rate)
        assert sorted(rewards.tolist()) == sorted(RANK_PATTERNS[rank]), (rank, rewards)
    # DDP kept the replicas identical.
    flat = torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "replicas diverged"
    assert len(SEEN) >= 2
    print(f"rank {rank}: ok, {len(SEEN)} batches, r_hat {expected_rate}")


if __name__ == "__main__":
    main(sys.argv[1])
