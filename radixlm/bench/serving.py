"""`radixlm bench serving`: an OpenAI-compatible server under Poisson load, radixlm against `transformers serve`
and vLLM's server (radixlm/bench/vllm_server.py).

The client sends `--num-requests` streaming `/v1/completions` requests with Poisson arrivals at
`--request-rate` requests/s (`inf`: all at once), and measures per request:
  TTFT  time from sending to the first chunk carrying non-empty text
  ITL   the gaps between successive non-empty chunks (pooled over all requests for p50/p99)
  E2E   time from sending to the end of the stream
and overall request throughput and output tokens/s (over the time from the first send to the last end).

`--max-concurrency N` caps the requests in flight (a request waits for a free slot after its arrival time),
so `--max-concurrency 1` and `8` measure one and eight concurrent streams on the same requests.
Each launched server's start-up (start to the first 200 from /health) is reported with its row.

Prompts are the same token sequences for every backend. radixlm and vLLM get token ids (`prompt: [ids]`)
with `ignore_eos` and `min_tokens` = `max_tokens`. `transformers serve` only takes text and rejects unknown
fields, so it gets a text that tokenizes to exactly those ids (see `workloads.canonical_text_prompt`)
and a `generation_config` JSON with `eos_token_id: -1` (no EOS), which its continuous batching honours
per request. Output token counts come from each server's final `usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from radixlm.bench.hf_baselines import CPU_MAX_BATCH_TOKENS
from radixlm.bench.launched_server import (  # noqa: F401 - LaunchedServer, _server_env, free_port: bench/lang.py
    LaunchedServer,
    ServerUnavailable,
    _server_env,
    free_port,
    terminate_as_exit,
)
from radixlm.bench.report import environment, percentile
from radixlm.bench.vllm_server import add_vllm_server_args, needs_vllm_python

BACKENDS = ("radixlm", "transformers", "vllm")
# --backend spellings that name several backends. `both` keeps its meaning from before vLLM was a backend.
BACKEND_GROUPS = {"both": ("radixlm", "transformers"), "all": BACKENDS}
HF_PAGE_SIZE = 256  # transformers continuous batching's default KV block


# ---- arguments ---------------------------------------------------------------------------------------


def _rate(value: str) -> float:
    rate = float(value)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"--request-rate must be > 0 or inf, got {value}")
    return rate


def parse_backends(value: str) -> tuple[str, ...]:
    """--backend: one backend, `both` (radixlm, transformers), `all`, or a comma list (radixlm,vllm)."""
    if value in BACKEND_GROUPS:
        return BACKEND_GROUPS[value]
    names = tuple(v.strip() for v in value.split(","))
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown backend {', '.join(unknown) or value!r}: choose from {', '.join(BACKENDS)}, "
            f"{', '.join(BACKEND_GROUPS)}, or a comma list such as radixlm,vllm"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--backend names a backend twice: {value!r}")
    return names


def add_serving_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        type=parse_backends,
        default=("radixlm",),
        metavar="BACKEND[,BACKEND]",
        help="servers to measure, one after the other: radixlm, transformers, vllm, a comma list of them, "
        "both (= radixlm,transformers) or all (default: radixlm)",
    )
    parser.add_argument(
        "--base-url",
        default=None,
        help="an already running server (e.g. http://127.0.0.1:30000); --backend then only says which "
        "request format it takes (radixlm, vllm: token ids; transformers: text). Default: launch the "
        "server(s).",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="most requests in flight at once (default: no cap); 1 measures a single stream",
    )
    parser.add_argument(
        "--model-path", default="", help="model folder (default: the local qwen2 0.5b test model)"
    )
    parser.add_argument(
        "--dtype", default="bfloat16", help="dtype the launched servers load (default bfloat16)"
    )
    parser.add_argument("--device", default="auto", help="device for the launched servers: auto, cpu, cuda")
    parser.add_argument(
        "--request-rate", type=_rate, default=math.inf, help="requests/s, Poisson; inf = all at once"
    )
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--min-prompt", type=int, default=128)
    parser.add_argument("--max-prompt", type=int, default=512)
    parser.add_argument("--min-output", type=int, default=64)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument(
        "--server-args",
        default="",
        help="extra flags for `python -m radixlm.launch_server` (one quoted string)",
    )
    parser.add_argument(
        "--hf-serve-args", default="", help="extra flags for `transformers serve` (one quoted string)"
    )
    parser.add_argument(
        "--hf-serve-pythonpath",
        default=None,
        help="prepended to PYTHONPATH for `transformers serve` only: a folder holding accelerate and psutil "
        "(`pip install --target DIR accelerate psutil`), which transformers serve needs and radixlm does not",
    )
    parser.add_argument(
        "--server-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for a server to start (vLLM's takes 100-400 s on a CPU)",
    )
    add_vllm_server_args(parser)


# ---- workload -------------------------------------------------------------------------------------------


@dataclass
class ServingRequest:
    prompt_ids: list[int]
    prompt_text: str
    max_tokens: int


def build_requests(
    model_path: str, ns: argparse.Namespace
) -> tuple[list[ServingRequest], list[ServingRequest]]:
    """(timed requests, two short warmup requests); ids and text agree for every one of them."""
    from radixlm.bench.workloads import canonical_text_prompt, load_token_pool, random_requests

    pool = load_token_pool(model_path)
    reqs = random_requests(
        pool, ns.num_requests, (ns.min_prompt, ns.max_prompt), (ns.min_output, ns.max_output), ns.seed
    )
    warm = random_requests(pool, 2, (16, 16), (4, 4), ns.seed + 7919)

    def convert(r) -> ServingRequest:
        text, ids = canonical_text_prompt(pool.tokenizer, r.prompt_ids)
        return ServingRequest(ids, text, r.max_new_tokens)

    return [convert(r) for r in reqs], [convert(r) for r in warm]


def payload(backend: str, model: str | None, req: ServingRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": req.prompt_ids,
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    if model:
        body["model"] = model
    if backend in ("radixlm", "vllm"):  # both take token ids, ignore_eos and min_tokens as SGLang does
        body.update(ignore_eos=True, min_tokens=req.max_tokens, stream_options={"include_usage": True})
    else:
        # transformers serve: text only, and a 422 for any field it does not know (ignore_eos, min_tokens,
        # stream_options); its generation_config field replaces the model's, and -1 means "no EOS".
        body["prompt"] = req.prompt_text
        body["generation_config"] = json.dumps(
            {"max_new_tokens": req.max_tokens, "do_sample": False, "eos_token_id": -1}
        )
    return body


# ---- client ---------------------------------------------------------------------------------------------


@dataclass
class RequestMetrics:
    requested: int
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    usage_reported: bool = False
    ttft: float = math.nan
    itls: list[float] = field(default_factory=list)
    e2e: float = math.nan
    end: float = 0.0


async def send_one(client: Any, url: str, body: dict[str, Any], requested: int) -> RequestMetrics:
    m = RequestMetrics(requested)
    start = time.perf_counter()
    last_token_time: float | None = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                m.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return m
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    m.error = str(chunk["error"])[:300]
                    return m
                now = time.perf_counter()
                if any(c.get("text") for c in chunk.get("choices") or []):
                    chunks += 1
                    if last_token_time is None:
                        m.ttft = now - start
                    else:
                        m.itls.append(now - last_token_time)
                    last_token_time = now
                usage = chunk.get("usage")
                if usage:
                    m.usage_reported = True
                    m.prompt_tokens = int(usage.get("prompt_tokens", 0))
                    m.output_tokens = int(usage.get("completion_tokens", 0))
    except Exception as exc:  # a dead connection is a failed request, reported, not a crashed benchmark
        m.error = f"{type(exc).__name__}: {exc}"
        return m
    m.end = time.perf_counter()
    m.e2e = m.end - start
    if not m.usage_reported:
        m.output_tokens = chunks  # one chunk per token as a fallback; flagged in the report
    m.ok = True
    return m


async def run_load(
    base_url: str,
    backend: str,
    model: str | None,
    requests: list[ServingRequest],
    rate: float,
    seed: int,
    max_concurrency: int | None = None,
) -> tuple[list[RequestMetrics], float]:
    """Poisson arrivals on a fixed, seeded schedule, at most `max_concurrency` in flight (a request that
    arrives while all slots are busy waits for one, and its TTFT counts from when it is sent); returns every
    request's metrics and the duration."""
    import httpx

    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in requests:
        offsets.append(t)
        if not math.isinf(rate):
            t += rng.expovariate(rate)
    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        t0 = time.perf_counter()

        async def scheduled(offset: float, req: ServingRequest) -> RequestMetrics:
            delay = t0 + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is None:
                return await send_one(client, url, payload(backend, model, req), req.max_tokens)
            async with slots:
                return await send_one(client, url, payload(backend, model, req), req.max_tokens)

        metrics = await asyncio.gather(*(scheduled(o, r) for o, r in zip(offsets, requests)))
    ends = [m.end for m in metrics if m.ok]
    return list(metrics), (max(ends) - t0) if ends else math.nan


