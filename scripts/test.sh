#!/usr/bin/env bash
# Quick start 2/2: install with the test extras, then run the test suite (CPU; GPU-only tests skip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RADIXLM_EXTRAS=test . scripts/install.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check radixlm tests
exec python -m pytest tests "$@"
