"""One-call GPU acceptance run: the headline first, every step's files written as it ends.

    python bench/gpu_acceptance.py --out DIR               # one H200: <= 6 minutes in all
    python bench/gpu_acceptance.py --rehearsal --out DIR   # the same steps on the CPU at tiny
                                                           # shapes (Triton interpreter; in CI)

Steps, in order of value, each in its own process (a new session) under a time limit; at the
limit the step gets SIGINT (pytest then prints its summary), then after a grace period its
whole process group is killed, so no child (torchrun) is left on the GPU:
  1. smoke    one chunked bf16 call at the Qwen2.5-7B head (H=3584, V=152064) against float64
              on a slice of rows; peak memory against nft_kernels.extra_memory_bytes
  2. bench    the headline: ours (chunked) vs the same-run cuBLAS ceiling vs Liger and CCE at
              N in {4096, 16384}, inputs made once per N on the GPU and shared, each record
              appended to results.json / results.md as it is measured; then the lean mode and
              the vocab-parallel tp=1 path while the step's time lasts
  3. tests    the compiled-Triton tests (tests/test_gpu.py and the kernel property tests) with
              a short hypothesis profile (NFT_PROPERTY_EXAMPLES)
  4. profile  torch.profiler of the chunked mode (the kernels by GPU time) and a sweep of the
              row kernel's launch configurations, with registers / spills
Files in DIR (7, within the device tool's 8): summary.md, summary.json (both rewritten after
every step), log.txt (every step's output, appended as it comes), results.json, results.md,
<head>.png, profile.txt. The cost model's prediction stands beside the measurement in the
summary (bench/cost_model.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:
    # `python bench/gpu_acceptance.py`: the repository root on the path, as `python -m bench.gpu_acceptance`
    sys.path[0] = str(Path(__file__).resolve().parents[1])
# The real run and its CPU rehearsal: the same steps, files and code paths, other sizes.
PLANS = {
    "gpu": dict(head=("Qwen2.5-7B", 3584, 152064), tokens=(4096, 16384), dtype="bf16",
                smoke_tokens=16384, smoke_rows=256, repeats=5, examples=3,
                limits=dict(smoke=60, bench=150, tests=100, profile=45), grace=10,
                sweep=((1024, 4), (2048, 8), (4096, 8), (8192, 16)), profile_tokens=16384),
    "rehearsal": dict(head=("rehearsal-head", 64, 512), tokens=(64, 128), dtype="bf16",
                      smoke_tokens=96, smoke_rows=32, repeats=2, examples=1,
                      limits=dict(smoke=60, bench=120, tests=90, profile=60), grace=10,
                      sweep=((64, 4),), profile_tokens=64),
}
# The bench's order: the headline's three, then what is worth having if time remains.
BENCH_IMPLS = ("nft_kernels chunked", "Liger GRPO (DAPO loss)", "CCE + NFT",
               "nft_kernels lean", "nft_kernels chunked tp=1", "TRL chunked logprob + NFT",
               "nft_kernels user head (CISPO)", "Liger GRPO (CISPO loss)")
PEER_NAMES = ("Liger GRPO (DAPO loss)", "CCE + NFT", "TRL chunked logprob + NFT", "torch naive")
TEST_FILES = ("tests/test_gpu.py", "tests/test_numerics_16bit.py",
              "tests/test_fused_nft_properties.py", "tests/test_edge_cases.py",
              "tests/test_reliability.py", "tests/test_bad_input.py")
REHEARSAL_TEST_FILES = ("tests/test_gpu.py", "tests/test_bad_input.py")


def _env(rehearsal: bool):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if rehearsal:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [
        p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def _kill_group(pid, sig):
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_step(name, cmd, limit, log_path, env, grace):
    """Run ``cmd`` in a new session with output appended to ``log_path``; at ``limit`` seconds
    SIGINT, then after ``grace`` SIGKILL to the whole group. Returns the step record."""
    t0 = time.perf_counter()
    with open(log_path, "a") as log:
        log.write(f"\n===== {name}: {' '.join(cmd)}\n")
        log.flush()
        start = log.tell()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            code, status = None, "timed out"
        _kill_group(proc.pid, signal.SIGKILL)  # whatever it started is gone too
        proc.wait()
    with open(log_path, errors="replace") as log:
        log.seek(start)
        output = log.read()
    seconds = time.perf_counter() - t0
    print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
    record = dict(step=name, status=status, exit_code=code, seconds=round(seconds, 1),
                  tail=output[-1500:])
    for line in output.splitlines():  # a step may report a structured result
        if line.startswith("STEP-RESULT "):
            record["result"] = json.loads(line[len("STEP-RESULT "):])
    return record


def _self(*args):
    return [sys.executable, str(Path(__file__).resolve()), *args]


def step_commands(plan_name, out):
    p = PLANS[plan_name]
    name, h, v = p["head"]
    bench_limit = p["limits"]["bench"]
    flag = ["--rehearsal"] if plan_name == "rehearsal" else []
    tests = REHEARSAL_TEST_FILES if plan_name == "rehearsal" else TEST_FILES
    return {
        "smoke": _self("--smoke", *flag),
        "bench": [sys.executable, "bench/loss_throughput.py", "--head-size", str(h), str(v),
                  "--name", name, "--tokens", *map(str, p["tokens"]), "--dtype", p["dtype"],
                  "--repeats", str(p["repeats"]), "--skip-compile", "--out", str(out),
                  "--impls", *BENCH_IMPLS, "--deadline", str(int(bench_limit * 0.6))],
        "tests": [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                  *tests],
        "profile": _self("--profile-into", str(out), *flag),
    }


# ---- the smoke step (its own process) --------------------------------------------------------
def smoke(plan_name) -> int:
    """One chunked call at the head against float64 on a slice of rows, and its peak memory
    against the documented bound. Prints STEP-RESULT {json}."""
    import torch

    from bench.implementations import IMPLEMENTATIONS  # noqa: PLC0415
    from bench.loss_throughput import (  # noqa: PLC0415
        DTYPES,
        make_inputs,
        reference_on_slice,
        relative_error,
        slice_inputs,
    )
    from nft_kernels import extra_memory_bytes, fused_linear_nft_loss  # noqa: PLC0415

    p = PLANS[plan_name]
    _, h, v = p["head"]
    dev = torch.device("cuda" if plan_name == "gpu" else "cpu")
    dtype = DTYPES[p["dtype"]]
    inputs = make_inputs(p["smoke_tokens"], h, v, dtype, dev, 0)
    n = inputs["target"].numel()
    hid = inputs["hidden"].clone().requires_grad_(True)
    w = inputs["weight"].clone().requires_grad_(True)
    peak = None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    loss = fused_linear_nft_loss(hid, w, inputs["target"], inputs["old"], inputs["rewards"],
                                 inputs["rate"], inputs["mask"], reduction="mean")
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    seconds = time.perf_counter() - t0
    counted = int(inputs["mask"].sum())
    bound = extra_memory_bytes(n, h, v, dtype, "chunked", device=dev, counted_tokens=counted)
    # The bench's own accuracy check: its chunked implementation on the first rows.
    sliced = slice_inputs(inputs, p["smoke_rows"])
    ours = next(i for i in IMPLEMENTATIONS if i.name == "nft_kernels chunked")
    got, dh, dw = ours.build(sliced)()
    ref_loss, ref_dh, ref_dw, _ = reference_on_slice(sliced, ours.loss)
    result = dict(tokens=n, counted=counted, seconds_first_call=round(seconds, 2),
                  loss_finite=bool(torch.isfinite(loss)),
                  rel_err_loss=abs(got.item() - ref_loss.item()) / max(abs(ref_loss.item()),
                                                                       1e-30),
                  rel_err_dh=relative_error(dh, ref_dh), rel_err_dw=relative_error(dw, ref_dw),
                  peak_extra_mib=None if peak is None else peak / 2**20,
                  memory_bound_mib=bound / 2**20,
                  within_memory_bound=None if peak is None else peak <= bound * 1.02 + 2**20)
    # bf16 dz and gradients: ~1e-2 relative; anything far beyond is a wrong kernel.
    ok = result["loss_finite"] and max(result["rel_err_dh"], result["rel_err_dw"]) < 5e-2
    print("STEP-RESULT " + json.dumps(result), flush=True)
    return 0 if ok and result["within_memory_bound"] is not False else 1


# ---- the profile step (its own process) ------------------------------------------------------
def profile_into(out: Path, plan_name) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.loss_throughput import make_inputs  # noqa: PLC0415
    from nft_kernels import fused_linear_nft_loss, triton_launch  # noqa: PLC0415
    from nft_kernels.heads import HeadSpec, LogitScaling  # noqa: PLC0415
    from nft_kernels.inputs import RowPass, TokenInputs  # noqa: PLC0415
    from nft_kernels.ops.chunk_rows import chunk_rows_kernel  # noqa: PLC0415

    p = PLANS[plan_name]
    name, h, v = p["head"]
    dev = torch.device("cuda" if plan_name == "gpu" else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    lines = []
    path = out / "profile.txt"
    inputs = make_inputs(p["profile_tokens"], h, v, torch.bfloat16, dev, 0)
    hid = inputs["hidden"].clone().requires_grad_(True)
    w = inputs["weight"].clone().requires_grad_(True)

    def step():
        hid.grad = w.grad = None
        fused_linear_nft_loss(hid, w, inputs["target"], inputs["old"], inputs["rewards"],
                              inputs["rate"], inputs["mask"]).backward()

    step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    lines.append(f"# chunked mode, {name} head, N={p['profile_tokens']}, bf16: one forward + "
                 f"backward")
    lines.append(prof.key_averages().table(sort_by=sort, row_limit=20))
    path.write_text("\n".join(lines) + "\n")  # kept if the sweep below does not finish

    # The row kernel alone on one chunk of logits through its launcher, over a small table of
    # launch configurations (stats + head + bf16 dz: 10 bytes moved per logit).
    rows = 1024 if dev.type == "cuda" else 16
    ws = torch.randn(rows, v, device=dev) * 3
    dz = ws.view(torch.bfloat16)[:, :v]
    target = torch.randint(0, v, (rows,), device=dev)
    ids = torch.arange(rows, device=dev)
    out_rows = {k: torch.zeros(rows, device=dev)
                for k in ("logp", "rowmax", "logsum", "entropy", "loss", "g")}
    zeros = torch.zeros(rows, device=dev)
    row_pass = RowPass(target=target, mask=None,
                       inputs=TokenInputs(old_logprobs=zeros, signal=zeros + 1.0,
                                          correct_rate=zeros + 0.5),
                       spec=HeadSpec(kind="nft"), scaling=LogitScaling(),
                       scale=torch.ones((), device=dev), out=out_rows, write_dz=True)
    lines.append(f"\n# row kernel sweep: {rows} rows x V={v} fp32 logits -> bf16 dz")
    shipped = triton_launch.GPU_CHUNK_ROWS
    for block_v, warps in p["sweep"]:
        launch = dict(BLOCK_V=block_v, num_warps=warps, num_stages=1)

        def run():
            triton_launch.chunk_rows(ws, dz, ids, None, row_pass, launch=launch)

        if dev.type == "cuda":
            from triton.testing import do_bench  # noqa: PLC0415

            ms = do_bench(run, warmup=10, rep=50, return_mode="median")
        else:
            t0 = time.perf_counter()
            run()
            ms = (time.perf_counter() - t0) * 1e3
        mark = "  <- shipped" if (block_v, warps) == (shipped["BLOCK_V"],
                                                     shipped["num_warps"]) else ""
        lines.append(f"BLOCK_V={block_v:5d} warps={warps:2d}: {ms:.3f} ms, "
                     f"{10 * rows * v / ms / 1e9:.0f} GB/s{mark}")
    assert torch.isfinite(out_rows["loss"]).all()

    lines.append("\n# Triton kernels compiled in this process: registers and spills")
    for compiled in _compiled_kernels(chunk_rows_kernel):
        lines.append(f"chunk_rows_kernel: regs={getattr(compiled, 'n_regs', '?')} "
                     f"spills={getattr(compiled, 'n_spills', '?')} "
                     f"shared={getattr(compiled.metadata, 'shared', '?')}")
    path.write_text("\n".join(lines) + "\n")
    return 0


def _compiled_kernels(kernel):
    """CompiledKernel objects of a JITFunction (the cache layout differs across Triton)."""
    caches = getattr(kernel, "device_caches", None) or {}
    for entry in caches.values():
        table = entry[0] if isinstance(entry, tuple) else entry
        if isinstance(table, dict):
            yield from table.values()
    for table in (getattr(kernel, "cache", None) or {}).values():
        if isinstance(table, dict):
            yield from table.values()


# ---- summary ---------------------------------------------------------------------------------
def headline(out: Path, tokens=PLANS["gpu"]["tokens"], prediction=None) -> dict:
    """The targets of the chunked mode read off the bench results (None where not measured);
    ``prediction``: the cost model's figures per N, put beside the measurement."""
    path = out / "results.json"
    if not path.exists():
        return {}
    records = json.loads(path.read_text())["records"]
    found = {}
    for n in tokens:
        row = {r["impl"]: r for r in records if r["N"] == n and r.get("status") == "ok"}
        ours = row.get("nft_kernels chunked")
        if not ours:
            continue
        entry = dict(ms=ours["time_ms"], fraction_of_gemm_6nhv=ours.get("fraction_of_gemm_6nhv"),
                     peak_extra_mib=ours["peak_extra_mib"],
                     memory_bound_mib=ours.get("memory_bound_mib"),
                     within_memory_bound=ours.get("within_memory_bound"),
                     rel_err_dw=ours.get("rel_err_dw"))
        if prediction and f"N={n}" in prediction:
            entry["predicted"] = prediction[f"N={n}"]
        for peer in PEER_NAMES + ("nft_kernels lean",):
            if peer in row:
                entry[f"speedup_vs {peer}"] = row[peer]["time_ms"] / ours["time_ms"]
                entry[f"peak_mib {peer}"] = row[peer]["peak_extra_mib"]
        # The vocab-parallel code path at tp=1 (a process group of one) over the plain call.
        for mode in ("chunked", "lean"):
            plain, sharded = row.get(f"nft_kernels {mode}"), row.get(f"nft_kernels {mode} tp=1")
            if plain and sharded:
                entry[f"tp=1 time ratio {mode}"] = sharded["time_ms"] / plain["time_ms"]
        found[f"N={n}"] = entry
    big = found.get(f"N={tokens[-1]}", {})
    targets = {
        ">= 80% of the GEMM ceiling (6NHV)": _at_least(big.get("fraction_of_gemm_6nhv"), 0.8),
        ">= 2x Liger GRPO": _at_least(big.get("speedup_vs Liger GRPO (DAPO loss)"), 2.0),
        ">= 1.5x CCE + NFT": _at_least(big.get("speedup_vs CCE + NFT"), 1.5),
        "peak memory within the formula": big.get("within_memory_bound"),
        "vocab-parallel path at tp=1 within 5% of the plain call (chunked)":
            _at_most(big.get("tp=1 time ratio chunked"), 1.05),
    }
    return dict(figures=found, targets=targets)


