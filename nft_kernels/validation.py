"""Input validation: every bad argument fails here with its name, never inside a kernel.

The one room for refusals. Options are checked as they become a ``HeadSpec`` (``nft_head``,
``ppo_head``) or ``CallOptions``; tensors as ``prepare_fused`` flattens them (shapes, dtypes,
devices: cheap, always). Value checks (ranges, finiteness, target ids) read the data: they run
on the device and are read back together, one synchronisation with the GPU per call
(``ValueChecks``, ``read_back``); ``validate=False`` skips them. With a vocab-sharded weight
the same checks end in agreement rounds (``vocab_parallel.GroupCall``), which raise a failure
of any rank on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .heads import KL_ALIASES, KL_ESTIMATORS, HeadSpec
from .inputs import TokenInputs

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "sum", "mean")
IMPLS = ("auto", "triton", "torch")
MODES = ("auto", "chunked", "lean")


def _require_tensor(name, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_required(tensors: dict) -> None:
    """Per-token inputs a head cannot do without: None is refused with the argument's name
    (never a placeholder buffer read as data)."""
    for name, value in tensors.items():
        if value is None:
            raise TypeError(f"{name} is required (a tensor with one value per token), got None")


def check_float_tensor(name, value, device, shape=None):
    _require_tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {device}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")


def check_scalar(name, value, *, low=None, high=None, low_open=False, integer_choices=None):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if integer_choices is not None:
        if value not in integer_choices:
            raise ValueError(f"{name} must be one of {integer_choices}, got {value!r}")
        return
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_rate_clamp(rate_clamp):
    try:
        lo, hi = (float(v) for v in rate_clamp)
    except (TypeError, ValueError):
        raise TypeError(f"rate_clamp must be a pair (low, high), got {rate_clamp!r}") from None
    if not (0.0 < lo <= hi < 1.0):
        raise ValueError(f"rate_clamp must satisfy 0 < low <= high < 1, got {rate_clamp!r}")
    return lo, hi


def check_filter_eps(filter_eps):
    if filter_eps is not None:
        check_scalar("filter_eps", filter_eps, low=0.0)


def flatten_tokens(name, value, lead_shape, device, *, kind="float"):
    """Per-token tensor of shape ``lead_shape`` -> [N]."""
    _require_tensor(name, value)
    if tuple(value.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (one value per token), "
                         f"got {tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but hidden is on {device}")
    if kind == "float" and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if kind == "index" and value.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got dtype {value.dtype}")
    if kind == "mask" and (value.is_floating_point() or value.is_complex()):
        raise TypeError(f"{name} must be a bool (or integer) tensor, got dtype {value.dtype}")
    return value.reshape(-1)


class ValueChecks:
    """Value checks of one call, read back together: each check leaves a 0-d device tensor
    that is nonzero when it failed, and ``run`` copies them all to the host at once (one
    synchronisation per call however many checks there are), then raises the first failure
    with its message (details such as counts are computed only then). ``value`` adds other
    scalars to the same transfer (the number of counted tokens)."""

    def __init__(self):
        self._failed, self._explain, self._values = [], [], []

    def add(self, failed: torch.Tensor, explain) -> None:
        self._failed.append(failed.reshape(()).to(torch.float64))
        self._explain.append(explain)

    def value(self, scalar: torch.Tensor) -> int:
        self._values.append(scalar.reshape(()).to(torch.float64))
        return len(self._values) - 1

    def run(self) -> list[float]:
        failure, values = self.collect()
        if failure is not None:
            raise ValueError(failure)
        return values

    def collect(self) -> tuple[str | None, list[float]]:
        """(the first failure's message or None, the added values), without raising."""
        everything = self._failed + self._values
        if not everything:
            return None, []
        host = torch.stack(everything).tolist()
        for failed, explain in zip(host, self._explain):
            if failed:
                return explain(), host[len(self._failed):]
        return None, host[len(self._failed):]

    # -- the checks --------------------------------------------------------------------------
    def finite_tensor(self, name, value):
        """NaN or Inf anywhere in a (large) tensor: the inf-norm is finite iff every element is,
        and is computed without a temporary of the tensor's size."""
        if value.numel() == 0:
            return
        norm = torch.linalg.vector_norm(value.detach(), ord=float("inf"), dtype=torch.float32)
        self.add(~torch.isfinite(norm), lambda: _finite_message(name, value, None))

    def finite(self, name, value, where=None):
        bad = _masked(~torch.isfinite(value), where)
        self.add(bad.any(), lambda: _finite_message(name, value, where))

    def no_nan(self, name, value, where=None):
        bad = _masked(torch.isnan(value), where)
        self.add(bad.any(), lambda: f"{name} contains NaN values "
                                    f"({int(bad.sum())} of {value.numel()})")

    def unit_interval(self, name, value, where=None):
        bad = _masked(~((value >= 0) & (value <= 1)), where)  # NaN fails too

        def explain():
            first = value[bad][0].item()
            return (f"{name} must lie in [0, 1] on counted tokens; found {first!r} "
                    f"({int(bad.sum())} values outside)")
        self.add(bad.any(), explain)

    def per_token_values(self, tensors, unit_names, where):
        """Per-token inputs on counted tokens: rewards / rates in [0, 1], old log-probs not
        NaN or +inf (-inf is a valid log-prob), token weights finite and >= 0, anything else
        (advantages, reference log-probs) finite."""
        for name, value in tensors.items():
            if value is None:
                continue
            if name in unit_names:
                self.unit_interval(name, value, where)
            elif name == "old_logprobs":
                self.log_probability(name, value, where)
            elif name == "token_weights":
                self.nonnegative(name, value, where)
            else:
                self.finite(name, value, where)

    def log_probability(self, name, value, where=None):
        """A log-probability: <= 0 up to rounding and never NaN; -inf (probability 0) is
        valid, +inf is not (it would make R = 0 and the NFT loss NaN)."""
        bad = _masked(torch.isnan(value) | (value == float("inf")), where)

        def explain():
            first = value[bad][0].item()
            return (f"{name} must be log-probabilities (not NaN or +inf) on counted tokens; "
                    f"found {first!r} ({int(bad.sum())} values)")
        self.add(bad.any(), explain)

    def positive(self, name, value, where=None):
        bad = _masked(~(torch.isfinite(value) & (value > 0)), where)

        def explain():
            first = value[bad][0].item()
            return (f"{name} must be finite and > 0 on counted tokens; found {first!r} "
                    f"({int(bad.sum())} values)")
        self.add(bad.any(), explain)

    def nonnegative(self, name, value, where=None):
        bad = _masked(~(torch.isfinite(value) & (value >= 0)), where)

        def explain():
            first = value[bad][0].item()
            return (f"{name} must be finite and >= 0 on counted tokens; found {first!r} "
                    f"({int(bad.sum())} values)")
        self.add(bad.any(), explain)

    def targets(self, target, vocab, where):
        bad = _masked((target < 0) | (target >= vocab), where)

        def explain():
            first = target[bad][0].item()
            return (f"target must lie in [0, {vocab}) on counted tokens; found {first} "
                    f"({int(bad.sum())} ids outside)")
        self.add(bad.any(), explain)


def _masked(bad, where):
    return bad if where is None else bad & where


def _finite_message(name, value, where):
    bad = _masked(~torch.isfinite(value), where)
    return f"{name} contains NaN or Inf values ({int(bad.sum())} of {value.numel()})"


def check_linear_inputs(hidden, weight, bias):
    """hidden [..., H], weight [V, H] of the same float dtype and device; bias [V]."""
    _require_tensor("hidden", hidden)
    _require_tensor("weight", weight)
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, float16 or bfloat16, got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., H], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, H], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden has H={hidden.shape[-1]} but weight has shape "
                         f"{tuple(weight.shape)} (expected [V, {hidden.shape[-1]}])")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (V >= 1)")
    if bias is not None:
        check_float_tensor("bias", bias, hidden.device, shape=(weight.shape[0],))
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match weight dtype "
                            f"{weight.dtype} (cast it as nn.Linear would need)")


