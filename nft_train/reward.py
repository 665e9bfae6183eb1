"""Binary rewards: math-verify, DAPO's "Answer:" grader, last-\\boxed{} grader, reasoning-gym's
scorers (made binary), the embedded task.

math-verify runs in a pool of worker processes (its own timeouts use signals, which fail outside a
main thread; math-verify #50, #55). Each answer gets a wall-clock limit twice over: a timer inside
the worker, and a deadline in the parent that kills and replaces the pool when a worker is stuck
in C code that never returns to Python. A timeout or an unparsable answer scores 0 and is
counted; a pathological answer can never hang or kill the run.
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import re
import signal
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, wait

from .data import gym_dataset, synthetic_reward

_ANSWER_LINE = re.compile(r"Answer\s*:\s*(.+)", re.IGNORECASE)


def extract_answer_line(text: str) -> str | None:
    """DAPO-Math-17k's format: the last "Answer: X" in the response."""
    found = _ANSWER_LINE.findall(text)
    return found[-1].strip() if found else None


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}), braces matched."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def normalize_answer(text: str) -> str:
    """Light normalization for exact-match grading (DAPO style): spaces, $, \\text{}, \\left/\\right,
    a trailing period, and a wrapping \\boxed{} go."""
    boxed = extract_boxed(text)
    if boxed is not None:
        text = boxed
    text = re.sub(r"\\text\{(.*?)\}", r"\1", text)
    for token in ("\\left", "\\right", "\\!", "\\,", "\\;", "$", " "):
        text = text.replace(token, "")
    text = text.replace("dfrac", "frac").replace("tfrac", "frac")
    return text.rstrip(".").strip()


def score_answer_line(response: str, answer: str) -> float:
    found = extract_answer_line(response)
    return float(found is not None and normalize_answer(found) == normalize_answer(answer))


def score_boxed(response: str, answer: str) -> float:
    found = extract_boxed(response)
    return float(found is not None and normalize_answer(found) == normalize_answer(answer))


class Unparsable(Exception):
    pass


_LAST_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:\s*/\s*\d+)?")


def final_answer_text(response: str) -> str | None:
    """What a response gives as its final answer: the "Answer:" line, else the last
    \\boxed{}, else the last number written. Never the whole response: math-verify would read
    an expression there and evaluate it, so restating the question ("9 - 7 = ?") would grade
    as its answer (a policy trained on that reward learns to do exactly that)."""
    line = extract_answer_line(response)
    if line:
        return line
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed
    numbers = _LAST_NUMBER.findall(response)
    return numbers[-1] if numbers else None


def score_math_verify(response: str, answer: str) -> float:
    """math-verify ``verify(gold, pred)`` (gold first) on the response's final answer
    (``final_answer_text``), so DAPO-style, boxed and plain "... = 2" responses all grade;
    math-verify's own signal timeouts are off (the caller's limit applies)."""
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not gold:
        raise Unparsable("ground truth")
    final = final_answer_text(response)
    pred = parse(f"\\boxed{{{final}}}", parsing_timeout=None) if final else []
    if not pred:
        raise Unparsable("response")
    return float(verify(gold, pred, timeout_seconds=None))


_ANSWER_TAG = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def score_reasoning_gym(response: str, grading: str) -> float:
    """reasoning-gym's own scorer on the response's final answer (reasoning-gym's
    <answer>...</answer> tag, else ``final_answer_text``), made binary: its scorers give partial
    credit (a wrong gsm_symbolic number scores 0.01, a longer string len(oracle)/len(answer)),
    and NFT's r_hat is the share of answers that are right, so only a score of 1.0 counts."""
    key = json.loads(grading)
    dataset = gym_dataset(key["task"], json.dumps(key["config"], sort_keys=True), key["seed"],
                          key["size"])
    tags = _ANSWER_TAG.findall(response)
    final = tags[-1].strip() if tags else final_answer_text(response)
    if final is None:
        raise Unparsable("response")
    return float(dataset.score_answer(final, dataset[key["index"]]) == 1.0)


