"""The paper's comparison on a real checkpoint: NFT vs RFT vs GRPO vs DAPO on SmolLM2-135M-Instruct,
off-policy, on reasoning-gym tasks, on a CPU.

    nft-train fetch-smollm2 --out .cache/smollm2-135m-instruct     # once (scripts/test.sh does it)
    python -m experiments.smollm2_gym base       # base accuracy of the task mix (and candidates)
    python -m experiments.smollm2_gym sweep      # every run; resumable: kill it, start it again
    python -m experiments.smollm2_gym report     # tables and plots from the runs finished so far

Every run starts from the same checkpoint and differs only in the algorithm preset (and seed).
Off-policy as the paper trains: each rollout step's groups are split into
``mini_batches_per_step`` optimizer steps, so from the second one on R != 1 and NFT's own terms
(the ratio, the implicit negative policy, the epsilon clip) act. Every algorithm samples the
same number of answers per step (one rollout batch, ``max_gen_batches: 1``); dynamic sampling
(NFT, RFT, DAPO) then only drops groups that carry no signal.

Resumable at two levels: a finished run leaves ``<out>/runs/<run>_seed<s>.json`` and is reused;
an interrupted one continues from its newest checkpoint (saved every step) in ``--work``, its
curves read back from the trainer's metrics.jsonl. Outputs under ``--out`` (default
experiments/smollm2_gym/): base_accuracy.json, runs/*.json, table.md, table.json,
summary.json, entropy.png, accuracy.png, command.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from experiments.reproduce import (
    EVALS,
    RunSpec,
    _evals,
    _git_commit,
    _invocations,
    plan,
    plot_all,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / ".cache" / "smollm2-135m-instruct"
ALGORITHMS = ["nft", "rft", "grpo", "dapo"]
# The mix: small enough numbers that SmolLM2-135M-Instruct answers some right at T=1 (measured
# by `base`, committed in base_accuracy.json), so groups hold right and wrong answers.
TASKS = [
    {"name": "gcd", "max_value": 20},
    {"name": "basic_arithmetic", "min_terms": 2, "max_terms": 2, "min_digits": 1,
     "max_digits": 1, "operators": ["+", "-"], "allow_parentheses": False,
     "allow_negation": False},
    {"name": "lcm", "max_value": 10},
]
SETTINGS = {
    "tasks": TASKS, "template": "plain", "train_size": 2000, "eval_size": 30, "data_seed": 0,
    "steps": 20, "prompts_per_step": 16, "n": 8, "max_new_tokens": 64, "temperature": 1.0,
    "mini_batches_per_step": 4, "max_gen_batches": 1, "lr": 1e-5, "warmup_steps": 2,
    "micro_batch_size": 32, "eval_k": 4, "probe_problems": 48, "probe_k": 4,
    "compute_dtype": "auto",
}
SMOKE = dict(SETTINGS, train_size=64, eval_size=4, steps=2, prompts_per_step=4, n=4,
             max_new_tokens=16, mini_batches_per_step=2, eval_k=2, probe_problems=4, probe_k=2)
SEEDS = [0, 1, 2]
THREADS = 2


def run_config(spec: RunSpec, settings: dict, work: Path, model: Path):
    from nft_train.config import Config, apply_preset, validate

    cfg = Config(out_dir=str(work / spec.key))
    apply_preset(cfg, spec.algorithm)
    cfg.model.path, cfg.model.compute_dtype = str(model), settings["compute_dtype"]
    d = cfg.data
    d.source, d.template, d.max_prompt_tokens = "reasoning_gym", settings["template"], 256
    g = d.reasoning_gym
    g.tasks, g.train_size, g.eval_size, g.seed = (settings["tasks"], settings["train_size"],
                                                  settings["eval_size"], settings["data_seed"])
    r = cfg.rollout
    r.backend, r.n, r.temperature = "vllm", settings["n"], settings["temperature"]
    r.max_new_tokens, r.vllm_max_model_len = settings["max_new_tokens"], 512
    cfg.algo.max_gen_batches = settings["max_gen_batches"]
    t = cfg.train
    t.steps, t.prompts_per_step, t.seed = settings["steps"], settings["prompts_per_step"], spec.seed
    t.mini_batches_per_step, t.micro_batch_size = (settings["mini_batches_per_step"],
                                                   settings["micro_batch_size"])
    t.lr, t.warmup_steps = settings["lr"], settings["warmup_steps"]
    e = cfg.eval
    e.k, e.max_new_tokens, e.every, e.before_train = (settings["eval_k"],
                                                      settings["max_new_tokens"], 0, False)
    cfg.checkpoint.every, cfg.checkpoint.keep_last = 1, 1
    cfg.log.progress, cfg.log.sample_dump_every = False, 5
    return validate(cfg)


# ---- one run (in its own process) -------------------------------------------------------------
CURVES = {"train/entropy": "entropy_trained_tokens", "train/accuracy": "rollout_accuracy",
          "train/kept_fraction": "kept_fraction", "train/response_length": "response_length",
          "train/grad_norm": "grad_norm", "train/ratio_max": "ratio_max",
          "time/step": "seconds_per_step", "t1/accuracy": "heldout_accuracy_t1",
          "probe/entropy": "entropy_heldout"}


def _rows(metrics_path: Path) -> list[dict]:
    if not metrics_path.is_file():
        return []
    return [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]


def _checkpoint_eval(trainer, settings: dict, seed: int) -> dict:
    """The paper's and the T=1 held-out evaluation, and the entropy probe, as metrics."""
    evals = _evals(trainer)
    flat = {f"{name}/{k}": v for name, r in evals.items() for k, v in r.items()
            if k in ("accuracy", "pass_at_k")}
    flat["probe/entropy"] = trainer.answer_entropy(settings["probe_problems"],
                                                   settings["probe_k"], 10_000 + seed)
    return {"evals": evals, **flat}


