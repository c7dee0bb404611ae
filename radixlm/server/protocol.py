"""Request and response models: the only place request JSON is checked (DESIGN.md invariant 5).

Types are checked here (strict: `"temperature": "hot"` or `"max_tokens": 3.5` is a 400, not a coercion);
sampling *values* are checked by SamplingParams, so that the offline API and the server agree on what is
valid. `to_sampling_params` renames SamplingParams' field names back to the OpenAI names in its messages.

Unknown fields are rejected with a 400 (`extra="forbid"`), as OpenAI itself does ("Unrecognized request
argument"), instead of vLLM's log-and-ignore: a silently dropped option samples differently from what the
caller asked for. OpenAI fields we know but do not implement (suffix, tools, ...) are accepted
only at their no-op values. JSON null for any field means "not given", and the fields other servers'
clients send are ignored or refused by the table in `compat.py` (each model names its two lists).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from radixlm.sampling_params import SamplingParams, is_valid_text, short_repr
from radixlm.server import compat, structured_output
from radixlm.server.errors import APIError
from radixlm.server.tools import tool_constraint

MAX_TOP_LOGPROBS = 20  # the Engine's limit for top_logprobs_num


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    # Other servers' fields this body accepts with no effect, and those it accepts only at a no-op value.
    _ignored_fields: ClassVar[frozenset[str]] = frozenset()
    _refused_fields: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_and_foreign_fields(cls, data: Any) -> Any:
        return compat.strip_foreign(compat.without_nulls(data), cls._ignored_fields, cls._refused_fields)

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        # JSON may carry a lone surrogate ("\\ud800"), which no tokenizer, msgpack or JSON response can
        # encode: refused here, for every string field at once, naming where it is.
        where = find_invalid_text(data)
        if where is not None:
            raise PydanticCustomError(
                "invalid_text",
                "must be valid Unicode text, but holds a lone surrogate (an unpaired \\ud800-\\udfff escape)",
                {"loc": ".".join(short_repr(x).strip("'") if isinstance(x, str) else str(x) for x in where)},
            )
        return data


_SCALARS = frozenset({int, float, bool, type(None)})


def find_invalid_text(value: Any) -> list[str | int] | None:
    """The path to the first string (or dict key) holding a lone surrogate, or None. Lists of numbers
    (token ids) are skipped at C speed, so a large prompt of ids costs little."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not is_valid_text(item):
                return path
        elif isinstance(item, dict):
            for key, sub in item.items():
                if isinstance(key, str) and not is_valid_text(key):
                    return [*path, key]
                if type(sub) not in _SCALARS:
                    stack.append((sub, [*path, key]))
        elif isinstance(item, list) and not set(map(type, item)) <= _SCALARS:
            stack.extend((sub, [*path, i]) for i, sub in enumerate(item) if type(sub) not in _SCALARS)
    return None


def _check_prompt(value: Any) -> Any:
    """str | list[str] | list[int] | list[list[int]], with one clear message instead of a union's four."""
    ok = (
        isinstance(value, str)
        or (isinstance(value, list) and value and all(isinstance(p, str) for p in value))
        or (isinstance(value, list) and value and all(_is_token(t) for t in value))
        or (
            isinstance(value, list)
            and value
            and all(isinstance(p, list) and all(_is_token(t) for t in p) for p in value)
        )
    )
    if not ok:
        raise ValueError(
            "must be a string, a non-empty list of strings, a non-empty list of token ids, "
            "or a non-empty list of token-id lists"
        )
    return value


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _check_stop(value: Any) -> Any:
    if (
        value is None
        or isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(s, str) for s in value))
    ):
        return value
    raise ValueError("must be a string, a list of strings, or null")


