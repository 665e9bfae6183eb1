"""The public functions: fused LM head + loss, and the same losses on given log-probs.

Shapes: ``hidden`` is [..., H] and every per-token argument has the leading shape [...] (a
flat [N, H] with [N] targets is the usual case). ``weight`` is [V, H] (``lm_head.weight``).
Losses and log-probs come back in fp32.

Each public function states its options and then: checks them into a ``HeadSpec`` and
``CallOptions`` (``validation.py``), prepares its tensors (``validation.prepare_fused``: every
refusal is raised there), plans the engine and the rows (``backend.py``), and runs the
autograd Function (``autograd.py``). GSPO's sequence-level head lives in ``gspo.py``; the
vocab-parallel head's layout and agreement rounds in ``vocab_parallel.py``.
"""

from __future__ import annotations

import dataclasses

import torch

from . import gspo
from . import validation as val
from . import vocab_parallel as vp
from .autograd import FusedLinearHead, FusedLinearScalarLoss, LossHead
from .backend import engine, head_module, row_plan
from .heads import (HeadSpec, check_loss_per_token, kl_penalty, reduce_loss,
                    reduction_scale)


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
    options = _call_options(locals(), compute_entropy=return_stats, scalar_loss=True)
    spec = val.nft_head(neg_weight=neg_weight, normalize=normalize,
                        clip_negative=clip_negative, rate_clamp=rate_clamp,
                        max_log_ratio=max_log_ratio, ref_logprobs=ref_logprobs, beta=beta,
                        kl_estimator=kl_estimator, kl_bias_correction=kl_bias_correction,
                        entropy_coef=entropy_coef)
    named = val.named_token_inputs(spec, old_logprobs=old_logprobs, rewards=rewards,
                                   correct_rate=correct_rate, token_weights=token_weights,
                                   ref_logprobs=ref_logprobs)
    loss, logp, entropy = _fused(hidden, weight, target, mask, bias, spec, named, options)
    return _with_stats(loss, logp, entropy, return_stats)


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
    options = _call_options(locals(), compute_entropy=return_stats, scalar_loss=True)
    spec = val.ppo_head(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
                        max_log_ratio=max_log_ratio, ref_logprobs=ref_logprobs, beta=beta,
                        kl_estimator=kl_estimator, kl_bias_correction=kl_bias_correction,
                        entropy_coef=entropy_coef)
    named = val.named_token_inputs(spec, old_logprobs=old_logprobs, advantages=advantages,
                                   token_weights=token_weights, ref_logprobs=ref_logprobs)
    if val.sequence_level(importance_sampling_level, sequence_ids, options.filter_eps):
        return _fused_gspo(hidden, weight, target, mask, bias, spec, named, sequence_ids,
                           options, return_stats)
    loss, logp, entropy = _fused(hidden, weight, target, mask, bias, spec, named, options)
    return _with_stats(loss, logp, entropy, return_stats)


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
    options = _call_options(locals(), reduction="none", compute_entropy=bool(return_entropy),
                            scalar_loss=False)
    _, logp, entropy = _fused(hidden, weight, target, mask, bias, HeadSpec(kind="none"), {},
                              options)
    return (logp, entropy) if return_entropy else logp


@torch.compiler.disable
def nft_loss(logprobs, old_logprobs, rewards, correct_rate, mask=None, *, neg_weight=1.0,
             normalize=1, clip_negative=1.0, rate_clamp=(0.02, 0.98), max_log_ratio=10.0,
             token_weights=None, ref_logprobs=None, beta=0.0, kl_estimator="k3",
             kl_bias_correction=False, reduction="sum", impl="auto", validate=True):
    """The NFT loss of ``fused_linear_nft_loss`` on log-probs the caller already has
    (differentiable w.r.t. ``logprobs``)."""
    spec = val.nft_head(neg_weight=neg_weight, normalize=normalize,
                        clip_negative=clip_negative, rate_clamp=rate_clamp,
                        max_log_ratio=max_log_ratio, ref_logprobs=ref_logprobs, beta=beta,
                        kl_estimator=kl_estimator, kl_bias_correction=kl_bias_correction)
    named = val.named_token_inputs(spec, old_logprobs=old_logprobs, rewards=rewards,
                                   correct_rate=correct_rate, token_weights=token_weights,
                                   ref_logprobs=ref_logprobs)
    return _on_logprobs(logprobs, spec, named, mask, reduction, impl, validate)


