"""What only a GPU can show: compiled kernels in 16-bit on tensor cores, offsets past 2^31, no
host synchronisation, the chunked mode's memory bound. Skipped without CUDA; run by
``bench/gpu_acceptance.py`` (and by pytest on any CUDA machine)."""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import GRAD_RTOL, LOSS_RTOL, assert_close_scaled, make_problem

from nft_kernels import (
    extra_memory_bytes,
    fused_linear_logprobs,
    fused_linear_nft_loss,
    fused_linear_ppo_loss,
)
from nft_kernels.reference import (
    reference_logprobs,
    reference_nft_loss,
    reference_ppo_loss,
    reference_with_grads,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
MODES = ["chunked", "lean"]


def _grads(p):
    return p["hidden"].grad, p["weight"].grad, None if p["bias"] is None else p["bias"].grad


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(700, 256, 5000), (333, 96, 1031)], ids=["aligned", "odd"])
def test_nft_and_ppo_against_float64_on_tensor_cores(mode, dtype, shape):
    """Sizes that fill many tiles and chunks, 16-bit GEMMs on tensor cores; a small workspace
    forces several chunks."""
    _check_against_float64(mode, dtype, shape)


@pytest.mark.parametrize("mode", MODES)
def test_pytorch_path_on_cuda_bf16(mode):
    """impl="torch" on CUDA (the row math in torch around cuBLAS GEMMs): its fp32 dz must not
    be read through the 16-bit view the row kernel writes (a bug this test would have shown)."""
    _check_against_float64(mode, torch.bfloat16, (333, 96, 1031), impl="torch")


def _check_against_float64(mode, dtype, shape, impl="auto"):
    n, h, v = shape
    for loss_kind in ("nft", "ppo"):
        p = make_problem(n, h, v, dtype, CUDA, seed=n + v, bias=True, temperature=0.8,
                         logit_scale=4.0)
        opts = dict(bias=p["bias"], temperature=0.8, mode=mode, workspace_bytes=4 * v * 128,
                    impl=impl)
        if loss_kind == "nft":
            loss = fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"],
                                         p["rewards"], p["rate"], p["mask"], **opts)
            ref_fn, ref_args = reference_nft_loss, (p["old"], p["rewards"], p["rate"])
        else:
            adv = p["rewards"] - p["rate"]
            loss = fused_linear_ppo_loss(p["hidden"], p["weight"], p["target"], p["old"], adv,
                                         p["mask"], clip_high=0.28, **opts)
            ref_fn, ref_args = reference_ppo_loss, (p["old"], adv)
        loss.backward()
        kwargs = dict(temperature=0.8) if loss_kind == "nft" else dict(temperature=0.8,
                                                                        clip_high=0.28)
        ref_loss, ref_dh, ref_dw, ref_db = reference_with_grads(
            ref_fn, p["hidden"], p["weight"], p["target"], *ref_args, p["mask"],
            bias=p["bias"], **kwargs)
        scale = ref_fn(p["hidden"].detach(), p["weight"].detach(), p["target"], *ref_args,
                       p["mask"], bias=p["bias"].detach(),
                       **{**kwargs, "reduction": "none"}).abs().sum().item()
        assert abs(loss.item() - ref_loss.item()) <= LOSS_RTOL * (1 + scale)
        dh, dw, db = _grads(p)
        assert dh.dtype == dtype and dw.dtype == dtype
        assert_close_scaled(dh, ref_dh, GRAD_RTOL[dtype], f"{loss_kind} dH")
        assert_close_scaled(dw, ref_dw, GRAD_RTOL[dtype], f"{loss_kind} dW")
        assert_close_scaled(db, ref_db, GRAD_RTOL[dtype], f"{loss_kind} d bias")


@pytest.mark.parametrize("mode", MODES)
def test_logprobs_and_entropy_gradient_bf16(mode):
    p = make_problem(400, 128, 3000, torch.bfloat16, CUDA, seed=2, logit_scale=3.0)
    logp, ent = fused_linear_logprobs(p["hidden"], p["weight"], p["target"], return_entropy=True,
                                      mode=mode, workspace_bytes=4 * 3000 * 64)
    (logp.sum() - 0.3 * ent.sum()).backward()

    def objective(hh, ww, target, bias=None):
        a, e = reference_logprobs(hh, ww, target)
        return a.sum() - 0.3 * e.sum()

    _, ref_dh, ref_dw, _ = reference_with_grads(objective, p["hidden"], p["weight"], p["target"])
    ref_logp, ref_ent = reference_logprobs(p["hidden"].detach(), p["weight"].detach(),
                                           p["target"])
    assert (logp.double().cpu() - ref_logp.cpu()).abs().max() < 1e-3
    assert (ent.double().cpu() - ref_ent.cpu()).abs().max() < 1e-3
    assert_close_scaled(p["hidden"].grad, ref_dh, GRAD_RTOL[torch.bfloat16], "dH")
    assert_close_scaled(p["weight"].grad, ref_dw, GRAD_RTOL[torch.bfloat16], "dW")


