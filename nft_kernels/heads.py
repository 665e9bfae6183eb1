"""Loss heads: what the loss does with each token's log-probability.

``HeadSpec`` carries a head's options; ``head_loss_and_grad`` evaluates a head in PyTorch
(fp32) and returns the per-token loss and g = d loss / d logp. The same math runs in Triton in
``ops/heads.py``; ``reference.py`` computes it a third way, in float64 with autograd.
Equation numbers refer to arXiv 2505.18116.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# "custom": a user-defined head (``loss_fn``), differentiated by autograd in torch; the
# Triton kernels never see it (the engines run their statistics pass, the head in torch, then
# the dz pass: ``chunked.TwoPassChunks``).
HEAD_KINDS = ("none", "nft", "ppo", "custom")
# KL-to-reference estimators (index = the kernels' KL code; 0 = no KL term). Names as verl's
# ``kl_penalty`` spells them, with its aliases: "k3" is verl's "low_var_kl" (clipped);
# "k3_unclipped" is the same estimator unclipped, as TRL's and Liger's GRPO losses compute it.
KL_ESTIMATORS = ("none", "k1", "k2", "k3", "k3_unclipped")
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}


@dataclass(frozen=True, eq=False)
class LogitScaling:
    """How logits are formed from h W^T + b: soft-capped (Gemma 2/3: c tanh(z / c), when
    ``softcap`` is set), then divided by the temperature: one float, or one per token
    (``inv_temperature_t``, [N] fp32, which then replaces the float)."""
    inv_temperature: float = 1.0
    softcap: float | None = None
    inv_temperature_t: torch.Tensor | None = None

    def kernel_args(self, dummy) -> dict:
        per_token = self.inv_temperature_t
        return dict(inv_temperature=float(self.inv_temperature),
                    softcap=float(self.softcap or 1.0),
                    inv_t_ptr=dummy if per_token is None else per_token)

    def kernel_flags(self) -> dict:
        return dict(SOFTCAP=self.softcap is not None,
                    PER_TOKEN_T=self.inv_temperature_t is not None)

    def inv(self, rows=None):
        """1 / T for ``rows`` (int64 indices): a float, or a [rows, 1] column per token."""
        if self.inv_temperature_t is None:
            return self.inv_temperature
        return self.inv_temperature_t.index_select(0, rows)[:, None]

    def apply_(self, x: torch.Tensor, rows=None) -> torch.Tensor:
        """In place on fp32 logits [rows, ...] (with bias): cap, then 1 / T."""
        if self.softcap is not None:
            x.div_(self.softcap).tanh_().mul_(self.softcap)
        inv = self.inv(rows)
        if not isinstance(inv, float) or inv != 1.0:
            x.mul_(inv)
        return x

    def cap_derivative(self, x: torch.Tensor, rows=None) -> torch.Tensor:
        """1 - tanh^2 from the scaled capped logits x (only with a cap)."""
        t = x / (self.inv(rows) * self.softcap)
        return 1.0 - t * t


@dataclass(frozen=True)
class HeadSpec:
    kind: str = "none"  # "none" (log-probs only) | "nft" | "ppo"
    # NFT (Eq. 8): weight of the negative term (0 = RFT), prompt weight omega, eps of max_st
    neg_weight: float = 1.0
    normalize: int = 1
    clip_negative: float = 1.0
    rate_lo: float = 0.02
    rate_hi: float = 0.98
    # PPO-clip (GRPO / Dr. GRPO / DAPO): ratio clip range and optional dual clip (0 = off)
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float = 0.0
    # both: R = exp(min(logp - old, max_log_ratio))
    max_log_ratio: float = 10.0
    # both: + beta * KL(pi || pi_ref) per token, by the estimator ``kl`` (KL_ESTIMATORS)
    beta: float = 0.0
    kl: str = "none"
    kl_bias_correction: bool = False  # KL estimate times the token's ratio R (TRL's default)
    # fused losses: - entropy_coef * H(pi(. | context)) per token (entropy bonus; 0 = no work)
    entropy_coef: float = 0.0
    # custom: loss_fn(logp [n] fp32, **named per-token inputs [n]) -> per-token loss [n];
    # check_head: check each evaluation (one loss per token, finite, no token reads another)
    loss_fn: Callable | None = field(default=None, compare=False)
    check_head: bool = False

    @property
    def custom(self) -> bool:
        return self.kind == "custom"

    @property
    def code(self) -> int:
        return HEAD_KINDS.index(self.kind)

    @property
    def kl_ratio(self) -> bool:
        """The kernels' KL_RATIO: the KL estimate times the token's ratio (bias correction)."""
        return bool(self.kl_code and self.kl_bias_correction)

    @property
    def kl_code(self) -> int:
        """The kernels' KL selector: 0 (no KL work at all) when beta is 0."""
        return KL_ESTIMATORS.index(self.kl) if self.beta > 0.0 else 0

    def kernel_scalars(self) -> dict:
        """Hyper-parameters as explicit Python floats (never fp64 tensors: Liger PR #1366)."""
        return dict(
            neg_weight=float(self.neg_weight), clip_negative=float(self.clip_negative),
            rate_lo=float(self.rate_lo), rate_hi=float(self.rate_hi),
            clip_low=float(self.clip_low), clip_high=float(self.clip_high),
            clip_ratio_c=float(self.clip_ratio_c), max_log_ratio=float(self.max_log_ratio),
            beta=float(self.beta),
        )


