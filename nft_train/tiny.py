"""Tiny models and byte-level tokenizers, built in code (no hub access).

The tokenizer is byte-level BPE with no merges: every byte is one token, which suits arithmetic
(digits are never merged) and loads in transformers and vLLM like any Qwen2 tokenizer. One head
of size ``hidden`` keeps vLLM's CPU attention happy (head sizes 32, 64, 80, ...).

``build_chat_tokenizer`` / ``arch="llama"`` give what real checkpoints bring and the demo's
model does not: a ChatML chat template with a default system prompt (as SmolLM2-Instruct's),
tied input and output embeddings, and two end-of-sequence ids in the generation config.
"""
from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_SYSTEM = "You are a careful assistant that adds numbers."
# ChatML, as SmolLM2-Instruct's template: a default system message when none is given.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[EOS] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)


def build_chat_tokenizer():
    """The byte-level tokenizer plus ChatML's <|im_start|> / <|im_end|> and a chat template
    whose default system prompt appears when the messages bring none."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, hidden: int = 64, layers: int = 2, intermediate: int = 256,
                     seed: int = 0, max_positions: int = 512, arch: str = "qwen2"):
    """``arch="qwen2"``: untied head (the demo's model). ``arch="llama"``: tied embeddings, and
    the generation config ends answers at <|im_end|> or <|endoftext|> (two eos ids) when the
    tokenizer has ChatML tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    vocab = 64 * ((len(tokenizer) + 63) // 64)   # padded, as real vocabularies are
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=1, num_key_value_heads=1, head_dim=hidden,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
        torch_dtype="float32")
    if arch == "qwen2":
        config, cls = Qwen2Config(tie_word_embeddings=False, **common), Qwen2ForCausalLM
    elif arch == "llama":
        config, cls = LlamaConfig(tie_word_embeddings=True, **common), LlamaForCausalLM
    else:
        raise ValueError(f"arch must be qwen2 or llama, got {arch!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    if arch == "llama" and im_end != tokenizer.unk_token_id and im_end is not None:
        model.generation_config.eos_token_id = [im_end, tokenizer.eos_token_id]
    return model


def save_tiny(out_dir: str | Path, hidden: int = 64, layers: int = 2, intermediate: int = 256,
              seed: int = 0, arch: str = "qwen2", chat: bool = False) -> Path:
    """Write a freshly initialized tiny model and its tokenizer as a Hugging Face folder."""
    out_dir = Path(out_dir)
    tokenizer = build_chat_tokenizer() if chat else build_tokenizer()
    model = build_tiny_model(tokenizer, hidden, layers, intermediate, seed, arch=arch)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
