"""The vLLM side of `radixlm bench ... --vllm-python PATH`: run under vLLM's own interpreter, not radixlm's.

    PATH/to/python radixlm/bench/vllm_worker.py JOB.json RESULT.json

It imports only the standard library and vllm (radixlm need not be installed in vLLM's environment, and
the two may pin different transformers). The job file says what to run; the result file says what
happened. The protocol (see radixlm/bench/vllm_baseline.py, which writes the job and reads the result):

job     {"protocol": 1, "model": PATH, "dtype": "float32", "seed": 0, "enable_prefix_caching": true,
         "engine_args": {...extra vllm.LLM keyword arguments: max_num_seqs, max_model_len, ...},
         "warmup": [{"prompt": [ids], "max_tokens": n}, ...],
         "runs": [{"name": "...", "kind": "batch", "requests": [{"prompt": [ids], "max_tokens": n}, ...]},
                  {"name": "...", "kind": "multi_turn", "conversations": [{"first_prompt": [ids],
                   "followups": [[ids], ...], "output_len": n, "num_turns": k}, ...]}]}
result  {"protocol": 1, "ok": true, "vllm_version": "...", "startup_seconds": s, "warmup_seconds": s,
         "settings": {...}, "runs": [{"name": "...", "kind": "...", "seconds": s, "outputs": [{"key": "...",
         "prompt": [ids] (multi_turn only), "token_ids": [ids], "num_cached_tokens": n or null}, ...]}]}
        or {"protocol": 1, "ok": false, "error": "...", "traceback": "..."} (also exit status 1)

Every request is greedy (temperature 0), ignores EOS and decodes exactly its max_tokens. A "batch" run is
ONE timed `LLM.generate` over all its requests, given as token ids (TokensPrompt). A "multi_turn" run
submits every conversation's first turn at once and each later turn as soon as the previous turn of that
conversation finishes (prompt = previous prompt + vLLM's own output + the followup), by driving the
LLM's engine with add_request/step; the whole loop is timed. The prefix cache is reset after the warmup
and between runs, so no run starts with another's blocks. Start-up (building the LLM) is timed on its
own and is not part of any run's seconds.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

PROTOCOL = 1


def _sampling(vllm, max_tokens: int):
    return vllm.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _tokens_prompt(ids: list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def _cached(out) -> int | None:
    n = getattr(out, "num_cached_tokens", None)
    return int(n) if isinstance(n, int) else None


def _reset_prefix_cache(llm) -> None:
    reset = getattr(llm, "reset_prefix_cache", None)
    if reset is not None:
        reset()


def _batch(vllm, llm, requests: list[dict]) -> tuple[float, list[dict]]:
    prompts = [_tokens_prompt(r["prompt"]) for r in requests]
    params = [_sampling(vllm, r["max_tokens"]) for r in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, [
        {"key": f"r{i}", "token_ids": list(o.outputs[0].token_ids), "num_cached_tokens": _cached(o)}
        for i, o in enumerate(outs)
    ]


def _multi_turn(vllm, llm, convs: list[dict]) -> tuple[float, list[dict]]:
    engine = llm.llm_engine
    prompts: dict[str, list[int]] = {}

    keys: dict[str, str] = {}  # vLLM's request id (it may add a suffix) -> ours

    def submit(ci: int, k: int, prompt: list[int]) -> None:
        key = f"c{ci}-t{k}"
        prompts[key] = prompt
        rid = engine.add_request(key, _tokens_prompt(prompt), _sampling(vllm, convs[ci]["output_len"]))
        keys[rid if isinstance(rid, str) else key] = key

    results: dict[str, dict] = {}
    start = time.perf_counter()
    for ci, conv in enumerate(convs):
        submit(ci, 0, list(conv["first_prompt"]))
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                continue
            key = keys.get(out.request_id, out.request_id)
            ci, k = (int(x[1:]) for x in key.split("-"))
            conv = convs[ci]
            ids = list(out.outputs[0].token_ids)
            results[key] = {
                "key": key,
                "prompt": prompts[key],
                "token_ids": ids,
                "num_cached_tokens": _cached(out),
            }
            if k + 1 < conv["num_turns"]:
                submit(ci, k + 1, prompts[key] + ids[: conv["output_len"]] + list(conv["followups"][k]))
    seconds = time.perf_counter() - start
    return seconds, [results[key] for key in prompts if key in results]


def _settings(llm) -> dict:
    """vLLM's effective scheduler/cache settings, where this version exposes them (best effort)."""
    found: dict = {}
    cfg = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    for section, names in (
        ("scheduler_config", ("max_num_seqs", "max_num_batched_tokens", "enable_chunked_prefill")),
        ("cache_config", ("block_size", "enable_prefix_caching", "cpu_kvcache_space_bytes")),
        ("model_config", ("dtype", "max_model_len")),
    ):
        obj = getattr(cfg, section, None)
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                found[name] = value if isinstance(value, (int, float, bool, str)) else str(value)
    found["env"] = {k: v for k, v in os.environ.items() if k.startswith("VLLM_")}
    return found


def run(job: dict) -> dict:
    if job.get("protocol") != PROTOCOL:
        raise ValueError(f"job protocol {job.get('protocol')!r}, this worker speaks {PROTOCOL}")
    t0 = time.perf_counter()
    import vllm

    llm = vllm.LLM(
        model=job["model"],
        dtype=job.get("dtype", "auto"),
        seed=job.get("seed", 0),
        enable_prefix_caching=bool(job.get("enable_prefix_caching", True)),
        **job.get("engine_args", {}),
    )
    startup = time.perf_counter() - t0

    t1 = time.perf_counter()
    if job.get("warmup"):
        _batch(vllm, llm, job["warmup"])
    _reset_prefix_cache(llm)
    warmup_seconds = time.perf_counter() - t1

    runs = []
    for spec in job["runs"]:
        if spec["kind"] == "batch":
            seconds, outputs = _batch(vllm, llm, spec["requests"])
        elif spec["kind"] == "multi_turn":
            seconds, outputs = _multi_turn(vllm, llm, spec["conversations"])
        else:
            raise ValueError(f"unknown run kind {spec['kind']!r}")
        runs.append({"name": spec["name"], "kind": spec["kind"], "seconds": seconds, "outputs": outputs})
        _reset_prefix_cache(llm)
    result = {
        "protocol": PROTOCOL,
        "ok": True,
        "vllm_version": getattr(vllm, "__version__", "unknown"),
        "python": sys.version.split()[0],
        "startup_seconds": startup,
        "warmup_seconds": warmup_seconds,
        "settings": _settings(llm),
        "runs": runs,
    }
    del llm  # let vLLM stop its engine process before this one leaves
    gc.collect()
    return result


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python vllm_worker.py JOB.json RESULT.json", file=sys.stderr)
        return 2
    job_path, result_path = argv
    try:
        with open(job_path) as f:
            result = run(json.load(f))
        code = 0
    except BaseException as e:  # the parent reads the error from the result file and stderr
        traceback.print_exc()
        result = {
            "protocol": PROTOCOL,
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc(),
        }
        code = 1
    with open(result_path, "w") as f:
        json.dump(result, f)
    return code


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM's engine processes and atexit hooks can hold a finished worker for a long time; the result is
    # written, so leave without them.
    os._exit(code)
