#!/usr/bin/env bash
# Download the wheels that tools/gpu_check.sh installs on a GPU machine without registry access
# (docs/gpu.md). Run where pip can reach the registry, from anywhere inside the repository:
#
#   bash tools/gpu_wheels.sh            # into .gpu_wheels/ (git-ignored)
#
# What the checks import and a stock PyTorch GPU image lacks: megatron-core (its own needs,
# torch, numpy and packaging, are on such an image) and omegaconf (needs PyYAML, also there).
# transformers, tokenizers, safetensors, PyYAML, pytest and pytest-timeout are on the image
# (docs/gpu.md lists the versions seen); add them to EXTRA for an image without them, e.g.
#   EXTRA="transformers==5.19.0 tokenizers==0.23.3" bash tools/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${K15_GPU_WHEELS:-.gpu_wheels}
PYTHON=${PYTHON:-python3}
WHEELS="megatron-core==0.19.2 omegaconf==2.4.0 ${EXTRA:-}"
mkdir -p "$DEST"
# shellcheck disable=SC2086  # WHEELS is a list of requirement strings
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" $WHEELS
ls -l "$DEST"
du -sh "$DEST"
