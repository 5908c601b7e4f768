"""Schemathesis hooks for deploy/api-check.sh: what the document cannot tell a fuzzer.

Loaded through SCHEMATHESIS_HOOKS, with this directory on PYTHONPATH.
"""

import schemathesis

# Module uploads are raw bytes; schemathesis has no serializer of its own for `application/wasm`.
schemathesis.serializer.alias("application/wasm", "application/octet-stream")

# Long polls: `wait_ms` is valid at any size a u64 holds (the server caps it at 60 s for events,
# 30 s for leases), but each such case would hold the run that long and prove nothing a short
# one does not. Capped here, not in the document, which says what the server accepts. Values the
# server refuses (negative, non-numeric, past u64) are left alone: they are the negative cases.
WAIT_CAP_MS = 20
U64_MAX = 2**64 - 1


def _capped(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and WAIT_CAP_MS < value <= U64_MAX:
        return WAIT_CAP_MS
    if isinstance(value, str) and value.isascii() and value.isdigit():
        # Query values travel as text; the coverage phase writes them that way.
        return str(WAIT_CAP_MS) if WAIT_CAP_MS < int(value) <= U64_MAX else value
    return value


@schemathesis.hook
def map_case(ctx, case):
    for container in (case.query, case.body):
        if isinstance(container, dict) and "wait_ms" in container:
            container["wait_ms"] = _capped(container["wait_ms"])
    return case
