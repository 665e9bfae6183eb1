"""Compile every Triton kernel ahead of time for a Hopper GPU (sm_90), on a machine without one.

The interpreter proves the math but accepts things the compiler rejects (non-constexpr globals,
tile shapes tl.dot refuses, type mismatches in loop-carried values). Triton's own compiler and
the bundled ptxas run on CPU, so CI compiles each kernel down to a cubin and checks its shared
memory against the H100's 227 KiB. Run by tests/test_gpu_compile.py in a process without
TRITON_INTERPRET; prints one JSON line per kernel variant.
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nft_kernels.ops.backward_atomic import fused_linear_backward_atomic_kernel
from nft_kernels.ops.backward_dh import fused_linear_backward_dh_kernel
from nft_kernels.ops.backward_dw import fused_linear_backward_dw_kernel
from nft_kernels.ops.forward import fused_linear_forward_kernel
from nft_kernels.ops.loss_head import loss_head_kernel
from nft_kernels.triton_launch import GROUP, _GPU_BACKWARD, _GPU_FORWARD

H100_SHARED_BYTES = 227 * 1024
INT_ARGS = {"n_rows", "V", "H", "n", "stride_hn", "stride_hh", "stride_wv", "stride_wh"}


def signature(kernel, consts, dtype):
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("hidden_ptr", "weight_ptr", "bias_ptr"):
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


def variants():
    for dtype in ("bf16", "fp32"):
        precision = dict(DOT_FP32=dtype == "fp32", IEEE=dtype == "fp32")
        fwd = {k: v for k, v in _GPU_FORWARD.items() if k.startswith("BLOCK")}
        bwd = {k: v for k, v in _GPU_BACKWARD.items() if k.startswith("BLOCK")}
        fwd_opts = dict(num_warps=_GPU_FORWARD["num_warps"], num_stages=_GPU_FORWARD["num_stages"])
        bwd_opts = dict(num_warps=_GPU_BACKWARD["num_warps"],
                        num_stages=_GPU_BACKWARD["num_stages"])
        for head in (0, 1, 2):
            yield (fused_linear_forward_kernel, dtype, fwd_opts,
                   dict(HAS_BIAS=True, COMPUTE_ENTROPY=head == 0, HEAD=head, NORMALIZE=2,
                        **fwd, **precision))
        for filt, ent in ((False, False), (True, True)):
            common = dict(HAS_BIAS=True, HAS_ENT_GRAD=ent, FILTER=filt, **bwd, **precision)
            yield fused_linear_backward_atomic_kernel, dtype, bwd_opts, dict(GROUP=GROUP,
                                                                             **common)
            yield fused_linear_backward_dh_kernel, dtype, bwd_opts, common
            yield fused_linear_backward_dw_kernel, dtype, bwd_opts, common
    for head in (1, 2):
        yield (loss_head_kernel, "fp32", dict(num_warps=4, num_stages=1),
               dict(HEAD=head, NORMALIZE=1, HAS_MASK=True, BLOCK=1024))


def main():
    target = GPUTarget("cuda", 90, 32)
    failures = 0
    for kernel, dtype, options, consts in variants():
        name = kernel.fn.__name__
        try:
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature(kernel, consts, dtype),
                          constexprs=consts),
                target=target, options=options)
            shared = compiled.metadata.shared
            ok = bool(compiled.asm.get("cubin")) and shared <= H100_SHARED_BYTES
            print(json.dumps(dict(kernel=name, dtype=dtype, consts=consts, ok=ok,
                                  shared_bytes=shared)), flush=True)
        except Exception as exc:  # report every failing variant, not just the first
            ok = False
            print(json.dumps(dict(kernel=name, dtype=dtype, consts=consts, ok=False,
                                  error=f"{type(exc).__name__}: {exc}"[:2000])), flush=True)
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