async def warm_up(base_url: str, backend: str, model: str | None, requests: list[ServingRequest]) -> None:
    import httpx

    url = base_url.rstrip("/") + "/v1/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0)) as client:
        for req in requests:
            m = await send_one(client, url, payload(backend, model, req), req.max_tokens)
            if not m.ok:
                raise RuntimeError(f"warmup request to {base_url} failed: {m.error}")


# ---- results ----------------------------------------------------------------------------------------------


@dataclass
class ServingResult:
    system: str
    requests: int
    completed: int
    failed: int
    short_requests: int
    prompt_tokens: int
    output_tokens: int  # sum over completed requests of min(generated, requested)
    requested_tokens: int
    duration_s: float
    request_throughput: float
    output_tok_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_s: dict[str, float]
    notes: list[str] = field(default_factory=list)
    backend: str = ""  # radixlm, transformers, vllm (system is the row's label, e.g. "vLLM 0.32.0")
    startup_s: float = math.nan  # process start to the first 200 from /health; NaN for --base-url

    @classmethod
    def from_metrics(
        cls,
        system: str,
        metrics: list[RequestMetrics],
        duration: float,
        backend: str = "",
        startup_s: float = math.nan,
    ) -> ServingResult:
        done = [m for m in metrics if m.ok]
        useful = sum(min(m.output_tokens, m.requested) for m in done)
        itls = [x for m in done for x in m.itls]

        def stats(xs: list[float], scale: float) -> dict[str, float]:
            return {
                "mean": scale * sum(xs) / len(xs) if xs else math.nan,
                "p50": scale * percentile(xs, 50),
                "p99": scale * percentile(xs, 99),
            }

        notes = []
        errors = sorted({m.error for m in metrics if not m.ok})
        if errors:
            notes.append(f"{len(metrics) - len(done)} request(s) failed: {'; '.join(errors[:3])}")
        if any(not m.usage_reported for m in done):
            notes.append("no usage in the stream: output tokens counted as non-empty chunks")
        return cls(
            system=system,
            requests=len(metrics),
            completed=len(done),
            failed=len(metrics) - len(done),
            short_requests=sum(1 for m in done if m.output_tokens < m.requested),
            prompt_tokens=sum(m.prompt_tokens for m in done),
            output_tokens=useful,
            requested_tokens=sum(m.requested for m in metrics),
            duration_s=duration,
            request_throughput=len(done) / duration if duration > 0 else math.nan,
            output_tok_per_s=useful / duration if duration > 0 else math.nan,
            ttft_ms=stats([m.ttft for m in done if not math.isnan(m.ttft)], 1e3),
            itl_ms=stats(itls, 1e3),
            e2e_s=stats([m.e2e for m in done], 1.0),
            notes=notes,
            backend=backend or system,
            startup_s=startup_s,
        )


