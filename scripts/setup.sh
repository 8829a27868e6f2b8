#!/usr/bin/env bash
# Create the project-local virtual environment (.venv) and install lmforge into it.
#   bash scripts/setup.sh           # the package with its server and eval metrics (quickstart, every CLI stage)
#   bash scripts/setup.sh --test    # plus test dependencies (transformers, datasets, pytest)
# torch is installed first and pinned, so no other package can pull a different (multi-GB CUDA) build.
# Override the torch requirement with LMFORGE_TORCH (e.g. LMFORGE_TORCH="torch==2.13.0 --index-url ...").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${LMFORGE_TORCH:-torch==2.13.0}
extras="[serve,eval]"   # the quickstart evaluates (metrics) and ends by serving the model it trained
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q --disable-pip-version-check $TORCH_SPEC
torch_version=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
constraints=$(mktemp)
echo "torch==${torch_version}" > "$constraints"
.venv/bin/python -m pip install -q --disable-pip-version-check -c "$constraints" -e ".${extras}"
rm -f "$constraints"
# lm-eval 0.4 has no plugin lookup for model types: a one-line .pth registers "lmforge" lazily, so plain
# `lm_eval --model lmforge ...` works (see lmforge/_lm_eval_hook.py).
if .venv/bin/python -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("lm_eval") is None)'; then
  .venv/bin/python -c "from lmforge._lm_eval_hook import write_pth; write_pth()"
fi
echo "lmforge installed in .venv (torch ${torch_version})"