class StreamOptions(_Strict):
    include_usage: bool = False
    # vLLM's: usage on every chunk. Accepted so clients written for vLLM work; we honour it.
    continuous_usage_stats: bool = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's, then SGLang/vLLM's extras)."""

    _ignored_fields = compat.OPENAI_IGNORED
    _refused_fields = compat.OPENAI_REFUSED

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: Any = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None  # recorded by OpenAI for abuse tracking; no effect here
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]
    # SGLang / vLLM extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    include_stop_str_in_output: bool = False  # vLLM's name for no_stop_trim
    rid: str | None = Field(default=None, min_length=1)  # SGLang: names the request for /abort_request
    # Constraints (structured_output.py maps them to one SamplingParams key): SGLang's, then vLLM's.
    regex: str | None = None
    ebnf: str | None = None
    json_schema: dict[str, Any] | str | None = None
    structural_tag: dict[str, Any] | str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_is_text(cls, value: Any) -> Any:
        return _check_stop(value)

    @model_validator(mode="after")
    def _unsupported(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def constraint(self) -> structured_output.Constraint | None:
        """The one constraint the body asks for (a 400 when it names more than one)."""
        extras = {name: getattr(self, name) for name in _CONSTRAINT_FIELDS}
        return structured_output.one(structured_output.from_extras(extras))

    def _sampling_dict(
        self, max_new_tokens: int, defaults: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """`defaults`: the model's sampling defaults (generation_config.json) for fields left unset."""
        model_defaults = defaults or {}

        def pick(value: Any, default: Any, name: str | None = None) -> Any:
            if value is not None:
                return value
            return model_defaults.get(name, default) if name else default

        return {
            "max_new_tokens": max_new_tokens,
            "min_new_tokens": self.min_tokens,
            "temperature": pick(self.temperature, 1.0, "temperature"),
            "top_p": pick(self.top_p, 1.0, "top_p"),
            "top_k": pick(self.top_k, -1, "top_k"),
            "min_p": pick(self.min_p, 0.0, "min_p"),
            "repetition_penalty": pick(self.repetition_penalty, 1.0, "repetition_penalty"),
            "frequency_penalty": pick(self.frequency_penalty, 0.0),
            "presence_penalty": pick(self.presence_penalty, 0.0),
            "stop": pick(self.stop, []),
            "stop_token_ids": pick(self.stop_token_ids, []),
            "ignore_eos": self.ignore_eos,
            "n": self.n,
            "seed": self.seed,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
            "no_stop_trim": self.keeps_stop,
            # SamplingParams checks the ids and values (a 400 naming logit_bias); the front, the vocabulary.
            "logit_bias": self.logit_bias or {},
            **structured_output.sampling_values(self.constraint()),
        }

    @property
    def keeps_stop(self) -> bool:
        """The matched stop string or token stays in the output (SGLang's no_stop_trim, vLLM's name)."""
        return self.no_stop_trim or self.include_stop_str_in_output

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


_CONSTRAINT_FIELDS = (
    "regex", "ebnf", "json_schema", "structural_tag", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "structured_outputs",
)

# SamplingParams' names -> the names a caller of the OpenAI routes used, for error messages.
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


def to_sampling_params(
    values: dict[str, Any], *, openai_names: bool = True, constraint: Any = None
) -> SamplingParams:
    """Build SamplingParams; its ValueError/TypeError becomes a 400 that names the caller's field.

    openai_names: the caller spoke OpenAI's names (max_tokens, top_p) at the top level of its body;
    otherwise it sent SamplingParams' own keys under `sampling_params` (/generate), and the message is
    left as it is.
    """
    try:
        return SamplingParams.from_any(values)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        match = re.search(r"sampling_params\.(\w+)", message)
        param = f"sampling_params.{match.group(1)}" if match else "sampling_params"
        if openai_names and match:
            names = dict(_OPENAI_NAMES)
            if constraint is not None:  # the caller's field, not the SamplingParams key it became
                names[constraint.kind] = constraint.param
            param = names.get(match.group(1), match.group(1))
            message = message.replace(f"sampling_params.{match.group(1)}", param)
        raise APIError(400, message, param=param) from exc


