"""The fields other servers' clients send that radixlm does not model one by one (drop-in compatibility).

Clients written for OpenAI, SGLang or vLLM send more than the fields a route implements: SGLang's own
frontend sends `"regex": null` and `"stop_regex": []` on every `gen`, the `openai` client passes through
whatever a caller sets to None, OpenAI's newer fields (`service_tier`, `prompt_cache_key`) arrive from
current SDKs. Refusing them all (the old rule) stopped those clients on their first request; accepting
them all would silently drop options that change the output. The rule here:

- JSON null for any field, known or not, means "not given": the field takes its default.
- `IGNORED`: fields with no effect on what is generated (accounting, routing hints, logging): any value
  is accepted and dropped.
- `REFUSED`: fields that would change the output and that radixlm does not implement: only null (or the
  no-op value listed) is accepted; anything else is a 400 that names the field.
- Any other field is still a 400 ("unknown field"), so a typo never passes silently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic_core import PydanticCustomError

# The error type of a refused field; errors.py reads its `loc` from the error's context.
UNSUPPORTED_FIELD = "unsupported_field"

# ---- OpenAI /v1/chat/completions and /v1/completions (with SGLang's and vLLM's extras) -----------------
OPENAI_IGNORED = frozenset(
    {
        "service_tier",  # a billing tier; there is one here
        "prompt_cache_key",  # a routing hint for OpenAI's cache; the radix cache needs none
        "prompt_cache_retention",
        "safety_identifier",  # abuse tracking, like `user`
        "priority",  # vLLM / SGLang: only with a priority scheduling policy, which radixlm has not
        "log_metrics",  # SGLang
        "guided_decoding_backend",  # vLLM: which grammar library; the constraint means the same in any
    }
)

# field -> the no-op values also accepted besides null (a tuple), shown in the error.
OPENAI_REFUSED: dict[str, tuple[Any, ...]] = {
    "functions": (),
    "function_call": ("none",),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "reasoning_effort": (),
    "verbosity": (),
    "modalities": (["text"],),
    # SGLang / vLLM extras with an effect radixlm does not have (LoRA, ...); their structured-output
    # fields are modeled (protocol._SamplingFields, structured_output.py)
    "lora_path": (),
    "guided_whitespace_pattern": (),  # vLLM: JSON here is always compact
    "session_params": (),
    "custom_logit_processor": (),
    "custom_params": (),
    "logits_processors": (),
    "allowed_token_ids": (),
    "bad_words": (),
    "truncate_prompt_tokens": (),
    "prompt_logprobs": (),
    "return_hidden_states": (False,),
    "use_beam_search": (False,),
    "length_penalty": (1.0, 1),
    "continue_final_message": (False,),
    "add_special_tokens": (),
    "chat_template": (),
    "documents": (),
    "return_tokens_as_token_ids": (False,),
    "cache_salt": (),
    "kv_transfer_params": (),
    "vllm_xargs": (),
}

# ---- SGLang's /generate (GenerateReqInput) --------------------------------------------------------------
GENERATE_IGNORED = frozenset(
    {
        "log_metrics",
        "no_logs",
        "custom_labels",
        "priority",  # only with --enable-priority-scheduling in SGLang, which radixlm has not
        "routing_key",
        "conversation_id",
        "http_worker_ipc",
    }
)

GENERATE_REFUSED: dict[str, tuple[Any, ...]] = {
    "token_ids_logprob": (),
    "input_embeds": (),
    "video_data": (),
    "audio_data": (),
    "modalities": (),
    "lora_path": (),
    "lora_id": (),
    "session_params": (),
    "session_id": (),
    "custom_logit_processor": (),
    "return_hidden_states": (False,),
    "return_routed_experts": (False,),
    "return_entropy": (False,),
    "return_bytes": (False,),
    "return_prompt_token_ids": (False,),
    "return_flat_raw_top_logprobs": (False,),
    "bootstrap_host": (),
    "bootstrap_port": (),
    "bootstrap_room": (),
    "data_parallel_rank": (),
    "routed_dp_rank": (),
    "extra_key": (),
    "background": (False,),
    "max_thinking_tokens": (),
}

# SGLang's sampling_params keys beyond radixlm's own (the lists count as given only when non-empty).
# Its constraint keys (regex, json_schema, ebnf, structural_tag) are SamplingParams' own.
SAMPLING_REFUSED: dict[str, tuple[Any, ...]] = {
    "stop_regex": ([], ""),
    "custom_params": (),
    "stream_interval": (),
    "beam_width": (),
    "watermark": (),
}
# SGLang spells the seed `sampling_seed`; radixlm's SamplingParams calls it `seed`.
SAMPLING_RENAMED = {"sampling_seed": "seed"}


def without_nulls(data: Any) -> Any:
    """A JSON object with its null fields removed (null means "not given"); anything else as it is."""
    if isinstance(data, Mapping):
        return {k: v for k, v in data.items() if v is not None}
    return data


def strip_foreign(
    data: Any, ignored: frozenset[str], refused: Mapping[str, tuple[Any, ...]], *, prefix: str = ""
) -> Any:
    """`data` without its ignored fields; a refused field with a value that does something is an error
    naming it (`prefix` + the field). Call after `without_nulls`."""
    if not isinstance(data, Mapping):
        return data
    out = {}
    for key, value in data.items():
        if key in ignored:
            continue
        if key in refused:
            if _is_no_op(value, refused[key]):
                continue
            raise unsupported(prefix + key, refused[key])
        out[key] = value
    return out


def _is_no_op(value: Any, no_ops: tuple[Any, ...]) -> bool:
    # `True == 1` in Python: compare types too, so `"return_hidden_states": 0` is not taken for False.
    return any(type(value) is type(ok) and value == ok for ok in no_ops)


def unsupported(field: str, no_ops: tuple[Any, ...] = ()) -> PydanticCustomError:
    accepted = " or ".join(json.dumps(v) for v in (None, *no_ops))
    return PydanticCustomError(
        UNSUPPORTED_FIELD,
        "is not supported by this server: send {accepted}, or leave it out",
        {"loc": field, "accepted": accepted},
    )


def generate_sampling_dict(params: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """One /generate `sampling_params` object in SGLang's spelling -> SamplingParams' keys."""
    params = strip_foreign(without_nulls(params), frozenset(), SAMPLING_REFUSED, prefix=prefix)
    out = dict(params)
    for theirs, ours in SAMPLING_RENAMED.items():
        if theirs in out:
            if ours in out:
                raise PydanticCustomError(
                    "conflicting_fields",
                    "pass {theirs} or {ours}, not both",
                    {"loc": prefix + theirs, "theirs": theirs, "ours": ours},
                )
            out[ours] = out.pop(theirs)
    return out
