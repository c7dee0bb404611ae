"""Pieces every offline benchmark shares: the default model, radixlm runs, and result rows."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from radixlm.bench.hf_baselines import Job
from radixlm.bench.report import SystemResult, count_tokens
from radixlm.bench.workloads import TokenPool
from radixlm.config import EngineConfig

DEFAULT_ARCH, DEFAULT_SIZE = "qwen2", "0.5b"


def default_model_path() -> str:
    """The Qwen2.5-0.5B-shaped qwen2 folder with random weights, written locally once (bf16)."""
    from radixlm.testing import cached_model_folder

    return str(cached_model_folder(DEFAULT_ARCH, DEFAULT_SIZE))


def resolve_config(config: EngineConfig) -> EngineConfig:
    """An empty --model-path means the benchmark model, not the engine's tiny demo model."""
    return config if config.model_path else config.replace(model_path=default_model_path())


def radixlm_params(max_new_tokens: int) -> dict[str, Any]:
    # ignore_eos: every request decodes exactly what it asked for, as the baselines do.
    return {"max_new_tokens": max_new_tokens, "ignore_eos": True, "temperature": 0.0}


def warmup_jobs(
    pool: TokenPool, seed: int, count: int = 4, prompt_len: int = 32, new_tokens: int = 8
) -> list[Job]:
    """A few short requests, run once per system before timing (first-call allocations, lazy init)."""
    rng = random.Random(seed + 7919)
    return [(pool.sample(rng, prompt_len), new_tokens) for _ in range(count)]


def start_engine(config: EngineConfig, warmup: Sequence[Job]) -> Any:
    """An Engine that has served `warmup` once and then dropped its prefix cache."""
    from radixlm import Engine

    engine = Engine(**{f: getattr(config, f) for f in EngineConfig.field_names()})
    try:
        if warmup:
            engine.generate(
                input_ids=[p for p, _ in warmup], sampling_params=[radixlm_params(n) for _, n in warmup]
            )
        engine.flush_cache()  # warmup prompts must not count as cache hits in the timed run
    except BaseException:
        engine.shutdown()
        raise
    return engine


def run_radixlm(
    engine: Any, jobs: Sequence[Job], extra: dict[str, Any] | None = None
) -> tuple[list[dict[str, Any]], float]:
    """All jobs in one `generate` call (the engine schedules them); returns its outputs and seconds.
    `extra`: sampling params added to every request (e.g. a json_schema)."""
    start = time.perf_counter()
    outs = engine.generate(
        input_ids=[p for p, _ in jobs], sampling_params=[{**radixlm_params(n), **(extra or {})} for _, n in jobs]
    )
    return outs, time.perf_counter() - start


T = TypeVar("T")


def fastest_round(rounds: int, run: Callable[[], tuple[T, float]]) -> tuple[T, float, list[float]]:
    """`run` (returning its outputs and seconds) `rounds` times: the fastest round's outputs and seconds,
    and every round's seconds in order. On a shared machine one short run moves 20-30% with the host's
    load; every system of a bench gets the same number of rounds, so the best of each compares alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    best: tuple[T, float] | None = None
    seconds: list[float] = []
    for _ in range(rounds):
        out, s = run()
        seconds.append(s)
        if best is None or s < best[1]:
            best = (out, s)
    assert best is not None
    return best[0], best[1], seconds


def rounds_note(seconds: Sequence[float]) -> str:
    return f"fastest of {len(seconds)} rounds ({', '.join(f'{s:.2f}' for s in seconds)} s)"


def make_result(
    system: str,
    jobs: Sequence[Job],
    generated: Sequence[int],
    seconds: float,
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> SystemResult:
    requested = [n for _, n in jobs]
    useful, total, short = count_tokens(list(generated), requested)
    return SystemResult(
        system=system,
        requests=len(jobs),
        prompt_tokens=sum(len(p) for p, _ in jobs),
        requested_tokens=sum(requested),
        output_tokens=useful,
        generated_tokens=total,
        seconds=seconds,
        short_requests=short,
        notes=list(notes),
        extra=dict(extra or {}),
    )


def radixlm_result(
    system: str, jobs: Sequence[Job], outs: Sequence[dict[str, Any]], seconds: float
) -> SystemResult:
    cached = sum(o["meta_info"].get("cached_tokens", 0) for o in outs)
    prompt = sum(len(p) for p, _ in jobs)
    return make_result(
        system,
        jobs,
        [len(o["output_ids"]) for o in outs],
        seconds,
        extra={"cached_tokens": cached, "cache_hit_rate": cached / prompt if prompt else 0.0},
    )
