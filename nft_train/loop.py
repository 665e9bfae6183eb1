"""The training loop, one rollout step at a time:

  K answers per prompt -> rewards -> r_hat per prompt -> dynamic sampling (drop groups with
  r_hat in {0, 1}; sample more batches, up to algo.max_gen_batches) -> old log-probs recomputed
  with the loss's kernel (on-policy R = 1) -> mini-batches -> AdamW (warm-up, grad clipping)
  -> weights pushed to the sampling engine.

The loss normalizer is global and explicit: every token carries the weight that the aggregation
mode gives it over the whole mini-batch (all micro-batches, all ranks), and FSDP2's average over
ranks is undone, so the gradient does not depend on micro-batching or world size.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .actor import (
    DistInfo,
    PolicyWithLoss,
    full_state_dict,
    init_distributed,
    load_model_and_tokenizer,
    resolve_compute_dtype,
    set_gradient_sync,
    shard,
)
from .batch import (
    Sequence,
    collate,
    group_advantages,
    rollout_correction,
    split_even,
    token_weights,
)
from .config import Config, save_resolved, to_dict
from .data import (
    EncodedProblem,
    PromptStream,
    encode_problems,
    load_file,
    load_files,
    reasoning_gym_problems,
    synthetic_problems,
)
from .evaluation import avg_at_k
from .run_log import PhaseTimer, RunLogger, plot_curves
from .reward import RewardScorer, scorer_for
from .rollout import Sample, call_seed, make_rollout


class TrainingStopped(RuntimeError):
    """Too many non-finite losses in a row (train.max_bad_steps)."""


class _UpdateStats:
    """What one step's update measures, summed over its micro-batches (all ranks at the end):
    entropy and ratio over the trained tokens, the sampler-trainer mismatch (and the rollout
    correction it drives), losses, gradient norms, skipped updates."""

    def __init__(self, correction):
        self.correction = correction
        self.sums = {"entropy": 0.0, "tokens": 0.0, "ratio": 0.0, "ratio_tokens": 0.0}
        self.ratio_max = 0.0
        self.mismatch: dict[str, float] = {}
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.skipped = 0

    def add_old(self, batch: dict, entropy: torch.Tensor) -> None:
        """pi_old is known for this micro-batch: entropy, mismatch, correction weights."""
        counted = batch["loss_mask"] & (batch["token_weight"] > 0)
        self.sums["entropy"] += float(entropy[counted].sum())
        self.sums["tokens"] += float(counted.sum())
        if "rollout_logprobs" in batch:
            c = self.correction
            for k, v in rollout_correction(batch, c.mode, c.cap).items():
                self.mismatch[k] = max(self.mismatch.get(k, 0.0), v) if k == "w_max" \
                    else self.mismatch.get(k, 0.0) + v

    def add_ratios(self, batch: dict, logprobs: torch.Tensor) -> None:
        counted = batch["loss_mask"] & (batch["token_weight"] > 0)
        ratio = torch.exp(logprobs - batch["old_logprobs"])[counted]
        self.sums["ratio"] += float(ratio.sum())
        self.sums["ratio_tokens"] += float(ratio.numel())
        if ratio.numel():
            self.ratio_max = max(self.ratio_max, float(ratio.max()))

    def metrics(self, total, largest) -> dict:
        """``total`` / ``largest``: sums and max over ranks."""
        ent, tok, ratio, ratio_tok = total([self.sums[k] for k in
                                            ("entropy", "tokens", "ratio", "ratio_tokens")])
        out = {"train/entropy": ent / max(tok, 1), "train/tokens": tok,
               "train/ratio_mean": ratio / max(ratio_tok, 1), "train/ratio_max": self.ratio_max}
        if self.mismatch:
            m = self.mismatch
            keys = [k for k in ("tokens", "k3", "w_sum", "over") if k in m]
            summed = dict(zip(keys, total([m[k] for k in keys])))
            n = max(summed["tokens"], 1.0)
            out["rollout_correction/mismatch_kl_k3"] = summed["k3"] / n
            if "w_sum" in summed:
                word = "clipped" if self.correction.mode.endswith("truncate") else "masked"
                out.update({"rollout_correction/is_ratio_mean": summed["w_sum"] / n,
                            "rollout_correction/is_ratio_max": largest(m["w_max"]),
                            f"rollout_correction/{word}_fraction": summed["over"] / n})
        if self.losses:
            out["train/loss"] = sum(self.losses) / len(self.losses)
            out["train/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        return out


# ---- the trainer ---------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config, model=None, tokenizer=None, model_dir: str | None = None,
                 info: DistInfo | None = None):
        self.cfg = cfg
        self.info = info or init_distributed()
        self.out_dir = Path(cfg.out_dir)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        # Before anything is loaded or written: is the folder this run's to use?
        self.resume_from = ckpt.prepare_run_dir(to_dict(cfg), self.out_dir,
                                                cfg.checkpoint.resume,
                                                cfg.checkpoint.overwrite, self.info.main)
        if self.info.world > 1 and cfg.checkpoint.overwrite:
            dist.barrier()  # the main rank has deleted the old run
        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg.model, self.info.device)
            model_dir = cfg.model.path
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self._load_data()
        model = model.to(self.info.device)
        self.compute_dtype = resolve_compute_dtype(cfg.model.compute_dtype, self.info.device)
        # The sampling engine gets its own unsharded weights before the trainer's are sharded;
        # vLLM samples in the training forward's precision.
        engine_dtype = "bfloat16" if self.compute_dtype == torch.bfloat16 else cfg.model.dtype
        self.engine = make_rollout(cfg.rollout, model, tokenizer, model_dir, self.info.device,
                                   call_seed(cfg.train.seed, 0, self.info.rank), engine_dtype)
        self.policy = shard(PolicyWithLoss(model, cfg.algo, cfg.train.impl, self.compute_dtype,
                                           cfg.train.mode, cfg.rollout.temperature), self.info)
        t = cfg.train
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=t.lr,
                                           betas=tuple(t.betas), weight_decay=t.weight_decay)
        warm = t.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)
        kind = scorer_for(cfg.reward.kind, self.data_format, cfg.data.template)
        self.scorer = RewardScorer.from_config(kind, cfg.reward.workers, cfg.reward.timeout_s)
        self.logger = RunLogger(self.out_dir, enabled=self.info.main,
                                tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb)
        self.timer = PhaseTimer()
        self.step, self.bad_steps = 0, 0
        self.saved_step = -1
        self._maybe_resume()
        if self.info.main and self.step == 0 and self.logger.metrics_path.exists():
            # A fresh run in a used folder: keep the old metrics under another name.
            old = self.logger.metrics_path
            old.rename(old.with_name(f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))
        self._push_weights()

    # -- set-up --
    def _load_data(self) -> None:
        d = self.cfg.data
        source = d.source
        if source == "auto":
            source = "files" if d.train_files and d.format != "synthetic" else "synthetic"
        held_out_sets: dict[str, list] = {}
        if source == "reasoning_gym":
            g = d.reasoning_gym
            train, held_out_sets = reasoning_gym_problems(g.tasks, g.train_size, g.eval_size,
                                                          g.seed, d.template)
            self.data_format = "reasoning_gym"
            self.load_reports = [f"reasoning_gym: {len(train)} train; held-out " + ", ".join(
                f"{k} {len(v)}" for k, v in held_out_sets.items())]
        elif source == "files":
            train, reports = load_files(d.train_files, d.format, d.template)
            self.data_format = "file"
            self.load_reports = [r.summary() for r in reports]
        else:
            train, held_out = synthetic_problems(d.synthetic_digits, d.synthetic_train_size,
                                                 self.cfg.eval.synthetic_size)
            self.data_format = "synthetic"
            self.load_reports = [f"synthetic: {len(train)} train, {len(held_out)} held-out"]
        encoded, too_long = encode_problems(train, self.tokenizer, d.max_prompt_tokens,
                                            d.system_prompt)
        if not encoded:
            raise ValueError(f"every training prompt is longer than data.max_prompt_tokens="
                             f"{d.max_prompt_tokens}")
        if too_long:
            self.load_reports.append(f"dropped {too_long} prompts over "
                                     f"{d.max_prompt_tokens} tokens")
        self.stream = PromptStream(encoded, self.cfg.train.seed, d.shuffle)
        self.eval_sets: dict[str, list[EncodedProblem]] = {}
        if self.cfg.eval.files:
            for path in self.cfg.eval.files:
                problems, _ = load_file(path, "auto", d.template)
                self.eval_sets[Path(path).stem] = encode_problems(
                    problems, self.tokenizer, d.max_prompt_tokens, d.system_prompt)[0]
        elif self.data_format == "synthetic":
            self.eval_sets["synthetic"] = encode_problems(held_out, self.tokenizer,
                                                          d.max_prompt_tokens,
                                                          d.system_prompt)[0]
        else:
            for name, problems in held_out_sets.items():
                self.eval_sets[name] = encode_problems(problems, self.tokenizer,
                                                       d.max_prompt_tokens, d.system_prompt)[0]
        if self.cfg.eval.max_problems:
            self.eval_sets = {k: v[:self.cfg.eval.max_problems] for k, v in self.eval_sets.items()}

    def _maybe_resume(self) -> None:
        if self.resume_from is None:
            return
        path, payload = self.resume_from
        ckpt.load_checkpoint(path, self.policy, self.optimizer, self.scheduler,
                             self.info.world, payload=payload)
        self.step = payload["step"]
        self.bad_steps = payload.get("bad_steps", 0)
        self.stream.load_state_dict(payload["data"])
        self.resume_from = None  # the payload's tensors are in the model now
        if self.info.main:
            # Steps logged after this checkpoint were lost with the process: train them again.
            self.logger.drop_after(self.step)
            print(f"resumed from {path} (step {self.step})")

    def _push_weights(self) -> None:
        with self.timer("sync"):
            self.engine.load_weights(full_state_dict(self.policy, self.info))

    # -- collectives (no-ops in one process) --
    def _gather(self, obj) -> list:
        if self.info.world == 1:
            return [obj]
        out = [None] * self.info.world
        dist.all_gather_object(out, obj)
        return out

    def _sum(self, values: list[float]) -> list[float]:
        if self.info.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.info.device)
        dist.all_reduce(t)
        return t.tolist()

    # -- one rollout step --
    def _sample_groups(self, step: int) -> tuple[list[list[Sequence]], dict]:
        cfg, r = self.cfg, self.cfg.rollout
        kept: list[list[Sequence]] = []
        seen = kept_count = 0
        lengths, truncated, all_rewards, dumps = [], [], [], []
        for gen in range(cfg.algo.max_gen_batches):
            problems = self.stream.take(cfg.train.prompts_per_step)   # same on every rank
            mine = problems[self.info.rank::self.info.world]
            with self.timer("generate"):
                samples = self.engine.generate(
                    [list(p.prompt_ids) for p in mine], r.n, r.temperature, r.top_p,
                    r.max_new_tokens,
                    call_seed(cfg.train.seed, step * cfg.algo.max_gen_batches + gen,
                              self.info.rank))
            with self.timer("reward"):
                texts = self.tokenizer.batch_decode([s.response_ids for s in samples],
                                                    skip_special_tokens=True)
                rewards = self.scorer(texts, [mine[s.prompt_index].problem.reference
                                              for s in samples])
            local = self._groups(mine, samples, rewards)
            if self.info.main and len(dumps) < 8:
                dumps += [{"prompt": mine[s.prompt_index].problem.prompt, "response": t,
                           "answer": mine[s.prompt_index].problem.answer, "reward": rw}
                          for s, t, rw in list(zip(samples, texts, rewards))[:8]]
            for groups in self._gather(local):
                for g in groups:
                    seen += 1
                    lengths += [len(s.response_ids) for s in g]
                    all_rewards += [s.reward for s in g]
                    if not cfg.algo.dynamic_sampling or 0.0 < g[0].correct_rate < 1.0:
                        kept.append(g)
                        kept_count += 1
            truncated += self._gather(sum(s.truncated for s in samples))
            if not cfg.algo.dynamic_sampling or len(kept) >= cfg.train.prompts_per_step:
                break
        metrics = {
            "train/accuracy": sum(all_rewards) / len(all_rewards),
            "train/kept_fraction": kept_count / seen,
            "train/gen_batches": gen + 1,
            "train/response_length": sum(lengths) / len(lengths),
            "train/truncation_rate": sum(truncated) / len(lengths),
        }
        if self.info.main and self.cfg.log.sample_dump_every and \
                step % self.cfg.log.sample_dump_every == 0:
            self.logger.dump_samples(step, dumps)
        return kept[:cfg.train.prompts_per_step], metrics

    def _groups(self, problems, samples: list[Sample], rewards) -> list[list[Sequence]]:
        by_prompt: dict[int, list[tuple[Sample, float]]] = {}
        for s, rw in zip(samples, rewards):
            by_prompt.setdefault(s.prompt_index, []).append((s, rw))
        groups = []
        for index, members in sorted(by_prompt.items()):
            rs = [rw for _, rw in members]
            rate = sum(rs) / len(rs)
            adv = group_advantages(rs, self.cfg.algo.advantage)
            groups.append([Sequence(problems[index].prompt_ids, s.response_ids, rw, rate, a,
                                    rollout_logprobs=s.logprobs)
                           for (s, rw), a in zip(members, adv)])
        return groups

    def _micro_batches(self, seqs: list[Sequence]) -> list[dict]:
        """This rank's share of a mini-batch, as micro-batches; every rank runs the same number
        of them (FSDP2's collectives must match), padding with zero-weight copies."""
        cfg = self.cfg
        for s, w in zip(seqs, token_weights([len(s.response_ids) for s in seqs],
                                            cfg.algo.loss_agg, cfg.rollout.max_new_tokens)):
            s.weight = w
        mine = seqs[self.info.rank::self.info.world]
        per_rank = math.ceil(len(seqs) / self.info.world)
        if len(mine) < per_rank:
            mine = mine + [Sequence(seqs[0].prompt_ids, seqs[0].response_ids, 0.0, 0.5, 0.0,
                                    0.0, seqs[0].rollout_logprobs)] * (per_rank - len(mine))
        mbs = cfg.train.micro_batch_size
        return [collate(mine[i:i + mbs], self.pad_id, self.info.device)
                for i in range(0, len(mine), mbs)]

    def _update(self, groups: list[list[Sequence]]) -> dict:
        """The step's groups as ``mini_batches_per_step`` optimizer steps."""
        cfg = self.cfg
        minis = [[s for g in part for s in g] for part in
                 split_even(groups, min(cfg.train.mini_batches_per_step, len(groups)))]
        plans = [self._micro_batches(m) for m in minis if m]
        # One mini-batch: pi_old is the policy being updated, so the update's own forward gives
        # it (PolicyWithLoss without "old_logprobs" in the batch) - a whole forward pass saved.
        # A correction needs pi_old before the loss's weights are set: the pass stays then.
        shortcut = (cfg.train.on_policy_shortcut and len(plans) == 1
                    and cfg.rollout_correction.mode == "off")
        stats = _UpdateStats(cfg.rollout_correction)
        if not shortcut:
            with self.timer("old_logp"), torch.no_grad():
                for plan in plans:
                    for batch in plan:
                        batch["old_logprobs"], entropy = self.policy(batch, logprobs_only=True)
                        stats.add_old(batch, entropy)
        with self.timer("update"):
            for plan in plans:
                self._optimizer_step(plan, shortcut, stats)
        out = stats.metrics(self._sum, self._max)
        out.update({"train/skipped_updates": stats.skipped,
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/on_policy_shortcut": float(shortcut)})
        return out

    def _optimizer_step(self, plan: list[dict], shortcut: bool, stats: _UpdateStats) -> None:
        """Forward and backward over one mini-batch's micro-batches, then one optimizer step
        (skipped, and counted towards train.max_bad_steps, when the loss or norm is not finite)."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        for i, batch in enumerate(plan):
            set_gradient_sync(self.policy, i == len(plan) - 1)
            loss, st = self.policy(batch)
            if shortcut:
                stats.add_old(batch, st["old_entropy"])
            # FSDP2 averages gradients over ranks; the weights already divide by the global
            # normalizer, so scale the average back to the sum.
            (loss * self.info.world).backward()
            loss_total += float(loss.detach())
            stats.add_ratios(batch, st["logprobs"])
        loss_total = self._sum([loss_total])[0]
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(),
                                              cfg.train.grad_clip or float("inf"))
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            stats.skipped += 1
            self.bad_steps += 1
            print(f"step {self.step + 1}: non-finite loss ({loss_total}) or grad norm "
                  f"({grad_norm}); update skipped ({self.bad_steps} in a row)")
            if self.bad_steps >= cfg.train.max_bad_steps:
                raise TrainingStopped(f"{self.bad_steps} non-finite updates in a row "
                                      f"(train.max_bad_steps={cfg.train.max_bad_steps}); "
                                      "stopping")
            return
        self.bad_steps = 0
        self.optimizer.step()
        self.scheduler.step()
        stats.losses.append(loss_total)
        stats.grad_norms.append(grad_norm)

    def _max(self, value: float) -> float:
        if self.info.world == 1:
            return value
        t = torch.tensor(value, dtype=torch.float64, device=self.info.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def train_step(self) -> dict:
        step = self.step + 1
        groups, metrics = self._sample_groups(step)
        metrics["train/kept_prompts"] = len(groups)
        if groups:
            metrics.update(self._update(groups))
            self._push_weights()
        self.step = step
        metrics.update({f"reward/{k}": v for k, v in self.scorer.counts.items()})
        metrics.update(self.timer.pop())
        return metrics

    # -- evaluation, checkpoints, the run --
    def evaluate(self, tag: str = "eval", temperature: float | None = None,
                 top_p: float | None = None) -> dict:
        """avg@k and pass@k on every held-out set, at the ``eval`` section's decoding unless
        ``temperature`` / ``top_p`` are given (e.g. the paper's T=0.6, top-p 0.7 beside T=1)."""
        e = self.cfg.eval
        temperature = e.temperature if temperature is None else temperature
        top_p = e.top_p if top_p is None else top_p
        results = {}
        for name, problems in self.eval_sets.items():
            results[name] = avg_at_k(self.engine, problems, self.scorer, e.k, temperature,
                                     top_p, e.max_new_tokens,
                                     call_seed(self.cfg.train.seed + 1, self.step, 0),
                                     self.tokenizer)
        flat = {f"{tag}/{name}/{k}": v for name, r in results.items() for k, v in r.items()
                if k in ("accuracy", "pass_at_k")}
        if results:
            flat[f"{tag}/accuracy"] = sum(r["accuracy"] for r in results.values()) / len(results)
        return flat

    def answer_entropy(self, problems: int, k: int, seed: int) -> float:
        """Mean per-token entropy (nats) of the policy on its own answers, sampled at
        rollout.temperature, to the first ``problems`` held-out prompts (every held-out set in
        turn): one probe that reads the same for every algorithm (``train/entropy`` covers only
        the prompts each algorithm keeps)."""
        prompts = [p for group in zip(*self.eval_sets.values()) for p in group][:problems]
        samples = self.engine.generate([list(p.prompt_ids) for p in prompts], k,
                                       self.cfg.rollout.temperature, 1.0,
                                       self.cfg.eval.max_new_tokens, seed)
        batch = collate([Sequence(prompts[s.prompt_index].prompt_ids, s.response_ids, 0.0, 0.5,
                                  0.0) for s in samples], self.pad_id, self.info.device)
        with torch.no_grad():
            _, entropy = self.policy(batch, logprobs_only=True)
        mask = batch["loss_mask"]
        return float(entropy[mask].sum() / mask.sum())

    def save(self) -> Path | None:
        self.saved_step = self.step
        extra = {"data": self.stream.state_dict(), "bad_steps": self.bad_steps,
                 "config": to_dict(self.cfg)}  # a resume checks it trains the same run
        try:
            return ckpt.save_checkpoint(self.out_dir, self.step, self.policy, self.optimizer,
                                        self.scheduler, extra, self.info.world, self.info.rank,
                                        self.cfg.checkpoint.keep_last)
        except OSError as err:
            # The previous checkpoint is intact; training goes on and tries again next time.
            print(f"checkpoint at step {self.step} failed ({err}); earlier checkpoints kept")
            return None

    def export(self, folder: Path) -> None:
        """The trained weights as a Hugging Face folder (for `nft-train eval`, vLLM, the hub)."""
        state = full_state_dict(self.policy, self.info, cpu=True)
        if self.info.main:
            lm = self.policy.lm
            lm.save_pretrained(folder, state_dict=state)
            self.tokenizer.save_pretrained(folder)

    def run(self) -> dict:
        cfg = self.cfg
        if self.info.main:
            # Written when the run starts, not before: a start that fails replaces nothing.
            save_resolved(cfg, self.out_dir / "config.yaml")
            for line in self.load_reports:
                print(line)
        final: dict = {}
        progress = None
        if self.info.main and cfg.log.progress:
            from tqdm import tqdm
            progress = tqdm(total=cfg.train.steps, initial=self.step, desc="nft-train")
        if self.eval_sets and cfg.eval.before_train and self.step == 0:
            # Every run reports before and after (verl's val_before_train).
            with self.timer("eval"):
                before = self.evaluate()
            self.logger.log(0, {**before, **self.timer.pop()})
            if self.info.main:
                print(f"before training: held-out accuracy {before['eval/accuracy']:.4f}")
        try:
            while self.step < cfg.train.steps:
                metrics = self.train_step()
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.eval_sets:
                    metrics.update(self.evaluate())
                self.logger.log(self.step, metrics)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(acc=f"{metrics['train/accuracy']:.2f}",
                                         kept=f"{metrics['train/kept_fraction']:.2f}")
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save()
        finally:
            if progress is not None:
                progress.close()
        if self.eval_sets:
            final = self.evaluate()
            self.logger.log(self.step, final)
        if self.saved_step != self.step:   # the same on every rank: saving is collective
            self.save()
        self.export(self.out_dir / "final_model")
        if self.info.main:
            plot_curves(self.logger.metrics_path, self.out_dir / "curves.png",
                        f"{cfg.algo.name} ({cfg.algo.loss} loss)")
        return final

    def close(self) -> None:
        self.scorer.close()
        self.logger.close()
