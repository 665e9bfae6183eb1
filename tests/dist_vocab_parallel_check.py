"""Run under torchrun (1, 2 or 3 CPU processes, gloo): the fused losses with the LM head sharded
over the vocabulary equal the single-process result on the whole weight.

Every rank builds the same problem (same seed), computes the unsharded result on the whole
weight itself, then the sharded one on its rows, and compares: loss, log-probs, entropy, dH
and its own dW / d bias rows, in both modes, for the NFT and PPO heads with bias, temperature
(scalar and per token), masks, soft-capping, KL, entropy (a bonus, and differentiated
log-probs / entropy); uneven shards, shards placed by vocab_start, a DTensor weight; then bad
input on one rank, which must raise on every rank. Arguments: IMPL (torch | triton) and
DEVICE (cpu, the default, with gloo | cuda, with NCCL: one GPU per process).
Prints "VOCAB-PARALLEL OK rank R cases K" at the end.
"""
import os
import sys

import torch
import torch.distributed as dist

from nft_kernels import (fused_linear_logprobs, fused_linear_nft_loss, fused_linear_policy_loss,
                         fused_linear_ppo_loss, losses)

N, H, V = 29, 16, 37  # V not divisible by 2 or 3: uneven shards
DEVICE = torch.device("cpu")
# fp32 tolerances: the sharded log-normalizer is a different summation order of the same
# fp32 terms (a few ulp of lse ~ 4, so ~1e-6 in logp); gradients carry that relative error.
TOL = dict(rtol=2e-5, atol=2e-5)


def problem(seed, *, bias=False, per_token_t=False, mask=True):
    gen = torch.Generator().manual_seed(seed)
    p = dict(hidden=torch.randn(N, H, generator=gen),
             weight=torch.randn(V, H, generator=gen) * 0.5,
             target=torch.randint(0, V, (N,), generator=gen),
             old=-torch.rand(N, generator=gen) * 4 - 0.5,
             rewards=(torch.rand(N, generator=gen) > 0.5).float(),
             rate=torch.rand(N, generator=gen) * 0.8 + 0.1,
             advantages=torch.randn(N, generator=gen),
             ref=-torch.rand(N, generator=gen) * 4 - 0.5,
             upstream=torch.randn(3, N, generator=gen))
    p["bias"] = torch.randn(V, generator=gen) if bias else None
    p["mask"] = torch.rand(N, generator=gen) > 0.25 if mask else None
    p["temperature"] = (torch.rand(N, generator=gen) + 0.5) if per_token_t else 0.7
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in p.items()}


