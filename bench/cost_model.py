"""Cost model of the chunked mode: bytes and FLOPs per step for any LM head, and the time a GPU
should take (a roofline per step: max(FLOPs / GEMM rate, bytes / memory bandwidth)).

    python bench/cost_model.py                          # the Qwen2.5-7B head on an H200
    python bench/cost_model.py --head 1536 151936 --tokens 8192 --tflops 700 --gbps 4000

The acceptance run (bench/gpu_acceptance.py) puts ``predict`` beside the measurement. Per
chunk of C counted rows (C from the workspace budget, ``nft_kernels.chunked.rows_per_chunk``):
  logits GEMM 2CHV FLOPs (bf16 in, fp32 out: 4CV bytes written), the row kernel (reads the fp32
  logits, writes bf16 dz over them: 10 bytes per logit with its two passes), dH = dz W and
  dW += dz^T h (2CHV FLOPs each; dW's fp32 accumulator read and written: 8VH bytes per chunk),
  then once per call the fp32 dW cast to the weight's dtype (6VH bytes).
Figures are estimates for planning, not measurements; the sizes are what the code does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nft_kernels.chunked import rows_per_chunk  # noqa: E402

# H200 SXM: cuBLAS bf16 GEMMs reach ~700-800 TF/s at these shapes (shared/design/kernel.md);
# HBM3e 4.8 TB/s, ~4 TB/s achievable for a streaming kernel.
H200 = dict(tflops=700.0, gbps=4000.0)


def predict(n, h, v, *, counted=None, workspace_bytes=1 << 30, elem=2, tflops=H200["tflops"],
            gbps=H200["gbps"]) -> dict:
    """Seconds and bytes per step of one chunked forward+backward (gradients in the forward)."""
    counted = int(0.9 * n) if counted is None else counted  # the bench pads 10% of each answer
    c = rows_per_chunk(workspace_bytes, v, counted)
    chunks = -(-counted // c)
    gemm_flops = 2 * counted * h * v
    steps = {
        "logits GEMM": (gemm_flops, 4 * counted * v + elem * (counted * h + chunks * v * h)),
        "row kernel": (12 * counted * v, 10 * counted * v),
        "dH GEMM": (gemm_flops, elem * (counted * v + chunks * v * h) + elem * counted * h),
        "dW GEMM": (gemm_flops, elem * (counted * v + counted * h) + 8 * v * h * chunks),
        "dW cast": (0, 6 * v * h),
    }
    out = {"rows_per_chunk": c, "chunks": chunks, "tail_rows": counted - (chunks - 1) * c}
    total = 0.0
    for name, (flops, nbytes) in steps.items():
        seconds = max(flops / (tflops * 1e12), nbytes / (gbps * 1e9))
        out[f"{name} ms"] = round(seconds * 1e3, 3)
        total += seconds
    out["total ms"] = round(total * 1e3, 2)
    out["6NHV / GEMM ceiling"] = round(3 * gemm_flops / (tflops * 1e12) / total, 3)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", nargs=2, type=int, default=(3584, 152064), metavar=("H", "V"))
    parser.add_argument("--tokens", type=int, nargs="*", default=(4096, 16384))
    parser.add_argument("--tflops", type=float, default=H200["tflops"])
    parser.add_argument("--gbps", type=float, default=H200["gbps"])
    parser.add_argument("--workspace-bytes", type=int, default=1 << 30)
    args = parser.parse_args(argv)
    h, v = args.head
    result = {f"N={n}": predict(n, h, v, tflops=args.tflops, gbps=args.gbps,
                                workspace_bytes=args.workspace_bytes) for n in args.tokens}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
