"""`radixlm bench lang`: a few-shot program through radixlm's language vs the same calls through the OpenAI
API on a server with the prefix cache off, in the same run.

The program (per question; `--num-questions` of them, run together):

    few-shot prefix (--prefix-len tokens, the same for every question)
    + "Text: <question>\\nLabel:" + select over 4 labels + "\\nReason:" + gen(--gen-len tokens)

radixlm lang   `radixlm serve` (radix cache on) driven by `run_batch` through `RuntimeEndpoint`: select
               scores the 4 labels in one batched /generate (prompt logprobs), the prefix is computed once
               and every later call finds it in the radix cache.
OpenAI API     `radixlm serve --disable-radix-cache` driven by the `openai` client, one thread per question
               as run_batch does: a /v1/completions call with the 4 labelled prompts (echo, logprobs,
               max_tokens=0) to score the labels, then a completion of `--gen-len` tokens. Every call
               computes its whole prompt.

Reported per system: wall time, the server's own count of computed tokens (get_server_info's
num_tokens_computed, before and after), and how many questions got the same label on both (a check that
the two did the same work; bf16 numerics may split a near tie).
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from radixlm.bench.serving import LaunchedServer, _server_env, free_port

LABELS = [" positive", " negative", " neutral", " mixed"]
_WORDS = (
    "river music paper field color money power market system program question number family friend school "
    "garden window table letter morning evening summer winter spring autumn water light night story point"
).split()


@dataclass
class LangResult:
    system: str
    seconds: float
    computed_tokens: int
    prompt_tokens: int
    labels: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def add_lang_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-path", default="", help="model folder (default: the 0.5B-shaped qwen2 bench folder)"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-questions", type=int, default=32)
    parser.add_argument("--prefix-len", type=int, default=1500, help="tokens of the shared few-shot prefix")
    parser.add_argument("--gen-len", type=int, default=32, help="tokens of the gen after the select")
    parser.add_argument("--server-args", default="", help="extra flags for both servers (one quoted string)")
    parser.add_argument("--server-timeout", type=float, default=600.0)


def few_shot_prefix(tokenize: Any, min_tokens: int, rng: random.Random) -> str:
    """Labelled examples until the text is at least `min_tokens` tokens long."""
    text = "Label the sentiment of each text.\n\n"
    while len(tokenize([text])[0]) < min_tokens:
        words = " ".join(rng.choice(_WORDS) for _ in range(12))
        text += f"Text: {words}\nLabel:{rng.choice(LABELS)}\n\n"
    return text


def questions(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(n)]


def _counters(url: str) -> tuple[int, int]:
    """The server's (tokens computed by forward passes, prompt tokens received) so far."""
    info = httpx.get(url + "/get_server_info", timeout=30).json()
    return int(info["num_tokens_computed"]), int(info["total_prompt_tokens"])


def _since(url: str, before: tuple[int, int]) -> tuple[int, int]:
    now = _counters(url)
    return now[0] - before[0], now[1] - before[1]


def run_lang(url: str, prefix: str, qs: list[str], gen_len: int) -> LangResult:
    from radixlm import lang as sgl

    @sgl.function
    def classify(s, question):
        s += prefix + "Text: " + question + "\nLabel:"
        s += sgl.select("label", choices=LABELS)
        s += "\nReason:" + sgl.gen("reason", max_tokens=gen_len, temperature=0, ignore_eos=True)

    backend = sgl.RuntimeEndpoint(url)
    try:
        before = _counters(url)
        t0 = time.perf_counter()
        states = classify.run_batch([{"question": q} for q in qs], backend=backend, num_threads=len(qs))
        seconds = time.perf_counter() - t0
        computed, prompt = _since(url, before)
        return LangResult(
            "radixlm lang",
            seconds,
            computed,
            prompt,
            [st["label"] for st in states],
            [st["reason"] for st in states],
        )
    finally:
        backend.shutdown()


