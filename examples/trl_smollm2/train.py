"""NFT inside TRL: NFTTrainer on SmolLM2-135M-Instruct, on a CPU, a few steps.

    pip install 'nft-kernels[trl,gym]'
    nft-train fetch-smollm2 --out .cache/smollm2-135m-instruct
    python examples/trl_smollm2/train.py --model .cache/smollm2-135m-instruct \
        --out examples/trl_smollm2/results

The data are reasoning-gym's one-digit sums and differences (generated offline), asked as chat
messages; the reward is binary (reasoning-gym's scorer on the final answer, only a full score
counts). TRL samples with transformers' generate. The logged metrics of every step go to
<out>/log_history.json; the run's settings and wall time to <out>/run.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

TASK = {"name": "basic_arithmetic", "min_terms": 2, "max_terms": 2, "min_digits": 1,
        "max_digits": 1, "operators": ["+", "-"], "allow_parentheses": False,
        "allow_negation": False}


def build_dataset(size: int):
    import datasets

    from nft_train.data import reasoning_gym_problems

    train, _ = reasoning_gym_problems([TASK], size, 1, seed=0, template="plain")
    return datasets.Dataset.from_dict({
        "prompt": [[{"role": "user", "content": p.prompt}] for p in train],
        "reference": [p.reference for p in train]})


def correct(completions, reference, **_) -> list[float]:
    """1.0 when reasoning-gym's scorer gives the final answer full marks, else 0.0."""
    from nft_train.reward import Unparsable, score_reasoning_gym

    out = []
    for completion, ref in zip(completions, reference):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        try:
            out.append(score_reasoning_gym(text, ref))
        except Unparsable:
            out.append(0.0)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=".cache/smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=Path("runs/trl_smollm2"))
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nft_kernels.integrations.trl import NFTConfig, NFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = NFTConfig(
        output_dir=str(Path("runs") / "trl_smollm2_trainer"), max_steps=args.steps,
        learning_rate=1e-5,
        per_device_train_batch_size=16, num_generations=8, max_completion_length=48,
        temperature=1.0, loss_type="dapo", beta=0.04, entropy_coef=0.01,
        nft_normalize=1, nft_clip_negative=1.0, nft_impl="torch",
        use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", report_to="none",
        seed=0, disable_tqdm=True)
    trainer = NFTTrainer(model=model, reward_funcs=correct, args=config,
                         train_dataset=build_dataset(200), processing_class=tokenizer)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    (args.out / "run.json").write_text(json.dumps({
        "model": Path(args.model).name, "steps": args.steps, "wall_seconds": round(wall, 1),
        "config": {k: getattr(config, k) for k in (
            "per_device_train_batch_size", "num_generations", "max_completion_length",
            "learning_rate", "loss_type", "beta", "entropy_coef", "nft_normalize",
            "nft_clip_negative")}}, indent=1))
    keys = ["loss", "grad_norm", "reward", "entropy", "kl", "clip_ratio/region_mean",
            "nft/signal_fraction", "frac_reward_zero_std"]
    for row in trainer.state.log_history:
        if "loss" in row:
            print(" ".join(f"{k}={row[k]:.4g}" for k in keys if k in row))
    print(f"{args.steps} steps in {wall:.0f} s; log -> {args.out / 'log_history.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
