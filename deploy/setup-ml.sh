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
if ! .venv/bin/python -c 'import torch, transformers, pyarrow; assert torch.__version__.startswith("2.11.0")' 2>/dev/null; then
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -r deploy/requirements-ml.txt
fi
torch_dir=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ln -sfn "$torch_dir" .venv/libtorch
echo "libtorch: $torch_dir ($(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
# verl 0.9.1, the reference for the GRPO trainer's mathematics (tests/fixtures/verl_reference.py),
# in its own target directory .venv/verl so that its pins cannot move .venv's torch/transformers.
# --no-deps: only what `import verl.trainer.ppo.core_algos` needs (verl/__init__ imports ray).
verl_pins=(verl==0.9.1 tensordict==0.10.0 pyvers==0.2.3 cloudpickle==3.1.2 codetiming==1.4.0
    orjson==3.13.0 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 ray==2.60.0 msgpack==1.2.4
    protobuf==7.36.2 requests==2.34.2 urllib3==2.8.0 jsonschema==4.26.0 attrs==26.1.0
    referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
    charset-normalizer==3.5.2)
if ! PYTHONPATH=.venv/verl .venv/bin/python -c 'import verl.trainer.ppo.core_algos, verl; import charset_normalizer; assert verl.__version__ == "0.9.1"' 2>/dev/null; then
    rm -rf .venv/verl
    .venv/bin/pip install --quiet --no-deps --target .venv/verl "${verl_pins[@]}"
fi
