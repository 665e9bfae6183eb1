"""Static Hopper gate: every GPU kernel variant compiles for sm_90 at its shipped configuration,
without spills (16-bit) and with wgmma (16-bit tile kernels), read back from ptxas on a machine
without a GPU (bench/static_sm90.py)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_present():
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return False
    return (Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell").exists()


@pytest.mark.skipif(not _ptxas_present(), reason="Triton's NVIDIA backend (ptxas-blackwell) "
                    "is not installed")
def test_every_kernel_variant_compiles_for_hopper_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "static_sm90.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=1500,
                          check=False)
    report = json.loads((tmp_path / "static_sm90.json").read_text())
    records = report["records"]
    failed = [r for r in records if not r["gate_ok"]]
    assert not failed, json.dumps(failed, indent=1)[:4000]
    assert done.returncode == 0, done.stderr[-3000:]
    assert {r["kernel"] for r in records} == {
        "fused_linear_forward_kernel", "fused_linear_backward_atomic_kernel",
        "fused_linear_backward_dh_kernel", "fused_linear_backward_dw_kernel",
        "chunk_rows_kernel", "loss_head_kernel"}
    assert {r["dtype"] for r in records} == {"bf16", "fp16", "fp32"}
    for r in records:
        assert r["registers"] > 0, r  # ptxas really read back
        if r["dtype"] != "fp32":
            assert r["spill_store_bytes"] == 0 and r["spill_load_bytes"] == 0, r
            if r["kernel"].startswith("fused_linear_"):
                assert r["wgmma"], r
    assert (tmp_path / "static_sm90.md").read_text().count("| ok: ") == len(records)
