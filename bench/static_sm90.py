"""Static Hopper check: every GPU kernel variant compiled for sm_90, on a machine without a GPU.

    python bench/static_sm90.py --out DIR    # static_sm90.json and static_sm90.md in DIR

Triton's own compiler turns each kernel variant (every dtype, loss head and option the
launcher can pass, at the shipped tile configurations of ``nft_kernels/triton_launch.py``) into
PTX for sm_90; Triton's bundled ``ptxas-blackwell -v -arch=sm_90a`` reads back its registers,
local-memory spill bytes and stack frame (the older bundled ``ptxas`` rejects Triton 3.9's PTX).
Kernels are specialised as the runtime specialises them on real LM heads: unit inner strides
become constants and pointers, sizes and row strides are known multiples of 16 (odd test
shapes get other, unchecked specialisations).

The gate (exit status 1 when it fails; ``tests/test_static_sm90.py`` runs it in CI):
- every variant compiles, within the H100's 227 KiB of shared memory;
- 16-bit variants spill nothing, and the tile kernels' 16-bit variants use wgmma;
- fp32 variants are reported, not gated (IEEE fp32 products run on the FMA units).
It catches what the interpreter accepts but the GPU compiler rejects (non-constexpr globals,
tile shapes tl.dot refuses, loop-carried type changes) and register blow-ups.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and not __package__:
    # `python bench/static_sm90.py`: the repository root on the path, as `python -m bench.static_sm90`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

H100_SHARED_BYTES = 227 * 1024
DTYPES = ("bf16", "fp16", "fp32")
INT_ARGS = {"n_rows", "V", "H", "n", "stride_hn", "stride_hh", "stride_wv", "stride_wh",
            "stride_logits", "stride_dz"}
UNIT_STRIDES = ("stride_hh", "stride_wh")          # contiguous rows: specialised to 1
ALIGNED_INTS = ("V", "H", "stride_hn", "stride_wv", "stride_logits", "stride_dz")


def _kernels():
    from nft_kernels.ops.backward_atomic import fused_linear_backward_atomic_kernel
    from nft_kernels.ops.backward_dh import fused_linear_backward_dh_kernel
    from nft_kernels.ops.backward_dw import fused_linear_backward_dw_kernel
    from nft_kernels.ops.chunk_rows import chunk_rows_kernel
    from nft_kernels.ops.forward import fused_linear_forward_kernel
    from nft_kernels.ops.loss_head import loss_head_kernel

    return {k.fn.__name__: k for k in (
        fused_linear_forward_kernel, fused_linear_backward_atomic_kernel,
        fused_linear_backward_dh_kernel, fused_linear_backward_dw_kernel, chunk_rows_kernel,
        loss_head_kernel)}


def signature(kernel, consts, dtype):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("hidden_ptr", "weight_ptr", "bias_ptr", "dz_ptr"):
            sig[name] = f"*{dtype}"
        elif name in ("target_ptr", "rows_ptr"):
            sig[name] = "*i64"
        elif name == "mask_ptr":
            sig[name] = "*i1"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in INT_ARGS:
            sig[name] = "i32"
        else:
            sig[name] = "fp32"
    return sig


# The heads' optional per-token terms, off unless a variant turns them on (constexprs: code
# that is off is not compiled at all).
HEAD_TERMS_OFF = dict(HAS_TOKEN_WEIGHTS=False, KL=0, KL_RATIO=False, ENT_BONUS=False,
                      SOFTCAP=False, PER_TOKEN_T=False)
SOFTCAP_ON = dict(SOFTCAP=True, PER_TOKEN_T=True)  # soft-capping with per-token temperatures
WITH_KL = dict(HAS_TOKEN_WEIGHTS=True, KL=3, KL_RATIO=True)


def variants():
    """(kernel name, dtype, launch options, constexprs) for every variant the launcher uses."""
    from nft_kernels.triton_launch import GPU_CHUNK_ROWS, GROUP, GPU_TILES

    for dtype in DTYPES:
        width = 32 if dtype == "fp32" else 16
        precision = dict(DOT_FP32=dtype == "fp32", IEEE=dtype == "fp32")
        for kind, names in (("forward", ["fused_linear_forward_kernel"]),
                            ("backward", ["fused_linear_backward_atomic_kernel",
                                          "fused_linear_backward_dh_kernel",
                                          "fused_linear_backward_dw_kernel"])):
            table = GPU_TILES[(kind, width)]
            blocks = {k: v for k, v in table.items() if k.startswith("BLOCK")}
            options = dict(num_warps=table["num_warps"], num_stages=table["num_stages"])
            for name in names:
                if kind == "forward":
                    for head, entropy, extras in ((0, True, {}), (1, False, {}), (1, True, {}),
                                                  (2, False, {}), (2, False, WITH_KL),
                                                  (1, True, SOFTCAP_ON)):
                        yield name, dtype, options, dict(
                            HAS_BIAS=True, COMPUTE_ENTROPY=entropy, HEAD=head, NORMALIZE=2,
                            **extras, **blocks, **precision)
                    continue
                for entropy, filtering, extras in ((False, False, {}), (True, True, {}),
                                                   (True, False, SOFTCAP_ON)):
                    consts = dict(HAS_BIAS=True, HAS_ENT_GRAD=entropy, FILTER=filtering,
                                  **extras, **blocks, **precision)
                    if name.endswith("atomic_kernel"):
                        consts["GROUP"] = GROUP
                    yield name, dtype, options, consts
        rows = {k: v for k, v in GPU_CHUNK_ROWS.items() if k.startswith("BLOCK")}
        options = dict(num_warps=GPU_CHUNK_ROWS["num_warps"],
                       num_stages=GPU_CHUNK_ROWS["num_stages"])
        for stats, write_dz, head, entropy, ent_grad, extras in (
                (True, True, 1, False, False, {}),       # scalar NFT loss: grads in the forward
                (True, True, 1, False, False, WITH_KL),  # ... with token weights and k3 KL
                (True, True, 2, True, True, dict(ENT_BONUS=True)),  # ... entropy bonus
                (True, True, 1, True, False, SOFTCAP_ON),  # ... logit soft-capping
                (False, True, 0, False, True, SOFTCAP_ON),  # recompute with soft-capping
                (True, True, 2, True, False, {}),        # scalar PPO loss with return_stats
                (True, False, 0, True, False, {}),       # per-token forward (log-probs, entropy)
                (False, True, 0, False, False, {}),      # backward recompute
                (False, True, 0, False, True, {})):      # backward recompute, entropy gradient
            yield "chunk_rows_kernel", dtype, options, dict(
                HAS_BIAS=True, HAS_MASK=True, STATS=stats, WRITE_DZ=write_dz, HEAD=head,
                NORMALIZE=1, COMPUTE_ENTROPY=entropy, HAS_ENT_GRAD=ent_grad, **extras, **rows)
    for head, extras in ((1, {}), (2, {}), (1, WITH_KL)):
        yield ("loss_head_kernel", "fp32", dict(num_warps=4, num_stages=1),
               dict(HEAD=head, NORMALIZE=1, HAS_MASK=True, **extras, BLOCK=1024))


def ptxas_path():
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas-blackwell"


def compile_one(job):
    """Compile one variant; returns its record (never raises)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, dtype, options, consts = job
    kernel = _kernels()[name]
    consts = dict(consts)
    for arg, off in HEAD_TERMS_OFF.items():
        if arg in kernel.arg_names:
            consts.setdefault(arg, off)
    for arg in UNIT_STRIDES:
        if arg in kernel.arg_names:
            consts[arg] = 1
    sig = signature(kernel, consts, dtype)
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(kernel.arg_names)
             if arg not in consts and ((arg.endswith("_ptr") and arg != "mask_ptr")
                                       or arg in ALIGNED_INTS)}
    shown = {k: v for k, v in consts.items()  # head terms shown only where on
             if k not in UNIT_STRIDES and not (k in HEAD_TERMS_OFF and not v)}
    record = dict(kernel=name, dtype=dtype, options=options, consts=shown)
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts,
                                            attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as exc:  # report every failing variant, not just the first
        return {**record, "compiled": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    ptx = compiled.asm["ptx"]
    record.update(compiled=True, shared_bytes=compiled.metadata.shared, wgmma="wgmma" in ptx,
                  uses_dot=name.startswith("fused_linear_"))  # the tile kernels (tl.dot)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        done = subprocess.run([str(ptxas_path()), "-v", "-arch=sm_90a", f.name, "-o",
                               os.devnull], capture_output=True, text=True, timeout=600)
    finally:
        os.unlink(f.name)
    info = done.stderr + done.stdout
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", info)
    stack = re.search(r"(\d+) bytes stack frame", info)
    if done.returncode != 0 or not regs or not spill:
        return {**record, "ptxas_ok": False, "error": info[-1500:]}
    record.update(ptxas_ok=True, registers=int(regs.group(1)),
                  spill_store_bytes=int(spill.group(1)), spill_load_bytes=int(spill.group(2)),
                  stack_bytes=int(stack.group(1)) if stack else 0)
    return record


