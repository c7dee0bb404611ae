"""TokenizerManager: text <-> ids, chat templates, and batched incremental detokenization.

It lives in the Engine's (the server's) process. The core sends token ids; `BatchDetokenizer.step` turns
the outputs of one core step, for every request that is due a chunk, into text with one batched decode,
on the thread that receives the step (the core client's reader thread), never on an asyncio loop.

Per request (`DetokState`), the incremental rule is the one every serving engine uses:

    ids:    [ ...........................|.....................|.......... ]
                          prefix_offset ^          read_offset ^   new ids
    prefix = decode(ids[prefix_offset:read_offset])    # a few tokens already shown: keeps word spacing
    full   = decode(ids[prefix_offset:])
    new text = full[len(prefix):], unless `full` ends in U+FFFD (a token that ends mid UTF-8 character:
               then nothing is shown until the character is complete, so no half character ever is)

While a request runs, the tail that could still become a stop string is held back; at the finish the
whole output is decoded once more and a matched stop string (or stop token) is trimmed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radixlm.frontend.chat_templates import builtin_chat_template, builtin_names
from radixlm.gguf_metadata import load_tokenizer
from radixlm.sampling_params import SamplingParams

# Decoding a few tokens before the unread ones keeps word boundaries (leading spaces) right.
CONTEXT_TOKENS = 5

# Text that `clean_up_tokenization` changes, plus special tokens: a tokenizer whose decode is not the raw
# Rust decode (optionally followed by that clean-up) on this probe is decoded the slow way.
_PROBE_TEXT = "a . b , c ! d ? e 's f n't g 'm h 've i 're j naïve 日本 😀"


class DetokState:
    """One request's detokenization state. Owned by the thread that processes core outputs."""

    __slots__ = ("ids", "prefix_offset", "read_offset", "text", "sent", "stop", "hold", "no_stop_trim", "key")

    def __init__(self, params: SamplingParams, ids: list[int] | None = None) -> None:
        self.ids: list[int] = [] if ids is None else ids  # the request's output ids (the caller appends)
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # what the incremental rule has decoded so far
        self.sent = 0  # characters of the text already handed to the user
        self.stop = bool(params.stop)
        # A running stream never shows the last len(longest stop) - 1 characters: they may begin a stop.
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.no_stop_trim = params.no_stop_trim
        self.key = (params.skip_special_tokens, params.spaces_between_special_tokens)


class BatchDetokenizer:
    """Decodes many requests' token ids per call.

    Why batched: one decode step of 64 streaming requests (a prefix and a full text each, 128 short
    sequences) took 1360 us as per-request `tokenizer.decode` calls (the front's old rule) and 440 us as
    one `step` here (3.1x; 256 requests: 6036 vs 1827 us, 3.3x). Measured with
    `TOKENIZERS_PARALLELISM=false python -m tests.frontend.detok_timing`, the suite's byte-level BPE
    tokenizer, best of 5 x 40 steps, on 2 CPU cores shared with other jobs (so the ratios, not the
    microseconds, are the result). transformers' own `batch_decode` is a Python loop over `decode` (no
    faster), so the Rust tokenizer's `decode_batch` is called directly where a probe shows that it decodes
    exactly as `tokenizer.decode` does (`_decode_path`); otherwise each sequence goes through `decode`.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._backend, self._cleanup = _decode_path(tokenizer)

    # ---- plain batched decode ------------------------------------------------------------------------
    def decode_batch(
        self,
        seqs: Sequence[Sequence[int]],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> list[str]:
        """Exactly `[tokenizer.decode(s, skip_special_tokens=..., ...) for s in seqs]`, in one call where
        the tokenizer allows it."""
        if not seqs:
            return []
        if self._backend is not None:
            texts = self._backend.decode_batch(list(seqs), skip_special_tokens=skip_special_tokens)
            if self._cleanup:
                texts = [self.tokenizer.clean_up_tokenization(t) for t in texts]
            return texts
        return [
            self.tokenizer.decode(
                list(s),
                skip_special_tokens=skip_special_tokens,
                spaces_between_special_tokens=spaces_between_special_tokens,
            )
            for s in seqs
        ]

    def _decode_grouped(self, seqs: list[list[int]], keys: list[tuple[bool, bool]]) -> list[str]:
        """Decode `seqs[i]` with the options `keys[i]`; one batched call per distinct options."""
        out = [""] * len(seqs)
        by_key: dict[tuple[bool, bool], list[int]] = {}
        for i, key in enumerate(keys):
            by_key.setdefault(key, []).append(i)
        for (skip, spaces), idx in by_key.items():
            texts = self.decode_batch(
                [seqs[i] for i in idx], skip_special_tokens=skip, spaces_between_special_tokens=spaces
            )
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    # ---- one step of many requests -------------------------------------------------------------------
    def step(
        self,
        running: Sequence[DetokState],
        finished: Sequence[tuple[DetokState, dict[str, Any] | None]],
    ) -> tuple[list[str], list[str]]:
        """Text deltas for requests due a chunk: `running` ones (their new ids already appended to
        `.ids`), and `finished` ones with their finish reason (SGLang's dict). Returns (running deltas,
        finished deltas); a finished request's delta completes its text to `final_text`."""
        return self._advance(running), [
            _take_final(st, text) for (st, _), text in zip(finished, self.final_texts(finished))
        ]

    def _advance(self, states: Sequence[DetokState]) -> list[str]:
        if not states:
            return []
        k = len(states)
        seqs = [st.ids[st.prefix_offset : st.read_offset] for st in states]
        seqs += [st.ids[st.prefix_offset :] for st in states]
        keys = [st.key for st in states] * 2
        texts = self._decode_grouped(seqs, keys)
        deltas = []
        for st, prefix, full in zip(states, texts[:k], texts[k:]):
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                st.text += full[len(prefix) :]
                st.prefix_offset = max(st.read_offset - CONTEXT_TOKENS, 0)
                st.read_offset = len(st.ids)
            limit = len(st.text) - st.hold if st.stop else len(st.text)
            if limit <= st.sent:
                deltas.append("")
            else:
                deltas.append(st.text[st.sent : limit])
                st.sent = limit
        return deltas

    def final_texts(self, finished: Sequence[tuple[DetokState, dict[str, Any] | None]]) -> list[str]:
        """The whole output of each, with a matched stop string (and what follows it) or a matched stop
        token trimmed unless no_stop_trim."""
        if not finished:
            return []
        seqs, cuts = [], []
        for st, reason in finished:
            matched = reason.get("matched") if reason and reason.get("type") == "stop" else None
            if st.no_stop_trim:
                matched = None
            if isinstance(matched, int) and st.ids and st.ids[-1] == matched:
                seqs.append(st.ids[:-1])
            else:
                seqs.append(st.ids)
            cuts.append(matched if isinstance(matched, str) else None)
        texts = self._decode_grouped(seqs, [st.key for st, _ in finished])
        out = []
        for text, cut in zip(texts, cuts):
            if cut is not None:
                at = text.find(cut)
                if at >= 0:
                    text = text[:at]
            out.append(text)
        return out


