"""Held-out evaluation: avg@k accuracy per benchmark, with explicit k, temperature and top_p
(the paper: avg@32 for AIME and AMC, avg@1 for MATH500, T=0.6, top_p 0.7)."""
from __future__ import annotations

from .data import EncodedProblem


def avg_at_k(engine, problems: list[EncodedProblem], scorer, k: int, temperature: float,
             top_p: float, max_new_tokens: int, seed: int, tokenizer) -> dict:
    """Mean reward over k sampled answers per problem, and the share of problems solved by
    at least one of them (pass@k)."""
    if not problems:
        raise ValueError("evaluation needs at least one problem")
    samples = engine.generate([list(p.prompt_ids) for p in problems], k, temperature, top_p,
                              max_new_tokens, seed)
    texts = tokenizer.batch_decode([s.response_ids for s in samples], skip_special_tokens=True)
    scores = scorer(texts, [problems[s.prompt_index].problem.reference
                               for s in samples])
    solved = [0.0] * len(problems)
    for s, r in zip(samples, scores):
        solved[s.prompt_index] = max(solved[s.prompt_index], r)
    return {"accuracy": sum(scores) / len(scores), "pass_at_k": sum(solved) / len(problems),
            "problems": len(problems), "k": k, "temperature": temperature, "top_p": top_p}
