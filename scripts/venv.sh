#!/usr/bin/env bash
# Create .venv (if needed) and install npcam into it with the given extras, e.g. `export,test`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: on the project's machines this version is the local CPU build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[$1]"
# The test extra's reference for ROAD, without its dependencies: they would bring torchvision and another torch
# (setup.cfg, the test extra, says why; tests/test_metrics_parity.py stubs what it does not use).
case ",$1," in *,test,*) .venv/bin/python -m pip install -q --no-deps grad-cam==1.5.7 ;; esac
