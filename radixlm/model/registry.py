"""Which implementation runs a model: a native one when we have it, else the Transformers backend."""

from __future__ import annotations

from dataclasses import dataclass

from radixlm.model.loader import ModelLoadError


@dataclass(frozen=True)
class ImplChoice:
    impl: str  # "native" | "transformers"
    architecture: str
    reason: str


def native_architectures() -> dict[str, type]:
    from radixlm.model.models import NATIVE_ARCHITECTURES

    return NATIVE_ARCHITECTURES


def choose_impl(config, model_impl: str) -> ImplChoice:
    archs = list(getattr(config, "architectures", None) or [])
    arch = archs[0] if archs else type(config).__name__
    has_remote_code = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    native = native_architectures()
    native_ok = arch in native and not has_remote_code
    if model_impl == "transformers":
        return ImplChoice("transformers", arch, "model_impl='transformers' was asked for")
    if model_impl == "native":
        if not native_ok:
            why = "it ships remote code" if has_remote_code else f"radixlm has no native {arch}"
            raise ModelLoadError(
                f"model_impl='native' was asked for, but {why}; native architectures are: "
                f"{', '.join(sorted(native))}. Use model_impl='auto' or 'transformers'."
            )
        return ImplChoice("native", arch, "model_impl='native' was asked for")
    if native_ok:
        return ImplChoice("native", arch, f"auto: radixlm has a native implementation of {arch}")
    why = "the model ships its own code" if has_remote_code else f"no native implementation of {arch}"
    return ImplChoice("transformers", arch, f"auto: {why}, so the Transformers backend runs it")
