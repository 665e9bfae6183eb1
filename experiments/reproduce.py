"""Reproduce the paper's comparisons at CPU scale: NFT vs RFT vs GRPO / Dr. GRPO / DAPO.

    python -m experiments.reproduce                 # the full sweep (3 seeds), ~1 h on 2 cores
    python -m experiments.reproduce --smoke --out /tmp/smoke    # 1 seed, a few steps (the test)

Every run starts from the same warm start per seed (the demo's SFT on the embedded addition
task, ``nft_train.demo``) and uses the demo's RL settings; only the algorithm preset, or one
NFT knob for the ablations, changes. Runs of one seed share the warm start, the prompt order and
the sampling seeds, so differences between algorithms are paired.

What is measured (paper reference in brackets):
- held-out accuracy per algorithm, mean +- std over seeds, and the warm start's ("base") [Table 1];
- rollout entropy per step for every algorithm [Fig. 8: RFT's entropy falls, NFT's does not];
- epsilon ablation: NFT with clip_negative in {0.1, 0.5, 1, 4} [Fig. 10];
- omega ablation: NFT with normalize 0 / 1 / 2 [Fig. 9].

Outputs under ``--out`` (default experiments/results/): summary.json (the table's numbers),
table.md, ablations.json, runs/<run>.json (every curve), entropy.png, accuracy.png,
ablation_epsilon.png, ablation_omega.png and command.json (command, seeds, versions, timings).
Training folders (checkpoints, exported models) go to ``--work`` (default runs/experiments/).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from nft_train.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["nft", "rft", "grpo", "dr_grpo", "dapo"]
# (ablation, NFT knob, values); the NFT preset's own value is the main "nft" run, reused.
ABLATIONS = [("epsilon", "clip_negative", [0.1, 0.5, 1.0, 4.0]),
             ("omega", "normalize", [0, 1, 2])]
NFT_DEFAULTS = {knob: PRESETS["nft"][knob] for _, knob, _ in ABLATIONS}
# Held-out evaluation: the demo's avg@4 at the rollout temperature, and the paper's decoding
# (T=0.6, top-p 0.7, Sec. 5.1), which the table leads with.
EVALS = {"paper": {"temperature": 0.6, "top_p": 0.7}, "t1": {"temperature": 1.0, "top_p": 1.0}}
FULL = {"seeds": [0, 1, 2], "steps": 300, "sft_steps": 1000, "eval_every": 25}
SMOKE = {"seeds": [0], "steps": 3, "sft_steps": 200, "eval_every": 0, "train_size": 400,
         "eval_size": 40, "prompts_per_step": 8}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str            # e.g. "nft", "nft_clip_negative=0.1"
    algorithm: str       # the preset
    overrides: tuple     # ((algo key, value), ...) applied after the preset
    seed: int

    @property
    def key(self) -> str:
        return f"{self.name}_seed{self.seed}"


def plan(seeds: list[int], ablations: bool = True, algorithms: list[str] = ALGORITHMS
         ) -> list[RunSpec]:
    runs = [RunSpec(a, a, (), s) for s in seeds for a in algorithms]
    if ablations:
        for _, knob, values in ABLATIONS:
            for v in values:
                if v != NFT_DEFAULTS[knob]:
                    runs += [RunSpec(f"nft_{knob}={v}", "nft", ((knob, v),), s) for s in seeds]
    return runs


def ablation_run_name(knob: str, value) -> str:
    return "nft" if value == NFT_DEFAULTS[knob] else f"nft_{knob}={value}"


# ---- one seed's warm start, one run ---------------------------------------------------------------
def warm_start(seed: int, work: Path, settings: dict) -> Path:
    """The demo's SFT warm start for this seed, saved as a Hugging Face folder (made once)."""
    import torch
    import transformers

    from nft_train.data import synthetic_problems
    from nft_train.demo import DEMO, sft_warm_start
    from nft_train.tiny import build_tiny_model, build_tokenizer

    transformers.utils.logging.disable_progress_bar()
    folder = work / f"warm_start_seed{seed}"
    done = folder / "sft.json"
    wanted = {k: settings[k] for k in ("sft_steps", "train_size", "eval_size")}
    if done.is_file() and json.loads(done.read_text()).get("settings") == wanted:
        return folder
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    train, _ = synthetic_problems(DEMO["digits"], settings["train_size"], settings["eval_size"])
    losses = sft_warm_start(model, tokenizer, train, settings["sft_steps"], DEMO["sft_batch"],
                            DEMO["sft_lr"], seed, impl="torch", mode="lean")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    done.write_text(json.dumps({"settings": wanted, "sft_loss_first_last":
                                [losses[0], losses[-1]] if losses else []}))
    return folder


