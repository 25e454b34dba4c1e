#!/usr/bin/env bash
# Set up .venv with the runtime, the exporter (its TFLite and Keras routes too), the dataset and serve extras
# and the test tools, then run the tests. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k parity`.
# The browser test needs Debian's chromium and chromium-driver (it skips, saying so, without them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh export,test,dataset,serve,tflite,keras
# NPCAM_ARM64=setup (CI sets it) first sets up the emulated aarch64 Python of tests/test_aarch64.py, which
# otherwise runs where scripts/arm64_env.sh was run before and skips, saying so, elsewhere.
if [ "${NPCAM_ARM64:-}" = setup ]; then
    bash scripts/arm64_env.sh .venv/bin/python >/dev/null \
        || echo "test: WARNING: no emulated aarch64 Python (see above); tests/test_aarch64.py will skip" >&2
fi
.venv/bin/python -m pytest "$@"
