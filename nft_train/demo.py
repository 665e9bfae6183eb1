"""``nft-train demo``: the whole loop on a CPU in a few minutes.

1. Build a tiny Qwen2-architecture model and a byte-level tokenizer in code.
2. Warm-start it briefly by supervised fine-tuning on the embedded addition task, so that it
   answers some held-out problems right and many wrong (the state RL starts from).
3. Train with NFT (rollout -> exact verifier -> fused NFT loss) and measure held-out accuracy
   before and after, both as avg@k at the rollout temperature.
4. Write summary.json, curves.png, metrics.jsonl and the resolved config into the output folder.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from .actor import PolicyWithLoss
from .config import Config, apply_preset, validate
from .data import encode_problems, synthetic_problems
from .tiny import build_tiny_model, build_tokenizer

# The demo's settings; everything else is the Config default.
DEMO = {
    "sft_steps": 1000, "sft_batch": 64, "sft_lr": 1e-3,
    "digits": 2, "train_size": 4000, "eval_size": 500,
}


def demo_config(out_dir: str, backend: str = "hf", steps: int = 300, seed: int = 0,
                lr: float = 2e-4) -> Config:
    cfg = Config(out_dir=out_dir)
    apply_preset(cfg, "nft")
    cfg.data.format = "synthetic"
    cfg.data.synthetic_digits = DEMO["digits"]
    cfg.data.synthetic_train_size = DEMO["train_size"]
    cfg.rollout.backend = backend
    cfg.rollout.n = 8
    cfg.rollout.max_new_tokens = 6
    cfg.rollout.temperature = 1.0
    cfg.train.steps = steps
    cfg.train.prompts_per_step = 64
    cfg.train.mini_batches_per_step = 2   # two optimizer steps per rollout (the second off-policy)
    cfg.train.micro_batch_size = 256
    cfg.train.lr = lr
    cfg.train.grad_clip = 1.0
    cfg.train.seed = seed
    cfg.eval.synthetic_size = DEMO["eval_size"]
    cfg.eval.k = 4
    cfg.eval.temperature = 1.0
    cfg.eval.max_new_tokens = 6
    cfg.eval.every = 25
    cfg.eval.before_train = False   # run_demo evaluates the warm start itself
    cfg.checkpoint.resume = False
    cfg.checkpoint.overwrite = True   # a fixed recipe: running it again replaces the last run
    cfg.log.sample_dump_every = 10
    return validate(cfg)


def sft_warm_start(model, tokenizer, problems, steps: int, batch_size: int, lr: float,
                   seed: int, impl: str = "auto", mode: str = "auto") -> list[float]:
    """Maximize log p(answer + eos | prompt), through the trainer's own forward (the fused
    log-prob kernel is differentiable)."""
    from .batch import Sequence, collate

    encoded, _ = encode_problems(problems, tokenizer, 64)
    eos = tokenizer.eos_token_id
    answers = {p.problem.answer: tokenizer(p.problem.answer, add_special_tokens=False)
               ["input_ids"] + [eos] for p in encoded}
    policy = PolicyWithLoss(model, Config().algo, impl, mode=mode)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        batch = collate([Sequence(p.prompt_ids, answers[p.problem.answer], 1.0, 1.0, 0.0, 1.0)
                         for p in rng.sample(encoded, batch_size)], eos, torch.device("cpu"))
        logp, _ = policy(batch, logprobs_only=True)
        loss = -logp.sum() / batch["loss_mask"].sum()     # masked tokens have logp 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def run_demo(out_dir: str | Path = "runs/demo", backend: str = "hf", steps: int = 300,
             seed: int = 0, sft_steps: int | None = None, lr: float = 2e-4) -> dict:
    from .loop import Trainer

    start = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    train, _ = synthetic_problems(DEMO["digits"], DEMO["train_size"], DEMO["eval_size"])
    sft_steps = DEMO["sft_steps"] if sft_steps is None else sft_steps
    print(f"[demo] warm-start: {sft_steps} SFT steps on the addition task")
    sft_losses = sft_warm_start(model, tokenizer, train, sft_steps, DEMO["sft_batch"],
                                DEMO["sft_lr"], seed)
    model_dir = out_dir / "warm_start_model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    cfg = demo_config(str(out_dir), backend, steps, seed, lr)
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer, model_dir=str(model_dir))
    try:
        before = trainer.evaluate()
        trainer.logger.log(0, before)
        print(f"[demo] before NFT: held-out accuracy {before['eval/accuracy']:.3f}")
        after = trainer.run()
    finally:
        trainer.close()
    summary = {
        "accuracy_before": before["eval/accuracy"],
        "accuracy_after": after["eval/accuracy"],
        "pass_at_k_before": before["eval/synthetic/pass_at_k"],
        "pass_at_k_after": after["eval/synthetic/pass_at_k"],
        "sft_loss_first_last": [sft_losses[0], sft_losses[-1]] if sft_losses else [],
        "seconds": round(time.time() - start, 1),
        "settings": {**DEMO, "algorithm": cfg.algo.name, "backend": backend, "seed": seed,
                     "sft_steps": sft_steps, "rl_steps": steps,
                     "prompts_per_step": cfg.train.prompts_per_step, "k_train": cfg.rollout.n,
                     "lr": cfg.train.lr, "eval_k": cfg.eval.k,
                     "eval_temperature": cfg.eval.temperature, "eval_top_p": cfg.eval.top_p},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    rise = summary["accuracy_after"] - summary["accuracy_before"]
    print("\n| held-out (avg@{k}, T={t}) | accuracy |\n|---|---|\n| before (warm start) | "
          "{b:.1%} |\n| after NFT | {a:.1%} |\n| change | {d:+.1f} points |".format(
              k=cfg.eval.k, t=cfg.eval.temperature, b=summary["accuracy_before"],
              a=summary["accuracy_after"], d=100 * rise))
    print(f"[demo] wrote {out_dir / 'summary.json'} and {out_dir / 'curves.png'} "
          f"in {summary['seconds']:.0f} s")
    return summary
