"""Where the update's time goes, and what the fast path saves: one fixed batch shaped like a
step of the example (32 answers of 40-96 tokens after 70-token prompts) through SmolLM2's
forward + backward with the fused NFT loss, in four settings:

  fp32, lean mode, reduction="none" + weighted sum   the trainer before this change
  fp32, chunked mode, reduction="none"               per-token upstream gradients: recompute
  fp32, chunked mode, token_weights                  one weighted sum: gradients in the forward
  bf16 autocast, chunked mode, token_weights         what the example runs (model.compute_dtype)
  the same, on-policy shortcut                       no old-log-prob pass: pi_old comes from
                                                     the update's own forward (one mini-batch)

    python examples/smollm2_arithmetic/time_update.py --model models/smollm2-135m-instruct
    python examples/smollm2_arithmetic/time_update.py --only 3 4 --repeats 3   # the shortcut

Token ids are random (timing only). Times are one run each on an otherwise idle machine; the
old log-probs (forward only) are timed too.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import nft_kernels
from nft_train.actor import PolicyWithLoss
from nft_train.config import Config
from nft_train.batch import Sequence, collate


class ReductionNone(PolicyWithLoss):
    """The trainer's loss as it was: per-token losses, then the weighted sum in torch (so the
    fused loss sees per-token upstream gradients and recomputes the logits in the backward)."""

    def _forward(self, batch, logprobs_only):
        if logprobs_only:
            return super()._forward(batch, True)
        hidden = self._hidden(batch["input_ids"], batch["attention_mask"])
        weight = self.lm.get_output_embeddings().weight
        loss_t, stats = nft_kernels.fused_linear_nft_loss(
            hidden, weight, batch["input_ids"][:, 1:], batch["old_logprobs"], batch["rewards"],
            batch["correct_rate"], batch["loss_mask"], reduction="none", impl=self.impl,
            mode=self.mode, return_stats=True)
        return (loss_t * batch["token_weight"]).sum(), stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=None, help="write the timings as JSON")
    parser.add_argument("--only", type=int, nargs="+", default=None,
                        help="settings to time, by index (0-4; default all)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="times per setting, interleaved; the median is reported")
    args = parser.parse_args(argv)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    seqs = [Sequence(tuple(rng.randrange(100, 40000) for _ in range(70)),
                     [rng.randrange(100, 40000) for _ in range(rng.randint(40, 96))],
                     float(i % 2), 0.5, 0.0, 1.0 / 2500) for i in range(32)]
    batch = collate(seqs, tok.pad_token_id, torch.device("cpu"))
    algo = Config().algo
    settings = [
        ("fp32, lean, reduction=none (before)", ReductionNone, torch.float32, "lean"),
        ("fp32, chunked, reduction=none (recompute)", ReductionNone, torch.float32, "chunked"),
        ("fp32, chunked, token_weights (grads in forward)", PolicyWithLoss, torch.float32,
         "chunked"),
        ("bf16 autocast, chunked, token_weights", PolicyWithLoss, torch.bfloat16, "chunked"),
        ("bf16 autocast, chunked, token_weights, on-policy shortcut", PolicyWithLoss,
         torch.bfloat16, "chunked"),
    ]
    chosen = args.only if args.only is not None else list(range(len(settings)))
    times: dict[int, list[tuple[float, float]]] = {i: [] for i in chosen}
    for _ in range(args.repeats):   # interleaved: a busy machine slows every setting alike
        for i in chosen:
            label, cls, dtype, mode = settings[i]
            shortcut = "shortcut" in label
            policy = cls(model, algo, "torch", dtype, mode)
            with torch.no_grad():
                batch["old_logprobs"], _ = policy(batch, logprobs_only=True)   # warm-up
            t0 = time.perf_counter()
            if shortcut:
                del batch["old_logprobs"]   # the update's forward computes pi_old itself
            else:
                with torch.no_grad():
                    policy(batch, logprobs_only=True)
            t1 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            loss, _ = policy(batch)
            loss.backward()
            t2 = time.perf_counter()
            times[i].append((t1 - t0, t2 - t1))
            print(f"{label:58s} old log-probs {t1 - t0:6.2f} s   update {t2 - t1:6.2f} s",
                  flush=True)
    rows = []
    for i in chosen:
        old = sorted(t for t, _ in times[i])[len(times[i]) // 2]
        upd = sorted(t for _, t in times[i])[len(times[i]) // 2]
        rows.append(dict(setting=settings[i][0], old_logp_s=round(old, 2), update_s=round(upd, 2),
                         total_s=round(old + upd, 2), repeats=args.repeats))
    tokens = int(batch["loss_mask"].sum())
    if args.out:
        args.out.write_text(json.dumps(dict(rows=rows, answer_tokens=tokens,
                                            sequences=len(seqs), torch=torch.__version__,
                                            machine=platform.processor() or platform.machine(),
                                            threads=torch.get_num_threads()), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