def shard_bounds(world, rank, how):
    """Rows [start, stop) of this rank: "even" as torch.chunk (DTensor's Shard(0)), "skewed"
    uneven sizes in rank order, "reversed" the skewed sizes placed in reverse rank order."""
    if how == "even":
        size = -(-V // world)
        return min(rank * size, V), min((rank + 1) * size, V)
    sizes = [V // world + (2 * r - (world - 1)) for r in range(world)]
    sizes[-1] += V - sum(sizes)
    order = list(range(world))[::-1] if how == "reversed" else list(range(world))
    start = sum(sizes[q] for q in order[:order.index(rank)])
    return start, start + sizes[rank]


def run_loss(p, weight, bias, *, head, reduction, stats=True, **options):
    """Loss (and with ``stats`` the per-token log-probs and entropy) and dH; without stats or
    an entropy bonus no entropy is computed at all (the chunked torch path's cheaper dz)."""
    hidden = p["hidden"].clone().requires_grad_(True)
    common = dict(bias=bias, temperature=p["temperature"], reduction=reduction,
                  return_stats=True, ref_logprobs=p["ref"], **options)
    common["return_stats"] = stats
    if head == "nft":
        out = fused_linear_nft_loss(hidden, weight, p["target"], p["old"], p["rewards"],
                                    p["rate"], p["mask"], **common)
    elif head == "user":  # a user-defined head (SAPO): the head in torch between the passes
        out = fused_linear_policy_loss(hidden, weight, p["target"], losses.sapo(), p["mask"],
                                       per_token={"old_logprobs": p["old"],
                                                  "advantages": p["advantages"]}, **common)
    else:
        out = fused_linear_ppo_loss(hidden, weight, p["target"], p["old"], p["advantages"],
                                    p["mask"], **common)
    loss, per_token = out if stats else (out, None)
    up = loss if loss.dim() == 0 else (loss * p["upstream"][0]).sum()
    up.backward()
    result = dict(loss=loss.detach(), dh=hidden.grad)
    if stats:
        result.update(logp=per_token["logprobs"], entropy=per_token["entropy"])
    return result


def run_logprobs(p, weight, bias, **options):
    """Differentiated log-probs and entropy (the backward's g_ent path)."""
    hidden = p["hidden"].clone().requires_grad_(True)
    logp, ent = fused_linear_logprobs(hidden, weight, p["target"], bias=bias,
                                      temperature=p["temperature"], mask=p["mask"],
                                      return_entropy=True, **options)
    ((logp * p["upstream"][1]).sum() + (ent * p["upstream"][2]).sum()).backward()
    return dict(logp=logp.detach(), entropy=ent.detach(), dh=hidden.grad)


def leaf(t):
    return None if t is None else t.clone().requires_grad_(True)


def compare(case, got, want, w_got, w_want, start, stop):
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m: f"{case} {key}: {m}")
    torch.testing.assert_close(w_got.grad, w_want.grad[start:stop], **TOL,
                               msg=lambda m: f"{case} dW: {m}")


def check_case(case, p, runner, *, group, start, stop, vocab_start=None, **options):
    w_full, b_full = leaf(p["weight"]), leaf(p["bias"])
    want = runner(p, w_full, b_full, **options)
    w_mine = leaf(p["weight"][start:stop])
    b_mine = None if p["bias"] is None else leaf(p["bias"][start:stop])
    got = runner(p, w_mine, b_mine, process_group=group, vocab_start=vocab_start, **options)
    compare(case, got, want, w_mine, w_full, start, stop)
    if b_full is not None:
        torch.testing.assert_close(b_mine.grad, b_full.grad[start:stop], **TOL,
                                   msg=lambda m: f"{case} d bias: {m}")


def expect_error_everywhere(case, fn, *words):
    try:
        fn()
    except (ValueError, TypeError) as err:
        text = str(err)
        missing = [w for w in words if w not in text]
        assert not missing, f"{case}: error lacks {missing}: {text}"
        return
    raise AssertionError(f"{case}: no error raised on rank {dist.get_rank()}")


def main(impl: str, device: str = "cpu") -> None:
    global DEVICE
    DEVICE = torch.device(device)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        DEVICE = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    cases = 0
    modes = [("chunked", dict(workspace_bytes=4 * 12 * 16)),  # several chunks of rows
             ("lean", {})]
    for mode, extra in modes:
        options = dict(impl=impl, mode=mode, **extra)
        for head in ("nft", "ppo", "user"):
            for reduction in ("sum", "mean", "none"):
                for how in ("skewed", "reversed"):
                    seed = cases
                    p = problem(seed, bias=reduction != "mean", per_token_t=reduction == "none")
                    start, stop = shard_bounds(world, rank, how)
                    head_options = dict(entropy_coef=0.05 if reduction != "mean" else 0.0,
                                        beta=0.1 if head in ("ppo", "user") else 0.0)
                    if head == "ppo":
                        head_options.update(clip_high=0.28)
                    check_case(f"{mode}/{head}/{reduction}/{how}", p, run_loss, group=group,
                               start=start, stop=stop,
                               vocab_start=start if how == "reversed" else None, head=head,
                               reduction=reduction, stats=reduction != "mean",
                               **head_options, **options)
                    cases += 1
        p = problem(100, bias=True, per_token_t=True)
        start, stop = shard_bounds(world, rank, "skewed")
        check_case(f"{mode}/logprobs+entropy", p, run_logprobs, group=group, start=start,
                   stop=stop, softcap=3.0, **options)
        cases += 1
    # GSPO (sequence-level ratio): fused log-probs on the shard, head on the shared values.
    p = problem(200)
    start, stop = shard_bounds(world, rank, "skewed")
    seq = torch.arange(N, device=DEVICE) // 7
    check_case("gspo", p, run_loss, group=group, start=start, stop=stop, head="ppo",
               reduction="sum", importance_sampling_level="sequence", sequence_ids=seq,
               impl=impl)
    cases += 1
    cases += check_dtensor(impl)
    cases += check_validate_false(impl, group, rank, world)
    if world > 1:
        cases += check_bad_input(impl, group, rank, world)
        cases += check_second_head_validate_false(impl, rank, world)
    sys.stdout.flush()  # then one write: the ranks share the pipe, lines must not interleave
    os.write(1, f"VOCAB-PARALLEL OK rank {rank} cases {cases}\n".encode())
    dist.barrier()
    dist.destroy_process_group()


def check_dtensor(impl) -> int:
    """A DTensor weight and bias, Shard(0) on a 1-D mesh: gradients come back as DTensors with
    the same placements, each rank's local part equal to its rows of the unsharded ones."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(DEVICE.type, (world,), mesh_dim_names=("tp",))
    p = problem(300, bias=True)
    start, stop = shard_bounds(world, rank, "even")
    n = 0
    for mode in ("chunked", "lean"):
        w_full, b_full = leaf(p["weight"]), leaf(p["bias"])
        want = run_loss(p, w_full, b_full, head="nft", reduction="sum", impl=impl, mode=mode,
                        entropy_coef=0.05)
        w_dt = distribute_tensor(p["weight"], mesh, [Shard(0)]).requires_grad_(True)
        b_dt = distribute_tensor(p["bias"], mesh, [Shard(0)]).requires_grad_(True)
        got = run_loss(p, w_dt, b_dt, head="nft", reduction="sum", impl=impl, mode=mode,
                       entropy_coef=0.05)
        assert tuple(w_dt.grad.placements) == (Shard(0),), w_dt.grad.placements
        for key in want:
            torch.testing.assert_close(got[key], want[key], **TOL, msg=f"dtensor {mode} {key}")
        torch.testing.assert_close(w_dt.grad.to_local(), w_full.grad[start:stop], **TOL)
        torch.testing.assert_close(b_dt.grad.to_local(), b_full.grad[start:stop], **TOL)
        n += 1
    n += check_colwise_parallel(impl, mesh, p, start, stop)
    return n


def check_colwise_parallel(impl, mesh, p, start, stop) -> int:
    """What a torch tensor-parallel user has: an lm_head nn.Linear given ColwiseParallel by
    parallelize_module; its weight (a Shard(0) DTensor parameter) goes to the loss as is."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    whole = torch.nn.Linear(H, V, bias=True, device=DEVICE)
    with torch.no_grad():
        whole.weight.copy_(p["weight"])
        whole.bias.copy_(p["bias"])
    sharded = torch.nn.Linear(H, V, bias=True, device=DEVICE)
    sharded.load_state_dict(whole.state_dict())
    parallelize_module(sharded, mesh, ColwiseParallel())
    want = run_loss(p, whole.weight, whole.bias, head="ppo", reduction="mean", impl=impl,
                    clip_high=0.28)
    got = run_loss(p, sharded.weight, sharded.bias, head="ppo", reduction="mean", impl=impl,
                   clip_high=0.28)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=f"ColwiseParallel {key}")
    torch.testing.assert_close(sharded.weight.grad.to_local(), whole.weight.grad[start:stop],
                               **TOL)
    torch.testing.assert_close(sharded.bias.grad.to_local(), whole.bias.grad[start:stop], **TOL)
    return 1


