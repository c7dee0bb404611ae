"""Issue 10, hole 8: whatever reaches the core process's request socket (anything the same user runs can
connect to it) must not take the engine down. A message that does not decode, or decodes into a message
whose fields are wrong, is dropped and logged; the engine keeps serving."""

from __future__ import annotations

import os

import msgpack
import pytest
import zmq

from radixlm import Engine
from radixlm.messages import AddRequest, encode
from radixlm.testing import cached_model_folder

GREEDY = {"max_new_tokens": 4, "temperature": 0.0}

MALFORMED = [
    b"",
    b"\xff\x00 not msgpack",
    msgpack.packb({"not": "a list"}),
    msgpack.packb(["NoSuchMessage", {}]),
    msgpack.packb(["AddRequest", {"rids": ["x"]}]),  # fields missing
    msgpack.packb(["AddRequest", "not a dict"]),
    encode(AddRequest(["bad-ids"], "not token ids", {}, False, 0)),  # type: ignore[arg-type]
    encode(AddRequest(5, [1, 2], {"max_new_tokens": 2}, False, 0)),  # type: ignore[arg-type]
    encode(AddRequest(["bad-params"], [1, 2], {"max_new_tokens": "many"}, False, 0)),
]


@pytest.fixture(scope="module")
def llm():
    path = str(cached_model_folder("llama", "tiny"))
    with Engine(model_path=path, dtype="float32", max_total_tokens=4096, log_level="error") as engine:
        yield engine


def test_malformed_messages_on_the_core_socket_leave_the_engine_running(llm: Engine) -> None:
    before = llm.generate(prompt="Hello", sampling_params=GREEDY)["output_ids"]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"ipc://{os.path.join(llm._client.socket_dir, 'req')}")
    try:
        for data in MALFORMED:
            push.send(data)
            # Each one on its own: the core must survive it and still answer.
            after = llm.generate(prompt="Hello", sampling_params=GREEDY)["output_ids"]
            assert llm.is_alive(), data
            assert after == before, data
    finally:
        push.close(linger=0)
        ctx.term()
