"""The public functions: fused LM head + loss, and the same losses on given log-probs.

Shapes: ``hidden`` is [..., H] and every per-token argument has the leading shape [...] (a
flat [N, H] with [N] targets is the usual case). ``weight`` is [V, H] (``lm_head.weight``).
Losses and log-probs come back in fp32.
"""

from __future__ import annotations

import torch

from . import validation as val
from . import vocab_parallel as vp
from .autograd import FusedLinearHead, FusedLinearScalarLoss, LossHead
from .backend import engine, head_module
from .heads import KL_ALIASES, KL_ESTIMATORS, HeadSpec, LogitScaling, sequence_ppo_loss


def compact_rows(mask: torch.Tensor, count: int) -> torch.Tensor:
    """int64 indices of the ``count`` True entries of ``mask``, in order, without a host
    synchronisation (``torch.nonzero`` would wait for the device to learn the count)."""
    n = mask.numel()
    position = torch.cumsum(mask, 0) - 1
    slot = torch.where(mask, position, torch.full_like(position, count))  # others: a spare slot
    rows = torch.empty(count + 1, dtype=torch.int64, device=mask.device)
    rows.scatter_(0, slot, torch.arange(n, device=mask.device))
    return rows[:count]


def _reduce(loss_t, n_counted, reduction, lead_shape):
    if reduction == "none":
        return loss_t.reshape(lead_shape)
    return loss_t.sum() * _reduction_scale(n_counted, reduction, loss_t.device)


def _reduction_scale(n_counted, reduction, device):
    """1 for "sum", 1 / counted tokens for "mean" (no counted token: 1, so the loss is 0, not
    NaN); a device scalar, since the count may only be known on the device."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    if isinstance(n_counted, torch.Tensor):
        return 1.0 / n_counted.clamp(min=1).to(torch.float32)
    return torch.full((), 1.0 / max(n_counted, 1), dtype=torch.float32, device=device)


def _head_inputs(flat):
    """(old log-probs, reward or advantage, correct rate, token weights, reference log-probs)
    from the flattened per-token arguments, None where absent."""
    reward = flat.get("rewards", flat.get("advantages"))
    return (flat.get("old_logprobs"), reward, flat.get("correct_rate"),
            flat.get("token_weights"), flat.get("ref_logprobs"))


# The per-token inputs each head reads (the others are optional).
_REQUIRED = {"none": (), "nft": ("old_logprobs", "rewards", "correct_rate"),
             "ppo": ("old_logprobs", "advantages")}


def _check_required(spec: HeadSpec, per_token: dict) -> None:
    val.check_required({name: per_token.get(name) for name in _REQUIRED[spec.kind]})


def _kl_options(ref_logprobs, beta, kl_estimator, kl_bias_correction=False) -> dict:
    """HeadSpec fields of the KL-to-reference term, checked: beta >= 0; with beta > 0 the
    reference log-probs are required (with beta = 0 they are not read)."""
    val.check_scalar("beta", beta, low=0.0)
    if not isinstance(kl_estimator, str) or \
            KL_ALIASES.get(kl_estimator, kl_estimator) not in KL_ESTIMATORS[1:]:
        names = ", ".join(repr(k) for k in KL_ESTIMATORS[1:] + tuple(KL_ALIASES))
        raise ValueError(f"kl_estimator must be one of {names}, got {kl_estimator!r}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when beta > 0 (the reference policy's "
                         "log-probs of the target tokens, the KL term's anchor)")
    if not isinstance(kl_bias_correction, bool):
        raise TypeError(f"kl_bias_correction must be a bool, got {kl_bias_correction!r}")
    return dict(beta=float(beta), kl=KL_ALIASES.get(kl_estimator, kl_estimator),
                kl_bias_correction=kl_bias_correction)


def _entropy_coef(entropy_coef) -> float:
    """The entropy bonus's coefficient: any finite number (> 0 rewards entropy)."""
    val.check_scalar("entropy_coef", entropy_coef)
    return float(entropy_coef)


