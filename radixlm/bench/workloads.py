"""Benchmark workloads: seeded random token-id prompts, so every system in a run sees the same requests.

Prompts are random ids drawn from the tokenizer's ordinary vocabulary (never a special or added token, so
no prompt contains an EOS or a chat marker). Every workload comes from one `random.Random(seed)`: the same
flags give the same requests on every machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    group: int = -1  # shared-prefix group, -1 when the workload has none


@dataclass(frozen=True)
class Conversation:
    """A multi-turn chat: turn k's prompt is turn k-1's prompt + its output + `followups[k-1]`."""

    first_prompt: list[int]
    followups: list[list[int]]
    output_len: int

    @property
    def num_turns(self) -> int:
        return 1 + len(self.followups)


@dataclass
class TokenPool:
    """The token ids a random prompt may contain."""

    ids: list[int]
    tokenizer: Any = field(default=None, repr=False)

    def sample(self, rng: random.Random, n: int) -> list[int]:
        return [self.ids[rng.randrange(len(self.ids))] for _ in range(n)]


def load_token_pool(model_path: str) -> TokenPool:
    """Every id of the model's tokenizer except special and added tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    excluded = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    ids = [i for i in range(len(tok)) if i not in excluded]
    if not ids:
        raise ValueError(f"the tokenizer of {model_path} has no ordinary tokens to sample prompts from")
    return TokenPool(ids, tok)


def random_requests(
    pool: TokenPool,
    num_requests: int,
    prompt_len: tuple[int, int],
    output_len: tuple[int, int],
    seed: int,
) -> list[BenchRequest]:
    """Prompt and output lengths uniform in the inclusive ranges given."""
    _check_range("prompt length", prompt_len)
    _check_range("output length", output_len)
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        n_prompt = rng.randint(*prompt_len)
        n_out = rng.randint(*output_len)
        requests.append(BenchRequest(pool.sample(rng, n_prompt), n_out))
    return requests


def shared_prefix_requests(
    pool: TokenPool,
    num_groups: int,
    per_group: int,
    prefix_len: int,
    question_len: int,
    output_len: int,
    seed: int,
) -> list[BenchRequest]:
    """`num_groups` system prompts, each shared by `per_group` requests with their own question; shuffled,
    so that a cache has to find the sharing rather than being handed it in order."""
    rng = random.Random(seed)
    requests = []
    for g in range(num_groups):
        prefix = pool.sample(rng, prefix_len)
        for _ in range(per_group):
            requests.append(BenchRequest(prefix + pool.sample(rng, question_len), output_len, group=g))
    rng.shuffle(requests)
    return requests


def multi_turn_conversations(
    pool: TokenPool,
    num_conversations: int,
    num_turns: int,
    first_len: int,
    turn_len: int,
    output_len: int,
    seed: int,
) -> list[Conversation]:
    rng = random.Random(seed)
    return [
        Conversation(
            pool.sample(rng, first_len),
            [pool.sample(rng, turn_len) for _ in range(num_turns - 1)],
            output_len,
        )
        for _ in range(num_conversations)
    ]


def canonical_text_prompt(tokenizer: Any, ids: list[int], max_rounds: int = 6) -> tuple[str, list[int]]:
    """A text whose tokenization is exactly the returned ids, about len(ids) tokens long.

    For servers that only take text prompts (transformers serve): decoding random ids and re-encoding
    the text gives other ids (BPE merges across token boundaries, split UTF-8 bytes). Re-encoding,
    truncating to the target length and decoding again reaches a fixed point within a round or two, so
    both servers can be sent the very same token sequence: ids to one, the text to the other.
    """
    target = len(ids)
    text = tokenizer.decode(ids)
    for _ in range(max_rounds):
        canon = tokenizer.encode(text, add_special_tokens=False)[:target]
        text = tokenizer.decode(canon)
        if tokenizer.encode(text, add_special_tokens=False) == canon:
            return text, canon
    return text, tokenizer.encode(
        text, add_special_tokens=False
    )  # not converged: the truth, whatever its length


def _check_range(name: str, bounds: tuple[int, int]) -> None:
    lo, hi = bounds
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} range must satisfy 1 <= min <= max, got {lo}..{hi}")
