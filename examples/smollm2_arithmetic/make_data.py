"""Arithmetic problems for the SmolLM2 example, as MATH-style jsonl (``problem``, ``answer``).

    python examples/smollm2_arithmetic/make_data.py --out data/arith

writes train.jsonl and eval.jsonl: sums and differences of whole numbers up to 20 ("What is
13 + 7?", answer "20"; differences never negative), in a fixed shuffled order; the held-out
problems never appear in training. With ``data.template=boxed`` the trainer asks for
step-by-step reasoning and the answer in \\boxed{}, graded by math-verify. (SmolLM2-135M, as the
dequantised GGUF, solves about a fifth of these at temperature 1 and almost no two-digit sums:
a task it can learn from.)
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def problems(seed: int, top: int = 20) -> list[dict]:
    """Every sum and difference of 1..top (non-negative results), in a seeded order."""
    rows = []
    for a in range(1, top + 1):
        for b in range(1, top + 1):
            rows.append({"problem": f"What is {a} + {b}?", "answer": str(a + b)})
            if a >= b:
                rows.append({"problem": f"What is {a} - {b}?", "answer": str(a - b)})
    random.Random(seed).shuffle(rows)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--train", type=int, default=500)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = problems(args.seed)
    if args.train + args.eval > len(rows):
        parser.error(f"only {len(rows)} problems exist; ask for fewer")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("eval", rows[:args.eval]),
                       ("train", rows[args.eval:args.eval + args.train])):
        with (args.out / f"{name}.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    print(f"wrote {args.out}/train.jsonl ({args.train}) and eval.jsonl ({args.eval})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