def _evals(trainer) -> dict:
    """Each of EVALS on every held-out set: accuracy and pass@k are means over the sets."""
    out = {}
    sets = list(trainer.eval_sets)
    for name, e in EVALS.items():
        r = trainer.evaluate(name, e["temperature"], e["top_p"])
        out[name] = {"accuracy": r[f"{name}/accuracy"],
                     "pass_at_k": statistics.fmean(r[f"{name}/{s}/pass_at_k"] for s in sets),
                     **e, "k": trainer.cfg.eval.k,
                     "problems": sum(len(trainer.eval_sets[s]) for s in sets)}
    return out


def run_one(spec: RunSpec, warm_dir: str, work: str, settings: dict, threads: int) -> dict:
    """Train one (algorithm, seed) from the seed's warm start with the trainer's own step;
    return its record (evaluations before and after, every curve)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nft_train.config import apply_preset, validate
    from nft_train.demo import demo_config
    from nft_train.loop import Trainer

    transformers.utils.logging.disable_progress_bar()
    start = time.time()
    out_dir = Path(work) / spec.key
    cfg = demo_config(str(out_dir), "hf", settings["steps"], spec.seed)
    apply_preset(cfg, spec.algorithm)
    for key, value in spec.overrides:
        setattr(cfg.algo, key, value)
    cfg.train.impl = "torch"          # the PyTorch path: the CPU default
    # The committed sweep ran before the chunked mode became the default; the lean mode keeps
    # it reproducible bit for bit (both are exact: they differ in fp32 rounding only).
    cfg.train.mode = "lean"
    cfg.data.synthetic_train_size = settings["train_size"]
    cfg.eval.synthetic_size = settings["eval_size"]
    cfg.train.prompts_per_step = settings["prompts_per_step"]
    cfg.log.progress = False
    cfg.log.sample_dump_every = 0
    validate(cfg)
    model = AutoModelForCausalLM.from_pretrained(warm_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(warm_dir)
    trainer = Trainer(cfg, model=model, tokenizer=tokenizer, model_dir=warm_dir)
    curves: dict[str, list] = {k: [] for k in ("entropy_heldout", "entropy_trained_tokens",
                                               "rollout_accuracy", "heldout_accuracy_t1",
                                               "kept_fraction", "response_length", "grad_norm")}
    probe = {"problems": min(200, settings["eval_size"]), "k": 4}

    def checkpoint_eval(step: int, t1_accuracy: float | None = None) -> dict:
        """The curves' points: held-out accuracy at T=1 (the trainer's own eval settings, the
        same as EVALS["t1"]; passed in where _evals has just measured it) and the entropy probe."""
        if t1_accuracy is None:
            t1_accuracy = trainer.evaluate()["eval/accuracy"]
        curves["heldout_accuracy_t1"].append([step, t1_accuracy])
        ent = trainer.answer_entropy(probe["problems"], probe["k"], 10_000 + spec.seed)
        curves["entropy_heldout"].append([step, ent])
        return {"eval/accuracy": t1_accuracy, "eval/entropy": ent}

    try:
        before = _evals(trainer)
        trainer.logger.log(0, checkpoint_eval(0, before["t1"]["accuracy"]))
        keys = {"train/entropy": "entropy_trained_tokens", "train/accuracy": "rollout_accuracy",
                "train/kept_fraction": "kept_fraction",
                "train/response_length": "response_length", "train/grad_norm": "grad_norm"}
        every = settings["eval_every"]
        while trainer.step < cfg.train.steps:
            metrics = trainer.train_step()
            for src, dst in keys.items():
                if isinstance(metrics.get(src), (int, float)):
                    curves[dst].append([trainer.step, metrics[src]])
            if trainer.step == cfg.train.steps:
                after = _evals(trainer)
                metrics.update(checkpoint_eval(trainer.step, after["t1"]["accuracy"]))
            elif every and trainer.step % every == 0:
                metrics.update(checkpoint_eval(trainer.step))
            trainer.logger.log(trainer.step, metrics)
    finally:
        trainer.close()
    return {
        "run": spec.name, "algorithm": spec.algorithm, "seed": spec.seed, "settings": settings,
        "overrides": dict(spec.overrides), "algo_config": dataclasses.asdict(cfg.algo),
        "entropy_probe": probe, "before": before, "after": after, "curves": curves,
        "seconds": round(time.time() - start, 1),
    }


# ---- aggregation ----------------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std 0 for a single seed."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_curve(records: list[dict], key: str) -> tuple[list[int], list[float], list[float]]:
    by_step: dict[int, list[float]] = {}
    for rec in records:
        for step, v in rec["curves"][key]:
            by_step.setdefault(step, []).append(v)
    steps = sorted(s for s, v in by_step.items() if len(v) == len(records))
    stats = [mean_std(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def _by_seed(records: list[dict]) -> dict[str, dict[int, dict]]:
    out: dict[str, dict[int, dict]] = {}
    for rec in records:
        out.setdefault(rec["run"], {})[rec["seed"]] = rec
    return out


def _final_entropy(rec: dict) -> float:
    return rec["curves"]["entropy_heldout"][-1][1]


def _paired(runs: dict[int, dict], reference: dict[int, dict], value) -> tuple | None:
    """Mean and std over seeds of value(run) - value(reference run of the same seed)."""
    seeds = sorted(set(runs) & set(reference))
    if not seeds:
        return None
    return mean_std([value(runs[s]) - value(reference[s]) for s in seeds])


def _accuracy(rec: dict) -> float:
    return rec["after"]["paper"]["accuracy"]


def summarize(records: list[dict], seeds: list[int], algorithms: list[str] = ALGORITHMS,
              ablation_plan: list = ABLATIONS, **describe) -> tuple[dict, dict, str]:
    """summary.json (the issue's schema), the rest (table, paired differences, ablations) and
    the markdown tables (``describe``: markdown_tables' wording)."""
    runs = _by_seed(records)
    # The warm start's numbers: the same eval (same seed, same model) in every run of a seed.
    base_by_seed: dict[int, dict] = {}
    for rec in records:
        base = base_by_seed.setdefault(rec["seed"], rec["before"])
        for name in EVALS:
            if abs(base[name]["accuracy"] - rec["before"][name]["accuracy"]) > 1e-12:
                raise RuntimeError(f"seed {rec['seed']}: the warm start evaluated differently in "
                                   f"run {rec['run']} ({rec['before'][name]['accuracy']} vs "
                                   f"{base[name]['accuracy']}); runs are not paired")
    # step 0 of the held-out entropy probe is the warm start's, the same in every run of a seed
    base_entropy = {rec["seed"]: rec["curves"]["entropy_heldout"][0][1] for rec in records}
    rows = {"base": {s: base_by_seed[s] for s in seeds}}
    rows.update({a: {s: r["after"] for s, r in runs[a].items()} for a in algorithms if a in runs})
    summary, table = {}, {}
    nft = runs.get("nft", {})
    for name, evals in rows.items():
        ordered = [evals[s] for s in sorted(evals)]
        m, s = mean_std([e["paper"]["accuracy"] for e in ordered])
        summary[name] = {"accuracy_mean": m, "accuracy_std": s, "seeds": sorted(evals)}
        row = {ev: {metric: mean_std([e[ev][metric] for e in ordered])
                    for metric in ("accuracy", "pass_at_k")} for ev in EVALS}
        if name == "base":
            row["entropy"] = mean_std([base_entropy[s] for s in sorted(evals)])
        else:
            row["entropy"] = mean_std([_final_entropy(runs[name][s]) for s in sorted(evals)])
            row["paired_vs_nft"] = {
                "accuracy": _paired(runs[name], nft, _accuracy),
                "entropy": _paired(runs[name], nft, _final_entropy)}
        table[name] = row
    ablations = {}
    for ablation, knob, values in ablation_plan:
        points = []
        default = runs.get(ablation_run_name(knob, NFT_DEFAULTS[knob]), {})
        for v in values:
            recs = runs.get(ablation_run_name(knob, v), {})
            if not recs:
                continue
            ordered = [recs[s] for s in sorted(recs)]
            m, s = mean_std([_accuracy(r) for r in ordered])
            m1, s1 = mean_std([r["after"]["t1"]["accuracy"] for r in ordered])
            em, es = mean_std([_final_entropy(r) for r in ordered])
            points.append({knob: v, "accuracy_mean": m, "accuracy_std": s,
                           "accuracy_t1_mean": m1, "accuracy_t1_std": s1,
                           "final_heldout_entropy_mean": em, "final_heldout_entropy_std": es,
                           "paired_accuracy_vs_default": _paired(recs, default, _accuracy),
                           "paired_entropy_vs_default": _paired(recs, default, _final_entropy),
                           "seeds": sorted(recs)})
        ablations[ablation] = {"knob": f"algo.{knob}", "default": NFT_DEFAULTS[knob],
                               "points": points}
    extra = {"table": table, "ablations": ablations}
    return summary, extra, markdown_tables(table, ablations, records, **describe)


LABELS = {"base": "base (warm start)", "nft": "NFT", "rft": "RFT", "grpo": "GRPO",
          "dr_grpo": "Dr. GRPO", "dapo": "DAPO"}


def _pts(pair, digits: int = 1, scale: float = 100.0, sign: bool = False) -> str:
    if pair is None:
        return "–"
    m, s = pair
    return f"{scale * m:{'+' if sign else ''}.{digits}f} ± {scale * s:.{digits}f}"


def markdown_tables(table: dict, ablations: dict, records: list[dict],
                    problems_are: str = "unseen addition problems",
                    start: str = "warm start") -> str:
    k = records[0]["after"]["paper"]["k"]
    problems = records[0]["after"]["paper"]["problems"]
    probe = records[0].get("entropy_probe", {}).get("problems", 200)
    seeds = sorted({r["seed"] for r in records})
    lines = [(f"Held-out accuracy (%) on {problems} {problems_are}, mean ± std over "
              f"seeds {seeds} (sample std). Δ vs NFT: the same seed's NFT run subtracted first "
              f"(runs of a seed share {start}, prompts and sampling seeds). Entropy: nats per "
              f"token of the policy's own T=1 answers to {probe} held-out prompts, after the "
              f"last step."), "",
             (f"| algorithm | avg@{k} T=0.6 top-p 0.7 (paper's decoding) | Δ vs NFT (points) "
              f"| avg@{k} T=1.0 | pass@{k} T=1.0 | entropy | Δ entropy vs NFT |"),
             "|---|---|---|---|---|---|---|"]
    for name, row in table.items():
        paired = row.get("paired_vs_nft", {})
        lines.append(
            f"| {LABELS.get(name, name) if name != 'base' else f'base ({start})'} | "
            f"{_pts(row['paper']['accuracy'])} | "
            f"{_pts(paired.get('accuracy'), sign=True) if name not in ('base', 'nft') else '–'} | "
            f"{_pts(row['t1']['accuracy'])} | {_pts(row['t1']['pass_at_k'])} | "
            f"{_pts(row['entropy'], 3, 1.0)} | "
            f"{_pts(paired.get('entropy'), 3, 1.0, True) if name not in ('base', 'nft') else '–'} |")
    for ablation, data in ablations.items():
        knob = data["knob"].split(".")[1]
        lines += ["", f"NFT {ablation} ablation ({data['knob']}; default {data['default']}):", "",
                  (f"| {knob} | avg@{k} T=0.6 top-p 0.7 | Δ vs default (points) | avg@{k} T=1.0 "
                   f"| entropy |"), "|---|---|---|---|---|"]
        for p in data["points"]:
            lines.append(
                f"| {p[knob]} | {_pts((p['accuracy_mean'], p['accuracy_std']))} | "
                f"{_pts(p['paired_accuracy_vs_default'], sign=True) if p[knob] != data['default'] else '–'} | "
                f"{_pts((p['accuracy_t1_mean'], p['accuracy_t1_std']))} | "
                f"{_pts((p['final_heldout_entropy_mean'], p['final_heldout_entropy_std']), 3, 1.0)} |")
    return "\n".join(lines) + "\n"


# ---- plots ----------------------------------------------------------------------------------------
def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _band(ax, records, key, label):
    steps, mean, std = _mean_curve(records, key)
    if not steps:
        return
    ax.plot(steps, mean, label=label, marker="o" if len(steps) < 30 else None, ms=3)
    if len(records) > 1:
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                        [m + s for m, s in zip(mean, std)], alpha=0.2)


def _axes_done(ax, ylabel: str) -> None:
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def plot_panels(by_run: dict[str, list[dict]], path: Path, title: str, panels: list,
                algorithms: list[str], width: float = 5.5) -> Path:
    """One figure, a panel per (curve key, y label), a mean +- std band per algorithm."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 4.2))
    for ax, (key, ylabel) in zip(axes, panels):
        for a in algorithms:
            if a in by_run:
                _band(ax, by_run[a], key, LABELS[a])
        _axes_done(ax, ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(records: list[dict], out: Path, algorithms: list[str] = ALGORITHMS,
             ablations: list = ABLATIONS) -> list[Path]:
    plt = _plt()
    by_run = {name: list(recs.values()) for name, recs in _by_seed(records).items()}
    figures = [
        ("entropy.png", "Entropy per algorithm (Fig. 8), mean ± std over seeds",
         [("entropy_heldout", "entropy on held-out answers, T=1 (nats/token)"),
          ("entropy_trained_tokens", "entropy on the tokens trained on (nats/token)")]),
        ("accuracy.png", "Held-out accuracy per algorithm, mean ± std over seeds",
         [("heldout_accuracy_t1", "held-out avg@k, T=1.0"),
          ("rollout_accuracy", "rollout accuracy (train prompts)")]),
    ]
    written = [plot_panels(by_run, out / fname, title, panels, algorithms)
               for fname, title, panels in figures]
    for ablation, knob, values in ablations:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        finals = []
        for v in values:
            recs = by_run.get(ablation_run_name(knob, v), [])
            if recs:
                _band(axes[0], recs, "heldout_accuracy_t1", f"{knob}={v}")
                _band(axes[1], recs, "entropy_heldout", f"{knob}={v}")
                finals.append((v, mean_std([100 * _accuracy(r) for r in recs])))
        _axes_done(axes[0], "held-out avg@k, T=1.0")
        _axes_done(axes[1], "entropy on held-out answers (nats/token)")
        if finals:
            x = list(range(len(finals)))
            axes[2].errorbar(x, [m for _, (m, _) in finals], yerr=[s for _, (_, s) in finals],
                             fmt="o-", capsize=4)
            axes[2].set_xticks(x, [str(v) for v, _ in finals])
            axes[2].set_xlabel(f"algo.{knob}")
            axes[2].set_ylabel("final held-out avg@k, T=0.6 top-p 0.7 (%)")
            axes[2].grid(alpha=0.3)
        fig.suptitle(f"NFT {ablation} ablation (algo.{knob}), mean ± std over seeds")
        fig.tight_layout()
        path = out / f"ablation_{ablation}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---- the command ----------------------------------------------------------------------------------
def _git_commit() -> str | None:
    """HEAD, with "+dirty" when tracked files differ from it (the code that is about to run)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10,
                               check=False).stdout.strip()
    except OSError:
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _invocations(path: Path, fresh: bool) -> list[dict]:
    """The history of invocations that wrote this results folder (a later run that reuses the
    trained runs keeps the record of the one that trained them)."""
    if fresh or not path.is_file():
        return []
    old = json.loads(path.read_text())
    if "invocations" in old:
        return old["invocations"]
    return [{k: old.get(k) for k in ("command", "date", "git_commit", "wall_seconds")}
            | {"trained": len(old.get("trained_now", old.get("runs", [])))}]


