#!/usr/bin/env bash
# GPU check kit (docs/gpu.md): on a machine with one CUDA GPU, Python 3.12 and torch but no
# megatron-core and no registry access, install the carried wheels and this package, then run
# tools/gpu_check.py (one line per check: PASS/FAIL/SKIP <check>: <detail>).
#
#   bash tools/gpu_check.sh [--no-install] [gpu_check.py options: --out DIR --checks a,b --allow-cpu]
#
# Wheels come from .gpu_wheels/ (tools/gpu_wheels.sh; K15_GPU_WHEELS names another folder); a
# wheel whose distribution is already installed is left unused. --no-install skips both installs.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${K15_GPU_WHEELS:-.gpu_wheels}
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# The repository is importable even if the editable install below is refused.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

install() {
    local missing
    missing=$("$PYTHON" - "$WHEELS" <<'PY'
import importlib.metadata as md, pathlib, sys
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        print(f"INFO wheels: {name} {md.version(name)} is installed; {wheel.name} not used", file=sys.stderr)
    except md.PackageNotFoundError:
        print(wheel)
PY
    )
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086  # one path per word
        "$PYTHON" -m pip install -q --no-index --no-deps $missing || { echo "FAIL install: pip could not install $missing"; return 1; }
    fi
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
        || echo "INFO install: editable install refused; using PYTHONPATH=$PWD"
}

if [ "${1:-}" = "--no-install" ]; then
    shift
else
    install || exit 1
fi
if ! err=$("$PYTHON" -c "import megatron.core, omegaconf, transformers, safetensors, k15_megatron" 2>&1); then
    echo "FAIL install: ${err##*$'\n'} (carry the wheels: bash tools/gpu_wheels.sh, docs/gpu.md)"
    exit 1
fi
echo "PASS install: megatron-core $("$PYTHON" -c 'import importlib.metadata as m; print(m.version("megatron-core"))') importable"
exec "$PYTHON" tools/gpu_check.py "$@"