@pytest.mark.parametrize("mode, deterministic", [("chunked", False), ("lean", True)])
def test_deterministic_modes_are_bit_identical(mode, deterministic):
    p = make_problem(2000, 256, 8000, torch.bfloat16, CUDA, seed=3, bias=True)
    grads = []
    for _ in range(2):
        for t in (p["hidden"], p["weight"], p["bias"]):
            t.grad = None
        fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                              p["rate"], p["mask"], bias=p["bias"], mode=mode,
                              deterministic=deterministic,
                              workspace_bytes=4 * 8000 * 512).backward()
        grads.append([t.grad.clone() for t in (p["hidden"], p["weight"], p["bias"])])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_offsets_past_two_to_the_31(mode):
    """N * V > 2^31 (here 16384 x 152064 = 2.5e9): every int32 offset would wrap. The loss is
    separable per token, so the float64 reference runs chunk by chunk of rows."""
    n, h, v = 16384, 64, 152064
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device=CUDA, generator=gen).bfloat16().requires_grad_(True)
    weight = (torch.randn(v, h, device=CUDA, generator=gen) / h ** 0.5).bfloat16()
    weight.requires_grad_(True)
    target = torch.randint(0, v, (n,), device=CUDA, generator=gen)
    target[-4:] = torch.tensor([0, v - 1, v // 2, 12345], device=CUDA)
    with torch.no_grad():
        old = fused_linear_logprobs(hidden, weight, target, mode=mode) - 0.1
    rewards = (torch.rand(n, device=CUDA, generator=gen) < 0.5).float()
    rate = torch.rand(n, device=CUDA, generator=gen)
    loss = fused_linear_nft_loss(hidden, weight, target, old, rewards, rate, mode=mode)
    loss.backward()
    ref_loss, ref_dw = 0.0, torch.zeros(v, h, dtype=torch.float64, device=CUDA)
    for r0 in range(0, n, 1024):
        sl = slice(r0, r0 + 1024)
        h64 = hidden.detach()[sl].double().requires_grad_(True)
        w64 = weight.detach().double().requires_grad_(True)
        part = reference_nft_loss(h64, w64, target[sl], old[sl], rewards[sl], rate[sl])
        part.backward()
        ref_loss += part.item()
        ref_dw += w64.grad
        if r0 + 1024 >= n:  # the last rows, whose offsets pass 2^31
            assert_close_scaled(hidden.grad[sl], h64.grad, GRAD_RTOL[torch.bfloat16],
                                "dH (last rows)")
        del h64, w64, part
    assert abs(loss.item() - ref_loss) <= LOSS_RTOL * (1 + abs(ref_loss)) * 10
    assert_close_scaled(weight.grad, ref_dw, GRAD_RTOL[torch.bfloat16], "dW")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("masked", [False, True])
def test_validate_false_never_synchronises(mode, masked):
    p = make_problem(512, 128, 4000, torch.bfloat16, CUDA, seed=4,
                     mask_kind="random" if masked else "all")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"],
                                     p["rewards"], p["rate"], p["mask"], mode=mode,
                                     validate=False, reduction="mean")
        loss.backward()
        with torch.no_grad():
            fused_linear_logprobs(p["hidden"], p["weight"], p["target"], mask=p["mask"],
                                  mode=mode, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.parametrize("mode", MODES)
def test_validate_true_synchronises_once(mode):
    p = make_problem(512, 128, 4000, torch.bfloat16, CUDA, seed=5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"],
                                         p["rewards"], p["rate"], p["mask"], mode=mode)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    loss.backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_peak_memory_within_the_documented_bound(mode, dtype):
    n, h, v = 4096, 512, 32000
    p = make_problem(n, h, v, dtype, CUDA, seed=6)
    budget = 64 << 20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                          p["rate"], p["mask"], mode=mode, workspace_bytes=budget).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    bound = extra_memory_bytes(n, h, v, dtype, mode, workspace_bytes=budget,
                               counted_tokens=int(p["mask"].sum()))
    assert peak <= bound, (peak, bound)


def test_vocab_parallel_one_rank_nccl():
    """The vocab-parallel path on CUDA with an NCCL group of one (compiled Triton kernels,
    agreement rounds on the GPU): equal to the unsharded call (tests/dist_vocab_parallel_check.py;
    the multi-rank cases run on CPU with gloo in tests/test_vocab_parallel.py)."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
           "--master_port", "29561", str(root / "tests" / "dist_vocab_parallel_check.py"),
           "triton", "cuda"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert re.search(r"VOCAB-PARALLEL OK rank 0 cases 31", proc.stdout), proc.stdout[-3000:]
