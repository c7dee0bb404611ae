"""Constrained decoding: compiled grammars (cached by key), one matcher per request, the step's bitmask.

    SamplingParams.grammar (kind, text) -> GrammarCompiler.compile(key): a Future, compiled on a thread and
    cached, so the step loop never waits for a compile (a request waits in EngineCore until it is done)
    -> RequestGrammar (an xgrammar matcher per request: each of n samples walks the grammar on its own)
    -> each step: BitmaskBuffer.fill -> int32 [B, ceil(V / 32)] for the step's B sampling rows, bit t of a
       constrained row set when token t is allowed (other rows are not read)
    -> the sampler masks the disallowed tokens of the constrained rows with one batched op
    -> accept(token) after sampling; is_terminated: the grammar ended (a finish reason)

xgrammar compiles against the tokenizer's vocabulary (TokenizerInfo), padded to the model's LM-head size,
with the model's EOS ids as the tokens that end a complete match.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

# Compiled grammars kept (the LRU bound): a client that sends a new schema per request must not grow memory
# without end; a compiled JSON-schema grammar over a 150k vocabulary is a few MB.
GRAMMAR_CACHE_SIZE = 256

# xgrammar's messages start with "[hh:mm:ss] /path/file.cc:123: "; callers want the reason only.
_XGRAMMAR_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s*\S+:\d+:\s*")


# The character class xgrammar writes for a bounded JSON string, and the one JSON allows (no U+0000-U+001F).
_LOOSE_STRING_CHARS = r'[^\"\\\r\n]'
_JSON_STRING_CHARS = r'[^\0-\x1f\"\\]'


class GrammarError(ValueError):
    """A constraint that does not compile; the message names the sampling_params field and the reason."""


def error_reason(exc: BaseException) -> str:
    """xgrammar's message without its source location, on one line."""
    text = _XGRAMMAR_PREFIX.sub("", str(exc)).strip()
    return " ".join(text.split()) or type(exc).__name__


def build_grammar(xgr: Any, kind: str, text: str) -> Any:
    """An xgrammar Grammar for one SamplingParams constraint (kind in GRAMMAR_KINDS)."""
    if kind == "json_schema":
        # Compact JSON, no free whitespace: a model (random weights above all) could otherwise pad
        # whitespace until max_new_tokens and never close the object.
        grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
        ebnf = str(grammar)
        if _LOOSE_STRING_CHARS in ebnf:
            # xgrammar 0.2.9 lets strings with a length bound (minLength / maxLength) hold raw control
            # characters (measured: "\x05" in 20 of 50 random-weight outputs), which JSON forbids.
            grammar = xgr.Grammar.from_ebnf(ebnf.replace(_LOOSE_STRING_CHARS, _JSON_STRING_CHARS))
        return grammar
    if kind == "regex":
        return xgr.Grammar.from_regex(text)
    if kind == "ebnf":
        return xgr.Grammar.from_ebnf(text)
    if kind == "structural_tag":
        return structural_tag_grammar(xgr, text)
    raise ValueError(f"unknown grammar kind {kind!r}")


def structural_tag_grammar(xgr: Any, text: str) -> Any:
    """SGLang's structural_tag ({"structures": [{begin, schema, end}], "triggers": [...]}) or xgrammar's own
    format ({"type": "structural_tag", "format": {...}})."""
    import json

    spec = json.loads(text)
    if "structures" in spec:
        items = [
            xgr.StructuralTagItem(
                begin=s["begin"],
                schema=s["schema"] if isinstance(s["schema"], str) else json.dumps(s["schema"]),
                end=s["end"],
            )
            for s in spec["structures"]
        ]
        return xgr.Grammar.from_structural_tag(items, list(spec.get("triggers", [])))
    return xgr.Grammar.from_structural_tag(text)


class GrammarCompiler:
    """Compiles constraints for one tokenizer on a worker thread; results are cached by (kind, text)."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        # One thread: compiles queue behind each other, and none runs on the step loop.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radixlm-grammar")
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._compiler: Any = None  # built on the worker thread by the first compile
        self._xgr: Any = None

    def compile(self, key: tuple[str, str]) -> Future:
        """A Future of the compiled grammar (a GrammarError on failure); the same key shares one Future."""
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._executor.submit(self._compile, key)
            self._cache[key] = fut
            while len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def _compile(self, key: tuple[str, str]) -> Any:
        kind, text = key
        compiler = self._get_compiler()
        try:
            return compiler.compile_grammar(build_grammar(self._xgr, kind, text))
        except Exception as exc:  # xgrammar raises RuntimeError and its own classes
            raise GrammarError(f"sampling_params.{kind} does not compile: {error_reason(exc)}") from None

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            from radixlm.gguf_metadata import load_tokenizer

            tokenizer = load_tokenizer(self.tokenizer_path)
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
            )
            self._xgr = xgr
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def new_matcher(self, compiled: Any) -> RequestGrammar:
        return RequestGrammar(self._xgr.GrammarMatcher(compiled))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class RequestGrammar:
    """One request's position in its grammar."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher

    def accept(self, token: int) -> bool:
        """Advance by the sampled token; False if the grammar does not allow it (the mask should prevent that)."""
        return bool(self._matcher.accept_token(token))

    @property
    def is_terminated(self) -> bool:
        """The grammar matched completely and accepted its end token: nothing may follow."""
        return bool(self._matcher.is_terminated())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._matcher.fill_next_token_bitmask(bitmask, row)


class BitmaskBuffer:
    """The step's bitmask rows, in one int32 buffer kept across steps (a fresh tensor per step costs an
    allocation the size of the batch's mask)."""

    def __init__(self, vocab_size: int) -> None:
        self.words = (vocab_size + 31) // 32
        self._buf: torch.Tensor | None = None

    def fill(self, grammars: list[RequestGrammar | None]) -> torch.Tensor:
        """[len(grammars), words] int32: row i is grammars[i]'s allowed tokens (rows of None are left as
        they were: nobody reads them). One row per sampling row, as xgrammar's batched kernel indexes it."""
        n = len(grammars)
        if self._buf is None or self._buf.shape[0] < n:
            self._buf = torch.empty(max(n, 8), self.words, dtype=torch.int32)
        out = self._buf[:n]
        for i, g in enumerate(grammars):
            if g is not None:
                g.fill(out, i)
        return out
