#!/usr/bin/env bash
# Set up .venv with the runtime, the exporter and the test tools, then run the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k parity`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh export,test
.venv/bin/python -m pytest "$@"
