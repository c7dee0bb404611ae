"""The import rule of DESIGN.md, checked from the source, and what importing a module may load (the front's
and the server routes' no-torch import check is tests/frontend/test_imports.py).

"A -> B" means a module of A may import B:
  messages, config, sampling_params   -> only each other (the leaves)
  frontend -> leaves                  server -> frontend, leaves          lang -> frontend
  core -> leaves, kv, model           model -> leaves, kv, layers         layers, kv -> leaves
Imports under `if TYPE_CHECKING:` are type-only and exempt. Imports inside functions count: the rule is
about what code runs, not only about import time. The one exception is named below.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "radixlm"
LEAVES = {"messages", "config", "sampling_params", "gguf_metadata"}
ALLOWED: dict[str, set[str]] = {
    "messages": LEAVES,
    "config": LEAVES,
    "sampling_params": LEAVES,
    "gguf_metadata": LEAVES,
    "frontend": LEAVES | {"frontend"},
    "server": LEAVES | {"frontend", "server"},
    "lang": LEAVES | {"frontend", "lang"},
    "core": LEAVES | {"core", "kv", "model"},
    "model": LEAVES | {"model", "kv", "layers"},
    "layers": LEAVES | {"layers"},
    "kv": LEAVES | {"kv"},
}
# The front starts the core it talks to: the inline client runs it on a thread, the process client's child
# runs it. Both import the core inside the function that runs it, never at module level, so importing the
# front loads no model code.
RUNS_THE_CORE = {"frontend/core_client.py", "frontend/core_process.py"}
# Modules on the scheduler's path: they hold host ints only, so they must not even import torch.
HOST_ONLY = [
    "kv/page_allocator.py",
    "kv/prefix_cache.py",
    "kv/radix_cache.py",
    "kv/no_prefix_cache.py",
    "kv/kv_manager.py",
    "core/request.py",
    "core/scheduler.py",
    "core/schedule_policy.py",
    "model/step_input.py",
]


def _layer(module: str) -> str:
    """radixlm.core.scheduler -> core; radixlm.messages -> messages."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import that runs (not TYPE_CHECKING-only)."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, child.lineno, top))
                # `from radixlm import engine` style: the names may be modules
                found.extend((f"{child.module}.{a.name}", child.lineno, top) for a in child.names)
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner)

    visit(tree, True)
    return found


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_import_dag_holds() -> None:
    violations = []
    for path in _package_files():
        rel = path.relative_to(PACKAGE).as_posix()
        layer = rel.split("/")[0].removesuffix(".py")
        allowed = ALLOWED.get(layer)
        if allowed is None:
            continue  # cli, launch_server, bench, testing: tools at the top, free to use everything
        for module, line, top in _imports(path):
            if not module.startswith("radixlm.") or module.count(".") < 1:
                continue
            target = _layer(module)
            if target in allowed or target not in ALLOWED:
                continue
            if rel in RUNS_THE_CORE and target == "core" and not top:
                continue
            violations.append(f"radixlm/{rel}:{line}: {layer} imports {module}")
    assert not violations, "import rule violated (DESIGN.md):\n" + "\n".join(violations)


@pytest.mark.parametrize("rel", HOST_ONLY)
def test_scheduler_path_modules_import_no_torch(rel: str) -> None:
    # DESIGN.md invariant 4: allocators, trees and the scheduler hold host ints; not importing torch at all
    # makes a device read impossible rather than merely absent.
    uses = [m for m, _, _ in _imports(PACKAGE / rel) if m == "torch" or m.startswith("torch.")]
    assert not uses, f"radixlm/{rel} imports {uses}"


def test_the_host_slot_table_imports_torch_only_for_its_device_half() -> None:
    top = [m for m, _, at_top in _imports(PACKAGE / "kv/req_to_token.py") if m == "torch" and at_top]
    assert not top, "kv/req_to_token.py imports torch at module level; only DeviceReqToToken may use it"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    # The DAG test above only means something if _imports finds imports in all the places code hides them.
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "import radixlm.core.scheduler\n"
        "if TYPE_CHECKING:\n    from radixlm.frontend.engine import Engine\n"
        "def f():\n    from radixlm.model import runner\n"
    )
    found = {(m, top) for m, _, top in _imports(src)}
    assert ("radixlm.core.scheduler", True) in found
    assert ("radixlm.model.runner", False) in found
    assert not any(m.startswith("radixlm.frontend") for m, _ in found)


def _loads_torch(modules: list[str]) -> bool:
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_scheduler_and_kv_manager_load_no_torch() -> None:
    assert not _loads_torch(["radixlm.core.scheduler", "radixlm.kv.kv_manager", "radixlm.kv.radix_cache"])
    assert _loads_torch(["radixlm.kv.kv_pool"])  # the check can tell: the device buffers do load torch
