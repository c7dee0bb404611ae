"""One interpreter, two backends: the same programs give the same results in-process and over HTTP."""

from __future__ import annotations

from radixlm import lang as sgl
from radixlm.lang import EngineBackend, RuntimeEndpoint


@sgl.function
def composite(s, topic):
    s += sgl.system("You answer in a few words.")
    s += sgl.user("Tell me about " + topic + ".")
    s += sgl.assistant(sgl.gen("about", max_tokens=10))
    s += sgl.user("Is it good or bad?")
    s += sgl.assistant(sgl.select("verdict", choices=["good", "bad", "it depends"]))
    forks = s.fork(3)
    forks += sgl.user("Give one more reason.")
    forks += sgl.assistant(sgl.gen("reason", max_tokens=6))
    forks.join()
    s += sgl.user("Summarize.") + sgl.assistant(sgl.gen("summary", max_tokens=8, stop=["."]))


def _results(backend) -> list[tuple]:
    states = composite.run_batch(
        [{"topic": t} for t in ("the river", "music", "winter", "a garden")], backend=backend, temperature=0
    )
    return [
        (st.text(), st["about"], st["verdict"], st["reason"], st["summary"], st.messages()) for st in states
    ]


def test_engine_and_runtime_endpoint_agree(
    engine_backend: EngineBackend, http_backend: RuntimeEndpoint
) -> None:
    here, there = _results(engine_backend), _results(http_backend)
    assert here == there
    assert all(len(r[3]) == 3 for r in here)  # three gathered reasons each


def test_the_default_backend(engine_backend: EngineBackend, http_backend: RuntimeEndpoint, engine) -> None:
    @sgl.function
    def short(s):
        s += "Hello" + sgl.gen("x", max_tokens=4, temperature=0)

    sgl.set_default_backend(engine)  # an Engine is wrapped in an EngineBackend
    try:
        assert isinstance(sgl.get_default_backend(), EngineBackend)
        a = short.run()["x"]
        sgl.set_default_backend(http_backend)
        assert short.run()["x"] == a
    finally:
        sgl.set_default_backend(engine_backend)
