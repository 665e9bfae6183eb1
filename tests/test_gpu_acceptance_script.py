"""bench/gpu_acceptance.py on a machine without a GPU: its rehearsal runs every step of the real
run at tiny shapes (the Triton interpreter where kernels launch) and writes every file; without
--rehearsal it refuses in one line; its summary reads the targets off bench results correctly
(checked on synthetic results)."""

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
    assert done.stderr.strip() == ("gpu_acceptance.py needs a CUDA GPU (--rehearsal runs its "
                                   "steps on the CPU)")


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_rehearsal_runs_every_step_and_writes_every_file(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_acceptance.py"),
                           "--rehearsal", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["step"], s["status"]) for s in summary["steps"]] == [
        ("smoke", "ok"), ("bench", "ok"), ("tests", "ok"), ("profile", "ok")]
    smoke = summary["steps"][0]["result"]
    assert smoke["loss_finite"] and smoke["rel_err_dh"] < 5e-2 and smoke["rel_err_dw"] < 5e-2
    assert " passed" in summary["steps"][2]["summary"]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["summary.md", "summary.json", "log.txt", "results.json",
                            "results.md", "rehearsal-head.png", "profile.txt"])
    assert len(files) <= 8  # what the device tool hands back
    records = json.loads((tmp_path / "results.json").read_text())["records"]
    ours = [r for r in records if r["impl"] == "nft_kernels chunked"]
    assert ours and ours[0]["status"] == "ok" and ours[0]["counted_tokens"] < ours[0]["N"]
    assert "row kernel sweep" in (tmp_path / "profile.txt").read_text()
    assert "Figures" in (tmp_path / "summary.md").read_text()


def test_a_step_past_its_limit_is_interrupted_and_its_children_killed(tmp_path):
    """SIGINT at the limit (pytest prints its summary then), SIGKILL to the whole group after
    the grace period: a child that ignores SIGINT does not outlive the step."""
    acc = _module()
    marker = tmp_path / "child.pid"
    script = (f"import os, signal, subprocess, sys, time\n"
              f"child = subprocess.Popen([sys.executable, '-c', "
              f"'import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              f"time.sleep(60)'])\n"
              f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
              f"print('started', flush=True)\n"
              f"time.sleep(60)\n")
    record = acc.run_step("hang", [sys.executable, "-c", script], 3, tmp_path / "log.txt",
                          dict(__import__("os").environ), grace=1)
    assert record["status"] == "timed out" and record["seconds"] < 15
    assert "started" in (tmp_path / "log.txt").read_text()
    import os
    import time
    pid = int(marker.read_text())
    time.sleep(0.2)
    try:
        os.kill(pid, 0)
        alive = open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        alive = False
    assert not alive, "the step's child outlived it"
