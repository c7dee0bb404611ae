"""M-RoPE positions (Qwen2-VL): each token's (temporal, height, width) rotary positions, three rows.

A request's prompt rows are computed once when it arrives, by the model's own get_rope_index
(TransformersVLM.mrope_prompt_positions), and travel with the request as plain ints: (rows, delta). A
token past the prompt (decode) is at its 1-D position + delta in all three rows, as transformers'
generate does. The rows depend only on the prompt, so a chunk, a prefix-cache hit or a retraction reads
the same slice. The 1-D positions stay what the attention and the KV slots use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MRopeRows = tuple[list[list[int]], int]  # (three rows of prompt positions, delta for later tokens)


def span_rows(mrope: MRopeRows, start: int, n: int) -> list[list[int]]:
    """The three position rows of the tokens at 1-D positions [start, start + n)."""
    rows, delta = mrope
    end, prompt_len = start + n, len(rows[0])
    after = list(range(max(start, prompt_len) + delta, end + delta))
    return [list(r[start : min(end, prompt_len)]) + after for r in rows]


def step_rows(spans: Sequence) -> torch.Tensor | None:
    """[3, T] positions of a packed step whose spans carry `mrope` (None: no span does). A span without
    it (a text-only request) has its 1-D positions in all three rows, as transformers gives text."""
    if not any(getattr(s, "mrope", None) is not None for s in spans):
        return None
    out: list[list[int]] = [[], [], []]
    for s in spans:
        n = len(s.token_ids)
        mrope = getattr(s, "mrope", None)
        rows = span_rows(mrope, s.start, n) if mrope is not None else [range(s.start, s.start + n)] * 3
        for k in range(3):
            out[k].extend(rows[k])
    return torch.tensor(out, dtype=torch.long)
