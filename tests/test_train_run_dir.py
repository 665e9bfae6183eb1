"""One run per output folder (issue 22, trainer): a resume continues only the same run, a
used folder is never mixed into, a damaged checkpoint falls back to the previous one, and
metrics hold each step once after a resume."""
import json
import warnings

import pytest
import train_helpers as th
import yaml

from nft_train import checkpoint as ckpt
from nft_train.data import load_file
from nft_train.loop import Trainer


def _run(out, preset="nft", steps=1, **sections):
    model, tok = th.tiny_model(0)
    sections.setdefault("eval", {"before_train": False})
    sections.setdefault("checkpoint", {"every": 1, "keep_last": 5})
    train = {"steps": steps, **sections.pop("train", {})}
    cfg = th.tiny_config(out, preset, train=train, **sections)
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_with_another_config_is_refused_and_names_the_keys(tmp_path):
    out = tmp_path / "run"
    _run(out)
    before = (out / "config.yaml").read_text()
    with pytest.raises(ckpt.RunDirError) as err:
        _run(out, preset="grpo", train={"lr": 5e-4})
    text = str(err.value)
    assert "algo.name: 'nft' -> 'grpo'" in text and "train.lr: 0.001 -> 0.0005" in text
    assert "train.steps" not in text
    # Nothing of the old run was touched by the refused start.
    assert (out / "config.yaml").read_text() == before
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]


def test_resume_with_more_steps_and_another_schedule_continues(tmp_path):
    out = tmp_path / "run"
    _run(out)
    trainer = _run(out, steps=2, eval={"before_train": False, "every": 1},
                   log={"progress": False, "sample_dump_every": 0})
    assert trainer.step == 2
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == 2
    saved = ckpt.read_latest(out)[1]["config"]
    assert saved["algo"]["name"] == "nft" and saved["train"]["steps"] == 2


def test_used_folder_without_resume_is_refused_unless_overwritten(tmp_path):
    out = tmp_path / "run"
    _run(out, steps=2)
    with pytest.raises(ckpt.RunDirError, match="already holds a run.*checkpoint.overwrite"):
        _run(out, checkpoint={"resume": False, "every": 1})
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1, 2]
    trainer = _run(out, preset="grpo", checkpoint={"resume": False, "overwrite": True,
                                                    "every": 1})
    assert trainer.step == 1
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [1]  # the old run's are gone
    assert yaml.safe_load((out / "config.yaml").read_text())["algo"]["name"] == "grpo"
    assert _steps(out) == [1, 1]  # the step and the final evaluation, of the new run only


def test_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    out = tmp_path / "run"
    _run(out, steps=2)
    latest = ckpt.list_checkpoints(out)[-1][1]
    latest.write_bytes(latest.read_bytes()[:1000])  # cut short, as a full disk would
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _run(out, steps=2)
    assert any(str(latest) in str(w.message) and "cannot be read" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    assert trainer.step == 2  # resumed from step 1, trained step 2 again
    assert ckpt.read_latest(out)[1]["step"] == 2
    for _, path in ckpt.list_checkpoints(out):
        path.write_bytes(b"not a checkpoint")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ckpt.CheckpointError, match="step_00000002.pt.*step_00000001.pt"):
            _run(out, steps=3)


def test_interrupted_step_is_logged_once_after_resume(tmp_path):
    out = tmp_path / "run"
    _run(out, steps=2)
    # Killed after logging step 3 (and half a line more) but before its checkpoint.
    with (out / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "train/accuracy": 0.5}) + "\n" + '{"step": 4, "tr')
    _run(out, steps=3)
    steps = _steps(out)
    assert steps.count(3) == 2 and steps.count(4) == 0, steps  # step 3 and the final eval
    assert steps == sorted(steps)


def test_byte_order_mark_does_not_cost_the_first_row(tmp_path):
    path = tmp_path / "bom.jsonl"
    rows = [{"problem": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode())
    problems, report = load_file(path)
    assert [p.answer for p in problems] == ["1", "2", "3"]
    assert not report.skipped
