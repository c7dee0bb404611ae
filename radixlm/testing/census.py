"""The decoder census: every model type in the installed transformers' causal-LM mapping, run tiny.

For each type whose class sets `_supports_attention_backend`, a tiny random model is built from its own
config class, shrunk generically (shrink.py), saved as a model folder and run by radixlm (`model_impl`
auto) and by transformers' `generate`, greedy, in float32. Each type gets one verdict:

    pass            token-identical (a step whose top-2 margin in transformers is below 1e-3 ends the
                    comparison: either token is right there)
    fail            radixlm loaded it and gave other tokens, or radixlm could not load or run it
    not-buildable   the model itself could not be built or run by transformers at that size (the reason
                    is the model's: its config, its init or its own generate)
    refused         the class does not support the attention interface, or some of its layers do not call
                    it (linear attention, state-space mixers), and radixlm refuses it by name

`python -m radixlm.testing.census [--types a,b] [--out docs/census.md]` runs it and writes the table.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import signal
import tempfile
import time
import traceback
from dataclasses import dataclass

import torch

from radixlm.testing import tokenizer as _tok
from radixlm.testing.parity import greedy_mismatch, greedy_with_margins, random_prompts
from radixlm.testing.shrink import shrink_config

PROMPT_LENGTHS = [5, 23, 41]
MAX_NEW_TOKENS = 8
TYPE_TIMEOUT_S = 240

VERDICTS = ("pass", "fail", "not-buildable", "refused")


@dataclass
class Entry:
    model_type: str
    class_name: str
    verdict: str
    impl: str = ""
    detail: str = ""
    seconds: float = 0.0


def causal_lm_types() -> list[tuple[str, str]]:
    """(model_type, class name) for every entry of transformers' causal-LM mapping, sorted by type."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type, name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        out.append((model_type, name[0] if isinstance(name, (list, tuple)) else name))
    return sorted(out)


def _model_class(class_name: str) -> type:
    import transformers

    return getattr(transformers, class_name)


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    """SIGALRM-based: a type that hangs (a huge default loop, a deadlock) is cut off, not the census."""

    def _raise(_sig, _frame):
        raise _Timeout(f"took over {seconds}s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= 220 else text[:217] + "..."


def build_folder(model_type: str, class_name: str, out: pathlib.Path, seed: int = 0) -> None:
    """Write a tiny random model folder of this type (config, weights, generation config, tokenizer)."""
    from transformers import CONFIG_MAPPING, GenerationConfig

    cls = _model_class(class_name)
    # The class's own config class where it names one: the mapping can pair a composite config (Llama 4's)
    # with a class built from its text part.
    config_cls = getattr(cls, "config_class", None) or CONFIG_MAPPING[model_type]
    config = shrink_config(config_cls, vocab_size=_tok.tokenizer_vocab_size())
    config.architectures = [class_name]
    # Encoder families (BERT, RoBERTa...) are causal LMs only as decoders: their *LMHeadModel says so.
    config.is_decoder = True
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=torch.float32).eval()
    _sharpen(model)
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=None, eos_token_id=None, pad_token_id=0).save_pretrained(out)
    _tok.write_tokenizer(out, vocab_size=config.get_text_config().vocab_size, model_max_length=4096)