@torch.compiler.disable
def ppo_clip_loss(logprobs, old_logprobs, advantages, mask=None, *, clip_low=0.2, clip_high=0.2,
                  clip_ratio_c=None, max_log_ratio=10.0, token_weights=None,
                  ref_logprobs=None, beta=0.0, kl_estimator="k3", kl_bias_correction=False,
                  importance_sampling_level="token", sequence_ids=None, reduction="sum",
                  impl="auto", validate=True):
    """The PPO-clip loss of ``fused_linear_ppo_loss`` on given log-probs (GSPO's
    ``importance_sampling_level="sequence"`` included)."""
    spec = val.ppo_head(clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
                        max_log_ratio=max_log_ratio, ref_logprobs=ref_logprobs, beta=beta,
                        kl_estimator=kl_estimator, kl_bias_correction=kl_bias_correction)
    named = val.named_token_inputs(spec, old_logprobs=old_logprobs, advantages=advantages,
                                   token_weights=token_weights, ref_logprobs=ref_logprobs)
    if val.sequence_level(importance_sampling_level, sequence_ids):
        val.check_reduction(reduction)
        val.check_float_tensor("logprobs", logprobs, getattr(logprobs, "device", None))
        return gspo.sequence_ppo(logprobs, None, named, mask, sequence_ids, spec,
                                 reduction=reduction, validate=validate, check_logprobs=True)
    return _on_logprobs(logprobs, spec, named, mask, reduction, impl, validate)


@torch.compiler.disable
def fused_linear_policy_loss(hidden, weight, target, loss_fn, mask=None, *, per_token=None,
                             bias=None, temperature=1.0, softcap=None, token_weights=None,
                             ref_logprobs=None, beta=0.0, kl_estimator="k3",
                             kl_bias_correction=False, entropy_coef=0.0, reduction="sum",
                             filter_eps=None, deterministic=False, impl="auto", mode="auto",
                             workspace_bytes=None, validate=True, return_stats=False,
                             process_group=None, vocab_start=None):
    """Any per-token policy loss, fused with the LM head: ``loss_fn(logp, **per_token)``.

    ``loss_fn`` is a plain torch function of the tokens' log-probs (fp32 [n]) and the
    per-token tensors of ``per_token`` (name -> [...] tensor, handed to it as [n] fp32 by
    name: old log-probs, advantages, rewards, anything), returning one loss per token [n].
    Its derivative g = d loss_t / d logp_t is taken by autograd on that O(n) function inside
    each chunk of rows, and dz = g (onehot - p) / T is formed in the same fused pass: a "sum"
    or "mean" loss keeps its gradients in the forward (6NHV) in the chunked mode, as the
    built-in heads do. ``nft_kernels.losses`` builds CISPO, SAPO and W-REINFORCE / NSR this
    way.

    Each token's loss must read only its own log-prob and inputs (checked with
    ``validate=True``: every other row of a chunk is evaluated again alone, and the losses and
    gradients must be finite on counted tokens; these checks read back once per chunk,
    ``validate=False`` skips them and synchronises nowhere). For sequence-level losses (a response's
    mean ratio, GSPO-like) take ``fused_linear_logprobs`` and ``policy_loss(...,
    token_level=False)``: the logits are then recomputed in the backward (8NHV).

    The other options are those of ``fused_linear_nft_loss``: temperature, soft cap, bias,
    mask, ``token_weights`` (multiply each token's loss and gradient), the KL term
    (``ref_logprobs``, ``beta``, ``kl_estimator``; ``kl_bias_correction`` reads
    ``per_token["old_logprobs"]``), ``entropy_coef``, both modes, the vocab-parallel head.
    Inputs in ``per_token`` are checked finite on counted tokens (``old_logprobs`` as
    log-probs: -inf allowed).
    """
    options = _call_options(locals(), compute_entropy=return_stats, scalar_loss=True)
    spec = val.custom_head(loss_fn, per_token=per_token or {}, ref_logprobs=ref_logprobs,
                           beta=beta, kl_estimator=kl_estimator,
                           kl_bias_correction=kl_bias_correction, entropy_coef=entropy_coef,
                           validate=validate)
    named = val.custom_token_inputs(spec, per_token, token_weights=token_weights,
                                    ref_logprobs=ref_logprobs)
    loss, logp, entropy = _fused(hidden, weight, target, mask, bias, spec, named, options)
    return _with_stats(loss, logp, entropy, return_stats)


