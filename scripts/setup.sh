#!/usr/bin/env bash
# Create .venv once and install torch, then sparta (editable) with its test dependencies and every
# optional extra (AutoAttack, torch-pruning, matplotlib, TensorBoard, submitit), and secml-torch, so the whole suite runs.
# torch goes first: without it, pip would resolve sparta's `torch` requirement to a multi-GB CUDA
# build. On a GPU machine, install the torch build you want into .venv first (see README); this
# script keeps any torch it finds there. SPARTA_TORCH overrides the default CPU pin.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "${SPARTA_TORCH:-torch==2.13.0}"
fi
# reinstall only when the package metadata changed (the install is editable: code changes need none)
stamp=.venv/.sparta-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q -e ".[test,autoattack,pruning,report,tensorboard,cluster]"
  echo "$want" > "$stamp"
fi
# secml-torch (the FMN of `sparta eval --attack fmn`) without its dependencies: it declares torchvision,
# which would pull another torch and does not import beside this one; the modules sparta uses need only torch
if ! .venv/bin/python -c "import secmlt, sys; sys.exit(secmlt.__version__.strip() != '1.5')" 2>/dev/null; then
  .venv/bin/python -m pip install -q --no-deps "secml-torch==1.5"
fi
