#!/usr/bin/env bash
# Installs verl 0.9.1, the reference for the GRPO trainer's mathematics
# (tests/fixtures/verl_reference.py), into its own target directory .venv/verl so that its pins
# cannot move .venv's torch/transformers. Only the tests need it (deploy/test.sh calls this after
# deploy/setup-ml.sh); the demo does not. --no-deps: only what `import
# verl.trainer.ppo.core_algos` needs (verl/__init__ imports ray). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
verl_pins=(verl==0.9.1 tensordict==0.10.0 pyvers==0.2.3 cloudpickle==3.1.2 codetiming==1.4.0
    orjson==3.13.0 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 ray==2.60.0 msgpack==1.2.4
    protobuf==7.36.2 requests==2.34.2 urllib3==2.8.0 jsonschema==4.26.0 attrs==26.1.0
    referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
    charset-normalizer==3.5.2)
if ! PYTHONPATH=.venv/verl .venv/bin/python -c 'import verl.trainer.ppo.core_algos, verl; import charset_normalizer; assert verl.__version__ == "0.9.1"' 2>/dev/null; then
    rm -rf .venv/verl
    .venv/bin/pip install --quiet --no-cache-dir --no-deps --target .venv/verl "${verl_pins[@]}"
fi
