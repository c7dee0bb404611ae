"""The llama.cpp side of `radixlm bench decode --llama-cpp-python PATH`: run under that interpreter.

    PATH/to/python radixlm/bench/llama_cpp_worker.py JOB.json RESULT.json

It imports only the standard library and llama_cpp (llama-cpp-python), so radixlm need not be installed
there. job: {"model": FILE.gguf, "prompt": [ids], "decode_tokens": n, "rounds": r, "threads": t,
"n_ctx": c}. result: {"ok": true, "version": "...", "startup_seconds": s, "rounds": [{"one": s, "full": s,
"generated": n}, ...]} or {"ok": false, "error": "..."}.

Each round times greedy generation of 1 token and of 1 + decode_tokens tokens from the same prompt ids,
with the KV cache reset before each (no prefix reuse), exactly as radixlm's rows are timed; the caller
takes decode_tokens / (full - one).
"""

from __future__ import annotations

import json
import sys
import time
import traceback


def _generate(llm, prompt: list[int], n: int) -> tuple[float, int]:
    llm.reset()  # forget the previous call's KV: the prompt is prefilled again, as for the other rows
    start = time.perf_counter()
    count = 0
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        count += 1  # no EOS check: the loop ends only when we have our n tokens
        if count == n:
            break
    return time.perf_counter() - start, count


def run(job: dict) -> dict:
    t0 = time.perf_counter()
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=job["model"],
        n_ctx=int(job["n_ctx"]),
        n_threads=int(job["threads"]),
        n_threads_batch=int(job["threads"]),
        n_batch=512,
        logits_all=False,
        verbose=False,
    )
    startup = time.perf_counter() - t0
    prompt, n = list(job["prompt"]), int(job["decode_tokens"])
    _generate(llm, prompt, 8)  # warm-up
    rounds = []
    for _ in range(int(job["rounds"])):
        one, _ = _generate(llm, prompt, 1)
        full, generated = _generate(llm, prompt, 1 + n)
        rounds.append({"one": one, "full": full, "generated": generated})
    return {"ok": True, "version": llama_cpp.__version__, "startup_seconds": startup, "rounds": rounds}


def main() -> int:
    job_path, result_path = sys.argv[1], sys.argv[2]
    try:
        with open(job_path) as f:
            result = run(json.load(f))
        code = 0
    except Exception as exc:  # reported to the caller, which keeps the other rows
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        code = 1
    with open(result_path, "w") as f:
        json.dump(result, f)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
