#!/usr/bin/env bash
# Set up .venv with the runtime, the exporter (its TFLite and Keras routes too), the dataset and serve extras
# and the test tools, then run the tests. Extra arguments go to pytest, e.g. `bash scripts/test.sh -k parity`.
# The browser test needs Debian's chromium and chromium-driver (it skips, saying so, without them).
#
# `bash scripts/test.sh --fast [pytest args]`: only the fast tier (the tests marked `fast`), in .venv-fast,
# which holds the runtime, onnx, pytest and hypothesis and never torch. Test files that mark no test fast
# are not collected and the other tests are deselected (not skipped); the summary counts them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--fast" ]]; then
    shift
    venv=.venv-fast
    stamp="$venv/.npcam-setup.cfg"
    # Installing again only when setup.cfg changed keeps the loop short.
    if ! cmp -s setup.cfg "$stamp" 2>/dev/null; then
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install -q --upgrade pip
        "$venv/bin/python" -m pip install -q -e ".[test-fast]"
        cp setup.cfg "$stamp"
    fi
    if "$venv/bin/python" -c "import torch" 2>/dev/null; then
        echo "test.sh: $venv has torch installed; the fast tier must run without it (remove $venv)" >&2
        exit 2
    fi
    exec "$venv/bin/python" -m pytest --fast "$@"
fi
bash scripts/venv.sh export,test,dataset,serve,tflite,keras,lint
.venv/bin/ruff check --quiet .
# NPCAM_ARM64=setup (CI sets it) first sets up the emulated aarch64 Python of tests/test_aarch64.py, which
# otherwise runs where scripts/arm64_env.sh was run before and skips, saying so, elsewhere.
if [ "${NPCAM_ARM64:-}" = setup ]; then
    bash scripts/arm64_env.sh .venv/bin/python >/dev/null \
        || echo "test: WARNING: no emulated aarch64 Python (see above); tests/test_aarch64.py will skip" >&2
fi
# One pytest-xdist worker per core (tests/conftest.py's made_once shares the exports between them); arguments
# given to this script come after, so `-n 0` runs the tests in this process.
.venv/bin/python -m pytest -n auto --dist worksteal "$@"
