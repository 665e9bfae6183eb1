"""Run logging: JSONL metrics (appended across resumes), per-phase timers, sample dumps, optional
TensorBoard / W&B, and PNG curves drawn from the JSONL file."""
from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path


class PhaseTimer:
    """``with timer("generate"): ...`` accumulates seconds per phase until ``pop()``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": round(v, 4) for k, v in self.seconds.items()}
        self.seconds = {}
        return out


def _row_step(line: str) -> float:
    """A metrics row's step; a torn last line (the process killed mid-write) counts as
    later than any step, so that it is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _clean(value):
    """JSON has no NaN/Inf: write them as strings so the line stays valid."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class RunLogger:
    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = False,
                 wandb: bool = False, config: dict | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self._tb = self._wandb = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:
                print("log.tensorboard: the tensorboard package is not installed; skipping it")
        if wandb:
            try:
                import wandb as wandb_lib
                self._wandb = wandb_lib.init(project="nft-train", dir=str(self.out_dir),
                                             config=config or {})
            except ImportError:
                print("log.wandb: the wandb package is not installed; skipping it")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def drop_after(self, step: int) -> None:
        """Keep only the rows of steps <= ``step`` (a resumed run logs the later ones again,
        so an interrupted step is not in the file twice); rewritten atomically."""
        if not self.enabled or not self.metrics_path.exists():
            return
        rows = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        kept = [line for line in rows if _row_step(line) <= step]
        if len(kept) == len(rows):
            return
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.metrics_path)

    def dump_samples(self, step: int, rows: list[dict]) -> None:
        if not self.enabled or not rows:
            return
        folder = self.out_dir / "samples"
        folder.mkdir(exist_ok=True)
        with (folder / f"step_{step:08d}.jsonl").open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CURVES = [("train/accuracy", "rollout accuracy"), ("eval/accuracy", "held-out accuracy"),
          ("train/entropy", "entropy (nats/token)"), ("train/kept_fraction", "kept fraction"),
          ("train/response_length", "response length"), ("train/grad_norm", "grad norm")]


def plot_curves(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """One panel per metric of ``CURVES`` that the run logged; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(metrics_path)
    panels = [(key, label) for key, label in CURVES
              if any(isinstance(r.get(key), (int, float)) for r in rows)]
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, (key, label) in zip(axes.flat, panels):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
