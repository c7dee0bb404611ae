"""SGLang's own frontend language (`sglang==0.5.23`, installed with --no-deps plus the few packages its
frontend imports; scripts/test.sh installs them) driving `radixlm serve` through `RuntimeEndpoint`.

The frontend runs in a subprocess: importing sglang applies its patches to transformers process-wide,
which must not leak into the rest of the suite. Skipped only when sglang is not installed at all; an
sglang that is installed but fails to import fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.server.test_server import Server

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("sglang") is None,
    reason="sglang is not installed (scripts/test.sh installs sglang==0.5.23 --no-deps and its frontend deps)",
)

PROGRAM = r"""
import json, sys
import sglang as sgl

backend = sgl.RuntimeEndpoint(sys.argv[1])
what = sys.argv[2]

@sgl.function
def chat(s, question):
    s += sgl.user(question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=8, temperature=0))
    s += sgl.user("And then?")
    s += sgl.assistant(sgl.gen("more", max_tokens=4, temperature=0, stop=["\n"]))

@sgl.function
def plain(s):
    s += "Once upon a time" + sgl.gen("story", max_tokens=6, temperature=0)

@sgl.function
def choose(s):
    s += "The best color is " + sgl.select("color", choices=["red", "green", "blue"])

@sgl.function
def constrained(s):
    s += "Call me at " + sgl.gen("phone", max_tokens=20, regex=r"[0-9]{3}-[0-9]{4}", temperature=1.0)
    s += "\nProfile: " + sgl.gen("profile", max_tokens=60, json_schema=sys.argv[3])

out = {}
if what in ("regex", "all"):
    state = constrained.run(backend=backend)
    out.update({"phone": state["phone"], "profile": state["profile"]})
if what in ("gen", "all"):
    state = chat.run(question="Hi there", backend=backend)
    streamed = plain.run(backend=backend, stream=True)
    pieces = list(streamed.text_iter("story"))
    out.update({
        "answer": state["answer"],
        "more": state["more"],
        "roles": [m["role"] for m in state.messages()],
        "story": plain.run(backend=backend)["story"],
        "streamed_story": "".join(pieces),
    })
if what in ("select", "all"):
    out["color"] = choose.run(backend=backend)["color"]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def server(plain_server: Server) -> Server:
    return plain_server


def run_frontend(server: Server, what: str, *args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, server.url, what, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\nserver log:\n{server.log_tail()}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


PROFILE_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["name", "age"],
}


@pytest.fixture(scope="module")
def programs(server: Server) -> dict:
    """Every program's results from one frontend process: starting Python and importing sglang is most of
    what a run costs, and the programs do not depend on each other."""
    return run_frontend(server, "all", json.dumps(PROFILE_SCHEMA))


def test_gen_and_roles(programs: dict) -> None:
    out = programs
    assert isinstance(out["answer"], str) and out["answer"]
    assert isinstance(out["more"], str) and "\n" not in out["more"]
    assert out["roles"] == ["user", "assistant", "user", "assistant"]
    assert out["streamed_story"] == out["story"]


def test_select(programs: dict) -> None:
    assert programs["color"] in ("red", "green", "blue")


def test_gen_with_regex_and_json_schema(programs: dict) -> None:
    # SGLang's frontend sends `regex` / `json_schema` in /generate's sampling_params (issue 13).
    import re

    import jsonschema

    out = programs
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", out["phone"]), out
    jsonschema.validate(json.loads(out["profile"]), PROFILE_SCHEMA)
