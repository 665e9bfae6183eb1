"""bench/gpu_acceptance.py on a machine without a GPU: it refuses in one line, and its summary
reads the targets off bench results correctly (checked on synthetic results)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_acceptance",
                                                  ROOT / "bench" / "gpu_acceptance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_refuses_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_acceptance.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "gpu_acceptance.py needs a CUDA GPU"


def test_summary_reads_targets_off_the_bench_results(tmp_path):
    acc = _module()

    def rec(impl, n, ms, **extra):
        return dict(impl=impl, N=n, status="ok", time_ms=ms, peak_extra_mib=100.0, **extra)

    records = []
    for n, ours_ms in ((4096, 30.0), (16384, 100.0)):
        records += [rec("nft_kernels chunked", n, ours_ms, fraction_of_gemm_6nhv=0.7,
                        memory_bound_mib=120.0, within_memory_bound=True, rel_err_dw=1e-3),
                    rec("Liger GRPO (DAPO loss)", n, 2.5 * ours_ms),
                    rec("CCE + NFT", n, 1.2 * ours_ms),
                    rec("nft_kernels chunked tp=1", n, 1.02 * ours_ms)]
    (tmp_path / "results.json").write_text(json.dumps(dict(records=records)))
    figures = acc.headline(tmp_path)
    big = figures["figures"]["N=16384"]
    assert big["speedup_vs Liger GRPO (DAPO loss)"] == pytest.approx(2.5)
    assert figures["targets"] == {">= 80% of the GEMM ceiling (6NHV)": False,
                                  ">= 2x Liger GRPO": True, ">= 1.5x CCE + NFT": False,
                                  "peak memory within the formula": True,
                                  "vocab-parallel path at tp=1 within 5% of the plain call "
                                  "(chunked)": True}
    assert big["tp=1 time ratio chunked"] == pytest.approx(1.02)
    steps = [dict(step="tests", status="ok", seconds=1.0, tail="3 passed in 1.0s",
                  summary="3 passed in 1.0s")]
    acc.write_summary(tmp_path, steps, dict(device="X", date="d", torch="t", triton="tr"),
                      figures)
    text = (tmp_path / "summary.md").read_text()
    assert "| >= 2x Liger GRPO | True |" in text and "| tests | ok |" in text
    assert json.loads((tmp_path / "summary.json").read_text())["steps"][0]["status"] == "ok"