def check_validate_false(impl, group, rank, world) -> int:
    """validate=False: the first call learns the shard layout (one agreement round), later
    ones take no agreement round at all (no all_gather, so no host synchronisation) and give
    the same result."""
    p = problem(500)
    start, stop = shard_bounds(world, rank, "skewed")
    weight = p["weight"][start:stop].clone()  # a shard size no earlier call used
    gathers = []
    real_all_gather = dist.all_gather

    def counting_all_gather(*args, **kwargs):
        gathers.append(1)
        return real_all_gather(*args, **kwargs)

    def call():
        return fused_linear_nft_loss(p["hidden"], weight, p["target"], p["old"], p["rewards"],
                                     p["rate"], p["mask"], impl=impl, process_group=group,
                                     validate=False, vocab_start=start)

    first = call()
    dist.all_gather = counting_all_gather
    try:
        second = call()
    finally:
        dist.all_gather = real_all_gather
    assert not gathers, f"validate=False took {len(gathers)} agreement round(s) on a known layout"
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    want = fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"], p["rewards"],
                                 p["rate"], p["mask"], impl=impl)
    torch.testing.assert_close(second, want, **TOL)
    return 1


def check_bad_input(impl, group, rank, world) -> int:
    """Bad input on one rank raises on every rank, naming the argument (and the rank); the
    group stays usable afterwards (no rank is left inside a collective)."""
    p = problem(400)
    start, stop = shard_bounds(world, rank, "skewed")
    weight = p["weight"][start:stop]

    def call(**changes):
        args = dict(hidden=p["hidden"], weight=weight, target=p["target"],
                    mask=p["mask"])
        args.update(changes)
        return fused_linear_nft_loss(args["hidden"], args["weight"], args["target"], p["old"],
                                     p["rewards"], p["rate"], args["mask"], impl=impl,
                                     process_group=group, vocab_start=args.get("vocab_start"))

    bad_target = p["target"].clone()
    bad_target[3] = V + 5 if rank == world - 1 else bad_target[3]
    if p["mask"] is not None:
        p["mask"][3] = True
    expect_error_everywhere("target", lambda: call(target=bad_target), "target",
                            f"rank {world - 1}")
    narrow = weight[:, : H - 1] if rank == 0 else weight  # wrong H on rank 0 only
    expect_error_everywhere("hidden size", lambda: call(weight=narrow), "rank 0")
    expect_error_everywhere("vocab_start", lambda: call(vocab_start=0), "vocab_start")
    other_mask = p["mask"].clone()
    other_mask[0] = not bool(other_mask[0]) if rank == 1 else other_mask[0]
    expect_error_everywhere("mask", lambda: call(mask=other_mask), "mask")
    # The same number of counted tokens, but not the same tokens: caught by round 2's
    # fingerprint of the mask (each rank would combine statistics of different tokens).
    swapped = p["mask"].clone()
    if rank == 1:
        on, off = int(swapped.nonzero()[0]), int((~swapped).nonzero()[0])
        swapped[on], swapped[off] = False, True
    expect_error_everywhere("mask, same count", lambda: call(mask=swapped), "masks differ")
    other_target = p["target"].clone()
    counted = int(p["mask"].nonzero()[0])
    if rank == 0:
        other_target[counted] = (other_target[counted] + 1) % V
    expect_error_everywhere("targets", lambda: call(target=other_target),
                            "target ids differ")
    fewer = p["hidden"][:-1] if rank == 1 else p["hidden"]  # one token fewer on rank 1
    expect_error_everywhere("tokens", lambda: call(hidden=fewer), "rank 1")
    # GSPO checks its head's inputs after the fused log-probs: still raised on every rank.
    advantages = p["advantages"].clone()
    if rank == world - 1:
        advantages[0] = float("nan")
    expect_error_everywhere("gspo advantages", lambda: fused_linear_ppo_loss(
        p["hidden"], weight, p["target"], p["old"], advantages, None, impl=impl,
        importance_sampling_level="sequence", sequence_ids=torch.arange(N, device=DEVICE) // 5,
        process_group=group), "advantages", f"rank {world - 1}")
    # The group still works: a good call gives the unsharded loss.
    w_full = p["weight"]
    want = fused_linear_nft_loss(p["hidden"], w_full, p["target"], p["old"], p["rewards"],
                                 p["rate"], p["mask"], impl=impl)
    torch.testing.assert_close(call(), want, **TOL)
    return 9