def run_one(spec: RunSpec, settings: dict, work: Path, model: Path) -> dict:
    import transformers

    from nft_train.loop import Trainer

    transformers.utils.logging.disable_progress_bar()
    cfg = run_config(spec, settings, work, model)
    trainer = Trainer(cfg)              # resumes from the newest checkpoint in out_dir
    try:
        rows = _rows(trainer.logger.metrics_path)
        if not any(r["step"] == 0 and "evals" in r for r in rows):
            # The untrained model's evaluation is the same in every run of a seed (same
            # checkpoint, same sampling seeds): measured once per seed, then reused.
            shared = work / f"before_seed{spec.seed}.json"
            saved = json.loads(shared.read_text()) if shared.is_file() else None
            if saved is None or saved["settings"] != settings:
                saved = {"settings": settings,
                         "row": _checkpoint_eval(trainer, settings, spec.seed)}
                shared.write_text(json.dumps(saved))
            trainer.logger.log(0, saved["row"])
        rows = _rows(trainer.logger.metrics_path)
        before = next(r["evals"] for r in rows if r["step"] == 0 and "evals" in r)
        while trainer.step < cfg.train.steps:
            start = time.time()
            metrics = trainer.train_step()
            metrics["time/step"] = time.time() - start
            if trainer.step == cfg.train.steps:
                metrics.update(_checkpoint_eval(trainer, settings, spec.seed))
            trainer.logger.log(trainer.step, metrics)
            trainer.save()
        rows = _rows(trainer.logger.metrics_path)
        after = next(r["evals"] for r in reversed(rows) if "evals" in r)
    finally:
        trainer.close()
    curves: dict[str, list] = {dst: [] for dst in CURVES.values()}
    for row in rows:
        for src, dst in CURVES.items():
            if isinstance(row.get(src), (int, float)):
                curves[dst].append([row["step"], row[src]])
    seconds = sum(v for _, v in curves["seconds_per_step"])
    return {"run": spec.name, "algorithm": spec.algorithm, "seed": spec.seed,
            "settings": settings, "algo_config": dataclasses.asdict(cfg.algo),
            "entropy_probe": {"problems": settings["probe_problems"], "k": settings["probe_k"]},
            "before": before, "after": after, "curves": curves, "seconds": round(seconds, 1)}


