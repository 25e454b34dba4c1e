#!/usr/bin/env bash
# Set up .venv with the runtime, the exporter and the test tools, then run the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: on the project's machines this version is the local CPU build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[export,test]'
.venv/bin/python -m pytest "$@"
