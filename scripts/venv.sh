# Sourced by test.sh and demo.sh: create .venv beside the repo and install torch, pinned.
# On this project's machines torch 2.13.0 is a local CPU build; an unpinned torch would pull a
# multi-GB CUDA build. On a GPU machine install the torch you need first (see README).
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }
pip_install torch==2.13.0
