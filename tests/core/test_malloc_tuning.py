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


# The same rounds on a thread started after the settings, with 80 MiB buffers: larger than a thread arena's
# 64 MiB heaps, so without share_main_arena each one is a fresh mmap whatever the thresholds.
THREAD_PROBE = """
import resource, sys, threading, torch
from radixlm.core import malloc_tuning
torch.set_num_threads(1)  # every page faulted on the probe's thread, which RUSAGE_THREAD counts
print(malloc_tuning.keep_freed_memory(), malloc_tuning.share_main_arena() if sys.argv[1] == "1" else "-")
out = {}
def rounds():
    for _ in range(10):
        torch.empty(5 << 22).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(40):
        torch.empty(5 << 22).fill_(1.0)
    out["faults"] = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before
t = threading.Thread(target=rounds)
t.start()
t.join()
print(out["faults"])
"""


def _thread_faults(share: bool) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != "RADIXLM_MALLOPT"}
    cmd = [sys.executable, "-c", THREAD_PROBE, "1" if share else "0"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    *applied, faults = out.stdout.split()
    return " ".join(applied), int(faults)


def test_a_thread_started_after_share_main_arena_reuses_its_large_buffers() -> None:
    applied, faults = _thread_faults(share=True)
    assert applied == "True True"
    assert faults < 400, f"{faults} minor faults in 40 rounds on a thread: its buffers were not reused"


def test_a_thread_arena_maps_large_buffers_afresh_without_it() -> None:
    """What share_main_arena is for: the thresholds alone do not reach a thread's own arena."""
    applied, faults = _thread_faults(share=False)
    assert applied == "True -"
    # 20,480 pages a round, each faulted in again.
    assert faults > 40 * 15000, f"only {faults} minor faults: the thread probe shows nothing"


def test_the_inline_core_shares_the_main_arena_before_its_thread_starts(monkeypatch) -> None:
    import threading

    from radixlm import Engine
    from radixlm.core import malloc_tuning
    from radixlm.testing import cached_model_folder

    seen: list[bool] = []

    def record() -> bool:
        seen.append(any(t.name == "radixlm-core" for t in threading.enumerate()))
        return True

    monkeypatch.setattr(malloc_tuning, "share_main_arena", record)
    engine = Engine(model_path=str(cached_model_folder("qwen2", "tiny")), dtype="float32", device="cpu",
                    inline_core=True, max_total_tokens=2048)  # fmt: skip
    try:
        assert seen == [False], seen  # called once, while no core thread existed yet
    finally:
        engine.shutdown()
