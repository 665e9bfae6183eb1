"""reasoning-gym as a data source: splits that cannot overlap, determinism, binary scoring of
its partial-credit scorers, clear errors, and a trainer step on it."""
import json
import sys

import pytest
import train_helpers as th

from nft_train.config import ConfigError, load_config
from nft_train.data import DataError, reasoning_gym_problems
from nft_train.loop import Trainer
from nft_train.reward import RewardScorer, score_reasoning_gym, scorer_for

pytest.importorskip("reasoning_gym")

SMALL_SUMS = {"name": "chain_sum", "min_terms": 2, "max_terms": 2, "min_digits": 1,
              "max_digits": 1}


def test_splits_do_not_overlap_and_are_deterministic():
    # One-digit sums of two terms: only 100 distinct questions, so 300 entries repeat many.
    train, held = reasoning_gym_problems([SMALL_SUMS, "gcd"], 300, 30, seed=3,
                                         template="boxed")
    assert set(held) == {"chain_sum", "gcd"} and all(len(v) == 30 for v in held.values())
    held_prompts = {p.prompt for v in held.values() for p in v}
    assert held_prompts.isdisjoint(p.prompt for p in train)
    sums = [p for p in train if p.source == "reasoning_gym/chain_sum"]
    assert 0 < len(sums) < 300            # the repeats of held-out questions were dropped
    assert all("\\boxed{}" in p.prompt for p in train)
    again, held_again = reasoning_gym_problems([SMALL_SUMS, "gcd"], 300, 30, seed=3,
                                               template="boxed")
    assert again == train and held_again == held
    other, _ = reasoning_gym_problems([SMALL_SUMS, "gcd"], 300, 30, seed=4, template="boxed")
    assert [p.prompt for p in other] != [p.prompt for p in train]


def test_only_a_full_score_counts_as_correct():
    _, held = reasoning_gym_problems(["gsm_symbolic", "chain_sum"], 1, 40, seed=0,
                                     template="dapo")
    gsm = held["gsm_symbolic"][0]
    right = gsm.answer
    wrong = str(int(right) + 1)
    entry = reasoning_gym_entry(gsm)
    import reasoning_gym
    scorer = reasoning_gym.get_score_answer_fn("gsm_symbolic")
    assert 0 < scorer(wrong, entry) < 1           # reasoning-gym's partial credit ...
    assert score_reasoning_gym(f"so the total is {wrong}", gsm.reference) == 0.0   # ... is 0
    assert score_reasoning_gym(f"so the total is {right}", gsm.reference) == 1.0
    assert score_reasoning_gym(f"\\boxed{{{right}}} (check: {wrong})", gsm.reference) == 1.0
    assert score_reasoning_gym(f"Answer: {right}", gsm.reference) == 1.0
    assert score_reasoning_gym(f"<answer>{right}</answer> then {wrong}", gsm.reference) == 1.0
    chain = held["chain_sum"][0]
    # chain_sum's scorer gives len(oracle)/len(answer) for an answer that contains the oracle
    padded = f"<answer>{chain.answer} {chain.answer}</answer>"
    assert 0 < reasoning_gym.get_score_answer_fn("chain_sum")(
        f"{chain.answer} {chain.answer}", reasoning_gym_entry(chain)) <= 1
    assert score_reasoning_gym(padded, chain.reference) == 0.0
    scorer = RewardScorer.from_config("reasoning_gym", 2, 5.0)
    assert scorer.workers == 0           # plain string work: scored in the process
    assert scorer(["no number here", f"\\boxed{{{chain.answer}}}"],
                  [chain.reference] * 2) == [0.0, 1.0]
    assert scorer.counts == {"unparsable": 1, "ok": 1}
    assert scorer_for("auto", "reasoning_gym", "dapo") == "reasoning_gym"


def test_clear_errors(monkeypatch):
    with pytest.raises(DataError, match="'chain_summ' is not a reasoning-gym task.*chain_sum"):
        reasoning_gym_problems(["chain_summ"], 10, 2, 0, "dapo")
    with pytest.raises(DataError, match="bad config for 'chain_sum'"):
        reasoning_gym_problems([{"name": "chain_sum", "max_terms": 1}], 10, 2, 0, "dapo")
    with pytest.raises(DataError, match="each task is a name or a mapping"):
        reasoning_gym_problems([{"task": "chain_sum"}], 10, 2, 0, "dapo")
    with pytest.raises(DataError, match="listed twice"):
        reasoning_gym_problems(["gcd", "gcd"], 10, 2, 0, "dapo")
    with pytest.raises(ConfigError, match="reward.kind"):
        load_config(overrides=["data.source=reasoning_gym", "reward.kind=math_verify"])
    with pytest.raises(ConfigError, match="reward.kind"):
        load_config(overrides=["reward.kind=reasoning_gym"])
    with pytest.raises(ConfigError, match="eval.files"):
        load_config(overrides=["data.source=reasoning_gym", "eval.files=[a.jsonl]"])
    with pytest.raises(ConfigError, match="data.reasoning_gym.tasks"):
        load_config(overrides=["data.source=reasoning_gym", "data.reasoning_gym.tasks=[]"])
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)   # the extra is not installed
    with pytest.raises(DataError, match=r"pip install 'nft-kernels\[gym\]'"):
        reasoning_gym_problems(["gcd"], 10, 2, 0, "dapo")


def test_trainer_runs_on_reasoning_gym_with_one_eval_set_per_task(tmp_path):
    model, tok = th.tiny_model(0)
    cfg = th.tiny_config(tmp_path / "run", "nft", algo={"dynamic_sampling": False},
                         train={"steps": 1})
    cfg.data.source, cfg.data.format, cfg.data.template = "reasoning_gym", "auto", "plain"
    cfg.data.reasoning_gym.tasks = [SMALL_SUMS, {"name": "gcd", "max_value": 20}]
    cfg.data.reasoning_gym.train_size, cfg.data.reasoning_gym.eval_size = 40, 4
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    try:
        assert set(trainer.eval_sets) == {"chain_sum", "gcd"}
        assert trainer.scorer.fn is score_reasoning_gym
        final = trainer.run()
    finally:
        trainer.close()
    assert "eval/chain_sum/accuracy" in final and "eval/gcd/accuracy" in final
    rows = [json.loads(x) for x in (trainer.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("train/accuracy" in r for r in rows)


def reasoning_gym_entry(problem):
    key = json.loads(problem.reference)
    import reasoning_gym
    return reasoning_gym.create_dataset(key["task"], size=key["size"], seed=key["seed"],
                                        **key["config"])[key["index"]]