# ---- the commands -----------------------------------------------------------------------------
def base_accuracy(settings: dict, model: Path, candidates: list, out: Path,
                  problems: int = 50) -> dict:
    """avg@k at the rollout temperature of the untrained model per task (the mix and any
    candidates), and the share of groups of ``n`` answers that hold both a right and a wrong one
    (the groups every algorithm can learn from)."""
    import torch

    from nft_train.actor import load_model_and_tokenizer
    from nft_train.config import Config
    from nft_train.data import encode_problems, parse_gym_task, reasoning_gym_problems
    from nft_train.reward import RewardScorer
    from nft_train.rollout import make_rollout

    cfg = Config()
    cfg.model.path, cfg.rollout.backend = str(model), "vllm"
    model_obj, tokenizer = load_model_and_tokenizer(cfg.model, torch.device("cpu"))
    engine = make_rollout(cfg.rollout, model_obj, tokenizer, str(model), torch.device("cpu"), 0)
    scorer = RewardScorer.from_config("reasoning_gym", 0, 5.0)
    report = {"model": str(model.name), "n": settings["n"], "temperature": settings["temperature"],
              "top_p": 1.0, "max_new_tokens": settings["max_new_tokens"],
              "template": settings["template"], "problems_per_task": problems,
              "tasks": []}
    for spec in settings["tasks"] + [c for c in candidates if c not in settings["tasks"]]:
        _, held = reasoning_gym_problems([spec], 1, problems, settings["data_seed"],
                                         settings["template"])
        name = parse_gym_task(spec)[0]
        encoded, _ = encode_problems(held[name], tokenizer, 256)
        start = time.time()
        samples = engine.generate([list(p.prompt_ids) for p in encoded], settings["n"],
                                  settings["temperature"], 1.0, settings["max_new_tokens"], 1)
        texts = tokenizer.batch_decode([s.response_ids for s in samples],
                                       skip_special_tokens=True)
        scores = scorer(texts, [encoded[s.prompt_index].problem.reference for s in samples])
        groups: dict[int, list[float]] = {}
        for s, v in zip(samples, scores):
            groups.setdefault(s.prompt_index, []).append(v)
        row = {"task": spec, "in_mix": spec in settings["tasks"],
               "accuracy": sum(scores) / len(scores),
               "mixed_groups": sum(0 < sum(v) < len(v) for v in groups.values()) / len(groups),
               "truncated": sum(s.truncated for s in samples) / len(samples),
               "mean_response_tokens": sum(len(s.response_ids) for s in samples) / len(samples),
               "seconds": round(time.time() - start, 1), "example": texts[0][:300]}
        report["tasks"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "example"}), flush=True)
    mix = [r for r in report["tasks"] if r["in_mix"]]
    report["mix_accuracy"] = sum(r["accuracy"] for r in mix) / len(mix)
    out.mkdir(parents=True, exist_ok=True)
    (out / "base_accuracy.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def write_report(records: list[dict], seeds: list[int], out: Path) -> str:
    summary, extra, table_md = summarize(
        records, seeds, ALGORITHMS, [], problems_are="held-out reasoning-gym problems "
        f"({', '.join(t['name'] for t in SETTINGS['tasks'])})", start="SmolLM2-135M-Instruct")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "table.json").write_text(json.dumps(extra["table"], indent=2) + "\n")
    (out / "table.md").write_text(table_md)
    plot_all(records, out, ALGORITHMS, ablations=[])
    plot_dynamics(records, out)
    return table_md


def plot_dynamics(records: list[dict], out: Path) -> Path:
    """Response length, the share of prompts dynamic sampling kept, the largest ratio R and
    the wall time per step, per algorithm (mean +- std over seeds)."""
    from experiments.reproduce import _by_seed, plot_panels

    by_run = {name: list(recs.values()) for name, recs in _by_seed(records).items()}
    panels = [("response_length", "response length (tokens)"),
              ("kept_fraction", "groups with mixed rewards (kept)"),
              ("ratio_max", "largest ratio R in the update"),
              ("seconds_per_step", "wall time per step (s)")]
    return plot_panels(by_run, out / "dynamics.png", "SmolLM2-135M-Instruct on reasoning-gym, "
                       "off-policy: per-step dynamics", panels, ALGORITHMS, width=5.2)