@torch.compiler.disable
def policy_loss(logprobs, loss_fn, mask=None, *, per_token=None, token_weights=None,
                ref_logprobs=None, beta=0.0, kl_estimator="k3", kl_bias_correction=False,
                token_level=True, reduction="sum", validate=True):
    """``fused_linear_policy_loss``'s loss on log-probs the caller already has
    (differentiable w.r.t. ``logprobs``).

    ``token_level=True``: each token's loss reads only its own inputs (checked), and its
    gradient is taken per token, as on the fused path. ``token_level=False``: ``loss_fn``
    may read every token (a sequence- or batch-level loss: it gets all n tokens of the call,
    padded ones included, with ``per_token`` and a ``mask`` [n] bool keyword when a mask is
    given) and is differentiated by autograd as written; the KL term and token weights
    apply per token as usual."""
    spec = val.custom_head(loss_fn, per_token=per_token or {}, ref_logprobs=ref_logprobs,
                           beta=beta, kl_estimator=kl_estimator,
                           kl_bias_correction=kl_bias_correction, validate=validate)
    named = val.custom_token_inputs(spec, per_token, token_weights=token_weights,
                                    ref_logprobs=ref_logprobs)
    if not isinstance(token_level, bool):
        raise TypeError(f"token_level must be a bool, got {token_level!r}")
    if token_level:
        return _on_logprobs(logprobs, spec, named, mask, reduction, "torch", validate)
    return _whole_call_loss(logprobs, spec, named, mask, reduction, validate)


# ---- the fused path ------------------------------------------------------------------------
_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(val.CallOptions))


def _call_options(arguments: dict, **fixed) -> val.CallOptions:
    """``CallOptions`` from a public function's arguments (its ``locals()`` on entry), by
    field name; ``fixed``: the fields the function decides itself."""
    return val.CallOptions(**{k: v for k, v in arguments.items() if k in _OPTION_NAMES},
                           **fixed)


def _with_stats(loss, logp, entropy, return_stats):
    if return_stats:
        return loss, {"logprobs": logp.detach(),
                      "entropy": None if entropy is None else entropy.detach()}
    return loss


def _fused(hidden, weight, target, mask, bias, spec: HeadSpec, named: dict,
           options: val.CallOptions):
    """(loss, logp, entropy) of one fused call. With a vocab-sharded weight (a
    ``process_group``, or a DTensor weight) the call's checks run as agreement rounds across
    the group (``vocab_parallel.agreement``): bad input on one rank raises on all."""
    group = vp.tensor_parallel_group(weight, options.process_group)
    val.check_vocab_start(options.vocab_start, sharded=group is not None)
    call = None if group is None else vp.GroupCall(group)
    with vp.agreement(call):
        return _fused_on_rank(hidden, weight, target, mask, bias, spec, named, options, call)


def _fused_on_rank(hidden, weight, target, mask, bias, spec: HeadSpec, named: dict,
                   options: val.CallOptions, call):
    """One rank's part of a fused call (``call``: the ``vocab_parallel.GroupCall`` when
    ``weight`` is this rank's vocabulary shard).

    Host synchronisations: with ``validate=True`` one per call (every value check and the
    number of counted tokens read back together); with ``validate=False`` none (a mask then
    stays on the device: padded tokens go through the GEMMs with zero gradient instead of
    being dropped before them; only the lean PyTorch path, a CPU fallback, compacts them on
    the host)."""
    head, shard = None, None
    if call is not None:  # DTensors -> this rank's tensors (gradients flow back to them)
        head = vp.head_identity(weight)
        hidden, weight, bias = vp.local_parts(hidden, weight, bias)
    prepared = val.prepare_fused(hidden, weight, target, mask, bias, named, options)
    h, weight, bias = prepared.hidden, prepared.weight, prepared.bias
    dev, vocab = h.device, weight.shape[0]
    if call is not None:  # round 1: every rank's shard; every local check above has passed
        shard = call.shard(head=head, vocab=vocab, hidden_size=h.shape[1], tokens=h.shape[0],
                           dtype=h.dtype, bias=bias is not None,
                           vocab_start=options.vocab_start, want=prepared.want,
                           validate=options.validate, mode=options.mode,
                           workspace_bytes=options.workspace_bytes)
        vocab = shard.total
    eng = engine(options.impl, options.mode, dev, vocab if shard is None else shard.max_size,
                 filter_eps=options.filter_eps, deterministic=options.deterministic,
                 workspace_bytes=options.workspace_bytes, shard=shard)
    # The value checks, with the number of counted tokens (then padded tokens are dropped
    # before any GEMM); without validation the count stays on the device (no
    # synchronisation). Sharded: round 2 raises a failed check on every rank.
    counted = val.read_back(
        prepared, vocab, spec, validate=options.validate,
        count=options.validate or not eng.takes_device_mask, group=call,
        checksums=None if call is None else vp.agreement_checksums)
    compute_entropy = options.compute_entropy or spec.entropy_coef != 0.0  # the bonus needs H
    plan = row_plan(prepared, counted, temperature=options.temperature,
                    softcap=options.softcap, compute_entropy=compute_entropy)
    n_counted = h.shape[0] if prepared.mask is None else (
        counted if counted is not None else prepared.mask.sum())
    inputs = val.token_inputs(prepared.named, spec)
    # The engines pick their own precisions (fp32 logits, fp32 accumulation): no autocast.
    with torch.autocast(dev.type, enabled=False):
        if (options.scalar_loss and options.reduction != "none" and eng.grads_in_forward
                and any(prepared.want)):
            scale = reduction_scale(n_counted, options.reduction, dev)
            loss, logp, entropy = FusedLinearScalarLoss.apply(
                h, weight, bias, plan, inputs, spec, eng, scale, prepared.want)
        else:
            loss_t, logp, entropy = FusedLinearHead.apply(h, weight, bias, plan, inputs, spec,
                                                          eng)
            loss = reduce_loss(loss_t, n_counted, options.reduction, prepared.lead)
    return loss, logp.reshape(prepared.lead), entropy.reshape(prepared.lead)