# ---- options -> HeadSpec / CallOptions ---------------------------------------------------
def _kl_fields(ref_logprobs, beta, kl_estimator, kl_bias_correction) -> dict:
    """HeadSpec fields of the KL-to-reference term: beta >= 0; with beta > 0 the reference
    log-probs are required (with beta = 0 they are not read)."""
    check_scalar("beta", beta, low=0.0)
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
    check_scalar("entropy_coef", entropy_coef)
    return float(entropy_coef)


def nft_head(*, neg_weight, normalize, clip_negative, rate_clamp, max_log_ratio,
             ref_logprobs=None, beta=0.0, kl_estimator="k3", kl_bias_correction=False,
             entropy_coef=0.0) -> HeadSpec:
    """The NFT head's options, checked (Eq. 8; ``rate_clamp`` bounds r_hat)."""
    check_scalar("neg_weight", neg_weight, low=0.0)
    check_scalar("normalize", normalize, integer_choices=(0, 1, 2))
    check_scalar("clip_negative", clip_negative, low=0.0, low_open=True)
    check_scalar("max_log_ratio", max_log_ratio, low=0.0, low_open=True)
    lo, hi = check_rate_clamp(rate_clamp)
    return HeadSpec(kind="nft", neg_weight=float(neg_weight), normalize=int(normalize),
                    clip_negative=float(clip_negative), rate_lo=lo, rate_hi=hi,
                    max_log_ratio=float(max_log_ratio),
                    **_kl_fields(ref_logprobs, beta, kl_estimator, kl_bias_correction),
                    entropy_coef=_entropy_coef(entropy_coef))


