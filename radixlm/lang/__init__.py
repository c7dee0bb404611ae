"""radixlm's frontend language: programs of gen, select and fork whose calls share prefixes through the
radix cache. The API is SGLang's, so an SGLang program runs by changing its import:

    from radixlm import lang as sgl          # or: import radixlm as sgl

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000"))   # or a radixlm Engine
    print(qa.run(question="What is RadixAttention?")["answer"])

See docs/lang.md.
"""

from radixlm.lang.api import (
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    gen,
    get_server_info,
    image,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from radixlm.lang.backend import Backend, BackendError
from radixlm.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    greedy_token_selection,
    token_length_normalized,
    unconditional_likelihood_normalized,
)
from radixlm.lang.defaults import get_default_backend, set_default_backend
from radixlm.lang.engine_backend import EngineBackend
from radixlm.lang.program import Function, function
from radixlm.lang.runtime_endpoint import RuntimeEndpoint
from radixlm.lang.state import ForkGroup, ProgramState

__all__ = [
    "Backend",
    "BackendError",
    "ChoicesDecision",
    "ChoicesSamplingMethod",
    "EngineBackend",
    "ForkGroup",
    "Function",
    "ProgramState",
    "RuntimeEndpoint",
    "assistant",
    "assistant_begin",
    "assistant_end",
    "flush_cache",
    "function",
    "gen",
    "get_default_backend",
    "get_server_info",
    "greedy_token_selection",
    "image",
    "select",
    "set_default_backend",
    "system",
    "system_begin",
    "system_end",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
    "user",
    "user_begin",
    "user_end",
]