def _fused_gspo(hidden, weight, target, mask, bias, spec: HeadSpec, named: dict, sequence_ids,
                options: val.CallOptions, return_stats: bool):
    """GSPO on hidden states: the fused log-probs (and entropy for the bonus or the stats),
    then ``gspo.sequence_ppo`` on them."""
    want_entropy = return_stats or spec.entropy_coef != 0.0
    out = fused_linear_logprobs(
        hidden, weight, target, bias=bias, temperature=options.temperature,
        softcap=options.softcap, return_entropy=want_entropy, mask=mask, impl=options.impl,
        mode=options.mode, workspace_bytes=options.workspace_bytes, validate=options.validate,
        deterministic=options.deterministic, process_group=options.process_group,
        vocab_start=options.vocab_start)
    logp, entropy = out if want_entropy else (out, None)
    group = vp.tensor_parallel_group(weight, options.process_group)
    loss = gspo.sequence_ppo(logp, entropy, named, mask, sequence_ids, spec,
                             reduction=options.reduction, validate=options.validate,
                             check_logprobs=False,
                             call=None if group is None else vp.GroupCall(group))
    return _with_stats(loss, logp, entropy, return_stats)


# ---- a head on given log-probs -------------------------------------------------------------
def _on_logprobs(logprobs, spec: HeadSpec, named: dict, mask, reduction, impl, validate):
    val.check_reduction(reduction)
    logp, flat, mask_flat = val.check_logprob_inputs(logprobs, named, mask, validate, spec)
    backend = head_module(impl, logp.device, spec)
    loss_t = LossHead.apply(logp, val.token_inputs(flat, spec), mask_flat, spec, backend)
    n_counted = logp.numel() if mask_flat is None else mask_flat.sum()
    return reduce_loss(loss_t, n_counted, reduction, tuple(logprobs.shape))


def _whole_call_loss(logprobs, spec: HeadSpec, named: dict, mask, reduction, validate):
    """A user-defined loss that reads every token (``policy_loss(..., token_level=False)``),
    differentiated by autograd as written; KL and token weights per token."""
    val.check_reduction(reduction)
    logp, flat, mask_flat = val.check_logprob_inputs(logprobs, named, mask, validate, spec)
    inputs = val.token_inputs(flat, spec).as_float()
    extra = {} if mask_flat is None else {"mask": mask_flat}
    loss_t = spec.loss_fn(logp.float(), **inputs.named, **extra)
    check_loss_per_token(loss_t, logp)
    loss_t = loss_t.float()
    if spec.kl_code:
        log_ratio = logp.float() - inputs.old_logprobs if spec.kl_bias_correction else None
        loss_t = loss_t + kl_penalty(spec, logp.float(), inputs.ref_logprobs, log_ratio)
    if inputs.token_weights is not None:
        loss_t = loss_t * inputs.token_weights
    if mask_flat is not None:
        loss_t = torch.where(mask_flat, loss_t, torch.zeros_like(loss_t))
    n_counted = logp.numel() if mask_flat is None else mask_flat.sum()
    return reduce_loss(loss_t, n_counted, reduction, tuple(logprobs.shape))