def ppo_head(*, clip_low, clip_high, clip_ratio_c, max_log_ratio, ref_logprobs, beta,
             kl_estimator, kl_bias_correction, entropy_coef=0.0) -> HeadSpec:
    """The PPO-clip head's options, checked (GRPO / Dr. GRPO / DAPO, optional dual clip)."""
    check_scalar("clip_low", clip_low, low=0.0)
    if clip_low >= 1.0:
        raise ValueError(f"clip_low must be < 1, got {clip_low!r}")
    check_scalar("clip_high", clip_high, low=0.0)
    check_scalar("max_log_ratio", max_log_ratio, low=0.0, low_open=True)
    if clip_ratio_c is not None:
        check_scalar("clip_ratio_c", clip_ratio_c, low=1.0, low_open=True)
    return HeadSpec(kind="ppo", clip_low=float(clip_low), clip_high=float(clip_high),
                    clip_ratio_c=float(clip_ratio_c or 0.0), max_log_ratio=float(max_log_ratio),
                    **_kl_fields(ref_logprobs, beta, kl_estimator, kl_bias_correction),
                    entropy_coef=_entropy_coef(entropy_coef))


def sequence_level(level, sequence_ids, filter_eps=None) -> bool:
    """``importance_sampling_level``: "token", or "sequence" (GSPO) with ``sequence_ids``."""
    if level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                         f"{level!r}")
    if level == "sequence" and sequence_ids is None:
        raise ValueError("sequence_ids is required with importance_sampling_level='sequence' "
                         "(one integer per token, equal within a response)")
    if level == "sequence" and filter_eps is not None:
        raise ValueError("filter_eps does not apply with importance_sampling_level='sequence'")
    return level == "sequence"


# The per-token inputs each head reads (the others are optional), by the names the user gave.
_REQUIRED = {"none": (), "nft": ("old_logprobs", "rewards", "correct_rate"),
             "ppo": ("old_logprobs", "advantages")}
# Inputs that must lie in [0, 1].
_UNIT_INTERVAL = ("rewards", "correct_rate")


def named_token_inputs(spec: HeadSpec, *, old_logprobs=None, rewards=None, advantages=None,
                       correct_rate=None, token_weights=None, ref_logprobs=None) -> dict:
    """The per-token arguments a head reads, by the names the user gave them (error
    messages say ``rewards`` or ``advantages``, not ``signal``); the reference log-probs only
    where the KL term reads them. The head's required ones must be given."""
    named = {"old_logprobs": old_logprobs, "rewards": rewards, "advantages": advantages,
             "correct_rate": correct_rate, "token_weights": token_weights,
             "ref_logprobs": ref_logprobs if spec.beta > 0 else None}
    check_required({name: named[name] for name in _REQUIRED[spec.kind]})
    return {name: t for name, t in named.items() if t is not None}


