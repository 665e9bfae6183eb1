#!/usr/bin/env bash
# Set up a fresh machine (a CPU is enough) and run the NFT demo: a tiny Qwen2 model built in
# code is warm-started on an addition task, trained with NFT, and evaluated before and after.
# Extra arguments go to `nft-train demo` (--out DIR, --steps N, --backend hf|vllm, --seed S).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
pip_install -e '.[train]'
exec .venv/bin/nft-train demo "$@"
