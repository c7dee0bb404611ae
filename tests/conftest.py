import os

import pytest

# Tests never touch the network: a Hub lookup must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def plain_server():
    """One `radixlm serve` with the default test flags (tiny qwen2, float32), shared by every module that
    needs nothing else: each server start costs seconds, and those modules flush or ignore the cache."""
    from tests.server.test_server import _start, _stop

    srv = _start()
    try:
        yield srv
    finally:
        clean, _ = _stop(srv)
    assert clean, srv.log_tail()