def load_oracle(class_name: str, out: pathlib.Path):
    """transformers' own load of the folder: the oracle reads the same files radixlm does."""
    model = _model_class(class_name).from_pretrained(str(out), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def _sharpen(model: torch.nn.Module) -> None:
    """Scale the LM head (when it is its own matrix) so logits spread over a few units: random init gives
    near-flat logits, where top-2 ties would end most comparisons after a token or two."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    if head is None or emb is None or head.weight is emb.weight:
        return
    ids = (torch.arange(32) * 37 + 11) % emb.weight.shape[0]
    with torch.inference_mode():
        logits = model(input_ids=ids[None], use_cache=False).logits.float()
        std = logits[0, 4:].std(dim=-1).mean().item()
        if std > 0:
            head.weight.mul_(5.0 / std)


def _radixlm_greedy(path: pathlib.Path, prompts: list[list[int]]) -> tuple[str, list[list[int]]]:
    from radixlm.config import EngineConfig
    from radixlm.core.engine_core import EngineCore
    from radixlm.testing.parity import drive_core

    core = EngineCore(EngineConfig(model_path=str(path), dtype="float32", max_total_tokens=4096))
    try:
        params = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "ignore_eos": True}
        return core.runner.choice.impl, drive_core(core, prompts, params, stagger=1)["ids"]
    finally:
        core.close()


def _is_refusal(exc: Exception) -> bool:
    """radixlm's refusal of a model that does not route attention through the interface (hybrid layers)."""
    from radixlm.model.loader import ModelLoadError

    return isinstance(exc, ModelLoadError) and "attention interface" in str(exc)


def check_refused(model_type: str, class_name: str) -> Entry:
    from radixlm.model.loader import ModelLoadError
    from radixlm.model.transformers_backend.causal import check_supports_attention_backend

    try:
        check_supports_attention_backend(_model_class(class_name))
    except ModelLoadError as exc:
        return Entry(model_type, class_name, "refused", detail=_one_line(exc))
    raise AssertionError(f"{class_name} supports the attention interface")


def run_one(model_type: str, class_name: str, workdir: pathlib.Path) -> Entry:
    """The verdict for one model type."""
    start = time.monotonic()
    try:
        cls = _model_class(class_name)
    except AttributeError as exc:
        return Entry(model_type, class_name, "not-buildable", detail=_one_line(exc))
    if not getattr(cls, "_supports_attention_backend", False):
        return check_refused(model_type, class_name)
    out = workdir / model_type
    entry = Entry(model_type, class_name, "not-buildable")
    try:
        with _deadline(TYPE_TIMEOUT_S):
            try:
                build_folder(model_type, class_name, out)
                model = load_oracle(class_name, out)
                prompts = random_prompts(model.get_input_embeddings().weight.shape[0], PROMPT_LENGTHS, seed=3)
                refs = [greedy_with_margins(model, p, MAX_NEW_TOKENS) for p in prompts]
            except _Timeout:
                raise
            except Exception as exc:  # the model's own failure: its config, init or generate
                entry.detail = _one_line(exc)
                return entry
            del model
            entry.verdict = "fail"
            try:
                entry.impl, ours = _radixlm_greedy(out, prompts)
            except _Timeout:
                raise
            except Exception as exc:
                entry.detail = _one_line(exc)
                if _is_refusal(exc):
                    entry.verdict = "refused"
                logging.getLogger(__name__).debug("%s", traceback.format_exc())
                return entry
            for i, ((ref, margins), got) in enumerate(zip(refs, ours)):
                why = greedy_mismatch(got, ref, margins, f"prompt {i}")
                if why is not None:
                    entry.detail = why[:220]
                    return entry
            entry.verdict = "pass"
            return entry
    except _Timeout as exc:
        entry.detail = str(exc)
        return entry
    finally:
        entry.seconds = time.monotonic() - start


def run_census(types: list[tuple[str, str]] | None = None, progress=print) -> list[Entry]:
    entries = []
    with tempfile.TemporaryDirectory(prefix="radixlm-census-") as tmp:
        for model_type, class_name in types or causal_lm_types():
            entry = run_one(model_type, class_name, pathlib.Path(tmp))
            progress(f"{entry.verdict:14s} {model_type:28s} {entry.seconds:6.1f}s {entry.detail[:120]}")
            entries.append(entry)
            with contextlib.suppress(OSError):
                import shutil

                shutil.rmtree(pathlib.Path(tmp) / model_type)
    return entries


def summary(entries: list[Entry]) -> dict[str, int]:
    counts = {v: sum(e.verdict == v for e in entries) for v in VERDICTS}
    buildable = counts["pass"] + counts["fail"]
    counts["buildable"] = buildable
    return counts


def render_markdown(entries: list[Entry], transformers_version: str) -> str:
    c = summary(entries)
    rate = 100.0 * c["pass"] / c["buildable"] if c["buildable"] else 0.0
    lines = [
        "# Decoder census",
        "",
        "Generated by `python -m radixlm.testing.census --out docs/census.md` (or the slow test",
        "tests/testing/test_census.py): every model type in the",
        f"installed transformers' ({transformers_version}) causal-LM mapping, built tiny with random weights",
        "and run greedy in float32 by radixlm (`model_impl` auto) and by transformers' `generate`.",
        "",
        f"**{c['pass']} of {c['buildable']} buildable types token-exact ({rate:.1f}%)**; "
        f"{c['fail']} fail, {c['not-buildable']} not buildable at tiny size (transformers itself failed to "
        f"build or run the shrunk config), {c['refused']} refused (no attention interface, or layers that "
        "do not use it).",
        "",
        "| model type | class | verdict | implementation | detail |",
        "|---|---|---|---|---|",
    ]
    for e in entries:
        lines.append(f"| {e.model_type} | {e.class_name} | {e.verdict} | {e.impl} | {e.detail} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import argparse

    import transformers

    parser = argparse.ArgumentParser(prog="python -m radixlm.testing.census", description=__doc__.split("\n")[0])
    parser.add_argument("--types", default="", help="comma-separated model types (default: all)")
    parser.add_argument("--out", default="", help="write the markdown table here (e.g. docs/census.md)")
    args = parser.parse_args(argv)
    wanted = {t for t in args.types.split(",") if t}
    types = [t for t in causal_lm_types() if not wanted or t[0] in wanted]
    logging.basicConfig(level=logging.WARNING)
    entries = run_census(types)
    c = summary(entries)
    print(f"{c['pass']}/{c['buildable']} buildable pass; {c['fail']} fail, {c['not-buildable']} not buildable, "
          f"{c['refused']} refused")  # fmt: skip
    if args.out:
        pathlib.Path(args.out).write_text(render_markdown(entries, transformers.__version__))
    return 0 if c["fail"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