def _clamped_log_ratio(logp, old, max_log_ratio):
    x = logp - old
    clamped = x > max_log_ratio
    return torch.where(clamped, torch.full_like(x, max_log_ratio), x), clamped


def prompt_weight(r_hat: torch.Tensor, normalize: int) -> torch.Tensor:
    """omega(q) of Sec. 4.3: 1, 1 - r_hat (~ Dr. GRPO) or sqrt((1 - r_hat)/r_hat) (~ GRPO)."""
    if normalize == 0:
        return torch.ones_like(r_hat)
    if normalize == 1:
        return 1.0 - r_hat
    return torch.sqrt((1.0 - r_hat) / r_hat)


def nft_loss_and_grad(logp, old, reward, correct_rate, spec: HeadSpec):
    """NFT per token (Eq. 8) and its derivative w.r.t. logp; all inputs fp32."""
    log_ratio, clamped = _clamped_log_ratio(logp, old, spec.max_log_ratio)
    ratio = torch.exp(log_ratio)
    r_hat = correct_rate.clamp(spec.rate_lo, spec.rate_hi)
    q = (1.0 - r_hat * ratio) / (1.0 - r_hat)
    q_st = q.clamp(min=spec.clip_negative)  # value of max_st; gradient passes straight through
    w = prompt_weight(r_hat, spec.normalize)
    loss = w * (reward * -log_ratio + spec.neg_weight * (1.0 - reward) * -torch.log(q_st))
    zero = torch.zeros_like(ratio)
    d_pos = torch.where(clamped, zero, -torch.ones_like(ratio))
    d_neg = r_hat * torch.where(clamped, zero, ratio) / ((1.0 - r_hat) * q_st)
    g = w * (reward * d_pos + spec.neg_weight * (1.0 - reward) * d_neg)
    return loss, g


def ppo_loss_and_grad(logp, old, advantage, spec: HeadSpec):
    """PPO-clip per token with optional dual clip, and its derivative w.r.t. logp."""
    log_ratio, clamped = _clamped_log_ratio(logp, old, spec.max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - spec.clip_low, 1.0 + spec.clip_high)
    loss = torch.maximum(unclipped, clipped)
    g = torch.where((unclipped >= clipped) & ~clamped, -advantage * ratio, torch.zeros_like(ratio))
    if spec.clip_ratio_c > 1.0:
        cap = -advantage * spec.clip_ratio_c
        dual = (advantage < 0) & (cap < loss)
        loss = torch.where(dual, cap, loss)
        g = torch.where(dual, torch.zeros_like(g), g)
    return loss, g


