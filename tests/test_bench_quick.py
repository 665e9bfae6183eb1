"""`python bench/loss_throughput.py --quick` runs end to end (no speed is asserted): both of our
modes, every peer (or its reason for not running), errors against float64, and our peak memory
within the documented formula (nft_kernels.extra_memory_bytes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_and_ours_uses_less_memory_than_naive(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "loss_throughput.py"), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    records = results["records"]
    assert results["meta"]["versions"]["torch"]
    impls = {r["impl"] for r in records}
    assert {"nft_kernels chunked", "nft_kernels lean", "nft_kernels lean filtered",
            "torch naive", "torch.compile naive", "torch.compile chunked", "CCE + NFT",
            "Liger GRPO (DAPO loss)", "TRL chunked logprob + NFT",
            "nft_kernels PPO (DAPO loss)", "nft_kernels chunked tp=1",
            "nft_kernels lean tp=1"} <= impls
    for r in records:
        assert r["status"] in ("ok", "skipped", "OOM", "error"), r
        if r["status"] != "ok":
            assert r["reason"], r  # never silently dropped
        if r["impl"].startswith("nft_kernels"):
            assert r["status"] == "ok", r
            assert r["rel_err_dh"] < 1e-4 and r["rel_err_dw"] < 1e-4, r
            assert r["rel_err_loss"] < 1e-4, r
            assert r["mode"] in ("chunked", "lean"), r
            assert r["within_memory_bound"], r
    for n in {r["N"] for r in records}:
        naive = next(r for r in records if r["N"] == n and r["impl"] == "torch naive")
        for mode in ("chunked", "lean"):
            ours = next(r for r in records if r["N"] == n and r["impl"] == f"nft_kernels {mode}")
            assert ours["peak_extra_mib"] < naive["peak_extra_mib"], (ours, naive)
    assert (tmp_path / "results.md").read_text().count("| tiny-head |") == len(records)
    assert list(tmp_path.glob("*.png"))