# ---- /v1/completions --------------------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    prompt: Any
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        return _check_prompt(value)

    @model_validator(mode="after")
    def _completion_only(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        return self

    def sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        limit = 16 if self.max_tokens is None else self.max_tokens
        return to_sampling_params(self._sampling_dict(limit, defaults), constraint=self.constraint())

    def engine_prompt(self) -> dict[str, Any]:
        """The Engine's `prompt=` (text) or `input_ids=` (token ids) keyword."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], str):
            return {"prompt": p}
        return {"input_ids": p}

    @property
    def num_prompts(self) -> int:
        p = self.prompt
        return 1 if isinstance(p, str) or _is_token(p[0]) else len(p)


# ---- /v1/chat/completions ---------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str  # a data URL or a local path (http(s) only with --allow-image-urls)
    detail: str | None = None  # OpenAI's; the model's processor decides the resolution


class ImagePart(_Strict):
    """OpenAI's image content part; only a vision-language model takes it (frontend/multimodal.py)."""

    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCallIn(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(_Strict):
    """An assistant message's earlier tool call, sent back in a multi-turn conversation."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message that made tool calls (OpenAI's shape)
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None  # role "tool": which call this is the result of
    reasoning_content: str | None = None  # an earlier answer's reasoning (some templates render it)

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError(
                "missing_content", "is required (only an assistant message with tool_calls may omit it)",
                {"loc": "content"},
            )
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    @field_validator("content", mode="wrap")
    @classmethod
    def _content_shape(cls, value: Any, handler: Any) -> Any:
        # One message instead of the union's per-branch errors.
        try:
            return handler(value)
        except ValidationError as exc:
            raise ValueError(
                'must be a string or a list of text parts [{"type": "text", "text": ...}] and image parts '
                '[{"type": "image_url", "image_url": {"url": ...}}]'
            ) from exc

    def to_template(self) -> dict[str, Any]:
        # Most chat templates index string content; text parts are joined as vLLM does.
        if self.content is None:
            content = ""
        elif isinstance(self.content, str):
            content = self.content
        elif any(isinstance(p, ImagePart) for p in self.content):
            # The processor's chat template places the images; it takes OpenAI's parts as they are.
            content = [p.model_dump(exclude_none=True) for p in self.content]
        else:
            content = "\n".join(p.text for p in self.content)
        # "developer" is OpenAI's new name for "system"; templates only know the old one.
        msg: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": content,
        }
        if self.name is not None:
            msg["name"] = self.name
        if self.tool_calls:
            # Templates (Qwen's, Llama's, Mistral's) write arguments with `tojson`: they want the object,
            # not OpenAI's JSON text (as vLLM and SGLang pass them).
            msg["tool_calls"] = [
                {
                    **({"id": c.id} if c.id is not None else {}),
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": _arguments_object(c.function.arguments)},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        return msg


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON: the template gets the text


class FunctionDef(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef

    def to_template(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    """OpenAI's response_format.json_schema (the SDK's parse() sends name, schema and strict: true)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    # OpenAI's strict mode; the output here always follows the schema, strict or not.
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JSONSchemaFormat | None = None
    # SGLang's structural_tag response format
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    # vLLM / SGLang: extra variables for the chat template (e.g. Qwen3's enable_thinking)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True  # vLLM's
    # SGLang's, with --reasoning-parser: reasoning into reasoning_content (false: left in content), and
    # streamed as it comes (false: in one delta when it ends)
    separate_reasoning: bool = True
    stream_reasoning: bool = True

    @model_validator(mode="after")
    def _chat_only(self) -> ChatCompletionRequest:
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise PydanticCustomError("no_tools", "needs tools", {"loc": "tool_choice"})
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            raise PydanticCustomError(
                "unknown_tool", "names function {name}, which is not in tools",
                {"loc": "tool_choice", "name": short_repr(choice.function.name)},
            )
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs to be true")
        return self

    def sampling_params(
        self, context_length: int, defaults: Mapping[str, Any] | None = None
    ) -> SamplingParams:
        # No max given: as many as fit in the context (the engine caps a request at its room).
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        values = self._sampling_dict(context_length if limit is None else limit, defaults)
        return to_sampling_params(values, constraint=self.constraint())

    @property
    def tool_mode(self) -> str | None:
        """None (no tools, or tool_choice none), "auto", "required" or "named"."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.to_template() for t in self.tools] if self.tools else None

    def constraint(self) -> structured_output.Constraint | None:
        found = [c for c in [structured_output.from_response_format(self.response_format)] if c is not None]
        found += [c for c in [tool_constraint(self)] if c is not None]
        extras = {name: getattr(self, name) for name in _CONSTRAINT_FIELDS}
        return structured_output.one(found + structured_output.from_extras(extras))

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.to_template() for m in self.messages]


# ---- native /generate and management ----------------------------------------------------------------
class GenerateRequest(_Strict):
    """SGLang's /generate body. `sampling_params` keys are SamplingParams' own (max_new_tokens, ...), plus
    SGLang's spellings that `compat.generate_sampling_dict` maps or refuses."""

    _ignored_fields = compat.GENERATE_IGNORED
    _refused_fields = compat.GENERATE_REFUSED

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(default=0, ge=0, le=MAX_TOP_LOGPROBS)
    # SGLang's: each logprob entry as [logprob, token id, token text] instead of [logprob, token id, null]
    return_text_in_logprobs: bool = False
    # SGLang's: with return_logprob, input_token_logprobs for prompt positions from this one (-1: none)
    logprob_start_len: int = Field(default=-1, ge=-1)
    rid: str | list[str] | None = None
    # SGLang's: per prompt an image (data URL or local path) or a list of them; vision-language models only
    image_data: str | list[str | list[str] | None] | None = None

    @field_validator("sampling_params")
    @classmethod
    def _sglang_sampling_keys(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [compat.generate_sampling_dict(p, prefix=f"{i}.") for i, p in enumerate(value)]
        return compat.generate_sampling_dict(value, prefix="") if value is not None else None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("pass exactly one of text or input_ids")
        if self.text == [] or self.input_ids == [] or (self.input_ids and [] in self.input_ids):
            field = "text" if self.text is not None else "input_ids"
            raise PydanticCustomError(
                "empty_prompt", "must not be empty (and hold no empty prompt)", {"loc": field}
            )
        return self

    @property
    def prompts(self) -> int:
        if isinstance(self.text, str) or (self.input_ids and _is_token(self.input_ids[0])):
            return 1
        return len(self.text if self.text is not None else self.input_ids or [])

    @property
    def single(self) -> bool:
        return isinstance(self.text, str) or bool(self.input_ids and _is_token(self.input_ids[0]))

    def sampling_params_list(self, defaults: Mapping[str, Any] | None = None) -> list[SamplingParams]:
        """One validated SamplingParams per prompt (a single dict applies to all). `defaults`: the model's
        sampling defaults (generation_config.json), for keys a dict leaves out."""
        sp = self.sampling_params
        if defaults:
            sp = [{**defaults, **p} for p in sp] if isinstance(sp, list) else {**defaults, **(sp or {})}
        if isinstance(sp, list):
            if len(sp) != self.prompts:
                raise APIError(
                    400,
                    f"sampling_params has {len(sp)} entries for {self.prompts} prompts",
                    param="sampling_params",
                )
            return [to_sampling_params(p, openai_names=False) for p in sp]
        return [to_sampling_params(sp or {}, openai_names=False)] * self.prompts


class AbortRequestBody(_Strict):
    rid: str = Field(min_length=1)


class TokenizeRequest(_Strict):
    """/tokenize (SGLang's and vLLM's): a prompt, or messages rendered with the chat template."""

    model: str | None = None
    prompt: str | list[str] | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # with messages
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None  # with messages: rendered by the template as a chat request's are

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("pass exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int] | list[list[int]]
    skip_special_tokens: bool = True


# ---- responses ---------------------------------------------------------------------------------------
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None  # SGLang's: the stop string or token id that ended the choice
    # Why the engine ended the choice, when finish_reason is "abort" (e.g. the KV cache ran out)
    abort_message: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    abort_message: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # parsers.tool_call.ToolCallDelta.to_openai() each


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    abort_message: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "radixlm"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