# Rows of the table: (label, getter, higher_is_better)
_ROWS = [
    ("server start-up (s)", lambda r: r.startup_s, False),
    ("completed / failed", lambda r: f"{r.completed} / {r.failed}", None),
    ("output tokens", lambda r: r.output_tokens, None),
    ("duration (s)", lambda r: r.duration_s, None),
    ("request throughput (req/s)", lambda r: r.request_throughput, True),
    ("output tok/s", lambda r: r.output_tok_per_s, True),
    ("TTFT p50 (ms)", lambda r: r.ttft_ms["p50"], False),
    ("TTFT p99 (ms)", lambda r: r.ttft_ms["p99"], False),
    ("ITL p50 (ms)", lambda r: r.itl_ms["p50"], False),
    ("ITL p99 (ms)", lambda r: r.itl_ms["p99"], False),
    ("E2E p50 (s)", lambda r: r.e2e_s["p50"], False),
    ("E2E p99 (s)", lambda r: r.e2e_s["p99"], False),
]


@dataclass
class ServingReport:
    workload: dict[str, Any]
    results: list[ServingResult] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # backend -> why it could not run

    def table(self) -> str:
        lines = [
            "== radixlm bench serving ==",
            "workload: " + ", ".join(f"{k}={v}" for k, v in self.workload.items()),
        ]
        names = [r.system for r in self.results]
        ref = next((r for r in self.results if r.backend == "radixlm"), None)
        others = [r for r in self.results if r is not ref]
        header = ["metric", *names] + [f"radixlm vs {o.system}" for o in others if ref]
        rows = []
        for label, get, higher in _ROWS:
            row = [label, *(_fmt(get(r)) for r in self.results)]
            if ref:
                for o in others:
                    row.append(_advantage(get(ref), get(o), higher))
            rows.append(row)
        from radixlm.bench.report import _format_rows

        lines += _format_rows(header, rows)
        if ref and others:
            lines.append(
                "radixlm vs X: how many times better radixlm is (X/radixlm for latencies, radixlm/X for rates)"
            )
        lines.append("output tokens: only the tokens each request asked for (from each server's usage)")
        for r in self.results:
            if r.short_requests:
                lines.append(
                    f"  [{r.system}] (!) {r.short_requests} request(s) got fewer tokens than requested"
                )
            for note in r.notes:
                lines.append(f"  [{r.system}] {note}")
        for backend, why in self.unavailable.items():
            lines.append(f"  [{backend}] not run: {why}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "serving",
            "workload": self.workload,
            "environment": self.environment,
            "results": [asdict(r) for r in self.results],
            "unavailable": self.unavailable,
        }


