"""`import radixlm as sgl` reaches the language's common names; importing stays cheap."""

from __future__ import annotations

import subprocess
import sys

import radixlm
from radixlm import lang


def _loaded(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_import_radixlm_does_not_load_the_language_and_the_language_loads_no_torch() -> None:
    assert _loaded("import sys, radixlm; print('radixlm.lang' in sys.modules)") == "False"
    # A client program (RuntimeEndpoint) needs no torch: only an EngineBackend's Engine loads it.
    assert _loaded("import sys, radixlm as sgl; sgl.gen; print('torch' in sys.modules)") == "False"


def test_the_common_names_are_the_languages() -> None:
    for name in (
        "function",
        "gen",
        "select",
        "system",
        "user",
        "assistant",
        "set_default_backend",
        "RuntimeEndpoint",
    ):
        assert getattr(radixlm, name) is getattr(lang, name)


def test_an_sglang_style_program_through_import_radixlm(engine) -> None:
    import radixlm as sgl

    @sgl.function
    def prog(s):
        s += sgl.user("Hi") + sgl.assistant(sgl.gen("a", max_tokens=4, temperature=0))

    st = prog.run(backend=engine)
    assert st.messages()[1] == {"role": "assistant", "content": st["a"].lstrip()}
