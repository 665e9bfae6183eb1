"""A tiny Qwen2-architecture model and a byte-level tokenizer, built in code (no hub access).

The tokenizer is byte-level BPE with no merges: every byte is one token, which suits arithmetic
(digits are never merged) and loads in transformers and vLLM like any Qwen2 tokenizer. One head
of size ``hidden`` keeps vLLM's CPU attention happy (head sizes 32, 64, 80, ...).
"""
from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"


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


def build_tiny_model(tokenizer, hidden: int = 64, layers: int = 2, intermediate: int = 256,
                     seed: int = 0, max_positions: int = 512):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab = 64 * ((len(tokenizer) + 63) // 64)   # padded, as real vocabularies are
    config = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=1, num_key_value_heads=1, head_dim=hidden,
        max_position_embeddings=max_positions, tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, torch_dtype="float32")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    return model


def save_tiny(out_dir: str | Path, hidden: int = 64, layers: int = 2, intermediate: int = 256,
              seed: int = 0) -> Path:
    """Write a freshly initialized tiny model and its tokenizer as a Hugging Face folder."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, hidden, layers, intermediate, seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