def main(argv: list[str] | None = None) -> dict:
    from nft_train.demo import DEMO, demo_config

    parser = argparse.ArgumentParser(prog="python -m experiments.reproduce",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    parser.add_argument("--work", default=None,
                        help="training folders (default: runs/experiments beside --out's repo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (1 thread each)")
    parser.add_argument("--smoke", action="store_true",
                        help="1 seed, 3 RL steps, small data: checks the pipeline, not the claims")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--fresh", action="store_true",
                        help="rerun every run (default: reuse runs/<run>.json written with the "
                             "same settings, so an interrupted sweep continues)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    preset = SMOKE if args.smoke else FULL
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    if len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        parser.error(f"--seeds must be distinct non-negative integers, got {seeds}")
    demo = demo_config("unused")
    settings = {"steps": preset["steps"], "sft_steps": preset["sft_steps"],
                "eval_every": preset["eval_every"],
                "train_size": preset.get("train_size", DEMO["train_size"]),
                "eval_size": preset.get("eval_size", DEMO["eval_size"]),
                "prompts_per_step": preset.get("prompts_per_step", demo.train.prompts_per_step)}
    out = Path(args.out)
    work = Path(args.work) if args.work else (ROOT / "runs" / "experiments"
                                               / ("smoke" if args.smoke else "full"))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    specs = plan(seeds, not args.no_ablations)
    start = time.time()
    commit = _git_commit()
    command = " ".join(["python -m experiments.reproduce",
                        *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    records: list[dict] = []
    todo: list[RunSpec] = []
    for spec in specs:
        old = out / "runs" / f"{spec.key}.json"
        rec = json.loads(old.read_text()) if old.is_file() and not args.fresh else None
        if rec is not None and rec.get("settings") == settings:
            print(f"[experiments] {spec.key}: reusing {old}", flush=True)
            records.append(rec)
        else:
            todo.append(spec)
    print(f"[experiments] {len(specs)} runs ({len(seeds)} seeds), {len(todo)} to train, "
          f"{args.jobs} at a time; results -> {out}", flush=True)
    need = sorted({spec.seed for spec in todo})
    if todo and args.jobs == 1:
        warm = {s: warm_start(s, work, settings) for s in need}
        for spec in todo:
            records.append(_finish(run_one(spec, str(warm[spec.seed]), str(work), settings, 0),
                                   out, start))
    elif todo:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"),
                                 initializer=_one_thread) as pool:
            warm = dict(zip(need, pool.map(warm_start, need, [work] * len(need),
                                           [settings] * len(need))))
            futures = [pool.submit(run_one, spec, str(warm[spec.seed]), str(work), settings, 1)
                       for spec in todo]
            for fut in futures:
                records.append(_finish(fut.result(), out, start))

    summary, extra, table_md = summarize(records, seeds)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "ablations.json").write_text(json.dumps(extra["ablations"], indent=2) + "\n")
    (out / "table.json").write_text(json.dumps(extra["table"], indent=2) + "\n")
    (out / "table.md").write_text(table_md)
    plots = plot_all(records, out)
    import torch
    import transformers
    wall = round(time.time() - start, 1)
    meta = {
        "command": command, "seeds": seeds, "smoke": args.smoke, "jobs": args.jobs,
        "runs": [s.key for s in specs], "trained_now": [s.key for s in todo],
        "settings": settings, "demo_settings": DEMO, "evals": EVALS,
        "git_commit": commit, "date": time.strftime("%Y-%m-%d"), "wall_seconds": wall,
        "invocations": _invocations(out / "command.json", args.fresh) + [
            {"command": command, "date": time.strftime("%Y-%m-%d"), "git_commit": commit,
             "wall_seconds": wall, "trained": len(todo)}],
        "run_seconds": {r["run"] + f"_seed{r['seed']}": r["seconds"] for r in records},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__},
        "outputs": sorted(p.name for p in [out / "summary.json", out / "ablations.json",
                                           out / "table.json", out / "table.md", *plots]),
    }
    (out / "command.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("\n" + table_md)
    print(f"[experiments] done in {meta['wall_seconds'] / 60:.1f} min; wrote {out}")
    return {"summary": summary, **extra, "meta": meta}


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)


def _finish(record: dict, out: Path, start: float) -> dict:
    key = f"{record['run']}_seed{record['seed']}"
    (out / "runs" / f"{key}.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"[experiments] {key}: held-out {100 * record['before']['paper']['accuracy']:.1f}% -> "
          f"{100 * record['after']['paper']['accuracy']:.1f}% (T=0.6), "
          f"{100 * record['before']['t1']['accuracy']:.1f}% -> "
          f"{100 * record['after']['t1']['accuracy']:.1f}% (T=1); {record['seconds']:.0f} s "
          f"[{(time.time() - start) / 60:.1f} min]", flush=True)
    return record


if __name__ == "__main__":
    main()
