#!/usr/bin/env bash
# Installs libtorch for twin-ml: PyPI's torch==2.11.0 wheel (CUDA 13 build; it runs on CPU too)
# into a project-local virtual environment ./.venv, plus the reference implementations the parity
# fixtures are made with. Then links .venv/libtorch to the wheel's torch directory, which is
# where .cargo/config.toml points tch's build (LIBTORCH). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
if ! .venv/bin/python -c 'import importlib.metadata as m, torch, transformers, pyarrow
assert torch.__version__.startswith("2.11.0"); m.version("nvidia-cuda-crt")' 2>/dev/null; then
    .venv/bin/pip install --quiet --no-cache-dir --upgrade pip
    # No download cache: the CUDA wheels are about 3 GB, already unpacked into .venv, and a CI
    # disk filled once.
    .venv/bin/pip install --quiet --no-cache-dir -r deploy/requirements-ml.txt
fi
torch_dir=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" .venv/libtorch
echo "libtorch: $torch_dir ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
