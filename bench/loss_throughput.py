"""Speed, memory and accuracy of the fused NFT loss next to its peers, in one run.

    python bench/loss_throughput.py            # the plan for this machine: the four real LM
                                               # heads on a GPU, a CPU-sized head on a CPU
    python bench/loss_throughput.py --quick    # small shapes, under two minutes on a CPU
    python bench/loss_throughput.py --out DIR  # results.json, results.md and PNG plots in DIR

Each record is printed and appended to results.json / results.md as soon as it is measured,
with a progress line (what runs, how many are left, an estimate of the time left). Inputs are
generated once per shape and shared by the implementations; a peer that would not fit in
memory (the naive ones hold [N, V] logits) is skipped with the reason before it is tried;
``--deadline`` stops starting new measurements after that many seconds.

Every implementation gets identical inputs (NFT with binary rewards, prompts of 8 answers,
10% padding). Per implementation and shape it records the median forward+backward time
(CUDA events on a GPU; several repeats after warm-up, two input sets alternated), tokens/s,
peak memory over the inputs, TFLOP/s counting the 6NHV useful FLOPs and as a fraction of a
plain GEMM of the same size timed in the same run, and the relative error of loss, dH and dW
against the float64 reference on a slice of the rows. A peer that is missing or cannot run is
reported as skipped with the reason; one that runs out of memory as OOM.

Peak memory comes from torch.cuda statistics on a GPU and from the process's resettable
resident high-water mark (Linux VmHWM) on CPU, where it also counts allocator slack.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if __name__ == "__main__" and not __package__:
    # `python bench/loss_throughput.py`: the repository root on the path, as `python -m bench.loss_throughput`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import implementations  # noqa: E402
from bench.implementations import IMPLEMENTATIONS  # noqa: E402

from nft_kernels import extra_memory_bytes, fused_linear_logprobs, losses  # noqa: E402
from nft_kernels.backend import resolve_impl  # noqa: E402
from nft_kernels.reference import (  # noqa: E402
    reference_nft_loss,
    reference_policy_loss,
    reference_ppo_loss,
    reference_with_grads,
)

HEADS = {  # name: (H, V)
    "Qwen2.5-Math-1.5B": (1536, 151936),
    "Qwen2.5-7B": (3584, 152064),
    "Qwen2.5-32B": (5120, 152064),
    "Llama-3-8B": (4096, 128256),
}
FULL_TOKENS = (4096, 16384, 65536)
QUICK_HEADS = {"tiny-head": (128, 16384)}
QUICK_TOKENS = (1024, 2048)
ANSWERS_PER_PROMPT = 8
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(n, h, v, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    # The large tensors are drawn where they live: a [V, H] weight at a real head is 545M
    # values, seconds of CPU time per draw.
    big = torch.Generator(device=device).manual_seed(seed) if device.type == "cuda" else gen
    seq_len = min(max(n // 32, 16), 1024, n)  # >= 4 prompts of 8 answers where n allows
    batch = max(n // seq_len, 1)
    n = batch * seq_len
    hidden = torch.randn(n, h, generator=big, device=big.device).to(device, dtype)
    weight = (torch.randn(v, h, generator=big, device=big.device)
              * (2.0 / h**0.5)).to(device, dtype)
    target = torch.randint(0, v, (n,), generator=big, device=big.device).to(device)
    seq_reward = (torch.rand(batch, generator=gen) < 0.5).float()
    groups = seq_reward.view(-1, min(ANSWERS_PER_PROMPT, batch))
    seq_rate = groups.mean(1, keepdim=True).expand_as(groups).reshape(-1)
    mask = torch.ones(batch, seq_len, dtype=torch.bool)
    mask[:, int(seq_len * 0.9):] = False  # padding
    with torch.no_grad():
        logp = fused_linear_logprobs(hidden, weight, target, validate=False)
    old = logp + 0.1 * torch.randn(n, generator=gen).to(device)
    per_token = lambda x: x.repeat_interleave(seq_len).to(device)  # noqa: E731
    return dict(hidden=hidden, weight=weight, target=target, old=old,
                rewards=per_token(seq_reward), rate=per_token(seq_rate),
                mask=mask.reshape(-1).to(device), advantages=per_token(seq_reward - seq_rate),
                seq_advantages=(seq_reward - seq_rate).to(device),
                batch_shape=(batch, seq_len))


def slice_inputs(inputs, rows):
    seq_len = inputs["batch_shape"][1]
    rows = max(seq_len, rows - rows % seq_len) if rows >= seq_len else rows
    sliced = {k: v[:rows] if isinstance(v, torch.Tensor) and v.shape[0] == inputs["target"].shape[0]
              else v for k, v in inputs.items()}
    if rows < seq_len:
        sliced["batch_shape"] = (1, rows)
        sliced["seq_advantages"] = inputs["seq_advantages"][:1]
    else:
        sliced["batch_shape"] = (rows // seq_len, seq_len)
        sliced["seq_advantages"] = inputs["seq_advantages"][:rows // seq_len]
    return sliced


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double().to(actual.device)
    return ((actual - expected).norm() / expected.norm().clamp(min=1e-30)).item()


def reference_on_slice(inputs, loss_kind):
    common = (inputs["hidden"], inputs["weight"], inputs["target"], inputs["old"])
    if loss_kind == "nft":
        return reference_with_grads(reference_nft_loss, *common, inputs["rewards"],
                                    inputs["rate"], inputs["mask"])
    if loss_kind == "cispo":  # the bench's user-defined head
        per_token = {"old_logprobs": inputs["old"], "advantages": inputs["advantages"]}
        return reference_with_grads(
            lambda h, w, target, old, mask, bias=None: reference_policy_loss(
                h, w, target, losses.cispo(implementations.CISPO_CLIP), per_token, mask,
                bias=bias, reduction="mean"), *common, inputs["mask"])
    return reference_with_grads(reference_ppo_loss, *common, inputs["advantages"],
                                inputs["mask"], clip_low=0.2, clip_high=0.28, reduction="mean")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, device):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def gemm_ms(n, h, v, dtype, device, repeats):
    a = torch.randn(n, h, device=device, dtype=dtype)
    b = torch.randn(v, h, device=device, dtype=dtype)
    fn = lambda: a @ b.T  # noqa: E731
    fn()
    _sync(device)
    return statistics.median(_time_ms(fn, device) for _ in range(repeats))


class CpuPeakMemory:
    """Peak resident memory of this process on Linux, resettable: freed heap goes back to the
    OS (malloc_trim), then writing 5 to /proc/self/clear_refs resets the VmHWM high-water mark."""

    def __init__(self):
        import ctypes
        import gc

        self._gc = gc
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None

    @staticmethod
    def _status_kib(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise OSError(f"{field} not in /proc/self/status")

    def reset(self):
        self._gc.collect()
        if self._trim is not None:
            self._trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self._base = self._status_kib("VmRSS")

    def peak_extra_mib(self):
        return (self._status_kib("VmHWM") - self._base) / 1024.0


# Implementations that hold [N, V] fp32 logits (and their gradient): how many such buffers.
LOGITS_COPIES = {"torch naive": 3, "torch.compile naive": 2}


def free_memory_bytes(device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def make_input_sets(n, h, v, dtype, device):
    """The two input sets every implementation of one shape is timed on (alternated)."""
    return [make_inputs(n, h, v, dtype, device, seed) for seed in (0, 1)]


def measure(job, input_sets=None):
    """One implementation on one shape: the record for results.json. ``input_sets``: from
    ``make_input_sets`` (shared by the implementations of a shape), or made here."""
    impl = next(i for i in IMPLEMENTATIONS if i.name == job["impl"])
    device = torch.device(job["device"])
    n, h, v, dtype = job["N"], job["H"], job["V"], DTYPES[job["dtype"]]
    record = dict(impl=impl.name, shape=job["shape"], N=n, H=h, V=v, dtype=job["dtype"],
                  device=job["device_name"])
    reason = impl.available(device)
    if reason:
        return {**record, "status": "skipped", "reason": reason}
    if impl.compiles and (job.get("quick") or job.get("skip_compile")):
        return {**record, "status": "skipped",
                "reason": "left out by --quick / --skip-compile (its compile time alone is "
                          "minutes)"}
    copies = LOGITS_COPIES.get(impl.name)
    free = free_memory_bytes(device) if copies else None
    if copies and free is not None and copies * 4 * n * v > 0.9 * free:
        return {**record, "status": "skipped",
                "reason": f"would not fit: {copies} x [N, V] fp32 logits = "
                          f"{copies * 4 * n * v / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"}
    if impl.name.startswith("nft_kernels"):
        record.update(backend=resolve_impl("auto", device), mode=impl.mode)
    try:
        if input_sets is None:
            input_sets = make_input_sets(n, h, v, dtype, device)
        runs = [impl.build(inputs) for inputs in input_sets]
        elem = torch.tensor([], dtype=dtype).element_size()
        record["gradient_buffers_mib"] = (n * h + v * h) * elem / 2**20
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            runs[0]()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            try:
                meter = CpuPeakMemory()
                meter.reset()
            except OSError:  # no resettable high-water mark (not Linux): memory not measured
                meter = None
            runs[0]()
            peak = meter.peak_extra_mib() if meter else None
        record["peak_extra_mib"] = peak
        record["peak_over_gradient_buffers"] = (None if peak is None else
                                                peak / record["gradient_buffers_mib"])
        if impl.mode is not None:
            # The documented bound (nft_kernels.extra_memory_bytes) for this call.
            counted = int(input_sets[0]["mask"].sum())
            bound = extra_memory_bytes(n, h, v, dtype, impl.mode, device=device,
                                       counted_tokens=counted) / 2**20
            record["memory_formula"] = "nft_kernels.extra_memory_bytes"
            record["memory_bound_mib"] = bound
            record["within_memory_bound"] = None if peak is None else peak <= bound * 1.02 + 1
        for k in range(job["warmup"]):
            runs[k % 2]()
        times = [_time_ms(runs[k % 2], device) for k in range(job["repeats"])]
        del runs
        ms = statistics.median(times)
        # Useful FLOPs are those of the counted rows: padded ones are dropped before any GEMM
        # (crediting all N would inflate the figures by N / counted, ~1.11 at 10% padding).
        counted = int(input_sets[0]["mask"].sum())
        record.update(status="ok", time_ms=ms, times_ms=times, tokens_per_s=n / ms * 1e3,
                      counted_tokens=counted, tflops_6nhv=6 * counted * h * v / ms / 1e9)
        gemm = job.get("gemm_ms")
        if gemm:
            gemm_tflops = 2 * n * h * v / gemm / 1e9
            record.update(gemm_ms=gemm, gemm_tflops=gemm_tflops,
                          fraction_of_gemm_6nhv=record["tflops_6nhv"] / gemm_tflops,
                          fraction_of_gemm_8nhv=8 * counted * h * v / ms / 1e9 / gemm_tflops)
        sliced = slice_inputs(input_sets[0], job["slice_rows"])
        loss, dh, dw = impl.build(sliced)()
        ref_loss, ref_dh, ref_dw, _ = reference_on_slice(sliced, impl.loss)
        record.update(slice_rows=sliced["target"].shape[0],
                      rel_err_loss=abs(loss.item() - ref_loss.item()) / max(abs(ref_loss.item()),
                                                                            1e-30),
                      rel_err_dh=relative_error(dh, ref_dh), rel_err_dw=relative_error(dw, ref_dw))
    except torch.cuda.OutOfMemoryError as exc:
        return {**record, "status": "OOM", "reason": str(exc).splitlines()[0]}
    except Exception as exc:  # a peer that breaks is reported, not fatal
        return {**record, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


def measure_isolated(job):
    """``measure(job)`` in a child process of this script."""
    import subprocess  # noqa: PLC0415

    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--job",
                           json.dumps(job)], capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RECORD "):
            return json.loads(line[len("RECORD "):])
    keep = ("impl", "shape", "N", "H", "V", "dtype")
    return {**{k: job[k] for k in keep}, "device": job["device_name"], "status": "error",
            "reason": f"child process failed (exit {done.returncode}): {done.stderr[-300:]}"}


def versions():
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "liger-kernel", "cut-cross-entropy", "numpy", "nft-kernels"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{os.cpu_count()}cores"


def write_markdown(records, path, meta):
    # "6NHV / GEMM": the useful FLOPs per second (counted rows) over a plain GEMM's in the same
    # run, the fraction of the ceiling reached; meaningful on a GPU (on a CPU the BLAS GEMM is
    # not a ceiling for the other work, so the column is left empty there).
    gpu = not str(meta["device"]).startswith("cpu")
    cols = ["shape", "N", "dtype", "impl", "status", "ms", "tokens/s", "peak MiB",
            "x grad bufs", "TFLOP/s (6NHV)", "6NHV / GEMM %", "err loss", "err dH", "err dW"]
    lines = [f"Device: {meta['device']} | {meta['date']} | torch {meta['versions']['torch']} | "
             f"triton {meta['versions']['triton']}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def f(x, spec):
        return "" if x is None else format(x, spec)

    for r in records:
        if r.get("status") != "ok":
            row = [r["shape"], r["N"], r["dtype"], r["impl"], r.get("status"),
                   r.get("reason", "")] + [""] * 8
        else:
            row = [r["shape"], r["N"], r["dtype"], r["impl"], "ok", f(r["time_ms"], ".1f"),
                   f(r["tokens_per_s"], ".3g"), f(r["peak_extra_mib"], ".0f"),
                   f(r["peak_over_gradient_buffers"], ".2f"), f(r["tflops_6nhv"], ".3g"),
                   f(100 * r["fraction_of_gemm_6nhv"], ".0f")
                   if gpu and "fraction_of_gemm_6nhv" in r else "",
                   f(r["rel_err_loss"], ".1e"), f(r["rel_err_dh"], ".1e"),
                   f(r["rel_err_dw"], ".1e")]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plots(records, out):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for shape in sorted({r["shape"] for r in records}):
        ok = [r for r in records if r["shape"] == shape and r.get("status") == "ok"]
        if len({r["N"] for r in ok}) == 1:  # one N: bars, one per implementation
            written.append(_bar_plot(plt, ok, shape, out))
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for impl in dict.fromkeys(r["impl"] for r in records):
            rows = sorted((r for r in records if r["shape"] == shape and r["impl"] == impl
                           and r.get("status") == "ok" and r.get("peak_extra_mib") is not None),
                          key=lambda r: r["N"])
            if rows:
                axes[0].plot([r["N"] for r in rows], [r["time_ms"] for r in rows], "o-",
                             label=impl)
                axes[1].plot([r["N"] for r in rows], [r["peak_extra_mib"] for r in rows], "o-",
                             label=impl)
        for ax, label in zip(axes, ("forward+backward ms", "peak extra MiB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(shape)
        fig.tight_layout()
        path = out / f"{shape.replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path.name)
    return written


def select_impls(selectors):
    """Implementations in the order the selectors give them (an exact name, else every name
    containing the selector); all of them, in table order, without selectors."""
    if not selectors:
        return list(IMPLEMENTATIONS)
    chosen = []
    for s in selectors:
        exact = [i for i in IMPLEMENTATIONS if i.name.lower() == s.lower()]
        for impl in exact or [i for i in IMPLEMENTATIONS if s.lower() in i.name.lower()]:
            if impl not in chosen:
                chosen.append(impl)
    return chosen


def write_results(out, meta, records):
    """results.json and results.md as they stand (rewritten after every record)."""
    (out / "results.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    write_markdown(records, out / "results.md", meta)


def _bar_plot(plt, rows, shape, out):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["impl"] for r in rows]
    for ax, key, label in zip(axes, ("time_ms", "peak_extra_mib"),
                              ("forward+backward ms", "peak extra MiB")):
        ax.barh(names, [r.get(key) or 0 for r in rows])
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{shape}, N={rows[0]['N']}, {rows[0]['dtype']}")
    fig.tight_layout()
    path = out / f"{shape.replace('.', '_')}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized shapes")
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--tokens", type=int, nargs="*", help="override the token counts N")
    parser.add_argument("--heads", nargs="*", help=f"subset of {list(HEADS)}")
    parser.add_argument("--head-size", nargs=2, type=int, metavar=("H", "V"),
                        help="one custom LM head instead (hidden size H, vocabulary V)")
    parser.add_argument("--name", help="the custom head's name in the results")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="input dtype (default: bf16 on "
                        "a GPU, fp32 on CPU)")
    parser.add_argument("--skip-compile", action="store_true",
                        help="leave out the torch.compile peers (minutes of compile time)")
    parser.add_argument("--impls", nargs="*", help="implementations to run, in this order "
                        "(exact names, or substrings)")
    parser.add_argument("--deadline", type=float, help="start no measurement after this many "
                        "seconds (the rest are recorded as skipped)")
    parser.add_argument("--isolate", action="store_true",
                        help="run every measurement in a fresh process (memory high-water "
                             "marks and allocator state not shared between implementations)")
    parser.add_argument("--job", help=argparse.SUPPRESS)  # one measurement, for --isolate
    args = parser.parse_args(argv)
    if args.job:
        job = json.loads(args.job)
        implementations.COMPILE_LIGER = not job.get("skip_compile")
        print("RECORD " + json.dumps(measure(job)), flush=True)
        return 0
    t_start = time.perf_counter()
    implementations.COMPILE_LIGER = not args.skip_compile
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = device_name(device)
    today = dt.date.today().isoformat()
    quick = args.quick
    if device.type == "cpu" and not (quick or args.heads or args.head_size or args.tokens):
        quick = True
        print(f"no GPU: running the CPU-sized plan ({', '.join(QUICK_HEADS)} at N = "
              f"{', '.join(map(str, QUICK_TOKENS))}); --heads / --head-size / --tokens ask for "
              f"more", flush=True)
    heads = QUICK_HEADS if quick else {k: HEADS[k] for k in (args.heads or HEADS)}
    if args.head_size:
        name_of_head = args.name or f"H{args.head_size[0]}-V{args.head_size[1]}"
        heads = {name_of_head: tuple(args.head_size)}
    tokens = tuple(args.tokens or (QUICK_TOKENS if quick else FULL_TOKENS))
    repeats = args.repeats or (3 if quick or device.type == "cpu" else 10)
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    plan = [(shape, h, v, n, dtype) for shape, (h, v) in heads.items() for n in tokens]
    if device.type == "cuda" and not quick and not args.dtype:
        h, v = heads[next(iter(heads))]
        plan.append((next(iter(heads)), h, v, tokens[min(1, len(tokens) - 1)], "fp32"))
    impls = select_impls(args.impls)
    out = args.out or Path(__file__).parent / "results" / f"{name.replace(' ', '_')}-{today}"
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, date=today, machine=platform.machine(), platform=platform.platform(),
                cpu_count=os.cpu_count(), versions=versions(), quick=quick,
                command=" ".join([Path(sys.argv[0]).name] + (argv or sys.argv[1:])))

    records = []
    total, done, measured_s = len(plan) * len(impls), 0, 0.0
    for shape, h, v, n, dtype in plan:
        gemm = gemm_ms(n, h, v, DTYPES[dtype], device, repeats)
        shared = None  # the shape's inputs, made once for all its implementations
        for impl in impls:
            job = dict(impl=impl.name, shape=shape, H=h, V=v, N=n, dtype=dtype,
                       device=device.type, device_name=name, repeats=repeats,
                       warmup=1 if device.type == "cpu" else 3, gemm_ms=gemm,
                       slice_rows=64 if device.type == "cpu" else 512, quick=quick,
                       skip_compile=args.skip_compile)
            elapsed = time.perf_counter() - t_start
            eta = (f", about {measured_s / done * (total - done):.0f} s left" if done else "")
            print(f"[{done + 1}/{total}] {impl.name} | {shape} N={n} {dtype}{eta}", flush=True)
            t0 = time.perf_counter()
            if args.deadline is not None and elapsed > args.deadline:
                record = dict(impl=impl.name, shape=shape, N=n, H=h, V=v, dtype=dtype,
                              device=name, status="skipped",
                              reason=f"out of time (--deadline {args.deadline:g} s)")
            elif args.isolate:
                record = measure_isolated(job)
            else:
                if shared is None and not impl.available(device):
                    shared = make_input_sets(n, h, v, DTYPES[dtype], device)
                record = measure(job, shared)
            measured_s += time.perf_counter() - t0
            done += 1
            records.append(record)
            write_results(out, meta, records)
            summary = (f"{record['time_ms']:.1f} ms, {record['peak_extra_mib'] or 0:.0f} MiB"
                       if record.get("status") == "ok" else
                       f"{record.get('status')}: {record.get('reason', '')}")
            print(f"    {impl.name}: {summary}", flush=True)
        del shared
        if device.type == "cuda":
            torch.cuda.empty_cache()

    plots = write_plots(records, out)
    print(f"wrote {out / 'results.json'}, results.md and {len(plots)} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
