#!/usr/bin/env bash
# Sets up everything the test suite needs on a fresh Debian machine, then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    # The service's integration test scrapes real metrics with a real Prometheus server;
    # tests/deploy checks and unit-tests the alerting rules with its promtool.
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
python3 -m pip install -q -e '.[test]'
# KServe's Python client pins pydantic and psutil and brings a web stack: its own environment,
# which sees this one's packages; tests/service/test_upstream.py runs it in a subprocess.
# --system-site-packages would link it to the base interpreter, not to a venv this script runs in:
# scripts/inherit_site.py points it at this python3's site-packages instead (rewritten every run).
if [ ! -x .venv-kserve/bin/python ]; then
    python3 -m venv .venv-kserve   # Debian's system Python: apt install python3-venv
fi
python3 scripts/inherit_site.py .venv-kserve >/dev/null
if ! .venv-kserve/bin/python -c 'import kserve' >/dev/null 2>&1; then
    .venv-kserve/bin/python -m pip install -q 'kserve==0.21.0'
fi
export SEMGUARD_KSERVE_PYTHON="$PWD/.venv-kserve/bin/python"
python3 -m pip check
# Two workers, a test file each at a time (module fixtures stay in one process): 166 s -> 100 s on 2 cores.
exec python3 -m pytest -q -n 2 --dist loadfile "$@"