def _child(spec: RunSpec, smoke: bool, work: Path, out: Path, model: Path) -> int:
    """Train one run in a fresh process (a vLLM engine per process, freed on exit)."""
    cmd = [sys.executable, "-m", "experiments.smollm2_gym", "_run", spec.algorithm,
           str(spec.seed), "--work", str(work), "--out", str(out), "--model", str(model)]
    # Two threads for the update: vLLM-CPU would otherwise cut the process's torch threads to
    # one; fixed here so that a resumed run computes as an uninterrupted one.
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    proc = subprocess.Popen(cmd + (["--smoke"] if smoke else []), cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        return proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)   # Ctrl-C: the run continues next time
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.smollm2_gym",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["base", "sweep", "report", "_run"])
    parser.add_argument("algorithm", nargs="?")
    parser.add_argument("seed", nargs="?", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments" / "smollm2_gym")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "smollm2_gym")
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("--smoke", action="store_true", help="tiny settings: checks the pipeline")
    parser.add_argument("--candidates", default="[]",
                        help="base: more tasks to measure, as JSON (names or mappings)")
    parser.add_argument("--problems", type=int, default=50, help="base: problems per task")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else SETTINGS
    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model} is not a model folder; run "
                     f"`nft-train fetch-smollm2 --out {args.model}` first")
    if args.command == "base":
        base_accuracy(settings, args.model, json.loads(args.candidates), args.out,
                      args.problems)
        return 0
    if args.command == "_run":
        spec = RunSpec(args.algorithm, args.algorithm, (), args.seed)
        record = run_one(spec, settings, args.work, args.model)
        path = args.out / "runs" / f"{spec.key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        return 0

    specs = plan(args.seeds, ablations=False, algorithms=args.algorithms)
    (args.out / "runs").mkdir(parents=True, exist_ok=True)

    def finished(spec: RunSpec) -> dict | None:
        path = args.out / "runs" / f"{spec.key}.json"
        rec = json.loads(path.read_text()) if path.is_file() else None
        return rec if rec is not None and rec.get("settings") == settings else None

    start, commit = time.time(), _git_commit()
    command = " ".join(["python -m experiments.smollm2_gym",
                        *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    trained = []
    if args.command == "sweep":
        todo = [s for s in specs if finished(s) is None]
        print(f"[smollm2_gym] {len(specs)} runs, {len(todo)} to train; results -> {args.out}",
              flush=True)
        for spec in todo:   # seed-major: a partial sweep compares all algorithms on seed 0
            t0 = time.time()
            rc = _child(spec, args.smoke, args.work, args.out, args.model)
            if rc != 0:
                print(f"[smollm2_gym] {spec.key} failed (exit {rc}); stopping", flush=True)
                return rc
            trained.append(spec.key)
            rec = finished(spec)
            print(f"[smollm2_gym] {spec.key}: held-out {100 * rec['before']['paper']['accuracy']:.1f}"
                  f"% -> {100 * rec['after']['paper']['accuracy']:.1f}% (T=0.6 top-p 0.7) in "
                  f"{(time.time() - t0) / 60:.1f} min [{(time.time() - start) / 60:.1f} min]",
                  flush=True)
    records = [r for r in map(finished, specs) if r is not None]
    if not records:
        print("[smollm2_gym] no finished run yet", flush=True)
        return 0
    table = write_report(records, sorted({r["seed"] for r in records}), args.out)
    import torch
    wall = round(time.time() - start, 1)
    meta = {"command": command, "settings": settings, "evals": EVALS, "seeds": args.seeds,
            "runs": [s.key for s in specs], "finished": [f"{r['run']}_seed{r['seed']}"
                                                         for r in records],
            "run_seconds": {f"{r['run']}_seed{r['seed']}": r["seconds"] for r in records},
            "git_commit": commit, "date": time.strftime("%Y-%m-%d"),
            "invocations": _invocations(args.out / "command.json", False) + [
                {"command": command, "date": time.strftime("%Y-%m-%d"), "git_commit": commit,
                 "wall_seconds": wall, "trained": len(trained)}],
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": THREADS}}
    (args.out / "command.json").write_text(json.dumps(meta, indent=2) + "\n")
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
