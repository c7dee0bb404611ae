"""malloc_tuning: with the thresholds raised, a step-sized buffer freed and allocated again is reused
instead of page-faulted in afresh (counted in minor page faults, not timed)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from radixlm.core.malloc_tuning import _is_glibc

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or not _is_glibc(), reason="mallopt is glibc's (Linux) only"
)

# 40 rounds of a 48 MiB buffer written through (fill_), freed, allocated again. 48 MiB: above the 32 MiB
# ceiling of glibc's own adaptive mmap threshold, so that with its defaults every round is a fresh mmap.
PROBE = """
import resource, sys, torch
from radixlm.core.malloc_tuning import keep_freed_memory
print(keep_freed_memory())
for _ in range(10):  # the first rounds still fault while the heap settles (seen: rounds 2-6)
    torch.empty(3 << 22).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    torch.empty(3 << 22).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_switch: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "RADIXLM_MALLOPT"}
    if env_switch is not None:
        env["RADIXLM_MALLOPT"] = env_switch
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


def test_raised_thresholds_reuse_freed_step_buffers() -> None:
    applied, faults = _faults(None)
    assert applied == "True"
    assert faults < 400, f"{faults} minor faults in 40 rounds: the freed buffer was not reused"


def test_switch_off_leaves_malloc_alone() -> None:
    applied, faults = _faults("0")
    assert applied == "False"
    # glibc's own thresholds: each round's buffer is a fresh mmap, 12288 pages faulted in again.
    assert faults > 40 * 6000, f"only {faults} minor faults with glibc's defaults: the probe shows nothing"