SCORERS: dict[str, Callable[[str, str], float]] = {
    "math_verify": score_math_verify,
    "dapo": score_answer_line,
    "boxed": score_boxed,
    "synthetic": synthetic_reward,
    "reasoning_gym": score_reasoning_gym,
}


def scorer_for(kind: str, data_format: str, template: str) -> str:
    """reward.kind "auto": the embedded task has its exact verifier, everything else math-verify
    when it is installed, else the grader that fits the prompt template."""
    if kind != "auto":
        return kind
    if data_format == "synthetic":
        return "synthetic"
    if data_format == "reasoning_gym":
        return "reasoning_gym"
    try:
        import math_verify  # noqa: F401
        return "math_verify"
    except ImportError:
        return "boxed" if template == "boxed" else "dapo"


class _Timeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


def _worker_init():
    signal.signal(signal.SIGALRM, _on_alarm)
    try:  # pay math-verify's import once per worker, not per answer
        import math_verify  # noqa: F401
    except ImportError:
        pass


def _score_in_worker(fn, response: str, answer: str, timeout_s: float) -> tuple[float, str]:
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        value = float(fn(response, answer))
        return (value if math.isfinite(value) else 0.0), "ok"
    except _Timeout:
        return 0.0, "timeout"
    except Unparsable:
        return 0.0, "unparsable"
    except Exception:  # noqa: BLE001 - a verifier failure scores 0 and is counted
        return 0.0, "error"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class RewardScorer:
    """Scores (response, answer) pairs. ``workers=0`` scores in this process (for graders that
    are plain string operations); otherwise a spawned process pool with per-answer limits."""

    def __init__(self, fn: Callable[[str, str], float], workers: int, timeout_s: float):
        self.fn, self.workers, self.timeout_s = fn, workers, timeout_s
        self.counts: Counter = Counter()     # ok / timeout / unparsable / error, over the run
        self._pool: ProcessPoolExecutor | None = None

    @classmethod
    def from_config(cls, kind: str, workers: int, timeout_s: float) -> RewardScorer:
        pooled = kind == "math_verify"
        return cls(SCORERS[kind], workers if pooled else 0, timeout_s)

    def __call__(self, responses: list[str], answers: list[str]) -> list[float]:
        if len(responses) != len(answers):
            raise ValueError(f"responses ({len(responses)}) and answers ({len(answers)}) differ "
                             "in length")
        if self.workers == 0:
            out = []
            for r, a in zip(responses, answers):
                try:
                    out.append(float(self.fn(r, a)))
                    self.counts["ok"] += 1
                except Unparsable:
                    out.append(0.0)
                    self.counts["unparsable"] += 1
                except Exception:  # noqa: BLE001
                    out.append(0.0)
                    self.counts["error"] += 1
            return out
        return self._score_pooled(responses, answers)

    def _score_pooled(self, responses, answers) -> list[float]:
        start_up = 2.0
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_worker_init)
            start_up = 30.0   # spawning workers and importing math-verify
        futures = [self._pool.submit(_score_in_worker, self.fn, r, a, self.timeout_s)
                   for r, a in zip(responses, answers)]
        # Worst case every answer runs to its limit, one after another on each worker.
        rounds = math.ceil(len(futures) / self.workers)
        done, not_done = wait(futures, timeout=self.timeout_s * (rounds + 1) + start_up)
        scores, crashed = [], False
        for fut in futures:
            if fut not in done:
                value, status = 0.0, "timeout"
            elif fut.exception() is not None:   # the worker died (killed, segfault, ...)
                value, status, crashed = 0.0, "error", True
            else:
                value, status = fut.result()
            scores.append(value)
            self.counts[status] += 1
        if not_done or crashed:
            self._kill_pool()
        return scores

    def _kill_pool(self) -> None:
        """A worker stuck past the deadline cannot be interrupted: kill every worker, start anew."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
