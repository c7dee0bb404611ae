"""radixlm: a fast LLM inference engine for Hugging Face models."""

from radixlm.config import EngineConfig
from radixlm.sampling_params import SamplingParams

__version__ = "0.1.0"

# The frontend language's common names, so that `import radixlm as sgl` runs an SGLang program
# (radixlm.lang has the rest). Loaded on first use, like the Engine.
_LANG_NAMES = frozenset(
    {
        "function",
        "gen",
        "select",
        "system",
        "user",
        "assistant",
        "system_begin",
        "system_end",
        "user_begin",
        "user_end",
        "assistant_begin",
        "assistant_end",
        "image",
        "set_default_backend",
        "RuntimeEndpoint",
        "EngineBackend",
        "flush_cache",
        "get_server_info",
        "token_length_normalized",
        "greedy_token_selection",
        "unconditional_likelihood_normalized",
    }
)


def __getattr__(name: str):
    # Importing the Engine pulls in torch and transformers; keep `import radixlm` cheap for the CLI's --help.
    if name == "Engine":
        from radixlm.frontend.engine import Engine

        return Engine
    if name in _LANG_NAMES:
        from radixlm import lang

        return getattr(lang, name)
    raise AttributeError(name)


__all__ = ["Engine", "EngineConfig", "SamplingParams", "__version__"]
