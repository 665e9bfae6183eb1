"""Input validation: every bad argument fails here with its name, never inside a kernel.

Shape, dtype and device checks are cheap and always run. Value checks (ranges, finiteness,
target ids) read the data: they run on the device and are read back together, one
synchronisation with the GPU per call (``ValueChecks``); ``validate=False`` skips them.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "sum", "mean")


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
