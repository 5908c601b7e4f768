#!/usr/bin/env bash
# Installs the third-party OpenAPI tools that deploy/api-check.sh holds the server's document to:
# openapi-spec-validator, schemathesis 4.32.5 and openapi-python-client 0.29.1, with every
# dependency pinned, into their own virtual environment .venv/api-tools (TWIN_API_TOOLS_VENV
# overrides), apart from .venv's torch stack. Idempotent: a second run only compares the pins
# with the ones the environment was built from.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${TWIN_API_TOOLS_VENV:-.venv/api-tools}
python=${PYTHON:-python3}
pins=(openapi-spec-validator==0.9.0 schemathesis==4.32.5 openapi-python-client==0.29.1
    annotated-doc==0.0.7 annotated-types==0.8.0 anyio==4.16.0 attrs==26.1.0
    certifi==2026.10.19.post1 charset-normalizer==3.5.3 click==8.5.1 graphql-core==3.3.2 h11==0.16.0
    harfile==0.6.0 httpcore==1.0.9 httpx==0.28.1 hypothesis==6.170.27 hypothesis-graphql==0.13.5
    idna==3.20 iniconfig==2.3.1 Jinja2==3.1.6 jsonschema==4.26.0 jsonschema-path==0.5.0
    jsonschema-specifications==2025.9.1 jsonschema_rs==0.60.3 lazy-object-proxy==1.13.0
    markdown-it-py==4.3.0 MarkupSafe==3.0.4 mdurl==0.1.2 openapi-schema-validator==0.9.0
    packaging==26.4 pathable==0.6.0 pluggy==1.7.0 pydantic==2.14.4 pydantic-settings==2.16.3
    pydantic_core==2.50.5 Pygments==2.21.0 pyrate-limiter==4.6.0 pytest==9.2.0
    python-dotenv==1.2.4 PyYAML==6.0.4 referencing==0.37.0
    requests==2.34.2 rfc3339-validator==0.1.4 rich==15.0.0 rpds-py==2026.9.1 ruamel.yaml==0.19.1
    ruff==0.17.6 shellingham==1.5.4 six==1.17.0 sortedcontainers==2.4.0 typer==0.27.3
    typing-inspection==0.4.5 typing_extensions==4.16.0 urllib3==2.8.0 Werkzeug==3.1.9)
stamp="$venv/twin-pins.txt"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${pins[*]}" ]; then
    exit 0
fi
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --no-cache-dir --disable-pip-version-check "${pins[@]}"
printf '%s' "${pins[*]}" >"$stamp"
