"""Problems for training and evaluation: DAPO-Math-17k parquet, MATH-500-style jsonl,
reasoning-gym's procedural tasks (optional extra), and the embedded synthetic arithmetic task
used by the demo and the tests.

A problem is a prompt (the full user message) and a ground-truth answer. Malformed rows are
skipped and counted; a missing file or a dataset with no usable row is a clear error.
"""
from __future__ import annotations

import functools
import json
import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    prompt: str       # the user message, instruction included
    answer: str       # ground truth, compared by the reward
    source: str = ""  # file or task it came from
    # What the scorer compares against when it needs more than the answer (reasoning-gym: what
    # regenerates the entry - task, config, seed, size, index - as JSON); empty: the answer.
    grading: str = ""

    @property
    def reference(self) -> str:
        """What the reward function receives beside the response."""
        return self.grading or self.answer


class DataError(ValueError):
    """A dataset that is missing, unreadable or has no usable row."""


@dataclass
class LoadReport:
    path: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)   # reason -> rows

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common())
        return f"{self.path}: {self.kept} problems" + (f", skipped {reasons}" if reasons else "")


# DAPO's own prompt (DAPO-Math-17k rows already carry it); MATH-style rows get one of these.
DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be of "
    "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
    "\n\n{problem}\n\nRemember to put your answer on its own line after \"Answer:\".")
TEMPLATES = {
    "dapo": DAPO_INSTRUCTION,
    "boxed": "{problem}\nPlease reason step by step, and put your final answer within "
             "\\boxed{{}}.",
    "plain": "{problem}",
    "synthetic": "{problem}",
}


def _text(value) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    return value


def _dapo_row(row: dict) -> tuple[str | None, str | None, str]:
    """DAPO-Math-17k: prompt = [{role, content}, ...], reward_model = {ground_truth, style}."""
    messages = row.get("prompt")
    if not isinstance(messages, (list, tuple)) or not messages:
        return None, None, "no prompt messages"
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    prompt = _text(user[-1].get("content")) if user else None
    if prompt is None:
        return None, None, "no user message"
    reward = row.get("reward_model")
    answer = _text(reward.get("ground_truth")) if isinstance(reward, dict) else None
    return prompt, answer, "no reward_model.ground_truth"


def _math_row(row: dict, template: str) -> tuple[str | None, str | None, str]:
    """MATH-500: problem, solution, answer, subject, level, unique_id."""
    problem = _text(row.get("problem"))
    if problem is None:
        return None, None, "no problem"
    return TEMPLATES[template].format(problem=problem), _text(row.get("answer")), "no answer"


def _read_rows(path: Path, fmt: str, report: LoadReport):
    if fmt == "dapo":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:  # pragma: no cover - pyarrow is in the train extra
            raise DataError("reading parquet needs pyarrow: pip install 'nft-kernels[train]'") \
                from err
        try:
            yield from pq.read_table(path).to_pylist()
        except Exception as err:  # noqa: BLE001 - any reader failure is a bad file
            raise DataError(f"cannot read parquet file {str(path)!r}: {err}") from None
        return
    # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first row.
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                report.skipped["invalid json"] += 1
                continue
            if not isinstance(row, dict):
                report.skipped["not an object"] += 1
                continue
            yield row


def detect_format(path: Path) -> str:
    if path.suffix == ".parquet":
        return "dapo"
    if path.suffix in (".jsonl", ".json"):
        return "math"
    raise DataError(f"cannot tell the format of {str(path)!r} from its suffix; set data.format "
                    "to dapo (parquet) or math (jsonl)")


def load_file(path: str | Path, fmt: str = "auto", template: str = "dapo"
              ) -> tuple[list[Problem], LoadReport]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in ("dapo", "math"):
        raise DataError(f"data.format {fmt!r} is not a file format (dapo or math)")
    report = LoadReport(str(path))
    problems = []
    for row in _read_rows(path, fmt, report):
        if fmt == "dapo" and "prompt" not in row and "problem" in row:
            prompt, answer, why = _math_row(row, template)   # a parquet of MATH-style rows
        elif fmt == "dapo":
            prompt, answer, why = _dapo_row(row)
        else:
            prompt, answer, why = _math_row(row, template)
        if prompt is None or answer is None:
            report.skipped[why] += 1
            continue
        problems.append(Problem(prompt, answer.strip(), path.name))
    report.kept = len(problems)
    if not problems:
        raise DataError(f"dataset file {str(path)!r} has no usable row ({report.summary()})")
    return problems, report


def load_files(paths: list[str], fmt: str = "auto", template: str = "dapo"
               ) -> tuple[list[Problem], list[LoadReport]]:
    if not paths:
        raise DataError("no dataset files given")
    problems, reports = [], []
    for p in paths:
        got, report = load_file(p, fmt, template)
        problems += got
        reports.append(report)
    return problems, reports


# ---- the embedded task -------------------------------------------------------------------------
# Addition of two zero-padded integers, "12+07=" -> "019" (fixed widths put every digit at a fixed
# position, which a tiny model learns in a minute). All pairs are enumerated and shuffled with a
# fixed seed, so the held-out split never overlaps the training split.
SYNTHETIC_SPLIT_SEED = 20250524


