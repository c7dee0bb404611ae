"""The server's routes and the front load no torch (and no model code) when imported."""

from __future__ import annotations

import subprocess
import sys

MODULES = [
    "radixlm.messages",
    "radixlm.server.protocol",
    "radixlm.server.serving",
    "radixlm.server.openai_chat",
    "radixlm.server.openai_completions",
    "radixlm.server.native",
    "radixlm.server.errors",
    "radixlm.server.metrics",
    "radixlm.server.app",
    "radixlm.frontend.engine",
    "radixlm.frontend.inputs",
    "radixlm.frontend.outputs",
    "radixlm.frontend.tokenizer_manager",
    "radixlm.frontend.core_client",
    "radixlm.frontend.core_process",
]


def test_front_and_server_import_no_torch() -> None:
    code = (
        f"import sys; import {', '.join(MODULES)}; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('radixlm.core', 'radixlm.model'))); "
        "assert not bad, bad"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