def _fmt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return f"{value:,}"
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"


def _advantage(ref: Any, other: Any, higher_is_better: bool | None) -> str:
    if higher_is_better is None or not all(isinstance(x, (int, float)) for x in (ref, other)):
        return ""
    if math.isnan(ref) or math.isnan(other) or ref <= 0 or other <= 0:
        return "-"
    return f"{(ref / other if higher_is_better else other / ref):.2f}x"


# ---- servers ----------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def radixlm_server(model_path: str, ns: argparse.Namespace) -> LaunchedServer:
    port = free_port()
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--model-path", model_path, "--dtype", ns.dtype]
    cmd += ["--device", ns.device, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    cmd += shlex.split(ns.server_args)
    return LaunchedServer("radixlm", cmd, port, _server_env(), ns.server_timeout)


def transformers_server(
    model_path: str, ns: argparse.Namespace, requests: list[ServingRequest]
) -> LaunchedServer:
    env = _server_env(ns.hf_serve_pythonpath)
    # transformers serve always loads with device_map, which needs accelerate (and accelerate needs psutil);
    # check up front so the report says so instead of showing a traceback from the server log.
    check = subprocess.run(
        [sys.executable, "-c", "import accelerate, psutil"], env=env, capture_output=True, text=True
    )
    if check.returncode != 0:
        missing = check.stderr.strip().splitlines()[-1] if check.stderr.strip() else "import failed"
        raise ServerUnavailable(
            f"`transformers serve` needs accelerate and psutil ({missing}). Install them "
            "(`pip install accelerate psutil`), or into a separate folder "
            "(`pip install --target DIR accelerate psutil`) and pass --hf-serve-pythonpath DIR"
        )
    # The `transformers` console script, run by this interpreter (the one the import check above used).
    base = [
        sys.executable,
        "-c",
        "import sys; from transformers.cli.transformers import main; sys.exit(main())",
    ]
    port = free_port()
    # KV blocks for every request at once, as for the offline generate_batch baseline (never preempts, and
    # on CPU avoids sizing the cache from all free RAM).
    longest = max(len(r.prompt_ids) + r.max_tokens for r in requests)
    num_blocks = (math.ceil(longest * 1.1 / HF_PAGE_SIZE) + 1) * len(requests) + 4
    cmd = [*base, "serve", model_path, "--continuous-batching", "--cb-num-blocks", str(num_blocks)]
    device = _resolve_device(ns.device)
    cmd += ["--dtype", ns.dtype, "--device", device]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    extra = shlex.split(ns.hf_serve_args)
    if device == "cpu" and "--cb-max-batch-tokens" not in extra:
        cmd += ["--cb-max-batch-tokens", str(CPU_MAX_BATCH_TOKENS)]  # see hf_baselines.CPU_MAX_BATCH_TOKENS
    cmd += extra
    return LaunchedServer("transformers", cmd, port, env, ns.server_timeout)


def _model_id(base_url: str, fallback: str) -> str:
    import httpx

    try:
        data = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=10).json()
        return data["data"][0]["id"]
    except Exception:  # transformers serve's /v1/models scans the Hub cache and can fail offline
        return fallback


# ---- the benchmark ------------------------------------------------------------------------------------------