def run_openai(url: str, prefix: str, qs: list[str], gen_len: int) -> LangResult:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    model = client.models.list().data[0].id

    def one(question: str) -> tuple[str, str]:
        head = prefix + "Text: " + question + "\nLabel:"
        scored = client.completions.create(
            model=model, prompt=[head + c for c in LABELS], max_tokens=0, echo=True, logprobs=0, temperature=0
        )
        means = [_choice_mean(ch.logprobs, len(head)) for ch in sorted(scored.choices, key=lambda c: c.index)]
        label = LABELS[max(range(len(LABELS)), key=means.__getitem__)]
        out = client.completions.create(
            model=model,
            prompt=head + label + "\nReason:",
            max_tokens=gen_len,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        return label, out.choices[0].text

    before = _counters(url)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(qs)) as pool:
        results = list(pool.map(one, qs))
    seconds = time.perf_counter() - t0
    computed, prompt = _since(url, before)
    return LangResult(
        "OpenAI API, cache off", seconds, computed, prompt, [r[0] for r in results], [r[1] for r in results]
    )


def _choice_mean(logprobs: Any, boundary: int) -> float:
    """Mean logprob of the echoed tokens that spell the label: those ending past the prefix's text."""
    values = [
        lp
        for tok, lp, off in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.text_offset)
        if lp is not None and off + len(tok) > boundary
    ]
    return sum(values) / len(values)


def _server(name: str, model_path: str, ns: argparse.Namespace, *extra: str) -> LaunchedServer:
    port = free_port()
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--model-path", model_path, "--dtype", ns.dtype]
    cmd += ["--device", ns.device, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    cmd += [*extra, *shlex.split(ns.server_args)]
    return LaunchedServer(name, cmd, port, _server_env(), ns.server_timeout)


def _warm(url: str) -> None:
    """One short request first: the first call on a fresh server pays one-time costs."""
    httpx.post(
        url + "/generate", json={"text": "warm up", "sampling_params": {"max_new_tokens": 4}}, timeout=600
    )


def run_lang_bench(ns: argparse.Namespace) -> dict[str, Any]:
    from radixlm.bench.common import default_model_path
    from radixlm.bench.report import environment

    model_path = ns.model_path or default_model_path()
    rng = random.Random(ns.seed)
    with _server("radixlm", model_path, ns) as srv:
        _warm(srv.base_url)
        tokenize = _tokenizer(srv.base_url)
        prefix = few_shot_prefix(tokenize, ns.prefix_len, rng)
        prefix_tokens = len(tokenize([prefix])[0])
        qs = questions(rng, ns.num_questions)
        lang = run_lang(srv.base_url, prefix, qs, ns.gen_len)
    with _server("radixlm-no-cache", model_path, ns, "--disable-radix-cache") as srv:
        _warm(srv.base_url)
        api = run_openai(srv.base_url, prefix, qs, ns.gen_len)
    same = sum(a == b for a, b in zip(lang.labels, api.labels))
    report = {
        "benchmark": "lang",
        "workload": {
            "num_questions": ns.num_questions,
            "prefix_tokens": prefix_tokens,
            "choices": len(LABELS),
            "gen_len": ns.gen_len,
        },
        "results": [asdict(lang), asdict(api)],
        "wall_time_ratio": api.seconds / lang.seconds,
        "computed_tokens_ratio": api.computed_tokens / max(1, lang.computed_tokens),
        "same_labels": same,
        "environment": environment(model_path, ns.dtype),
    }
    _print(report, lang, api)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


def _tokenizer(url: str) -> Any:
    def tokenize(texts: list[str]) -> list[list[int]]:
        return httpx.post(url + "/tokenize", json={"prompt": texts}, timeout=60).json()["tokens"]

    return tokenize


def _print(report: dict[str, Any], lang: LangResult, api: LangResult) -> None:
    w = report["workload"]
    print(
        f"\nradixlm bench lang: {w['num_questions']} questions, {w['prefix_tokens']}-token shared prefix, "
        f"select over {w['choices']}, then a {w['gen_len']}-token gen"
    )
    print(f"{'system':<24}{'wall s':>10}{'computed tokens':>18}{'prompt tokens':>16}")
    for r in (lang, api):
        print(f"{r.system:<24}{r.seconds:>10.2f}{r.computed_tokens:>18}{r.prompt_tokens:>16}")
    print(
        f"radixlm lang is {report['wall_time_ratio']:.2f}x faster and computes "
        f"{report['computed_tokens_ratio']:.1f}x fewer tokens; same label on {report['same_labels']}/{len(lang.labels)}"
    )
