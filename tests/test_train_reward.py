"""Rewards: extractors, math-verify, and a pool that survives answers that hang or crash."""
import time

import pytest
import train_helpers

from nft_train.reward import (
    RewardScorer,
    extract_answer_line,
    extract_boxed,
    normalize_answer,
    score_answer_line,
    score_boxed,
    score_math_verify,
    scorer_for,
)


def test_extractors_take_the_last_answer():
    text = "Answer: 3\nwait, redo.\nAnswer: $\\frac{1}{2}$"
    assert extract_answer_line(text) == "$\\frac{1}{2}$"
    assert extract_answer_line("no answer") is None
    assert extract_boxed("\\boxed{1} then \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert extract_boxed("\\boxed{unclosed") is None
    assert normalize_answer("\\boxed{ \\dfrac{1}{2} }.") == "\\frac{1}{2}"
    assert score_answer_line("steps...\nAnswer: 42", "42") == 1.0
    assert score_answer_line("Answer: 41", "42") == 0.0
    assert score_boxed("so \\boxed{\\left(1,2\\right)}", "(1, 2)") == 1.0


def test_math_verify_grades_equivalent_forms():
    pytest.importorskip("math_verify")
    assert score_math_verify("so the answer is \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert score_math_verify("work\nAnswer: 1/2", "\\frac{1}{2}") == 1.0
    assert score_math_verify("\\boxed{3}", "4") == 0.0
    assert score_math_verify("9 - 7 = 2", "2") == 1.0          # a plain final number
    assert score_math_verify("so it is 3/4.", "0.75") == 1.0


def test_math_verify_does_not_evaluate_a_restated_question():
    """The whole response is never parsed as the answer: math-verify would evaluate "9 - 7"
    to 2. SmolLM2 trained on that reward learned to answer "9 - 7 = ?" (the example's first
    run: 94.5% by math-verify, 29.8% by the last number written)."""
    pytest.importorskip("math_verify")
    assert score_math_verify("9 - 7 = ?", "2") == 0.0
    assert score_math_verify("What is 12 + 17? 12 + 17", "29") == 0.0
    assert score_math_verify("12 + 17 = 29", "29") == 1.0
    assert scorer_for("auto", "file", "dapo") == "math_verify"
    assert scorer_for("auto", "synthetic", "dapo") == "synthetic"


def test_pool_scores_math_verify_and_counts_unparsable():
    pytest.importorskip("math_verify")
    scorer = RewardScorer.from_config("math_verify", workers=2, timeout_s=5.0)
    try:
        scores = scorer(["Answer: 4", "\\boxed{5}", "", "Answer: \\frac{8}{2}"], ["4"] * 4)
    finally:
        scorer.close()
    assert scores == [1.0, 0.0, 0.0, 1.0]
    assert scorer.counts["ok"] == 3 and scorer.counts["unparsable"] == 1


@pytest.mark.parametrize("fn, bad", [(train_helpers.slow_scorer, "slow"),
                                     (train_helpers.stuck_scorer, "stuck"),
                                     (train_helpers.crashing_scorer, "crash")])
def test_a_pathological_answer_scores_zero_and_the_pool_recovers(fn, bad):
    scorer = RewardScorer(fn, workers=2, timeout_s=1.0)
    try:
        scorer(["warm", "up"], ["warm", "x"])           # spawn the workers outside the timing
        start = time.monotonic()
        scores = scorer(["7", bad, "8", "9"], ["7", bad, "0", "9"])
        elapsed = time.monotonic() - start
        assert scores == [1.0, 0.0, 0.0, 1.0] or (bad == "crash" and scores[1] == 0.0)
        assert scorer.counts["timeout"] + scorer.counts["error"] >= 1
        assert elapsed < 15, f"scoring took {elapsed:.0f} s"
        assert scorer(["5", "6"], ["5", "5"]) == [1.0, 0.0]   # the pool still works
    finally:
        scorer.close()
