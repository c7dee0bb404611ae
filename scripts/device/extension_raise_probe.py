"""Seen on the CUDA image (torch 2.11+cu130, 2026-12-04): the second TORCH_CHECK failure raised by radixlm's
CPU extension in a process segfaulted, in five tests; the first raised cleanly. Not reproduced on the
2-core dev machine with the same torch build. This probe raises the same error four times, alone, with the
compiler's and the CPU's names printed, so a GPU session can see whether it is the image's toolchain."""

import platform
import subprocess

import torch

from radixlm.layers import cpu_kernels

print("g++:", subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout.splitlines()[0])
cpu = [ln for ln in open("/proc/cpuinfo") if ln.startswith("model name")][:1]
print("cpu:", cpu[0].split(":", 1)[1].strip() if cpu else platform.processor(), "| torch", torch.__version__)
ops = cpu_kernels.ops()
print("isa:", cpu_kernels.isa() if ops is not None else "extension did not build", flush=True)
for i in range(4):
    try:
        ops.silu_and_mul(torch.randn(2, 7).bfloat16() if i % 2 else torch.randn(2, 8))
    except RuntimeError as e:
        print(i, "raised:", str(e).splitlines()[0][:80], flush=True)
print("probe: all four raised")
