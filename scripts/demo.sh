#!/usr/bin/env bash
# Quick start 1/2: install, then generate with a locally written demo model (or pass --model-path DIR).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/install.sh
exec radixlm demo "$@"
