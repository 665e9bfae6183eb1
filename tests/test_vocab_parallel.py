"""Vocab-parallel LM head: the fused losses on a weight sharded over the vocabulary across a
process group equal the single-process result on the whole weight (tests/
dist_vocab_parallel_check.py under torchrun, gloo on CPU: 1, 2 and 3 processes, uneven
shards, both modes, PyTorch and the Triton kernels in the interpreter), and bad input raises
on every rank."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nft_kernels import fused_linear_logprobs, fused_linear_nft_loss

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nproc,impl", [(1, "torch"), (2, "torch"), (3, "torch"),
                                        (2, "triton"), (3, "triton")])
def test_sharded_head_equals_the_whole_head(nproc, impl):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
               OMP_NUM_THREADS="1")
    if impl == "triton":
        pytest.importorskip("triton")
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(_free_port()),
           str(ROOT / "tests" / "dist_vocab_parallel_check.py"), impl]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    done = dict(re.findall(r"VOCAB-PARALLEL OK rank (\d+) cases (\d+)", proc.stdout))
    assert sorted(done) == [str(r) for r in range(nproc)], output[-3000:]
    # Every rank ran every case: the per-mode loss cases (NFT, PPO and a user-defined head:
    # 3 x 3 reductions x 2 layouts + log-probs), GSPO, DTensor, validate=False, bad input.
    expected = 2 * 19 + 1 + 3 + 1 + (9 + 1 if nproc > 1 else 0)
    assert set(done.values()) == {str(expected)}, done


def _problem():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(6, 8, generator=gen), torch.randn(11, 8, generator=gen), \
        torch.randint(0, 11, (6,), generator=gen)


def test_vocab_start_needs_a_process_group():
    hidden, weight, target = _problem()
    with pytest.raises(ValueError, match="vocab_start"):
        fused_linear_logprobs(hidden, weight, target, vocab_start=0)


@pytest.mark.skipif(torch.distributed.is_initialized(), reason="needs no default group")
def test_process_group_without_torch_distributed_is_refused():
    hidden, weight, target = _problem()
    fake_group = object()
    with pytest.raises(ValueError, match="process_group"):
        fused_linear_nft_loss(hidden, weight, target, torch.zeros(6), torch.ones(6),
                              torch.full((6,), 0.5), process_group=fake_group)