def check_args(ns: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (one line naming the flag), or None."""
    for lo, hi in (("min_prompt", "max_prompt"), ("min_output", "max_output")):
        if not 1 <= getattr(ns, lo) <= getattr(ns, hi):
            return f"need 1 <= --{lo.replace('_', '-')} <= --{hi.replace('_', '-')}"
    if ns.base_url and len(ns.backend) > 1:
        return "--base-url is one server; pick one --backend (radixlm, transformers or vllm)"
    if ns.num_requests < 1:
        return "--num-requests must be >= 1"
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        return "--max-concurrency must be >= 1"
    if "vllm" in ns.backend and not ns.base_url:
        return needs_vllm_python(ns)
    return None


def run_serving_from_args(ns: argparse.Namespace) -> list[ServingReport]:
    from radixlm.bench.common import default_model_path

    problem = check_args(ns)
    if problem:
        print(f"radixlm bench serving: {problem}", file=sys.stderr)
        return []
    model_path = ns.model_path or default_model_path()
    requests, warm = build_requests(model_path, ns)
    report = ServingReport(
        {
            "requests": len(requests),
            "request_rate": ns.request_rate,
            "max_concurrency": ns.max_concurrency or "none",
            "prompt_len": f"{ns.min_prompt}-{ns.max_prompt}",
            "output_len": f"{ns.min_output}-{ns.max_output}",
            "prompt_tokens": sum(len(r.prompt_ids) for r in requests),
            "requested_output_tokens": sum(r.max_tokens for r in requests),
            "seed": ns.seed,
        },
        environment=environment(model_path, ns.dtype),
    )
    # SIGTERM (a CI time-out, `kill`) must stop the servers too, as Ctrl-C and errors do.
    with terminate_as_exit():
        for backend in ns.backend:
            try:
                report.results.append(_run_backend(backend, model_path, requests, warm, ns))
            except ServerUnavailable as exc:
                print(f"[bench] {backend} unavailable: {exc}", file=sys.stderr)
                report.unavailable[backend] = str(exc).splitlines()[0]
    return [report]


def _launch(
    backend: str,
    model_path: str,
    ns: argparse.Namespace,
    requests: list[ServingRequest],
    warm: list[ServingRequest],
) -> LaunchedServer:
    if backend == "radixlm":
        return radixlm_server(model_path, ns)
    if backend == "transformers":
        return transformers_server(model_path, ns, requests)
    from radixlm.bench.vllm_server import longest_request, vllm_server

    return vllm_server(model_path, ns, longest_request([*requests, *warm]))


def _run_backend(
    backend: str,
    model_path: str,
    requests: list[ServingRequest],
    warm: list[ServingRequest],
    ns: argparse.Namespace,
) -> ServingResult:
    if ns.base_url:
        model = _model_id(ns.base_url, model_path)
        return _measure(backend, _system_name(backend, ns.base_url), ns.base_url, model, requests, warm, ns)
    with _launch(backend, model_path, ns, requests, warm) as server:
        # vLLM serves the model under the --model it was given (an absolute path): ask it.
        model = _model_id(server.base_url, model_path) if backend == "vllm" else model_path
        system = _system_name(backend, server.base_url)
        try:
            result = _measure(backend, system, server.base_url, model, requests, warm, ns)
        except RuntimeError as exc:  # a failed warmup: say whether the server died, with its log
            server.check_alive()
            raise ServerUnavailable(f"{backend}: {exc}") from None
        result.startup_s = server.startup_s
        if server.proc is not None and server.proc.poll() is not None:
            note = f"the server exited with code {server.proc.returncode} during the run ({server.log_path})"
            print(f"[bench] {backend}: {note}; log tail:\n{server.log_tail()}", file=sys.stderr)
            result.notes.append(note)
        return result


def _system_name(backend: str, base_url: str) -> str:
    if backend != "vllm":
        return backend
    from radixlm.bench.vllm_server import server_version

    version = server_version(base_url)
    return f"vLLM {version}" if version else "vLLM"


def _measure(
    backend: str,
    system: str,
    base_url: str,
    model: str,
    requests: list[ServingRequest],
    warm: list[ServingRequest],
    ns: argparse.Namespace,
) -> ServingResult:
    cap = f", at most {ns.max_concurrency} in flight" if ns.max_concurrency else ""
    print(
        f"[bench] {system}: warmup, then {len(requests)} requests at rate {ns.request_rate}{cap}",
        file=sys.stderr,
    )
    asyncio.run(warm_up(base_url, backend, model, warm))
    metrics, duration = asyncio.run(
        run_load(base_url, backend, model, requests, ns.request_rate, ns.seed, ns.max_concurrency)
    )
    return ServingResult.from_metrics(system, metrics, duration, backend=backend)
