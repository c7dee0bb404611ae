"""radixlm: a fast LLM inference engine for Hugging Face models."""

from radixlm.config import EngineConfig
from radixlm.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name: str):
    # Importing the Engine pulls in torch and transformers; keep `import radixlm` cheap for the CLI's --help.
    if name == "Engine":
        from radixlm.frontend.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "EngineConfig", "SamplingParams", "__version__"]
