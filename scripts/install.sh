#!/usr/bin/env bash
# Install radixlm into ./.venv. Sourced by scripts/demo.sh and scripts/test.sh; safe to run again.
#
# Why a venv with --system-site-packages: a torch the user already has (CUDA or CPU) stays visible and is
# kept. Only when there is no torch at all do we install one ourselves, and then a pinned build, because
# an unpinned `torch` pulls several GB of CUDA wheels even on a CPU-only machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extras="${RADIXLM_EXTRAS:-}"  # e.g. "test"; an env var because this file is sourced with the caller's arguments
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" >/dev/null 2>&1; then
    # Override with RADIXLM_TORCH_SPEC (e.g. a CUDA build on a GPU machine).
    python -m pip install -q "${RADIXLM_TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".${extras:+[$extras]}"
