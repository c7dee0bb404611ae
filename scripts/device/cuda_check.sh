#!/usr/bin/env bash
# On a lent CUDA machine (the `device` tool's H200): the suite on CUDA, then a short GPU benchmark.
# Carry `.whl` (the server/grammar/GGUF wheels that machine's image lacks; see scripts/device/README.md).
# Results land in $OUT: suite.log, junit.xml, bench.json, bench.log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SUITE_S=${SUITE_S:-330}; BENCH_S=${BENCH_S:-150}; WORKERS=${WORKERS:-12}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

# 0) does an error raised in the CPU extension come back as a RuntimeError here (see the probe's docstring)?
timeout 120 python3 -X faulthandler scripts/device/extension_raise_probe.py 2>&1 | grep -v Warning | tail -8

# 1) the suite (not slow) with device auto = cuda; the transformers oracle stays on the CPU in float32.
# -v names each test as it ends, so a run cut short by the timeout still says which ones failed.
timeout "$SUITE_S" python3 -m pytest tests -v -m 'not slow' -p no:cacheprovider -n "$WORKERS" --timeout 120 \
    -o addopts="" -rfE --junitxml="$OUT/junit.xml" >"$OUT/suite.log" 2>&1
echo "suite rc=$?"
grep -E "(FAILED|ERROR|crashed)" "$OUT/suite.log" | grep -v "^E " | cut -c1-200 | sort -u | head -60
grep -cE "PASSED" "$OUT/suite.log" | sed 's/^/passed: /'
tail -2 "$OUT/suite.log"

# 2) the offline benchmark's default workload on the 0.5B qwen2 shape in bf16, against transformers on the GPU.
M=$(python3 -c "from radixlm.testing.model_folders import cached_model_folder as c; print(c('qwen2', '0.5b'))")
timeout "$BENCH_S" python3 -m radixlm.cli bench offline --model-path "$M" --dtype bfloat16 --device cuda \
    --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
echo "bench rc=$?"
tail -25 "$OUT/bench.log"
