"""When a request is done: stop tokens, stop strings, max_new_tokens, the context length."""

from __future__ import annotations

from radixlm.core.request import Request
from radixlm.messages import FinishReason

# Extra tokens decoded beyond the longest stop string: tokens can be shorter than one character (bytes).
_STOP_TAIL_SLACK = 8


class StopChecker:
    def __init__(self, tokenizer_path: str, eos_token_ids: list[int]) -> None:
        self.tokenizer_path = tokenizer_path
        self.eos_token_ids = frozenset(eos_token_ids)
        self._tokenizer = None  # loaded on the first request with stop strings

    def check(self, req: Request, context_length: int) -> FinishReason | None:
        params = req.params
        last = req.token_ids[-1]
        if last in params.stop_token_ids or (not params.ignore_eos and last in self.eos_token_ids):
            return FinishReason.stop(last)
        if params.stop:
            matched = self._match_stop_string(req)
            if matched is not None:
                return FinishReason.stop(matched)
        n_out = req.num_output_tokens
        if n_out >= params.max_new_tokens or req.num_tokens >= context_length:
            return FinishReason.of_length(n_out)
        return None

    def _match_stop_string(self, req: Request) -> str | None:
        tok = self._get_tokenizer()
        longest = max(len(s) for s in req.params.stop)
        tail = req.token_ids[max(req.num_prompt_tokens, req.num_tokens - longest - _STOP_TAIL_SLACK) :]
        text = tok.decode(tail, skip_special_tokens=req.params.skip_special_tokens)
        for s in req.params.stop:
            if s in text:
                return s
        return None

    def _get_tokenizer(self):
        if self._tokenizer is None:
            from radixlm.gguf_metadata import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path)
        return self._tokenizer
