"""Batched incremental detokenization (radixlm/frontend/tokenizer_manager.py) against the per-request
rule it replaces, on multi-byte text, special tokens and stop strings."""

from __future__ import annotations

import random
from typing import Any

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from radixlm.frontend.tokenizer_manager import BatchDetokenizer, DetokState
from radixlm.sampling_params import SamplingParams
from radixlm.testing import cached_model_folder

# Multi-byte characters that the suite's byte-level BPE sometimes splits across tokens.
TEXTS = [
    "naïve café — 日本語のテキスト 😀👍🏽 done",
    "The quick brown fox jumps over the lazy dog. Ünïcödé ☃ ❄ 𝔘𝔫𝔦",
    "東京 大阪 京都 🍣🍜 and some plain ascii words to finish",
    "emoji run: 😀😃😄😁😆😅😂🤣 end",
]


class ReferenceDetokenizer:
    """The per-request rule the front used before batching (two `tokenizer.decode` calls per token)."""

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0
        self._hold = max((len(s) for s in params.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.params.skip_special_tokens,
            spaces_between_special_tokens=self.params.spaces_between_special_tokens,
        )

    def add(self, new_ids: list[int]) -> None:
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = max(self.read_offset - self.CONTEXT_TOKENS, 0)
            self.read_offset = len(self.ids)

    def final_text(self, finish_reason: dict[str, Any] | None) -> str:
        text = self._decode(self.ids)
        if finish_reason and finish_reason.get("type") == "stop" and not self.params.no_stop_trim:
            matched = finish_reason.get("matched")
            if isinstance(matched, str):
                cut = text.find(matched)
                if cut >= 0:
                    text = text[:cut]
            elif isinstance(matched, int) and self.ids and self.ids[-1] == matched:
                text = self._decode(self.ids[:-1])
        return text

    def take_delta(self, finished: bool, finish_reason: dict[str, Any] | None) -> str:
        if finished:
            text = self.final_text(finish_reason)
            delta = text[self.sent :] if len(text) >= self.sent else ""
            self.sent = max(self.sent, len(text))
            return delta
        limit = len(self.text) - self._hold if self.params.stop else len(self.text)
        if limit <= self.sent:
            return ""
        delta = self.text[self.sent : limit]
        self.sent = limit
        return delta


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(cached_model_folder("qwen2")))


def _requests(tokenizer) -> list[tuple[list[int], SamplingParams, dict[str, Any] | None]]:
    """(output ids, params, finish reason) for a mix of requests that all run in one batch."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    reqs = []
    for i, text in enumerate(TEXTS):
        ids = tokenizer.encode(text, add_special_tokens=False)
        reqs.append((ids, SamplingParams(), {"type": "length", "length": len(ids)}))
        # A stop string in the middle, trimmed (and kept with no_stop_trim); streams hold its length back.
        # The output ends at the token that completes it, as the core stops there.
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        end = next(k for k in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:k]))
        stopped = {"type": "stop", "matched": stop}
        reqs.append((ids[:end], SamplingParams(stop=[stop, "zz"]), stopped))
        reqs.append((ids[:end], SamplingParams(stop=[stop], no_stop_trim=True), stopped))
        # Special tokens inside the output, shown or skipped; a stop token at the end, trimmed.
        with_special = ids[:5] + [1] + ids[5:] + [eos]
        for skip in (True, False):
            reqs.append(
                (
                    with_special,
                    SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=i % 2 == 0),
                    {"type": "stop", "matched": eos},
                )
            )
    return reqs


def _run_batched(detok, reqs, chunk_sizes):
    """Feed every request its ids `chunk_sizes[i]` at a time, one batched step per round, as the Engine's
    output thread does; returns each request's deltas (the last one from the finish)."""
    states = [DetokState(p) for _, p, _ in reqs]
    deltas: list[list[str]] = [[] for _ in reqs]
    pos = [0] * len(reqs)
    while True:
        running, finished = [], []
        for i, (ids, _, _) in enumerate(reqs):
            if pos[i] > len(ids):
                continue
            new = ids[pos[i] : pos[i] + chunk_sizes[i]]
            states[i].ids.extend(new)
            pos[i] += chunk_sizes[i]
            (finished if pos[i] >= len(ids) else running).append(i)
            if pos[i] >= len(ids):
                pos[i] = len(ids) + 1  # done
        if not running and not finished:
            return deltas, states
        run_d, fin_d = detok.step([states[i] for i in running], [(states[i], reqs[i][2]) for i in finished])
        for i, d in zip(running, run_d):
            deltas[i].append(d)
        for i, d in zip(finished, fin_d):
            deltas[i].append(d)


