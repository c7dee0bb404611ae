"""vLLM's OpenAI server as a backend of `radixlm bench serving` (`--backend vllm --vllm-python PATH`).

vLLM lives in its own environment (its wheel pins its own transformers), so its server runs under that
environment's python:

    PATH -m vllm.entrypoints.openai.api_server --model DIR --dtype DTYPE --host 127.0.0.1 --port P
         --enable-prefix-caching --max-model-len LONGEST --kv-cache-memory-bytes N --seed S
         [--max-num-seqs] [--max-num-batched-tokens] [--vllm-server-args ...]

with the environment the offline baseline gives its worker (vllm_baseline.worker_env: radixlm's PYTHONPATH
and VIRTUAL_ENV removed, offline Hub, no usage stats, VLLM_CPU_OMP_THREADS_BIND from
--vllm-omp-threads-bind). It gets the same token-id prompts as radixlm (vLLM's /v1/completions takes
`prompt` as a list of ints) with ignore_eos, min_tokens = max_tokens and temperature 0, so both servers
decode exactly the requested tokens. Start-up (minutes on a CPU: vLLM compiles its model) is timed apart,
as for every launched server, and reported next to radixlm's.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from collections.abc import Sequence
from typing import Any

from radixlm.bench.launched_server import LaunchedServer, ServerUnavailable, free_port
from radixlm.bench.vllm_baseline import VllmOptions, add_shared_vllm_args, worker_env

BACKEND = "vllm"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def add_vllm_server_args(parser: argparse.ArgumentParser) -> None:
    """The offline baseline's spellings (vllm_baseline.add_vllm_args), with their meaning for a server."""
    group = parser.add_argument_group("vLLM server (--backend vllm; runs under its own python)")
    add_shared_vllm_args(
        group,
        "python of an environment with vLLM installed (e.g. /work/vllm-venv/bin/python); needed by "
        "--backend vllm / all",
        server=True,
    )
    group.add_argument(
        "--vllm-server-args",
        default="",
        help="extra flags for vLLM's api_server (one quoted string)",
    )


def needs_vllm_python(ns: argparse.Namespace) -> str | None:
    """Why --backend vllm cannot run with these arguments, or None."""
    if not getattr(ns, "vllm_python", None):
        return "--backend vllm needs --vllm-python PATH (the python of an environment with vLLM installed)"
    return None


def resolve_python(python: str) -> str:
    """The executable --vllm-python names, or ServerUnavailable saying it is missing."""
    resolved = shutil.which(python) if os.sep not in python else python
    if resolved is None or not os.path.isfile(resolved) or not os.access(resolved, os.X_OK):
        raise ServerUnavailable(f"--vllm-python {python}: no such executable")
    return resolved


def vllm_options(ns: argparse.Namespace) -> VllmOptions:
    return VllmOptions(
        python=ns.vllm_python,
        max_num_seqs=ns.vllm_max_num_seqs,
        max_num_batched_tokens=ns.vllm_max_num_batched_tokens,
        kv_cache_gib=ns.vllm_kv_cache_gib,
        omp_threads_bind=ns.vllm_omp_threads_bind,
    )


def server_command(
    python: str, model_path: str, ns: argparse.Namespace, port: int, max_model_len: int
) -> list[str]:
    opts = vllm_options(ns)
    cmd = [python, "-m", SERVER_MODULE, "--model", model_path, "--dtype", ns.dtype]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--enable-prefix-caching"]
    # The longest request decides the context; vLLM would otherwise size it (and check the KV cache
    # against it) from the model's max_position_embeddings.
    cmd += ["--max-model-len", str(max_model_len)]
    cmd += ["--kv-cache-memory-bytes", str(int(opts.kv_cache_gib * 2**30)), "--seed", str(ns.seed)]
    if opts.max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(opts.max_num_seqs)]
    if opts.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(opts.max_num_batched_tokens)]
    # One access-log line per request would only fill the log that a failure's tail is read from.
    cmd += ["--disable-uvicorn-access-log"]
    cmd += shlex.split(ns.vllm_server_args)
    return cmd


def vllm_server(model_path: str, ns: argparse.Namespace, longest: int) -> LaunchedServer:
    """vLLM's server on a free port; `longest`: the longest prompt + max_tokens it will be sent."""
    why = needs_vllm_python(ns)
    if why:
        raise ServerUnavailable(why)
    python = resolve_python(ns.vllm_python)
    port = free_port()
    cmd = server_command(python, os.path.abspath(model_path), ns, port, longest)
    return LaunchedServer("vllm", cmd, port, worker_env(vllm_options(ns)), ns.server_timeout)


def server_version(base_url: str) -> str | None:
    """vLLM's version from its /version route (None if it does not answer)."""
    import httpx

    try:
        return str(httpx.get(base_url.rstrip("/") + "/version", timeout=10).json()["version"])
    except Exception:  # a version is a label in the report, never a reason to fail the run
        return None


def longest_request(requests: Sequence[Any]) -> int:
    """The longest prompt + max_tokens of `requests` (ServingRequest)."""
    return max(len(r.prompt_ids) + r.max_tokens for r in requests)
