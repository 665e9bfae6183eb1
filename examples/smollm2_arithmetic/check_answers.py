"""Grade held-out answers two ways: math-verify (the training reward) and a strict rule.

    python examples/smollm2_arithmetic/check_answers.py --model runs/smollm2-arith/final_model \
        --files data/arith/eval.jsonl --out examples/smollm2_arithmetic/results/check_final.json

math-verify reads an answer from the whole response when there is no \\boxed{} or "Answer:"
line, and it evaluates expressions: "9 - 7 = ?" grades as the answer 2. A policy can learn
that. The strict rule accepts a response only when the last integer written in it is the
answer. Sampling as in the example's evaluation (k=4, T=0.6, top-p 0.7, 96 new tokens, the
vLLM engine), with its own seed: the math-verify column is comparable to the run's avg@4, not
the same draw.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from nft_train.actor import load_model_and_tokenizer
from nft_train.config import Config, validate
from nft_train.data import encode_problems, load_file
from nft_train.reward import RewardScorer
from nft_train.rollout import make_rollout

_INTEGER = re.compile(r"-?\d+")


def last_integer_is_answer(response: str, answer: str) -> float:
    found = _INTEGER.findall(response)
    return float(bool(found) and found[-1].lstrip("+") == answer.strip())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--files", nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = Config(out_dir=str(args.out.parent))
    cfg.model.path, cfg.rollout.backend, cfg.data.template = args.model, args.backend, "boxed"
    cfg.rollout.max_new_tokens = 96
    validate(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model, torch.device("cpu"))
    engine = make_rollout(cfg.rollout, model, tokenizer, args.model, torch.device("cpu"),
                          args.seed, cfg.model.dtype)
    scorer = RewardScorer.from_config("math_verify", 2, 10.0)
    report = {"model": args.model, "k": args.k, "temperature": 0.6, "top_p": 0.7}
    try:
        for path in args.files:
            problems, _ = load_file(path, "auto", "boxed")
            encoded, _ = encode_problems(problems, tokenizer, cfg.data.max_prompt_tokens)
            samples = engine.generate([list(p.prompt_ids) for p in encoded], args.k, 0.6, 0.7,
                                      96, args.seed)
            texts = tokenizer.batch_decode([s.response_ids for s in samples],
                                           skip_special_tokens=True)
            answers = [encoded[s.prompt_index].problem.answer for s in samples]
            lenient = scorer(texts, answers)
            strict = [last_integer_is_answer(t, a) for t, a in zip(texts, answers)]
            echoed = [t for t, m, s in zip(texts, lenient, strict) if m and not s]
            report[Path(path).stem] = {
                "answers": len(texts),
                "math_verify_accuracy": sum(lenient) / len(texts),
                "strict_accuracy": sum(strict) / len(texts),
                "math_verify_only": len(echoed),
                "examples_math_verify_only": echoed[:8],
                "boxed_fraction": sum("\\boxed" in t for t in texts) / len(texts),
                "mean_response_chars": sum(map(len, texts)) / len(texts),
            }
            print(json.dumps({k: v for k, v in report[Path(path).stem].items()
                              if not k.startswith("examples")}))
    finally:
        scorer.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