def kl_and_grad(logp, ref, kl_code: int):
    """Per-token KL(pi || pi_ref) estimate and its derivative w.r.t. logp (Schulman's k1, k2,
    k3; verl's ``kl_penalty``, TRL's ``per_token_kl``). k3 = e^x - x - 1 with x = ref - logp;
    clipped (code 3) as verl clips "low_var_kl": x to [-20, 20], the estimate to at most 10,
    with zero gradient where a clip is active (torch.clamp's convention)."""
    if kl_code == 1:
        return logp - ref, torch.ones_like(logp)
    if kl_code == 2:
        diff = logp - ref
        return 0.5 * diff * diff, diff
    x = ref - logp
    ok = torch.ones_like(logp, dtype=torch.bool)
    if kl_code == 3:
        ok = (x >= -20.0) & (x <= 20.0)
        x = x.clamp(-20.0, 20.0)
    ex = torch.exp(x)
    kl = ex - x - 1.0
    if kl_code == 3:
        ok = ok & (kl <= 10.0)
        kl = kl.clamp(max=10.0)
    return kl, torch.where(ok, 1.0 - ex, torch.zeros_like(ex))


def head_loss_and_grad(spec: HeadSpec, logp, inputs, counted=None):
    """Per-token (loss, g = d loss / d logp) of ``spec``'s head on fp32 ``logp`` and
    ``inputs`` (``inputs.TokenInputs``, fp32: the rows being evaluated). ``inputs.signal`` is
    NFT's reward or the PPO head's advantage; ``inputs.ref_logprobs`` anchors the KL term
    (``spec.beta`` > 0). With ``token_weights`` each token's loss and gradient (KL term
    included) are multiplied by its weight. ``counted``: [n] bool, the rows whose values
    count (a custom head's checks look only at them; None: every row)."""
    old = inputs.old_logprobs
    if spec.custom:
        loss, g = custom_loss_and_grad(spec, logp, inputs.named or {}, counted)
    elif spec.kind == "nft":
        loss, g = nft_loss_and_grad(logp, old, inputs.signal, inputs.correct_rate, spec)
    elif spec.kind == "ppo":
        loss, g = ppo_loss_and_grad(logp, old, inputs.signal, spec)
    else:
        zeros = torch.zeros_like(logp)
        return zeros, zeros
    if spec.kl_code:
        ref = inputs.ref_logprobs
        kl, d_kl = kl_and_grad(logp, ref, spec.kl_code)
        if spec.kl_bias_correction:  # d (kl R) = R (d kl + kl), or R d kl where R is clamped
            log_ratio, clamped = _clamped_log_ratio(logp, old, spec.max_log_ratio)
            ratio = torch.exp(log_ratio)
            if spec.kl_code >= 3:  # k3: d kl + kl = -x where not clipped (no e^x cancellation)
                d_sum = torch.where(d_kl != 0, logp - ref, kl)
            else:
                d_sum = d_kl + kl
            kl, d_kl = kl * ratio, torch.where(clamped, d_kl, d_sum) * ratio
        loss, g = loss + spec.beta * kl, g + spec.beta * d_kl
    if inputs.token_weights is not None:
        loss, g = loss * inputs.token_weights, g * inputs.token_weights
    return loss, g


def kl_penalty(spec: HeadSpec, logp, ref, log_ratio=None):
    """beta * the KL estimate per token in torch ops (differentiated by autograd: the heads
    that run as written, GSPO's and a whole-call user loss); with ``kl_bias_correction``
    times the ratio exp(min(log_ratio, max_log_ratio)), ``log_ratio`` then required."""
    kl, _ = kl_and_grad(logp, ref, spec.kl_code)
    if spec.kl_bias_correction:
        kl = kl * torch.exp(log_ratio.clamp(max=spec.max_log_ratio))
    return spec.beta * kl