def custom_head(loss_fn, *, per_token: dict, ref_logprobs, beta, kl_estimator,
                kl_bias_correction, entropy_coef=0.0, validate=True) -> HeadSpec:
    """A user-defined head: ``loss_fn(logp, **per_token)`` -> one loss per token."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (logp, **per_token) -> per-token loss, got "
                        f"{type(loss_fn).__name__}")
    kl = _kl_fields(ref_logprobs, beta, kl_estimator, kl_bias_correction)
    if kl["beta"] > 0 and kl_bias_correction and "old_logprobs" not in per_token:
        raise ValueError("kl_bias_correction=True multiplies the KL term by the ratio "
                         "exp(logp - old_logprobs): give per_token={'old_logprobs': ..., ...}")
    return HeadSpec(kind="custom", loss_fn=loss_fn, check_head=bool(validate), **kl,
                    entropy_coef=_entropy_coef(entropy_coef))


_RESERVED = ("token_weights", "ref_logprobs")


def custom_token_inputs(spec: HeadSpec, per_token, *, token_weights=None,
                        ref_logprobs=None) -> dict:
    """A user-defined head's per-token tensors by name (each [...], floating point), with
    the token weights and the KL term's reference log-probs beside them."""
    if per_token is None:
        per_token = {}
    if not isinstance(per_token, dict) or not all(isinstance(k, str) for k in per_token):
        raise TypeError(f"per_token must be a dict of name -> tensor, got "
                        f"{type(per_token).__name__}")
    clash = [k for k in per_token if k in _RESERVED]
    if clash:
        raise ValueError(f"per_token: {clash} are arguments of their own (token_weights=, "
                         f"ref_logprobs=), not inputs of loss_fn")
    named = {k: v for k, v in per_token.items()}
    for name, value in named.items():
        if value is None:
            raise TypeError(f"per_token[{name!r}] is None (give a tensor, or leave it out)")
    if token_weights is not None:
        named["token_weights"] = token_weights
    if ref_logprobs is not None and spec.beta > 0:
        named["ref_logprobs"] = ref_logprobs
    return named


def token_inputs(flat: dict, spec: HeadSpec | None = None) -> TokenInputs:
    """``TokenInputs`` from the flattened named per-token tensors."""
    if spec is not None and spec.custom:
        return TokenInputs(old_logprobs=flat.get("old_logprobs"),
                           token_weights=flat.get("token_weights"),
                           ref_logprobs=flat.get("ref_logprobs"),
                           named={k: v for k, v in flat.items() if k not in _RESERVED})
    return TokenInputs(old_logprobs=flat.get("old_logprobs"),
                       signal=flat.get("rewards", flat.get("advantages")),
                       correct_rate=flat.get("correct_rate"),
                       token_weights=flat.get("token_weights"),
                       ref_logprobs=flat.get("ref_logprobs"))


def check_impl(impl) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_mode(mode, filter_eps) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "chunked" and filter_eps is not None:
        raise ValueError("filter_eps skips gradient tiles of the lean mode; it does not apply "
                         "to mode='chunked' (use mode='lean' or mode='auto', or drop filter_eps)")


def check_workspace_bytes(workspace_bytes) -> None:
    if workspace_bytes is None:
        return
    if isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int):
        raise TypeError(f"workspace_bytes must be an int (bytes) or None, got "
                        f"{type(workspace_bytes).__name__}")
    if workspace_bytes < 1:
        raise ValueError(f"workspace_bytes must be >= 1, got {workspace_bytes}")


def check_vocab_start(vocab_start, sharded: bool) -> None:
    if vocab_start is None:
        return
    if not sharded:
        raise ValueError("vocab_start applies to a vocab-sharded weight (give process_group)")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
        raise TypeError(f"vocab_start must be an int or None, got {vocab_start!r}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")


def refuse_small_workspace(workspace_bytes: int, vocab: int):
    """mode='chunked' with a workspace smaller than one row of fp32 logits."""
    raise ValueError(f"workspace_bytes={workspace_bytes} cannot hold one row of fp32 logits "
                     f"(4 * V = {4 * vocab} bytes); raise it or use mode='lean'")


def check_process_group(process_group) -> None:
    """A plain vocab shard's ``process_group``: a ProcessGroup of an initialized job."""
    import torch.distributed as dist  # noqa: PLC0415 - only for sharded calls

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("process_group is given but torch.distributed is not initialized")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")