def synthetic_problems(digits: int, train_size: int, eval_size: int
                       ) -> tuple[list[Problem], list[Problem]]:
    top = 10 ** digits
    if train_size + eval_size > top * top:
        raise DataError(f"the {digits}-digit task has only {top * top} problems; ask for fewer "
                        f"than {train_size} + {eval_size}")
    rng = random.Random(SYNTHETIC_SPLIT_SEED + digits)
    codes = rng.sample(range(top * top), train_size + eval_size)
    problems = [Problem(f"{c // top:0{digits}d}+{c % top:0{digits}d}=",
                        f"{c // top + c % top:0{digits + 1}d}", "synthetic") for c in codes]
    return problems[eval_size:], problems[:eval_size]


def synthetic_reward(response: str, answer: str) -> float:
    """Exact verifier of the embedded task: the first line must be the zero-padded sum."""
    first = response.strip().split("\n", 1)[0].strip() if response.strip() else ""
    return float(first == answer)


# ---- reasoning-gym (pip install 'nft-kernels[gym]') -------------------------------------------
def _gym():
    try:
        import reasoning_gym
    except ImportError as err:
        raise DataError("data.source reasoning_gym needs the reasoning-gym package: "
                        "pip install 'nft-kernels[gym]'") from err
    return reasoning_gym


def gym_task_names() -> list[str]:
    from reasoning_gym.factory import DATASETS
    return sorted(DATASETS)


@functools.lru_cache(maxsize=32)
def gym_dataset(name: str, config_json: str, seed: int, size: int):
    """One reasoning-gym dataset (entries are generated on access, from seed and index)."""
    return _gym().create_dataset(name, size=size, seed=seed, **json.loads(config_json))


def parse_gym_task(spec) -> tuple[str, dict]:
    """A task is a name ("chain_sum") or a mapping {"name": ..., **its config}."""
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        return spec["name"], {k: v for k, v in spec.items() if k != "name"}
    raise DataError(f"data.reasoning_gym.tasks: each task is a name or a mapping with a "
                    f"'name' key, got {spec!r}")


def reasoning_gym_problems(tasks: list, train_size: int, eval_size: int, seed: int,
                           template: str) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """Train problems of every task and one held-out list per task, generated offline from the
    installed package. Per task one dataset of ``train_size + eval_size`` entries is made with
    ``seed``; the first ``eval_size`` are held out, and a training entry whose question equals a
    held-out one (small procedural spaces repeat) is dropped, so the splits never overlap."""
    _gym()   # a clear error when the extra is not installed
    known = gym_task_names()
    if not tasks:
        raise DataError("data.reasoning_gym.tasks is empty; name at least one task, e.g. "
                        "[chain_sum]")
    train: list[Problem] = []
    held_out: dict[str, list[Problem]] = {}
    for spec in tasks:
        name, task_cfg = parse_gym_task(spec)
        if name not in known:
            close = [k for k in known if name.split("_")[0] in k][:8]
            raise DataError(f"data.reasoning_gym.tasks: {name!r} is not a reasoning-gym task"
                            + (f"; similar: {', '.join(close)}" if close else ""))
        if name in held_out:
            raise DataError(f"data.reasoning_gym.tasks: {name!r} is listed twice")
        size = train_size + eval_size
        try:
            dataset = gym_dataset(name, json.dumps(task_cfg, sort_keys=True), seed, size)
        except (TypeError, ValueError, AssertionError) as err:
            raise DataError(f"data.reasoning_gym.tasks: bad config for {name!r}: {err}") \
                from None
        # The scorer regenerates the entry from (task, config, seed, size, index): entries can
        # hold values JSON cannot (gsm_symbolic: Fraction), and regenerating is exact.
        key = {"task": name, "config": task_cfg, "seed": seed, "size": size}

        def problem(index: int, entry: dict) -> Problem:
            return Problem(TEMPLATES[template].format(problem=entry["question"]),
                           str(entry["answer"]), f"reasoning_gym/{name}",
                           json.dumps({**key, "index": index}, sort_keys=True))

        rows = [dataset[i] for i in range(size)]
        held_out[name] = [problem(i, e) for i, e in enumerate(rows[:eval_size])]
        seen = {e["question"] for e in rows[:eval_size]}
        train += [problem(i, e) for i, e in enumerate(rows) if i >= eval_size
                  and e["question"] not in seen]
    return train, held_out


class PromptStream:
    """Endless, seeded, reshuffled-per-epoch stream of problems with a resumable position."""

    def __init__(self, problems: list[Problem], seed: int, shuffle: bool = True):
        if not problems:
            raise DataError("no training problems")
        self.problems, self.seed, self.shuffle = problems, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.problems)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.problems[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._order = self._make_order()


@dataclass(frozen=True)
class EncodedProblem:
    problem: Problem
    prompt_ids: tuple[int, ...]


def encode_problems(problems: list[Problem], tokenizer, max_tokens: int,
                    system_prompt: str = "") -> tuple[list[EncodedProblem], int]:
    """Token ids of each prompt, through the tokenizer's chat template when it has one (with
    ``system_prompt`` as the system message if given, else the template's own default).
    Prompts longer than ``max_tokens`` are dropped, as DAPO's filter does; returns the count."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    kept, too_long = [], 0
    for p in problems:
        if chat:
            messages = [{"role": "user", "content": p.prompt}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
            if isinstance(ids, Mapping):   # transformers 5 returns a BatchEncoding (a Mapping)
                ids = ids["input_ids"]
            ids = [int(i) for i in ids]
        else:
            if system_prompt:
                raise ValueError("data.system_prompt needs a tokenizer with a chat template; "
                                 "this one has none")
            ids = tokenizer(p.prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > max_tokens:
            too_long += 1
            continue
        kept.append(EncodedProblem(p, tuple(ids)))
    return kept, too_long