def custom_loss_and_grad(spec: HeadSpec, logp, named: dict, counted=None):
    """A user-defined head: (loss_fn(logp, **named), its derivative w.r.t. logp by autograd).

    The sum's gradient is each token's own derivative only if a token's loss reads no other
    token; with ``spec.check_head`` that is checked (every other row evaluated alone must give
    the same losses), as are the shape and finiteness on counted rows."""
    with torch.enable_grad():
        x = logp.detach().requires_grad_(True)
        loss = spec.loss_fn(x, **named)
        check_loss_per_token(loss, x)
        if loss.requires_grad:
            (g,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
        else:
            g = None
    loss = loss.detach().float()
    g = torch.zeros_like(logp) if g is None else g.float()
    if spec.check_head:
        _check_head_values(spec, loss, g, logp, named, counted)
    return loss, g


def check_loss_per_token(loss, logp):
    """A user-defined head returns one floating-point loss per token (checked at run time,
    where its output first exists)."""
    if not isinstance(loss, torch.Tensor) or tuple(loss.shape) != tuple(logp.shape) \
            or not loss.is_floating_point():
        got = (f"a {loss.dtype} tensor of shape {tuple(loss.shape)}"
               if isinstance(loss, torch.Tensor) else type(loss).__name__)
        raise ValueError(f"loss_fn must return one floating-point loss per token (shape "
                         f"{tuple(logp.shape)}, like logp), got {got}")


def _check_head_values(spec, loss, g, logp, named, counted):
    ok = torch.isfinite(loss) & torch.isfinite(g)
    if counted is not None:
        ok = ok | ~counted
    if not bool(ok.all()):
        bad = int((~ok).sum())
        raise ValueError(f"loss_fn returned a non-finite loss or gradient on {bad} counted "
                         f"token(s) of {logp.numel()}")
    if logp.numel() < 2:
        return
    # Every other row evaluated alone: a loss that mixes tokens (a mean over the batch, over a
    # response of two or more consecutive tokens) changes value.
    alternate = torch.arange(1, logp.numel(), 2, device=logp.device)
    with torch.enable_grad():
        alone = spec.loss_fn(logp.index_select(0, alternate).detach().requires_grad_(True),
                             **{k: v.index_select(0, alternate) for k, v in named.items()})
    alone = alone.detach().float()
    keep = torch.ones_like(alternate, dtype=torch.bool) if counted is None \
        else counted.index_select(0, alternate)
    same = torch.isclose(alone, loss.index_select(0, alternate), rtol=1e-5, atol=1e-6) | ~keep
    if not bool(same.all()):
        raise ValueError(
            "loss_fn: a token's loss depends on other tokens (its value changed when every "
            "other token was evaluated alone). The fused path needs each token's loss to "
            "read only its own log-prob and inputs; for sequence-level or batch-level losses "
            "take fused_linear_logprobs(...) and apply the loss to them (policy_loss(..., "
            "token_level=False))")


def reduce_loss(loss_t, n_counted, reduction, lead_shape):
    """The call's loss from per-token losses: [...] for "none", else a 0-d sum or mean."""
    if reduction == "none":
        return loss_t.reshape(lead_shape)
    return loss_t.sum() * reduction_scale(n_counted, reduction, loss_t.device)


def reduction_scale(n_counted, reduction, device):
    """1 for "sum", 1 / counted tokens for "mean" (no counted token: 1, so the loss is 0, not
    NaN); a device scalar, since the count may only be known on the device."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float32, device=device)
    if isinstance(n_counted, torch.Tensor):
        return 1.0 / n_counted.clamp(min=1).to(torch.float32)
    return torch.full((), 1.0 / max(n_counted, 1), dtype=torch.float32, device=device)