def check_dtensor_weight(weight, process_group) -> int:
    """A DTensor weight: Shard(0) on one mesh dimension (returned: the tensor-parallel one)
    and Replicate on the others; its mesh names the group, so no ``process_group``."""
    if process_group is not None:
        raise ValueError("process_group must be None with a DTensor weight (its device mesh "
                         "already names the tensor-parallel group)")
    placements = tuple(weight.placements)
    dims = [i for i, p in enumerate(placements) if p.is_shard(0)]
    others = [p for i, p in enumerate(placements) if i not in dims and not p.is_replicate()]
    if len(dims) != 1 or others:
        raise ValueError(f"weight: a DTensor weight must be Shard(0) on one mesh dimension "
                         f"(the tensor-parallel one) and Replicate on the others, got "
                         f"placements {placements}")
    return dims[0]


def check_replicated(name: str, value) -> None:
    """A DTensor ``hidden`` (or other per-token argument) is the same on every rank."""
    if not all(p.is_replicate() for p in value.placements):
        raise ValueError(f"{name}: a DTensor {name} must be replicated (Replicate placements) "
                         f"over the mesh, got {tuple(value.placements)}")


@dataclass(frozen=True)
class CallOptions:
    """The options of one fused call, between the front door and the engines (as Cut
    Cross-Entropy's params object). ``scalar_loss``: only the reduced loss is differentiated
    (its gradients may then be computed in the forward); ``compute_entropy``: the per-token
    entropy is returned (the entropy bonus asks for it too)."""
    temperature: object = 1.0  # a number, or a tensor of one temperature per token
    softcap: float | None = None
    reduction: str = "sum"
    filter_eps: float | None = None
    deterministic: bool = False
    impl: str = "auto"
    mode: str = "auto"
    workspace_bytes: int | None = None
    validate: bool = True
    compute_entropy: bool = False
    scalar_loss: bool = True
    process_group: object = None
    vocab_start: int | None = None

    def __post_init__(self):
        for flag in ("deterministic", "validate", "compute_entropy", "scalar_loss"):
            object.__setattr__(self, flag, bool(getattr(self, flag)))
        if not isinstance(self.temperature, torch.Tensor):
            check_scalar("temperature", self.temperature, low=0.0, low_open=True)
        if self.softcap is not None:
            check_scalar("softcap", self.softcap, low=0.0, low_open=True)
        check_reduction(self.reduction)
        check_filter_eps(self.filter_eps)
        check_impl(self.impl)
        check_mode(self.mode, self.filter_eps)
        check_workspace_bytes(self.workspace_bytes)


# ---- tensors -> a prepared call ----------------------------------------------------------
@dataclass(frozen=True, eq=False)
class PreparedCall:
    """A fused call's tensors, checked and flattened: ``hidden`` [N, H], per-token [N]."""
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    target: torch.Tensor
    mask: torch.Tensor | None  # bool
    temperatures: torch.Tensor | None  # one per token (a tensor ``temperature``)
    named: dict  # the per-token inputs by the user's names
    lead: tuple  # the leading shape [...] of the call
    want: tuple  # (dH, dW, d bias) wanted


def _autocast(hidden, weight, bias):
    """Under ``torch.autocast`` the LM head runs in the autocast dtype, as ``nn.Linear`` would:
    fp32 master weights are cast for the call (gradients flow back to them in fp32)."""
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in FLOAT_DTYPES:
        return hidden, weight, bias

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


def _flatten_per_token(named: dict, mask, lead: tuple, device):
    """The named per-token tensors and the mask, each [...] -> [N] (contiguous; the mask as
    bool, None when not given), shapes, dtypes and devices checked."""
    flat = {name: flatten_tokens(name, t, lead, device).contiguous() for name, t in named.items()}
    if mask is None:
        return flat, None
    return flat, (flatten_tokens("mask", mask, lead, device, kind="mask") != 0).contiguous()


