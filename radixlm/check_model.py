"""`radixlm check-model DIR_OR_ID`: will this model run, how, and what will and won't work.

Reads the model's files (config, tokenizer config, weights index) and builds the model on the meta device
(no weights read), so it answers in seconds for any size: which implementation runs it and why, whether a
tensor-parallel split is possible and for which sizes, the quantization method, the chat template, the
context length. `--parity` also loads the weights and compares a short greedy run with transformers'.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        self.lines.append((key, value))

    def fail(self, key: str, why: str) -> None:
        self.add(key, f"NO: {why}")
        self.problems.append(f"{key}: {why}")

    def render(self) -> str:
        width = max((len(k) for k, _ in self.lines), default=0)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in self.lines)


def _chat_template(path: Path) -> str:
    if (path / "chat_template.jinja").is_file():
        return "yes (chat_template.jinja)"
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        template = json.loads(cfg.read_text()).get("chat_template")
        if template:
            return "yes (tokenizer_config.json)"
    return "none: chat requests need --chat-template (chatml, llama-3, llama-2, gemma or a file)"


def _tp_sizes(config, limit: int = 8) -> list[int]:
    """Sizes up to `limit` that divide the attention heads (KV heads are replicated when fewer)."""
    from radixlm.model.loader import text_config

    heads = getattr(text_config(config), "num_attention_heads", None)
    if not isinstance(heads, int):
        return [1]
    return [n for n in range(1, limit + 1) if heads % n == 0]


def _check_transformers_split(report: Report, config, path: Path, trust_remote_code: bool, sizes: list[int]) -> None:
    """Each size's split built on the meta device: the plan read, every entry checked against the modules."""
    import copy

    import torch

    from radixlm.model.loader import ModelLoadError

    ok = []
    for n in sizes[1:]:
        try:
            _backend_class(config)(
                copy.deepcopy(config), path, trust_remote_code=trust_remote_code, dtype=torch.float32,
                tp_rank=0, tp_size=n,
            )  # fmt: skip
        except ModelLoadError as exc:
            report.add(f"tensor parallel {n}", f"no: {exc}")
            continue
        ok.append(n)
    report.add("tensor parallel", f"tp_size {', '.join(map(str, [1, *ok]))} (from base_model_tp_plan)")


