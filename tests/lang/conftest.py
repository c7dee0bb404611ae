"""Fixtures for the language's tests: one in-process Engine and one `radixlm serve`, on the same tiny
qwen2 folder in float32, so every program can run on both backends and be compared."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from radixlm import Engine
from radixlm.lang import EngineBackend, RuntimeEndpoint
from radixlm.lang.backend import Backend
from radixlm.testing import cached_model_folder
from tests.server.test_server import Server

KV_TOKENS = 20000  # what tests/server/test_server.py's _start gives the server


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    with Engine(
        model_path=str(cached_model_folder("qwen2")),
        dtype="float32",
        max_total_tokens=KV_TOKENS,
        inline_core=True,
        log_level="warning",
    ) as llm:
        yield llm


@pytest.fixture(scope="session")
def server(plain_server: Server) -> Server:
    return plain_server


@pytest.fixture(scope="session")
def engine_backend(engine: Engine) -> EngineBackend:
    return EngineBackend(engine)


@pytest.fixture(scope="session")
def http_backend(server: Server) -> Iterator[RuntimeEndpoint]:
    be = RuntimeEndpoint(server.url)
    yield be
    be.shutdown()


@pytest.fixture(params=["engine", "http"])
def backend(request: pytest.FixtureRequest) -> Backend:
    """Each test that takes `backend` runs once per backend."""
    return request.getfixturevalue(f"{request.param}_backend")
