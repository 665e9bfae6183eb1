"""Atomic, resumable checkpoints: model + optimizer + scheduler + RNG + data position + step.

A checkpoint is one file, written by rank 0 as ``step_XXXXXXXX.pt.tmp``, flushed to disk, then
renamed, so a crash, a full disk or a failed write never leaves a half checkpoint under the real
name, and older checkpoints are pruned (keep-last-k) only after the new one is in place.
Model and optimizer are gathered to full tensors first, so a run may resume with another world
size.
"""
from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _model_and_optim_state(policy, optimizer, world: int) -> tuple[dict, dict]:
    if world == 1:
        return policy.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(policy, optimizer,
                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(out_dir, step: int, policy, optimizer, scheduler, extra: dict, world: int,
                    rank: int, keep_last: int) -> Path | None:
    """Every rank calls this (gathering is collective); rank 0 writes. Returns the path written,
    or None on other ranks. Raises OSError if the write fails; earlier checkpoints stay intact."""
    model_state, optim_state = _model_and_optim_state(policy, optimizer, world)
    if rank != 0:
        return None
    folder = checkpoint_dir(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:08d}.pt"
    tmp = final.with_name(final.name + ".tmp")
    payload = {"step": step, "model": model_state, "optimizer": optim_state,
               "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra}
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for _, old in list_checkpoints(out_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return final


def read_latest(out_dir) -> tuple[Path, dict] | None:
    """The newest checkpoint that can be read, as (path, payload); None when there is none.
    An unreadable one (a truncated file, a full disk at the wrong moment) is named in a
    warning and the previous one is tried; if none can be read, the error names them all."""
    found = list_checkpoints(out_dir)
    failures = []
    for _, path in reversed(found):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001 - any reader failure is a damaged file
            failures.append(f"{path} ({type(err).__name__}: {err})")
            warnings.warn(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); "
                          f"falling back to the previous checkpoint", stacklevel=2)
    if failures:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(out_dir)} can be read: "
                              + "; ".join(failures))
    return None


class CheckpointError(ValueError):
    """No checkpoint of the run folder can be read."""


def load_checkpoint(path: Path, policy, optimizer, scheduler, world: int,
                    payload: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; returns the whole payload
    (``payload``: the file's contents when already read)."""
    if payload is None:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    if world == 1:
        policy.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
    else:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        set_state_dict(policy, optimizer, model_state_dict=payload["model"],
                       optim_state_dict=payload["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
    return payload


# ---- the run folder: one run per folder ----------------------------------------------------
# What a run writes into its folder; any of them there means the folder holds a run.
RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "samples", "final_model",
             "curves.png", "tensorboard")
# Settings a resumed run may change: how long it runs and what it evaluates, logs and saves.
# Every other key changes what is trained, so a resume with another value is refused.
SCHEDULE_KEYS = ("out_dir", "train.steps", "eval.", "log.", "checkpoint.")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for each setting that changes what is trained."""
    a, b = _flat(saved), _flat(current)
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys
            if a.get(k) != b.get(k) and not k.startswith(SCHEDULE_KEYS)]


def prepare_run_dir(config: dict, out_dir, resume: bool, overwrite: bool,
                    main: bool) -> tuple[Path, dict] | None:
    """Decide what to do with ``out_dir`` before anything is written there; returns the
    checkpoint to resume from, as (path, payload), or None for a fresh start.

    - empty (or new): a fresh start.
    - ``overwrite``: the run there is deleted (by the main rank) and a fresh one starts.
    - holding a run, ``resume``: continue from its newest readable checkpoint, only if that
      run's config (kept in each checkpoint; else its config.yaml) trains the same thing;
      otherwise refused, naming the keys that differ. No checkpoint yet: a fresh start.
    - holding a run, not ``resume``: refused (the two runs' checkpoints and metrics would
      interleave)."""
    import shutil

    import yaml

    folder = Path(out_dir)
    present = [name for name in RUN_FILES if (folder / name).exists()]
    if not present:
        return None
    if overwrite:
        if main:
            for name in present:
                path = folder / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        return None
    holds = f"out_dir {str(folder)!r} already holds a run ({', '.join(present)})"
    if not resume:
        raise RunDirError(f"{holds}; set checkpoint.resume=true to continue it, "
                          f"checkpoint.overwrite=true to replace it, or choose another out_dir")
    latest = read_latest(folder)
    saved = latest[1].get("config") if latest is not None else None
    if saved is None and (folder / "config.yaml").is_file():
        saved = yaml.safe_load((folder / "config.yaml").read_text())
    if isinstance(saved, dict):
        differ = config_differences(saved, config)
        if differ:
            raise RunDirError(f"{holds} with another config: {'; '.join(differ)}. Resuming "
                              f"would mix two runs: choose another out_dir, or set "
                              f"checkpoint.overwrite=true to replace that run")
    return latest


class RunDirError(ValueError):
    """The output folder holds a run this one must not continue or mix with."""
