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


def load_checkpoint(path: Path, policy, optimizer, scheduler, world: int) -> dict:
    """Restore model, optimizer, scheduler and RNG in place; returns the whole payload."""
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
