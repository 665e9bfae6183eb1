"""`nft-train demo` end to end, shortened (the full demo and its 15-point bar are run by hand;
README and CHANGELOG give the measured numbers)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_command_writes_summary_and_curves(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)      # the demo's default path on a CPU: chunked PyTorch
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "nft_train.cli", "demo", "--out", str(out),
                           "--steps", "4", "--sft-steps", "40"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["settings"]["rl_steps"] == 4 and summary["settings"]["sft_steps"] == 40
    assert summary["sft_loss_first_last"][1] < summary["sft_loss_first_last"][0]
    assert (out / "curves.png").stat().st_size > 0 and (out / "config.yaml").is_file()
    assert "before (warm start)" in proc.stdout and "after NFT" in proc.stdout
    # The trained model is a Hugging Face folder that `nft-train eval` takes.
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"problem": f"{a:02d}+{a:02d}=", "answer": f"{2 * a:03d}"})
                             + "\n" for a in (3, 14, 25)))
    proc = subprocess.run([sys.executable, "-m", "nft_train.cli", "eval", "--model",
                           str(out / "final_model"), "--files", str(bench), "--k", "2",
                           "--template", "plain", "--reward", "dapo", "--max-new-tokens", "5",
                           "--temperature", "1.0", "--top-p", "1.0", "--out", str(tmp_path / "ev")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())["bench"]
    assert result["problems"] == 3 and result["k"] == 2 and 0.0 <= result["accuracy"] <= 1.0