def judge(record):
    """(ok, why) of the gate for one record."""
    if not record.get("compiled"):
        return False, "does not compile: " + record.get("error", "")
    if record["shared_bytes"] > H100_SHARED_BYTES:
        return False, f"shared memory {record['shared_bytes']} B > {H100_SHARED_BYTES} B"
    if not record.get("ptxas_ok"):
        return False, "ptxas failed: " + record.get("error", "")
    if record["dtype"] == "fp32":
        return True, "reported (fp32 is not gated)"
    if record["spill_store_bytes"] or record["spill_load_bytes"]:
        return False, (f"spills {record['spill_store_bytes']} B stores / "
                       f"{record['spill_load_bytes']} B loads")
    if record["uses_dot"] and not record["wgmma"]:
        return False, "16-bit tile kernel without wgmma"
    return True, "no spills" + (", wgmma" if record["uses_dot"] else "")


def write_markdown(records, path, meta):
    lines = [f"Static sm_90 check | {meta['date']} | triton {meta['triton']} | "
             f"{meta['ptxas']}", "",
             "| kernel | dtype | variant | warps/stages | regs | spill st/ld B | stack B | "
             "shared KiB | wgmma | gate |", "|" + "---|" * 10]
    for r in records:
        variant = ", ".join(f"{k}={v}" for k, v in r["consts"].items()
                            if not k.startswith("BLOCK") and k not in ("DOT_FP32", "IEEE",
                                                                       "GROUP"))
        blocks = "x".join(str(v) for k, v in r["consts"].items() if k.startswith("BLOCK"))
        lines.append("| " + " | ".join(str(c) for c in (
            r["kernel"].replace("_kernel", ""), r["dtype"], f"{blocks} {variant}",
            f"{r['options']['num_warps']}/{r['options']['num_stages']}",
            r.get("registers", ""),
            f"{r.get('spill_store_bytes', '')}/{r.get('spill_load_bytes', '')}",
            r.get("stack_bytes", ""),
            f"{r['shared_bytes'] / 1024:.0f}" if "shared_bytes" in r else "",
            "yes" if r.get("wgmma") else "no",
            ("ok: " if r["gate_ok"] else "FAIL: ") + r["gate"])) + " |")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for static_sm90.json / .md")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton

    if not ptxas_path().exists():
        print(f"no {ptxas_path()}: Triton's NVIDIA backend is not installed", file=sys.stderr)
        return 2
    version = subprocess.run([str(ptxas_path()), "--version"], capture_output=True,
                             text=True).stdout.strip().splitlines()[-1]
    jobs = list(variants())
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        records = list(pool.map(compile_one, jobs))
    failures = 0
    for r in records:
        ok, why = judge(r)
        r.update(gate_ok=ok, gate=why)
        failures += not ok
        print(json.dumps(r), flush=True)
    meta = dict(date=dt.date.today().isoformat(), triton=triton.__version__, ptxas=version,
                target="sm_90a (H100/H200)", variants=len(records), failures=failures)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "static_sm90.json").write_text(json.dumps(dict(meta=meta, records=records),
                                                              indent=1))
        write_markdown(records, args.out / "static_sm90.md", meta)
    print(f"{len(records)} variants, {failures} failing the gate", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
