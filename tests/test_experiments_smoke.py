"""`python -m experiments.reproduce --smoke`: the whole reproduction pipeline (every preset and
every ablation point, 1 seed, 3 RL steps) writes what the full sweep writes. The claims
themselves come from the full sweep (experiments/results/, README)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments import reproduce


def _run(out, work):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)        # the CPU default path: chunked PyTorch
    return subprocess.run([sys.executable, "-m", "experiments.reproduce", "--smoke", "--out",
                           str(out), "--work", str(work), "--jobs", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_smoke_sweep_writes_table_curves_ablations(tmp_path):
    out, work = tmp_path / "results", tmp_path / "work"
    proc = _run(out, work)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"base", *reproduce.ALGORITHMS}
    for name, row in summary.items():
        assert set(row) == {"accuracy_mean", "accuracy_std", "seeds"}, name
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["accuracy_std"] == 0.0
        assert row["seeds"] == [0]

    records = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    assert set(records) == {spec.key for spec in reproduce.plan([0])}
    for key, rec in records.items():
        steps = [s for s, _ in rec["curves"]["entropy_heldout"]]
        assert steps == [0, 3], key                      # warm start and after the last step
        assert all(0.0 < h < 10.0 for _, h in rec["curves"]["entropy_heldout"])
        # Paired runs: every run of the seed starts from the same warm start and evaluation.
        assert rec["before"] == records["nft_seed0"]["before"], key
        assert abs(summary[rec["algorithm"]]["accuracy_mean"] - rec["after"]["paper"]["accuracy"]) \
            < 1e-12 or rec["overrides"], key
    # Something was trained: every algorithm took updates with a nonzero gradient.
    for algo in reproduce.ALGORITHMS:
        assert any(g > 0 for _, g in records[f"{algo}_seed0"]["curves"]["grad_norm"]), algo
    # The knobs reached the loss.
    assert records["nft_clip_negative=4.0_seed0"]["algo_config"]["clip_negative"] == 4.0
    assert records["nft_normalize=0_seed0"]["algo_config"]["normalize"] == 0
    assert records["rft_seed0"]["algo_config"]["neg_weight"] == 0.0

    table = (out / "table.md").read_text()
    for label in ("base (warm start)", "NFT", "RFT", "GRPO", "Dr. GRPO", "DAPO",
                  "epsilon ablation", "omega ablation"):
        assert label in table
    ablations = json.loads((out / "ablations.json").read_text())
    assert [p["clip_negative"] for p in ablations["epsilon"]["points"]] == [0.1, 0.5, 1.0, 4.0]
    assert [p["normalize"] for p in ablations["omega"]["points"]] == [0, 1, 2]
    for png in ("entropy.png", "accuracy.png", "ablation_epsilon.png", "ablation_omega.png"):
        assert (out / png).stat().st_size > 10_000, png
    meta = json.loads((out / "command.json").read_text())
    assert meta["command"].startswith("python -m experiments.reproduce --smoke")
    assert meta["seeds"] == [0] and len(meta["trained_now"]) == len(records)

    # A second invocation reuses every finished run (an interrupted sweep continues).
    again = _run(out, work)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 to train" in again.stdout
    assert json.loads((out / "summary.json").read_text()) == summary
    history = json.loads((out / "command.json").read_text())["invocations"]
    assert [h["trained"] for h in history] == [len(records), 0]


def test_summary_statistics_are_paired_and_sample_std():
    def rec(run, seed, acc, ent):
        evals = {"paper": {"accuracy": acc, "pass_at_k": acc, "k": 4, "problems": 10},
                 "t1": {"accuracy": acc, "pass_at_k": acc, "k": 4, "problems": 10}}
        base = {"paper": {"accuracy": 0.1, "pass_at_k": 0.1, "k": 4, "problems": 10},
                "t1": {"accuracy": 0.1, "pass_at_k": 0.1, "k": 4, "problems": 10}}
        return {"run": run, "algorithm": run, "seed": seed, "overrides": {}, "before": base,
                "after": evals, "curves": {"entropy_heldout": [[0, 0.5], [3, ent]]}}

    records = [rec("nft", 0, 0.5, 0.30), rec("nft", 1, 0.7, 0.20),
               rec("rft", 0, 0.4, 0.25), rec("rft", 1, 0.7, 0.18)]
    summary, extra, _ = reproduce.summarize(records, [0, 1])
    assert summary["nft"]["accuracy_mean"] == 0.6
    assert abs(summary["nft"]["accuracy_std"] - 0.1414213562) < 1e-9      # n - 1
    paired = extra["table"]["rft"]["paired_vs_nft"]
    assert abs(paired["accuracy"][0] - (-0.05)) < 1e-12                   # (-0.1 + 0.0) / 2
    assert abs(paired["entropy"][0] - (-0.035)) < 1e-12
    assert summary["base"] == {"accuracy_mean": 0.1, "accuracy_std": 0.0, "seeds": [0, 1]}