def _build_on_meta(report: Report, config, path: Path, trust_remote_code: bool) -> bool:
    import torch

    from radixlm.model.loader import ModelLoadError

    try:
        model = _backend_class(config)(config, path, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except ModelLoadError as exc:
        report.fail("builds", str(exc))
        return False
    report.add("builds", "yes (on the meta device; the attention shapes are measured when the weights load)")
    if getattr(model, "multimodal", False):
        how = "both ways inside each image (token_type_ids)" if model.bidirectional_images else "causally"
        report.add("images", f"yes: transformers' vision tower, image token id {model.image_token_id}, attended {how}")
    return True


def _backend_class(config) -> type:
    """The Transformers-backend wrapper the runner builds: the VLM one for a config with a vision tower."""
    from radixlm.model.transformers_backend.causal import TransformersCausalLM
    from radixlm.model.transformers_backend.multimodal import TransformersVLM, is_vision_language

    return TransformersVLM if is_vision_language(config) else TransformersCausalLM


def inspect(model: str, *, trust_remote_code: bool = False, parity: bool = False) -> Report:
    from radixlm.model import loader, quantization
    from radixlm.model.registry import choose_impl

    report = Report()
    try:
        path = loader.resolve_model_path(model)
        config = loader.load_config(path, trust_remote_code=trust_remote_code)
    except (loader.ModelLoadError, OSError, ValueError) as exc:
        report.fail("model", str(exc))
        return _with_verdict(report)
    report.add("model", str(path))
    cfg = loader.text_config(config)
    archs = getattr(config, "architectures", None) or [type(config).__name__]
    report.add("architecture", f"{archs[0]} (model_type {getattr(config, 'model_type', '?')!r})")
    try:
        report.add("weights", loader.checkpoint_format(path))
    except loader.ModelLoadError as exc:
        report.fail("weights", str(exc))
    if not _check_head(report, config, path, trust_remote_code):  # a pooling model's report ends there
        return _with_verdict(report)
    choice = choose_impl(config, "auto")
    report.add("implementation", f"{choice.impl}: {choice.reason}")
    if choice.impl == "transformers" and not _build_on_meta(report, config, path, trust_remote_code):
        return _with_verdict(report)
    sizes = _tp_sizes(config)
    if choice.impl == "native":
        report.add("tensor parallel", f"tp_size {', '.join(map(str, sizes))} (sizes that divide the heads)")
    else:
        _check_transformers_split(report, config, path, trust_remote_code, sizes)
    try:
        report.add("quantization", quantization.resolve_method(None, config, loader.checkpoint_format(path)))
    except loader.ModelLoadError as exc:
        report.fail("quantization", str(exc))
    report.add("chat template", _chat_template(path))
    context = getattr(cfg, "max_position_embeddings", None)
    report.add("context length", f"{context} (max_position_embeddings)" if context else "not in the config")
    if parity and not report.problems:
        _parity(report, path, trust_remote_code)
    return _with_verdict(report)


def _check_head(report: Report, config, path: Path, trust_remote_code: bool) -> bool:
    """The task line (model/heads.py). True: a causal LM, whose checks follow; a pooling model is built on
    the meta device here and its report completed (False), as is an unsupported head's refusal."""
    import torch

    from radixlm.model.heads import pooling_impl, pooling_info, resolve_head
    from radixlm.model.loader import ModelLoadError, text_config

    try:
        head = resolve_head(config, path)
    except ModelLoadError as exc:
        report.fail("task", str(exc))
        return False
    report.add("task", f"{head.task} ({head.reason})")
    if head.task == "generate":
        return True
    from radixlm.model.transformers_backend.encoder import TransformersPoolingModel

    report.add("implementation", f"transformers: {pooling_impl(head, 'auto').reason}")
    try:
        model = TransformersPoolingModel(config, path, head, trust_remote_code=trust_remote_code, dtype=torch.float32)
    except ModelLoadError as exc:
        report.fail("builds", str(exc))
        return False
    report.add("builds", f"yes (on the meta device; attention {'causal' if model.causal else 'bidirectional'})")
    for key, value in pooling_info(model, config).items():
        report.add(key, ", ".join(value) if isinstance(value, list) else value)
    report.add("tensor parallel", "tp_size 1 (pooling models are not split)")
    routes = "Engine.encode (logits), /encode, /v1/classify, /classify" if head.task == "classify" else (
        "Engine.encode, /v1/embeddings, /encode"
    )
    report.add("routes", routes)
    context = getattr(text_config(config), "max_position_embeddings", None)
    report.add("context length", f"{context} (max_position_embeddings)" if context else "not in the config")
    return False


def _with_verdict(report: Report) -> Report:
    report.add("verdict", "runs" if not report.problems else "does not run: " + "; ".join(report.problems))
    return report


def _parity(report: Report, path: Path, trust_remote_code: bool) -> None:
    """A short greedy comparison with transformers on the real weights, in float32."""
    from radixlm.config import EngineConfig
    from radixlm.core.engine_core import EngineCore
    from radixlm.testing.parity import drive_core, greedy_mismatch, greedy_with_margins, random_prompts

    core = EngineCore(
        EngineConfig(model_path=str(path), dtype="float32", trust_remote_code=trust_remote_code, max_total_tokens=4096)
    )
    try:
        prompts = random_prompts(core.runner.vocab_size, [7, 29], seed=1)
        params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
        ours = drive_core(core, prompts, params)["ids"]
    finally:
        core.close()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from radixlm.model.transformers_backend.multimodal import is_vision_language

    vlm = is_vision_language(AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code))
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM  # a VLM's text path: its own class
    hf = auto.from_pretrained(str(path), dtype="float32", trust_remote_code=trust_remote_code).eval()
    hf.generation_config.eos_token_id = None
    for i, p in enumerate(prompts):
        ref, margins = greedy_with_margins(hf, p, 8)
        why = greedy_mismatch(ours[i], ref, margins, f"prompt {i}")
        if why is not None:
            report.fail("parity", why)
            return
    report.add("parity", f"greedy token-identical to transformers (float32, {len(prompts)} prompts x 8 tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="radixlm check-model", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model folder, a .gguf file or a Hugging Face id")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--parity", action="store_true", help="also run a short greedy comparison with transformers")
    args = parser.parse_args(argv)
    report = inspect(args.model, trust_remote_code=args.trust_remote_code, parity=args.parity)
    print(report.render())
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