def _run_reference(tokenizer, reqs, chunk_sizes):
    out = []
    for (ids, params, reason), size in zip(reqs, chunk_sizes):
        ref = ReferenceDetokenizer(tokenizer, params)
        deltas = []
        for start in range(0, len(ids), size):
            ref.add(ids[start : start + size])
            done = start + size >= len(ids)
            deltas.append(ref.take_delta(done, reason))
        out.append((deltas, ref.final_text(reason)))
    return out


@pytest.mark.parametrize("fast_path", [True, False], ids=["rust-decode-batch", "per-sequence-decode"])
@pytest.mark.parametrize("chunking", ["one-token", "mixed"])
def test_batched_equals_per_request(tokenizer, fast_path: bool, chunking: str) -> None:
    detok = BatchDetokenizer(tokenizer)
    assert detok._backend is not None  # the suite's tokenizer takes the fast path
    if not fast_path:
        detok._backend = None
    reqs = _requests(tokenizer)
    rng = random.Random(0)
    sizes = [1] * len(reqs) if chunking == "one-token" else [rng.choice([1, 2, 3, 7]) for _ in reqs]
    batched, _ = _run_batched(detok, reqs, sizes)
    reference = _run_reference(tokenizer, reqs, sizes)
    saw_split_char = False
    for (ids, params, reason), got, (want, final) in zip(reqs, batched, reference):
        assert got == want  # every delta, step by step, as the per-request rule gives it
        assert "".join(got) == final
        assert final == detok.final_texts([(DetokState(params, list(ids)), reason)])[0]
        full = tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
        if "\ufffd" not in full:
            assert all("\ufffd" not in d for d in got), got  # never half a character
        saw_split_char |= any(tokenizer.decode(ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    assert saw_split_char, "the texts must include characters split across tokens"


def test_stream_holds_back_a_possible_stop_string(tokenizer) -> None:
    detok = BatchDetokenizer(tokenizer)
    ids = tokenizer.encode("hello world, and more words", add_special_tokens=False)
    st = DetokState(SamplingParams(stop=["abcd"]))  # 4 characters: 3 are held back while running
    shown = ""
    for t in ids:
        st.ids.append(t)
        shown += detok.step([st], [])[0][0]
        assert len(shown) <= max(0, len(tokenizer.decode(st.ids)) - 3)
    shown += detok.step([], [(st, {"type": "length", "length": len(ids)})])[1][0]
    assert shown == tokenizer.decode(ids)


def test_decode_batch_and_token_texts_equal_decode(tokenizer) -> None:
    detok = BatchDetokenizer(tokenizer)
    rng = random.Random(1)
    seqs = [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 12))] for _ in range(50)]
    for skip in (True, False):
        assert detok.decode_batch(seqs, skip_special_tokens=skip) == [
            tokenizer.decode(s, skip_special_tokens=skip) for s in seqs
        ]


def test_a_tokenizer_that_cleans_up_spaces_decodes_the_same() -> None:
    """WordPiece with clean_up_tokenization_spaces: transformers' decode cleans " ." to "."; the raw Rust
    decode does not, so the batched path must clean up too (the probe in `_decode_path` finds out)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = ["[UNK]", "[CLS]", "a", "b", "c", "d", ".", ",", "!", "?", "'", "s", "t", "n", "##s", "hello"]
    wp = Tokenizer(models.WordPiece({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece(cleanup=False)  # leave the clean-up to transformers
    tok = PreTrainedTokenizerFast(
        tokenizer_object=wp, unk_token="[UNK]", cls_token="[CLS]", clean_up_tokenization_spaces=True
    )
    detok = BatchDetokenizer(tok)
    seqs = [tok.encode(t, add_special_tokens=False) for t in ("hello a . b , c !", "a ' s d ?", "as bs")]
    assert tok.decode(seqs[0]) != tok.backend_tokenizer.decode(seqs[0])  # the clean-up matters here
    assert detok.decode_batch(seqs) == [tok.decode(s, skip_special_tokens=True) for s in seqs]