def _per_token_ref(ref_logprobs, beta):
    """The reference log-probs as a per-token input, only where the KL term reads them."""
    return {"ref_logprobs": ref_logprobs if beta > 0 else None}


def _autocast(hidden, weight, bias):
    """Under ``torch.autocast`` the LM head runs in the autocast dtype, as ``nn.Linear`` would:
    fp32 master weights are cast for the call (gradients flow back to them in fp32)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in val.FLOAT_DTYPES:
        return hidden, weight, bias
    cast = lambda t: t if t is None or t.dtype == dtype else t.to(dtype)  # noqa: E731
    return cast(hidden), cast(weight), cast(bias)


def _nft_spec(neg_weight, normalize, clip_negative, rate_clamp, max_log_ratio,
              kl: dict | None = None, entropy_coef=0.0) -> HeadSpec:
    val.check_scalar("neg_weight", neg_weight, low=0.0)
    val.check_scalar("normalize", normalize, integer_choices=(0, 1, 2))
    val.check_scalar("clip_negative", clip_negative, low=0.0, low_open=True)
    val.check_scalar("max_log_ratio", max_log_ratio, low=0.0, low_open=True)
    lo, hi = val.check_rate_clamp(rate_clamp)
    return HeadSpec(kind="nft", neg_weight=float(neg_weight), normalize=int(normalize),
                    clip_negative=float(clip_negative), rate_lo=lo, rate_hi=hi,
                    max_log_ratio=float(max_log_ratio), **(kl or {}),
                    entropy_coef=_entropy_coef(entropy_coef))


def _ppo_spec(clip_low, clip_high, clip_ratio_c, max_log_ratio,
              kl: dict | None = None, entropy_coef=0.0) -> HeadSpec:
    val.check_scalar("clip_low", clip_low, low=0.0)
    if clip_low >= 1.0:
        raise ValueError(f"clip_low must be < 1, got {clip_low!r}")
    val.check_scalar("clip_high", clip_high, low=0.0)
    val.check_scalar("max_log_ratio", max_log_ratio, low=0.0, low_open=True)
    if clip_ratio_c is not None:
        val.check_scalar("clip_ratio_c", clip_ratio_c, low=1.0, low_open=True)
    return HeadSpec(kind="ppo", clip_low=float(clip_low), clip_high=float(clip_high),
                    clip_ratio_c=float(clip_ratio_c or 0.0), max_log_ratio=float(max_log_ratio),
                    **(kl or {}), entropy_coef=_entropy_coef(entropy_coef))


def _fused(hidden, weight, target, mask, bias, temperature, spec, per_token, *,
           process_group=None, vocab_start=None, **options):
    """Shared body of the fused entry points; see ``_fused_on_rank``. With a vocab-sharded
    weight (``process_group``, or a DTensor weight) the call's checks run as agreement rounds
    across the group (``vocab_parallel.agreement``): bad input on one rank raises on all."""
    group = vp.tensor_parallel_group(weight, process_group)
    if group is None and vocab_start is not None:
        raise ValueError("vocab_start applies to a vocab-sharded weight (give process_group)")
    call = None if group is None else vp.GroupCall(group)
    with vp.agreement(call):
        return _fused_on_rank(hidden, weight, target, mask, bias, temperature, spec, per_token,
                              call=call, vocab_start=vocab_start, **options)


def _fused_on_rank(hidden, weight, target, mask, bias, temperature, spec, per_token, *,
                   unit_names, reduction, filter_eps, deterministic, impl, mode,
                   workspace_bytes, validate, compute_entropy, scalar_loss, softcap=None,
                   call=None, vocab_start=None):
    """One rank's part of a fused call. ``per_token``: name -> tensor or None, in the
    order (old_logprobs, reward-or-advantage, correct_rate). ``scalar_loss``: only the reduced
    loss is differentiated (its gradients may then be computed in the forward). ``call``: the
    ``vocab_parallel.GroupCall`` when ``weight`` is this rank's vocabulary shard.

    Host synchronisations: with ``validate=True`` one per call (every value check and the
    number of counted tokens read back together); with ``validate=False`` none (a mask then
    stays on the device: padded tokens go through the GEMMs with zero gradient instead of
    being dropped before them; only the lean PyTorch path, a CPU fallback, compacts them on
    the host)."""
    if call is not None:  # DTensors -> this rank's tensors (gradients flow back to them)
        head = vp.head_identity(weight)
        hidden = vp.local_part("hidden", hidden, shard_dim0=False)
        weight = vp.local_part("weight", weight, shard_dim0=True)
        bias = vp.local_part("bias", bias, shard_dim0=True)
        if vocab_start is not None:
            if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
                raise TypeError(f"vocab_start must be an int or None, got {vocab_start!r}")
            if vocab_start < 0:
                raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    _check_required(spec, per_token)
    val.check_linear_inputs(hidden, weight, bias)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    if bias is not None:
        bias = bias.contiguous()  # the kernels index the bias with unit stride
    compute_entropy = compute_entropy or spec.entropy_coef != 0.0  # the bonus needs H
    per_token_t = isinstance(temperature, torch.Tensor)
    if not per_token_t:
        val.check_scalar("temperature", temperature, low=0.0, low_open=True)
    if softcap is not None:
        val.check_scalar("softcap", softcap, low=0.0, low_open=True)
    val.check_reduction(reduction)
    val.check_filter_eps(filter_eps)
    dev = hidden.device
    width = hidden.shape[-1]
    lead = tuple(hidden.shape[:-1])
    h = hidden.reshape(-1, width)
    target = val.flatten_tokens("target", target, lead, dev, kind="index").contiguous()
    flat = {name: None if t is None else
            val.flatten_tokens(name, t, lead, dev).contiguous() for name, t in per_token.items()}
    mask_flat = None
    if mask is not None:
        mask_flat = (val.flatten_tokens("mask", mask, lead, dev, kind="mask") != 0).contiguous()
    temps = val.flatten_tokens("temperature", temperature, lead, dev) if per_token_t else None
    want = (h.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    want = tuple(w and torch.is_grad_enabled() for w in want)

    vocab, shard = weight.shape[0], None
    if call is not None:  # round 1: every rank's shard; every local check above has passed
        shard = call.shard(head=head, vocab=vocab, hidden_size=width, tokens=h.shape[0],
                           dtype=h.dtype, bias=bias is not None, vocab_start=vocab_start,
                           want=want,
                           validate=bool(validate), mode=mode,
                           workspace_bytes=workspace_bytes)
        vocab = shard.total
    eng = engine(impl, mode, dev, vocab if shard is None else shard.max_size,
                 filter_eps=filter_eps, deterministic=bool(deterministic),
                 workspace_bytes=workspace_bytes, shard=shard)

    checks = val.ValueChecks()
    if validate:
        if temps is not None:
            checks.positive("temperature", temps, mask_flat)
        checks.targets(target, vocab, mask_flat)
        checks.per_token_values(flat, unit_names, mask_flat)
        checks.finite_tensor("hidden", h)
        checks.finite_tensor("weight", weight)
        if bias is not None:
            checks.finite_tensor("bias", bias)
    # The number of counted tokens, read with the checks: then padded tokens are dropped
    # before any GEMM. Without validation it stays on the device (no synchronisation).
    count_slot = None
    if mask_flat is not None and (validate or not eng.takes_device_mask):
        count_slot = checks.value(mask_flat.sum())
    # Sharded: round 2 raises a failed check on every rank (and wants the same count, the
    # same targets and the same mask on every rank).
    if call is None or not validate:
        host = checks.run()
    else:
        host = call.value_checks(checks, count_slot,
                                 vp.agreement_checksums(checks, target, mask_flat))
    rows, device_mask, n_counted = None, None, h.shape[0]
    if mask_flat is not None:
        if count_slot is not None:
            n_counted = int(host[count_slot])
            rows = compact_rows(mask_flat, n_counted)
        else:
            device_mask, n_counted = mask_flat, mask_flat.sum()
    old, reward, rate, token_weights, ref = _head_inputs(flat)
    cap = None if softcap is None else float(softcap)
    if temps is None:
        scaling = LogitScaling(inv_temperature=1.0 / float(temperature), softcap=cap)
    else:  # 1 / T per token; padded tokens get 1 (their temperature may be anything)
        inv_t = 1.0 / temps.float()
        if mask_flat is not None:
            inv_t = torch.where(mask_flat, inv_t, torch.ones_like(inv_t))
        scaling = LogitScaling(softcap=cap, inv_temperature_t=inv_t.contiguous())
    # The engines pick their own precisions (fp32 logits, fp32 accumulation): no autocast.
    with torch.autocast(dev.type, enabled=False):
        if scalar_loss and reduction != "none" and eng.grads_in_forward and any(want):
            scale = _reduction_scale(n_counted, reduction, dev)
            loss, logp, entropy = FusedLinearScalarLoss.apply(
                h, weight, bias, target, rows, device_mask, old, reward, rate, token_weights,
                ref, spec, scaling, compute_entropy, eng, scale, want)
        else:
            loss_t, logp, entropy = FusedLinearHead.apply(
                h, weight, bias, target, rows, device_mask, old, reward, rate, token_weights,
                ref, spec, scaling, compute_entropy, eng)
            loss = _reduce(loss_t, n_counted, reduction, lead)
    return loss, logp.reshape(lead), entropy.reshape(lead)


@torch.compiler.disable
def fused_linear_nft_loss(hidden, weight, target, old_logprobs, rewards, correct_rate, mask=None,
                          *, bias=None, temperature=1.0, softcap=None, neg_weight=1.0,
                          normalize=1,
                          clip_negative=1.0, rate_clamp=(0.02, 0.98), max_log_ratio=10.0,
                          token_weights=None, ref_logprobs=None, beta=0.0, kl_estimator="k3",
                          kl_bias_correction=False, entropy_coef=0.0, reduction="sum",
                          filter_eps=None,
                          deterministic=False, impl="auto", mode="auto", workspace_bytes=None,
                          validate=True, return_stats=False, process_group=None,
                          vocab_start=None):
    """NFT loss (arXiv 2505.18116, Eq. 8) from final hidden states, never forming [N, V] logits.

    Per counted token: logp = log_softmax(cap(h W^T + b) / T)[target], with cap the logit
    soft-capping of Gemma 2/3, ``softcap`` c: z -> c tanh(z / c) (None: no cap);
    R = exp(min(logp - old, max_log_ratio)); r_hat = clamp(correct_rate, *rate_clamp);
    loss = w * (r * -log R + neg_weight * (1 - r) * -log max_st((1 - r_hat R)/(1 - r_hat), eps))
    with eps = clip_negative and w = 1, 1 - r_hat, sqrt((1 - r_hat)/r_hat) for normalize 0/1/2.
    ``neg_weight=0, normalize=0`` is RFT. ``token_weights`` ([...], >= 0) multiplies each token's
    loss and gradient (importance-sampling corrections, tool-output masks, an aggregation's
    per-token normalizer); "mean" still divides by the number of counted tokens.
    ``beta > 0`` adds beta * KL(pi || pi_ref) per token, estimated from ``ref_logprobs`` by
    ``kl_estimator``: "k1" (logp - ref), "k2" ((logp - ref)^2 / 2), "k3" (e^x - x - 1,
    x = ref - logp, clipped as verl's "low_var_kl": x to [-20, 20], the estimate to <= 10) or
    "k3_unclipped" (as TRL's and Liger's GRPO losses); verl's names "kl", "mse" and
    "low_var_kl" are accepted. ``kl_bias_correction=True`` multiplies the estimate by the
    token's ratio R (TRL's ``use_bias_correction_kl``, its default). ``entropy_coef`` c adds
    - c * H per token (H the entropy of the token's softmax; an entropy bonus for c > 0, at no
    cost when c = 0). Token weights multiply the KL and entropy terms too.

    ``mode``: ``"chunked"`` (what ``"auto"`` picks) runs vendor GEMMs on chunks of rows around
    one fused row kernel, with the gradients of a "sum" / "mean" loss computed in the forward;
    its fp32 logits workspace is at most ``workspace_bytes`` (default on CUDA 1/32 of the
    GPU's memory, 1 to 8 GiB; 128 MiB on CPU). ``"lean"`` runs the tile kernels (no
    workspace, logits recomputed in the backward). ``filter_eps`` (lean only) skips gradient
    tiles whose |onehot - p| < filter_eps (approximate); ``deterministic=True`` makes the lean
    backward atomic-free (the chunked mode is deterministic anyway). With
    ``return_stats=True`` also returns {"logprobs", "entropy"} per token (detached).

    Vocab-parallel LM head (``vocab_parallel.py``): ``weight`` (and ``bias``) may be this rank's
    rows of a head sharded over the vocabulary: give the tensor-parallel ``process_group``
    (shards in rank order, uneven ones allowed, or placed by ``vocab_start``, this shard's
    first vocabulary id), or pass a DTensor weight that is ``Shard(0)`` on one mesh dimension.
    ``hidden``, ``target`` and the per-token inputs are the same on every rank; the loss,
    log-probs and entropy come back the same on every rank, dW is the rank's own shard and
    dH is all-reduced over the group. ``target`` holds global vocabulary ids.
    """
    spec = _nft_spec(neg_weight, normalize, clip_negative, rate_clamp, max_log_ratio,
                     _kl_options(ref_logprobs, beta, kl_estimator,
                                 kl_bias_correction), entropy_coef)
    loss, logp, entropy = _fused(
        hidden, weight, target, mask, bias, temperature, spec,
        {"old_logprobs": old_logprobs, "rewards": rewards, "correct_rate": correct_rate,
         "token_weights": token_weights, **_per_token_ref(ref_logprobs, beta)},
        unit_names=("rewards", "correct_rate"), reduction=reduction, filter_eps=filter_eps,
        deterministic=deterministic, impl=impl, mode=mode, workspace_bytes=workspace_bytes,
        validate=validate, compute_entropy=return_stats, scalar_loss=True, softcap=softcap,
        process_group=process_group, vocab_start=vocab_start)
    if return_stats:
        return loss, {"logprobs": logp.detach(), "entropy": entropy.detach()}
    return loss


@torch.compiler.disable
def fused_linear_ppo_loss(hidden, weight, target, old_logprobs, advantages, mask=None, *,
                          bias=None, temperature=1.0, softcap=None, clip_low=0.2,
                          clip_high=0.2,
                          clip_ratio_c=None, max_log_ratio=10.0, token_weights=None,
                          ref_logprobs=None, beta=0.0, kl_estimator="k3",
                          kl_bias_correction=False, entropy_coef=0.0,
                          importance_sampling_level="token", sequence_ids=None,
                          reduction="sum", filter_eps=None, deterministic=False, impl="auto",
                          mode="auto", workspace_bytes=None, validate=True, return_stats=False,
                          process_group=None, vocab_start=None):
    """PPO-clip loss from hidden states: GRPO / Dr. GRPO (clip 0.2/0.2) and DAPO's
    clip-higher (``clip_high=0.28``), the paper's baselines, on the same kernels.

    loss = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)) per counted token, with the
    optional dual clip ``clip_ratio_c``. Token-level aggregation ("sum" then divide by a global
    token count, or "mean") is the caller's choice through ``reduction``. ``mode``, the KL
    term (``ref_logprobs``, ``beta``, ``kl_estimator``), ``entropy_coef`` and the other options
    as in ``fused_linear_nft_loss``, the vocab-parallel head (``process_group``, ``vocab_start``
    or a DTensor weight) included.

    ``importance_sampling_level="sequence"`` (GSPO) replaces each token's ratio by its
    response's, exp(mean of logp - old over the response's counted tokens), with
    ``sequence_ids`` ([...] integers, equal within a response) saying which tokens form a
    response; the loss stays per token, as in TRL and Liger. A response's ratio needs all its
    tokens, so this path runs the fused log-probs (logits recomputed in the backward, 8NHV)
    and the head on them by autograd.
    """
    spec = _ppo_spec(clip_low, clip_high, clip_ratio_c, max_log_ratio,
                     _kl_options(ref_logprobs, beta, kl_estimator,
                                 kl_bias_correction), entropy_coef)
    if _sequence_level(importance_sampling_level, sequence_ids):
        return _sequence_ppo(hidden, weight, target, old_logprobs, advantages, mask,
                             sequence_ids, spec, ref_logprobs=ref_logprobs,
                             token_weights=token_weights, bias=bias, temperature=temperature,
                             softcap=softcap, reduction=reduction, impl=impl, mode=mode,
                             workspace_bytes=workspace_bytes, validate=validate,
                             deterministic=deterministic, filter_eps=filter_eps,
                             return_stats=return_stats, process_group=process_group,
                             vocab_start=vocab_start)
    loss, logp, entropy = _fused(
        hidden, weight, target, mask, bias, temperature, spec,
        {"old_logprobs": old_logprobs, "advantages": advantages, "correct_rate": None,
         "token_weights": token_weights, **_per_token_ref(ref_logprobs, beta)},
        unit_names=(), reduction=reduction, filter_eps=filter_eps, deterministic=deterministic,
        impl=impl, mode=mode, workspace_bytes=workspace_bytes, validate=validate,
        compute_entropy=return_stats, scalar_loss=True, softcap=softcap,
        process_group=process_group, vocab_start=vocab_start)
    if return_stats:
        return loss, {"logprobs": logp.detach(), "entropy": entropy.detach()}
    return loss


def _sequence_level(level, sequence_ids) -> bool:
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                         f"{level!r}")
    if level == "sequence" and sequence_ids is None:
        raise ValueError("sequence_ids is required with importance_sampling_level='sequence' "
                         "(one integer per token, equal within a response)")
    return level == "sequence"


def _sequence_index(sequence_ids, lead, device):
    """[N] int64 indices in [0, S) of the responses, and S (one host synchronisation)."""
    ids = val.flatten_tokens("sequence_ids", sequence_ids, lead, device, kind="index")
    unique, index = torch.unique(ids, return_inverse=True)
    return index.reshape(-1), unique.numel()


def _sequence_ppo(hidden, weight, target, old, advantages, mask, sequence_ids, spec, *,
                  ref_logprobs, token_weights, bias, temperature, reduction, impl, mode,
                  softcap=None,
                  workspace_bytes, validate, deterministic, filter_eps, return_stats,
                  logprobs=None, process_group=None, vocab_start=None):
    """GSPO: the fused (or given) log-probs, then ``heads.sequence_ppo_loss`` by autograd.
    With ``logprobs`` given (``ppo_clip_loss``) no hidden states are needed."""
    val.check_reduction(reduction)
    if filter_eps is not None:
        raise ValueError("filter_eps does not apply with importance_sampling_level='sequence'")
    entropy = None
    if logprobs is None:
        want_entropy = return_stats or spec.entropy_coef != 0.0
        out = fused_linear_logprobs(hidden, weight, target, bias=bias, temperature=temperature,
                                    softcap=softcap, return_entropy=want_entropy, mask=mask,
                                    impl=impl, mode=mode, workspace_bytes=workspace_bytes,
                                    validate=validate, deterministic=deterministic,
                                    process_group=process_group, vocab_start=vocab_start)
        logp, entropy = out if want_entropy else (out, None)
    else:
        logp = logprobs
    lead = tuple(logp.shape)
    dev = logp.device
    # With a vocab-sharded weight the fused log-probs took collectives and the backward will
    # take more: the checks of the head's inputs end in one agreement round, so that an error
    # on one rank is raised on all of them (always: a shape error would otherwise strand the
    # others in the backward's all-reduce).
    group = None if logprobs is not None else vp.tensor_parallel_group(weight, process_group)
    call = None if group is None else vp.GroupCall(group)
    with vp.agreement(call):
        names = {"old_logprobs": old, "advantages": advantages, "token_weights": token_weights,
                 **_per_token_ref(ref_logprobs, spec.beta)}
        _check_required(spec, names)
        flat = {name: None if t is None else val.flatten_tokens(name, t, lead, dev)
                for name, t in names.items()}
        counted = torch.ones(logp.numel(), dtype=torch.bool, device=dev)
        if mask is not None:
            counted = val.flatten_tokens("mask", mask, lead, dev, kind="mask") != 0
        index, n_seq = _sequence_index(sequence_ids, lead, dev)
        checks = val.ValueChecks()
        if validate:
            if logprobs is not None:
                checks.no_nan("logprobs", logp.reshape(-1), counted)
            checks.per_token_values(flat, (), counted)
        if call is None:
            checks.run()
        else:
            call.value_checks(checks, None)
    # As on the token-level path: padded tokens are never read (whatever they hold: NaN
    # included, which autograd would otherwise carry into a response's mean through 0 * NaN),
    # and the per-token inputs are constants (no gradient flows to them).
    keep = lambda t: None if t is None else torch.where(  # noqa: E731
        counted, t.detach().float(), torch.zeros((), dtype=torch.float32, device=dev))
    flat = {name: keep(t) for name, t in flat.items()}
    logp_flat = torch.where(counted, logp.reshape(-1).float(), 0.0)
    loss_t = sequence_ppo_loss(logp_flat, flat["old_logprobs"], flat["advantages"], index,
                               n_seq, counted, spec, ref=flat["ref_logprobs"])
    if entropy is not None and spec.entropy_coef != 0.0:
        loss_t = loss_t - spec.entropy_coef * torch.where(counted, entropy.reshape(-1),
                                                          torch.zeros_like(loss_t))
    if flat["token_weights"] is not None:
        loss_t = loss_t * flat["token_weights"]
    n_counted = counted.sum() if mask is not None else logp.numel()
    loss = _reduce(loss_t, n_counted, reduction, lead)
    if return_stats:
        return loss, {"logprobs": logp.detach(),
                      "entropy": entropy.detach() if entropy is not None else None}
    return loss


@torch.compiler.disable
def fused_linear_logprobs(hidden, weight, target, *, bias=None, temperature=1.0, softcap=None,
                          return_entropy=False, mask=None, impl="auto", mode="auto",
                          workspace_bytes=None, validate=True, deterministic=False,
                          process_group=None, vocab_start=None):
    """fp32 log pi(target) = log_softmax(cap(h W^T + b) / T)[target] per token (cap: the
    ``softcap`` soft-capping, when given), differentiable
    (and the per-token entropy of the softmax, also differentiable, with return_entropy).

    Under ``torch.no_grad()`` this is how a trainer recomputes old log-probs with the same
    kernel as the loss, so that on-policy R is exactly 1 (use the same ``mode`` and
    ``workspace_bytes`` as the loss for bit-identical values). Masked tokens return 0.
    A vocab-sharded weight (``process_group``, ``vocab_start``, or a DTensor weight) as in
    ``fused_linear_nft_loss``.
    """
    loss, logp, entropy = _fused(
        hidden, weight, target, mask, bias, temperature, HeadSpec(kind="none"), {},
        unit_names=(), reduction="none", filter_eps=None, deterministic=deterministic,
        impl=impl, mode=mode, workspace_bytes=workspace_bytes, validate=validate,
        compute_entropy=return_entropy, scalar_loss=False, softcap=softcap,
        process_group=process_group, vocab_start=vocab_start)
    del loss
    return (logp, entropy) if return_entropy else logp


def _on_logprobs(logprobs, spec, per_token, mask, reduction, impl, validate, unit_names):
    _check_required(spec, per_token)
    val.check_reduction(reduction)
    val.check_float_tensor("logprobs", logprobs, getattr(logprobs, "device", None))
    lead = tuple(logprobs.shape)
    dev = logprobs.device
    flat = {name: val.flatten_tokens(name, t, lead, dev).contiguous()
            for name, t in per_token.items() if t is not None}
    mask_flat = None
    if mask is not None:
        mask_flat = (val.flatten_tokens("mask", mask, lead, dev, kind="mask") != 0).contiguous()
    logp = logprobs.reshape(-1).contiguous()
    if validate:
        checks = val.ValueChecks()
        checks.no_nan("logprobs", logp, mask_flat)
        checks.per_token_values(flat, unit_names, mask_flat)
        checks.run()
    backend = head_module(impl, dev)
    loss_t = LossHead.apply(logp, *_head_inputs(flat), mask_flat, spec, backend)
    n_counted = logp.numel() if mask_flat is None else mask_flat.sum()
    return _reduce(loss_t, n_counted, reduction, lead)


@torch.compiler.disable
def nft_loss(logprobs, old_logprobs, rewards, correct_rate, mask=None, *, neg_weight=1.0,
             normalize=1, clip_negative=1.0, rate_clamp=(0.02, 0.98), max_log_ratio=10.0,
             token_weights=None, ref_logprobs=None, beta=0.0, kl_estimator="k3",
             kl_bias_correction=False, reduction="sum", impl="auto", validate=True):
    """The NFT loss of ``fused_linear_nft_loss`` on log-probs the caller already has
    (differentiable w.r.t. ``logprobs``)."""
    spec = _nft_spec(neg_weight, normalize, clip_negative, rate_clamp, max_log_ratio,
                     _kl_options(ref_logprobs, beta, kl_estimator,
                                 kl_bias_correction))
    return _on_logprobs(logprobs, spec, {"old_logprobs": old_logprobs, "rewards": rewards,
                                         "correct_rate": correct_rate,
                                         "token_weights": token_weights,
                                         **_per_token_ref(ref_logprobs, beta)},
                        mask, reduction, impl, validate, ("rewards", "correct_rate"))


@torch.compiler.disable
def ppo_clip_loss(logprobs, old_logprobs, advantages, mask=None, *, clip_low=0.2, clip_high=0.2,
                  clip_ratio_c=None, max_log_ratio=10.0, token_weights=None,
                  ref_logprobs=None, beta=0.0, kl_estimator="k3", kl_bias_correction=False,
                  importance_sampling_level="token", sequence_ids=None, reduction="sum",
                  impl="auto", validate=True):
    """The PPO-clip loss of ``fused_linear_ppo_loss`` on given log-probs (GSPO's
    ``importance_sampling_level="sequence"`` included)."""
    spec = _ppo_spec(clip_low, clip_high, clip_ratio_c, max_log_ratio,
                     _kl_options(ref_logprobs, beta, kl_estimator,
                                 kl_bias_correction))
    if _sequence_level(importance_sampling_level, sequence_ids):
        val.check_float_tensor("logprobs", logprobs, getattr(logprobs, "device", None))
        return _sequence_ppo(None, None, None, old_logprobs, advantages, mask, sequence_ids,
                             spec, ref_logprobs=ref_logprobs, token_weights=token_weights,
                             bias=None, temperature=1.0, reduction=reduction, impl=impl,
                             mode="auto", workspace_bytes=None, validate=validate,
                             deterministic=False, filter_eps=None, return_stats=False,
                             logprobs=logprobs)
    return _on_logprobs(logprobs, spec, {"old_logprobs": old_logprobs, "advantages": advantages,
                                         "token_weights": token_weights,
                                         **_per_token_ref(ref_logprobs, beta)},
                        mask, reduction, impl, validate, ())
