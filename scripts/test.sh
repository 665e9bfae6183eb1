#!/usr/bin/env bash
# Set up a fresh machine (no GPU needed) and run the whole test suite.
# Creates .venv beside the repo; the Triton kernels run in the Triton interpreter on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: on this project's machines 2.13.0 is a local CPU build; an unpinned
# torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
.venv/bin/python -c "import torch, triton, nft_kernels; print('torch', torch.__version__, '| triton', triton.__version__)"
exec .venv/bin/python -m pytest -q "$@"