def _take_final(st: DetokState, text: str) -> str:
    delta = text[st.sent :] if len(text) >= st.sent else ""
    st.sent = max(st.sent, len(text))
    return delta


def _decode_path(tokenizer: Any) -> tuple[Any, bool]:
    """(the Rust tokenizer to batch-decode with, whether to apply `clean_up_tokenization` after), or
    (None, False) for the per-sequence `tokenizer.decode`.

    Decided by a probe instead of by reading transformers' internals: whether `decode` cleans up
    spaces depends on the tokenizer's config and, in transformers 5, on its model type.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "decode_batch"):
        return None, False
    try:
        ids = list(tokenizer.encode(_PROBE_TEXT, add_special_tokens=False))
        ids += [int(t) for t in getattr(tokenizer, "all_special_ids", [])][:8]
        for cleanup in (False, True):
            ok = True
            for skip in (True, False):
                want = tokenizer.decode(ids, skip_special_tokens=skip)
                got = backend.decode(ids, skip_special_tokens=skip)
                if cleanup:
                    got = tokenizer.clean_up_tokenization(got)
                ok = ok and got == want
            if ok:
                return backend, cleanup
    except Exception:  # an unusual tokenizer: the slow path is always right
        pass
    return None, False


class TokenizerManager:
    def __init__(
        self,
        tokenizer_path: str | os.PathLike,
        *,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        # A .gguf file's tokenizer and chat template come from its metadata, read once per file.
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
        self.chat_template = _read_chat_template(chat_template)
        self.detokenizer = BatchDetokenizer(self.tokenizer)
        self.max_chars_per_token = _max_chars_per_token(self.tokenizer)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """`template_kwargs`: extra variables for the template (vLLM's chat_template_kwargs). `tools`: the
        OpenAI tool definitions, which the template renders (transformers' `tools=`)."""
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                "this tokenizer has no chat template; pass one with --chat-template (a file, a Jinja "
                f"template, or a built-in name: {', '.join(builtin_names())})"
            )
        text = self.tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            **({"tools": tools} if tools else {}),
            **(template_kwargs or {}),
        )
        # The template already wrote any BOS it wants; encoding must not add a second one.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token on its own as the text it decodes to (special tokens kept), in one batched call:
        how logprob entries show tokens, as OpenAI does (not their BPE spelling)."""
        return self.detokenizer.decode_batch([[int(t)] for t in token_ids], skip_special_tokens=False)


def _max_chars_per_token(tokenizer: Any) -> int:
    """An upper bound on the characters one token covers, for refusing a far too long text before
    tokenizing it (frontend/inputs.check_prompt_chars).

    A vocabulary entry's spelling has at least as many characters as the text it decodes to (byte-level
    BPE spells each byte as one character; SentencePiece spells a space as one "▁"). A normalizer can
    shrink the text first (NFC composes at most 4 code points into one, e.g. U+1FA2), hence 4x the longest
    entry. (A normalizer that deletes characters outright could beat the bound; no common one does.)"""
    return 4 * max((len(t) for t in tokenizer.get_vocab()), default=1)


def _read_chat_template(value: str | None) -> str | None:
    """--chat-template: a file holding a template, a built-in template's name, or a Jinja template."""
    if value is None:
        return None
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text()
    builtin = builtin_chat_template(value)
    if builtin is not None:
        return builtin
    if "{" not in value:
        raise ValueError(
            f"chat_template {value!r} is neither a Jinja template, an existing file, nor a built-in "
            f"template name ({', '.join(builtin_names())})"
        )
    return value