def check_second_head_validate_false(impl, rank, world) -> int:
    """validate=False on two heads whose shards have the same size on some ranks and not on
    others (V and V + 1 split as torch.chunk: 19/18 then 19/19 over 2 ranks, 13/13/11 then
    13/13/12 over 3): every rank must decide alike whether to take the agreement round, or
    the collectives mismatch and the call hangs. A group with a short timeout turns such a
    hang into a failure (plain shards; a DTensor weight's layout is keyed by its global size)."""
    from datetime import timedelta

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    group = dist.new_group(timeout=timedelta(seconds=60))
    mesh = init_device_mesh(DEVICE.type, (world,))
    n = 0
    for vocab in (V, V + 1):
        p = problem(600 + vocab)
        if vocab != V:
            extra = torch.Generator().manual_seed(vocab)
            row = (torch.randn(1, H, generator=extra) * 0.5).to(DEVICE)
            p["weight"] = torch.cat([p["weight"], row])
        size = -(-vocab // world)
        start, stop = min(rank * size, vocab), min((rank + 1) * size, vocab)
        want = fused_linear_nft_loss(p["hidden"], p["weight"], p["target"], p["old"],
                                     p["rewards"], p["rate"], p["mask"], impl=impl)
        shard = p["weight"][start:stop].clone()
        for _ in range(2):  # the second call of a head reuses its layout
            got = fused_linear_nft_loss(p["hidden"], shard, p["target"], p["old"],
                                        p["rewards"], p["rate"], p["mask"], impl=impl,
                                        process_group=group, validate=False)
            torch.testing.assert_close(got, want, **TOL, msg=f"plain V={vocab}")
            n += 1
        w_dt = distribute_tensor(p["weight"], mesh, [Shard(0)])
        for _ in range(2):
            got = fused_linear_nft_loss(p["hidden"], w_dt, p["target"], p["old"],
                                        p["rewards"], p["rate"], p["mask"], impl=impl,
                                        validate=False)
            torch.testing.assert_close(got, want, **TOL, msg=f"dtensor V={vocab}")
            n += 1
    assert n == 8
    return 1


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip gloo's C++ teardown at exit (see tests/dist_grad_check.py)