def _at_least(value, bound):
    return None if value is None else value >= bound


def _at_most(value, bound):
    return None if value is None else value <= bound


def write_summary(out: Path, steps, meta, figures):
    (out / "summary.json").write_text(json.dumps(dict(meta=meta, steps=steps, **figures),
                                                 indent=1))
    lines = [f"# GPU acceptance run: {meta['device']} | {meta['date']} | torch {meta['torch']} "
             f"| triton {meta['triton']}", "", "| step | status | seconds | note |",
             "|---|---|---|---|"]
    for s in steps:
        note = s.get("summary") or (s["tail"].strip().splitlines()[-1] if s["tail"].strip()
                                    else "")
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {note[:200]} |")
    smoke_result = next((s.get("result") for s in steps if s["step"] == "smoke"), None)
    if smoke_result:
        lines += ["", "## Smoke (one chunked call, float64 on a slice)", "", "```",
                  json.dumps(smoke_result, indent=1), "```"]
    if figures:
        lines += ["", "## Targets (chunked mode, the largest N)", "", "| target | met |",
                  "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in figures["targets"].items()]
        lines += ["", "## Figures (prediction: bench/cost_model.py)", "", "```",
                  json.dumps(figures["figures"], indent=1), "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _tests_summary(record):
    last = [line for line in record["tail"].splitlines() if " passed" in line or
            " failed" in line or " error" in line]
    return last[-1] if last else None


def _prediction(plan):
    try:
        from bench.cost_model import predict  # noqa: PLC0415
    except ImportError:
        return None
    _, h, v = plan["head"]
    return {f"N={n}": predict(n, h, v) for n in plan["tokens"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="output folder (7 files)")
    parser.add_argument("--rehearsal", action="store_true",
                        help="every step on the CPU at tiny shapes (Triton interpreter)")
    parser.add_argument("--steps", nargs="*", default=["smoke", "bench", "tests", "profile"],
                        help="subset of: smoke bench tests profile")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--profile-into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan_name = "rehearsal" if args.rehearsal else "gpu"
    if args.smoke or args.profile_into:
        return smoke(plan_name) if args.smoke else profile_into(args.profile_into, plan_name)
    import torch
    import triton

    if not args.rehearsal and not torch.cuda.is_available():
        print("gpu_acceptance.py needs a CUDA GPU (--rehearsal runs its steps on the CPU)",
              file=sys.stderr)
        return 2
    plan = PLANS[plan_name]
    device = torch.cuda.get_device_name() if not args.rehearsal else "cpu (rehearsal)"
    out = args.out or ROOT / "bench" / "results" / (
        device.replace(" ", "_") + "-" + dt.date.today().isoformat())
    out.mkdir(parents=True, exist_ok=True)
    prediction = _prediction(plan)
    meta = dict(device=device, date=dt.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(), plan=plan_name,
                command="python bench/gpu_acceptance.py " + " ".join(argv or sys.argv[1:]))
    env = _env(args.rehearsal)
    env["NFT_PROPERTY_EXAMPLES"] = str(plan["examples"])
    commands = step_commands(plan_name, out)
    steps = []
    t0 = time.perf_counter()
    for name in ("smoke", "bench", "tests", "profile"):
        if name not in args.steps:
            continue
        record = run_step(name, commands[name], plan["limits"][name], out / "log.txt", env,
                          plan["grace"])
        if name == "tests":
            record["summary"] = _tests_summary(record)
        steps.append(record)
        meta["total_seconds"] = round(time.perf_counter() - t0, 1)
        write_summary(out, steps, meta, headline(out, plan["tokens"], prediction))
    print((out / "summary.md").read_text())
    return 0 if all(s["status"] == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