def prepare_fused(hidden, weight, target, mask, bias, named: dict,
                  options: CallOptions) -> PreparedCall:
    """Every check that needs no data, and the flattening: hidden [..., H] -> [N, H], each
    per-token argument [...] -> [N] (contiguous, on hidden's device)."""
    check_linear_inputs(hidden, weight, bias)
    hidden, weight, bias = _autocast(hidden, weight, bias)
    if bias is not None:
        bias = bias.contiguous()  # the kernels index the bias with unit stride
    dev = hidden.device
    lead = tuple(hidden.shape[:-1])
    flat, mask_flat = _flatten_per_token(named, mask, lead, dev)
    temps = None
    if isinstance(options.temperature, torch.Tensor):
        temps = flatten_tokens("temperature", options.temperature, lead, dev)
    want = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    return PreparedCall(
        hidden=hidden.reshape(-1, hidden.shape[-1]), weight=weight, bias=bias,
        target=flatten_tokens("target", target, lead, dev, kind="index").contiguous(),
        mask=mask_flat, temperatures=temps, named=flat, lead=lead,
        want=tuple(w and torch.is_grad_enabled() for w in want))


def unit_interval_names(spec: HeadSpec) -> tuple:
    """The per-token inputs that must lie in [0, 1]: NFT's rewards and correct rate (a
    user-defined head's inputs are only required to be finite)."""
    return _UNIT_INTERVAL if spec.kind == "nft" else ()


def read_back(call: PreparedCall, vocab: int, spec: HeadSpec, *, validate: bool, count: bool,
              group=None, checksums=None):
    """The call's value checks and, with ``count``, the number of counted tokens, read back
    together (one synchronisation); raises the first failure. ``group``: the
    ``vocab_parallel.GroupCall`` of a sharded call, whose round 2 raises a failure of any rank
    on every rank; ``checksums(checks, target, mask)`` adds that round's fingerprints of the
    targets and the mask. Returns the number of counted tokens (None when not read)."""
    checks = ValueChecks()
    if validate:
        if call.temperatures is not None:
            checks.positive("temperature", call.temperatures, call.mask)
        checks.targets(call.target, vocab, call.mask)
        checks.per_token_values(call.named, unit_interval_names(spec), call.mask)
        checks.finite_tensor("hidden", call.hidden)
        checks.finite_tensor("weight", call.weight)
        if call.bias is not None:
            checks.finite_tensor("bias", call.bias)
    count_slot = checks.value(call.mask.sum()) if count and call.mask is not None else None
    if group is None or not validate:
        host = checks.run()
    else:
        slots = checksums(checks, call.target, call.mask) if checksums else None
        host = group.value_checks(checks, count_slot, slots)
    return None if count_slot is None else int(host[count_slot])


def check_logprob_inputs(logprobs, named: dict, mask, validate: bool, spec: HeadSpec):
    """The head-on-log-probs path (``nft_loss``, ``ppo_clip_loss``): (logp [N], the named
    per-token inputs [N], mask [N] or None), checked."""
    check_float_tensor("logprobs", logprobs, getattr(logprobs, "device", None))
    lead = tuple(logprobs.shape)
    dev = logprobs.device
    flat, mask_flat = _flatten_per_token(named, mask, lead, dev)
    logp = logprobs.reshape(-1).contiguous()
    if validate:
        checks = ValueChecks()
        checks.no_nan("logprobs", logp, mask_flat)
        checks.per_token_values(flat, unit_interval_names(spec), mask_flat)
        checks.run()
    return logp, flat, mask_flat


def check_sequence_inputs(logp, named: dict, mask, sequence_ids, *, validate: bool,
                          check_logprobs: bool, group=None):
    """GSPO's inputs on log-probs [...]: (the named per-token inputs [N], counted [N] bool,
    each token's response index [N] in [0, S), S). One host synchronisation (the number of
    responses); ``group``: a sharded call's ``GroupCall`` (its agreement round)."""
    lead = tuple(logp.shape)
    dev = logp.device
    flat, counted = _flatten_per_token(named, mask, lead, dev)
    if counted is None:
        counted = torch.ones(logp.numel(), dtype=torch.bool, device=dev)
    ids = flatten_tokens("sequence_ids", sequence_ids, lead, dev, kind="index")
    unique, index = torch.unique(ids, return_inverse=True)
    checks = ValueChecks()
    if validate:
        if check_logprobs:
            checks.no_nan("logprobs", logp.reshape(-1), counted)
        checks.per_token_values(flat, _UNIT_INTERVAL, counted)
    if group is None:
        checks.run()
    else:
        group.value_checks(checks, None)
    return flat, counted, index.reshape(-1), unique.numel()

