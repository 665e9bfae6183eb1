"""Cost model of the chunked mode: the time each step of one call should take on a GPU, for
any LM head (GEMMs at the GEMM rate, derated by their last wave; memory-bound steps at the
memory bandwidth).

    python bench/cost_model.py                          # the Qwen2.5-7B head on an H200
    python bench/cost_model.py --head 1536 151936 --tokens 8192 --tflops 700 --gbps 4000

The acceptance run (bench/gpu_acceptance.py) puts ``predict`` beside the measurement. Per
chunk of C counted rows (C from the workspace budget, ``nft_kernels.chunked.rows_per_chunk``):
  logits GEMM 2CHV FLOPs (bf16 in, fp32 out), the row kernel (reads the fp32 logits, writes
  bf16 dz over them: 10 bytes per logit with its two passes), dH = dz W and dW += dz^T h
  (2CHV FLOPs each; the fp32 dW's read-modify-write is taken as hidden under the GEMM), then
  once per call the fp32 dW cast to the weight's dtype (6VH bytes).
Figures are estimates for planning, not measurements; the sizes are what the code does.

Changes to the chunked mode made from this model, with the saving it predicts at the
Qwen2.5-7B head, N = 16384, bf16, on an H200 (700 TF/s, 4 TB/s; ``python bench/cost_model.py
--compare``), to be checked by the acceptance run:
- the CUDA workspace default scales with the GPU's memory (1 GiB -> 4.4 GiB on an H200): 9
  chunks -> 3, six fewer read-modify-writes of the fp32 dW (8VH bytes each);
- equal-sized chunks, multiples of 128 rows: no 921-row tail chunk (at 1 GiB) whose GEMMs
  leave most SMs idle (the roofline does not see that part of the saving);
- the first chunk's dW written by the GEMM (no zero-fill, no read): 8VH bytes once.
Together (``--compare``, 2026-12-03): N = 16384 86.6 -> 80.4 ms (-7%), N = 4096 23.6 ->
21.2 ms; predicted 0.86 of the 6NHV GEMM ceiling at N = 16384, below the 0.8 target's margin
mostly because the dH GEMM (C x H output: 14 tiles across H = 3584) fills its last wave badly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # `python bench/cost_model.py`: the repository root on the path, as `python -m bench.cost_model`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from nft_kernels.chunked import rows_per_chunk  # noqa: E402

# H200 SXM: cuBLAS bf16 GEMMs assumed at ~700 TF/s at these shapes (an H100 was measured at
# ~800 TF/s on a large bf16 GEMM; not yet measured on an H200); HBM3e 4.8 TB/s, ~4 TB/s
# achievable for a streaming kernel.
H200 = dict(tflops=700.0, gbps=4000.0)


H200_MEMORY = 141 * 10**9
H200_WORKSPACE = H200_MEMORY // 32  # nft_kernels.chunked's CUDA default on an H200


def _waves(m, n, sms=132, tile=(128, 256)) -> float:
    """Efficiency of a GEMM's last wave: output tiles over SM slots (cuBLAS-like 128 x 256
    tiles, one per SM at a time on an H200's 132 SMs)."""
    tiles = -(-m // tile[0]) * -(-n // tile[1])
    return tiles / (-(-tiles // sms) * sms)


def predict(n, h, v, *, counted=None, workspace_bytes=H200_WORKSPACE, elem=2,
            tflops=H200["tflops"], gbps=H200["gbps"], first_chunk_writes_dw=True) -> dict:
    """Milliseconds per step of one chunked forward+backward (gradients in the forward): each
    GEMM at the GEMM rate derated by its last wave, each memory-bound step at the bandwidth.
    ``first_chunk_writes_dw=False``: the former zero-filled fp32 dW."""
    counted = int(0.9 * n) if counted is None else counted  # the bench pads 10% of each answer
    c = rows_per_chunk(workspace_bytes, v, counted)
    sizes = [min(c, counted - c0) for c0 in range(0, counted, c)]
    rate = tflops * 1e12
    gemm = {"logits GEMM": 0.0, "dH GEMM": 0.0, "dW GEMM": 0.0}
    for rows in sizes:
        flops = 2 * rows * h * v
        gemm["logits GEMM"] += flops / (rate * _waves(rows, v))
        gemm["dH GEMM"] += flops / (rate * _waves(rows, h))
        gemm["dW GEMM"] += flops / (rate * _waves(v, h))
    memory = {"row kernel": 10 * counted * v, "dW cast": 6 * v * h,
              "dW zero-fill": 0 if first_chunk_writes_dw else 4 * v * h}
    out = {"workspace_gib": round(workspace_bytes / 2**30, 2), "rows_per_chunk": c,
           "chunks": len(sizes), "tail_rows": sizes[-1]}
    total = 0.0
    for name, seconds in gemm.items():
        out[f"{name} ms"] = round(seconds * 1e3, 3)
        total += seconds
    for name, nbytes in memory.items():
        seconds = nbytes / (gbps * 1e9)
        out[f"{name} ms"] = round(seconds * 1e3, 3)
        total += seconds
    out["total ms"] = round(total * 1e3, 2)
    out["6NHV / GEMM ceiling"] = round(6 * counted * h * v / rate / total, 3)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", nargs=2, type=int, default=(3584, 152064), metavar=("H", "V"))
    parser.add_argument("--tokens", type=int, nargs="*", default=(4096, 16384))
    parser.add_argument("--tflops", type=float, default=H200["tflops"])
    parser.add_argument("--gbps", type=float, default=H200["gbps"])
    parser.add_argument("--workspace-bytes", type=int, default=H200_WORKSPACE)
    parser.add_argument("--compare", action="store_true",
                        help="before (1 GiB workspace, zero-filled dW) and after, per N")
    args = parser.parse_args(argv)
    h, v = args.head
    rates = dict(tflops=args.tflops, gbps=args.gbps)
    if args.compare:
        result = {}
        for n in args.tokens:
            before = predict(n, h, v, workspace_bytes=1 << 30, first_chunk_writes_dw=False,
                             **rates)
            after = predict(n, h, v, workspace_bytes=args.workspace_bytes, **rates)
            result[f"N={n}"] = dict(before_ms=before["total ms"], after_ms=after["total ms"],
                                    saving_ms=round(before["total ms"] - after["total ms"], 2),
                                    chunks=(before["chunks"], after["chunks"]))
    else:
        result = {f"N={n}": predict(n, h, v, workspace_bytes=args.workspace_bytes, **rates)
                  for n in args.tokens}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
