"""Issue 10: a bounded schema fuzz run. schemathesis generates requests from the server's own OpenAPI
schema (valid and invalid bodies, every route) against a real server process; not one may answer 5xx, and
every error must be OpenAI-shaped.

Marked slow, and run only when asked for (`-m slow`), so the default suite stays fast:

    python -m pytest -m slow tests/server/test_schema_fuzz.py

About 2-3 minutes on 2 CPU cores, most of it schemathesis' coverage phase (boundary values for every
field). RADIXLM_FUZZ_EXAMPLES sets the random examples per operation on top of it (default 10).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from tests.server.test_server import Server, _start, _stop  # noqa: E402

EXAMPLES = int(os.environ.get("RADIXLM_FUZZ_EXAMPLES", "10"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fuzz_server(request: pytest.FixtureRequest) -> Iterator[Server]:
    markexpr = request.config.getoption("markexpr") or ""
    if "slow" not in markexpr or "not slow" in markexpr:
        pytest.skip("the schema fuzz run takes minutes: run it with -m slow")
    # A short context keeps every generation short, whatever max_tokens or n the fuzzer picks.
    srv = _start("--context-length", "40")
    try:
        yield srv
    finally:
        _stop(srv)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples every run: a failure reproduces
)
def test_no_input_makes_a_server_error(case, fuzz_server: Server) -> None:
    response = case.call(timeout=120)
    assert response.status_code < 500, (case.as_curl_command(), response.status_code, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], response.text[:500]
    # The server is still healthy after it.
    assert httpx.get(fuzz_server.url + "/health", timeout=30).status_code == 200
