"""nft_train config and data: presets, overrides, errors that name the key, dataset loaders."""
import json

import pytest
import yaml

from nft_train.config import PRESETS, Config, ConfigError, load_config, save_resolved
from nft_train.data import (
    DataError,
    PromptStream,
    load_file,
    synthetic_problems,
    synthetic_reward,
)


def test_defaults_are_valid_and_presets_set_the_papers_settings(tmp_path):
    assert load_config().algo.name == "nft"
    nft = load_config(preset="nft").algo
    assert (nft.loss, nft.neg_weight, nft.normalize, nft.clip_negative) == ("nft", 1.0, 1, 1.0)
    rft = load_config(preset="rft").algo
    assert (rft.neg_weight, rft.normalize) == (0.0, 0)
    dapo = load_config(preset="dapo").algo
    assert (dapo.loss, dapo.clip_low, dapo.clip_high, dapo.loss_agg, dapo.dynamic_sampling) == \
        ("ppo", 0.2, 0.28, "token-mean", True)
    assert load_config(preset="dr_grpo").algo.advantage == "dr_grpo"
    assert load_config(preset="grpo").algo.advantage == "grpo"
    assert set(PRESETS) == {"nft", "rft", "grpo", "dr_grpo", "dapo",
                            "cispo", "sapo", "w_reinforce", "nsr"}
    cispo = load_config(preset="cispo").algo
    assert (cispo.loss, cispo.cispo_clip_max, cispo.loss_agg) == ("cispo", 5.0, "token-mean")
    sapo = load_config(preset="sapo").algo
    assert (sapo.loss, sapo.sapo_temperature_pos, sapo.sapo_temperature_neg) == \
        ("sapo", 1.0, 1.05)
    assert load_config(preset="nsr").algo.positive_weight == 0.0
    assert load_config(preset="w_reinforce").algo.positive_weight == 0.1


def test_file_then_overrides_win_over_the_preset_and_resolved_config_round_trips(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"algo": {"name": "dapo", "clip_high": 0.3},
                                    "train": {"lr": 3e-6, "steps": 7}}))
    cfg = load_config(path, ["train.lr=1e-5", "eval.files=[a.jsonl, b.jsonl]",
                             "algo.dynamic_sampling=false"])
    assert cfg.algo.loss == "ppo" and cfg.algo.clip_high == 0.3 and cfg.train.steps == 7
    assert cfg.train.lr == 1e-5 and cfg.eval.files == ["a.jsonl", "b.jsonl"]
    assert cfg.algo.dynamic_sampling is False
    save_resolved(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


@pytest.mark.parametrize("override, key", [
    ("train.lrr=1", "train.lrr"),
    ("trian.lr=1", "trian"),
    ("train.lr=-1", "train.lr"),
    ("train.lr=abc", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("algo.normalize=3", "algo.normalize"),
    ("algo.name=ppo", "algo.name"),
    ("algo.rate_clamp=[0.5, 0.1]", "algo.rate_clamp"),
    ("train.steps=0", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("rollout.backend=sglang", "rollout.backend"),
    ("train=3", "train"),
    ("train.mini_batches_per_step=5", "train.mini_batches_per_step"),
])
def test_bad_keys_and_values_fail_at_start_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(overrides=[override])


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["train.lr"])


def _dapo_rows():
    prompt = "Solve ... What is 2+2?\n\nRemember to put your answer on its own line"
    good = {"data_source": "math_dapo", "prompt": [{"role": "user", "content": prompt}],
            "ability": "MATH", "reward_model": {"ground_truth": "4", "style": "rule-lighteval"},
            "extra_info": {"index": "0"}}
    no_truth = dict(good, reward_model={"ground_truth": None, "style": "rule"})
    no_user = dict(good, prompt=[{"role": "system", "content": "hi"}])
    empty = dict(good, prompt=[])
    return [good, no_truth, no_user, empty, good]


def test_dapo_parquet_schema_with_malformed_rows_counted(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(_dapo_rows()), path)
    problems, report = load_file(path)
    assert len(problems) == 2 and problems[0].answer == "4"
    assert problems[0].prompt.startswith("Solve ...")
    assert report.skipped == {"no reward_model.ground_truth": 1, "no user message": 1,
                              "no prompt messages": 1}
    assert "2 problems" in report.summary()


def test_math500_jsonl_with_malformed_rows_counted(tmp_path):
    path = tmp_path / "math500.jsonl"
    rows = [{"problem": "What is $1+1$?", "solution": "...", "answer": "2", "subject": "A",
             "level": 1, "unique_id": "x"},
            {"problem": "No answer here", "solution": "..."},
            {"problem": "", "answer": "3"}, [1, 2]]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n\n")
    problems, report = load_file(path, template="boxed")
    assert len(problems) == 1 and problems[0].answer == "2"
    assert "\\boxed{}" in problems[0].prompt and "What is $1+1$?" in problems[0].prompt
    assert report.skipped == {"no answer": 1, "no problem": 1, "not an object": 1,
                              "invalid json": 1}


def test_missing_empty_and_unknown_datasets_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_file(tmp_path / "nope.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no usable row"):
        load_file(empty)
    other = tmp_path / "data.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match="data.format"):
        load_file(other)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read parquet"):
        load_file(broken)


def test_synthetic_task_splits_are_disjoint_and_the_verifier_is_exact():
    train, held = synthetic_problems(2, 500, 100)
    assert len(train) == 500 and len(held) == 100
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    for p in train[:50]:
        a, b = p.prompt.rstrip("=").split("+")
        assert int(p.answer) == int(a) + int(b) and len(p.answer) == 3
        assert synthetic_reward(p.answer, p.answer) == 1.0
        assert synthetic_reward(f" {p.answer}\nmore", p.answer) == 1.0
        assert synthetic_reward(str(int(p.answer) + 1).zfill(3), p.answer) == 0.0
    assert synthetic_reward("", "012") == 0.0 and synthetic_reward("12", "012") == 0.0
    with pytest.raises(DataError, match="only 100 problems"):
        synthetic_problems(1, 90, 20)


def test_prompt_stream_resumes_at_the_same_position():
    problems, _ = synthetic_problems(2, 30, 1)
    a = PromptStream(problems, seed=3)
    a.take(45)                                  # into the second epoch
    state = a.state_dict()
    expected = a.take(40)
    b = PromptStream(problems, seed=3)
    b.load_state_dict(state)
    assert b.take(40) == expected
    assert Config().train.seed == 0
