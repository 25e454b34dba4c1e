#!/usr/bin/env bash
# Set up .venv with the runtime, the exporter (its TFLite and Keras routes too), the dataset and serve extras
# and the test tools, then run the tests. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k parity`.
# The browser test needs Debian's chromium and chromium-driver (it skips, saying so, without them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh export,test,dataset,serve,tflite,keras
.venv/bin/python -m pytest "$@"
