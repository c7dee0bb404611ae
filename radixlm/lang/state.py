"""ProgramState (`s` in a program) and ForkGroup (what `s.fork(n)` returns).

s += "Q: " + question + "\\nA:" + gen("answer", max_tokens=32)
s["answer"]                       # the variable (waits for it)
forks = s.fork(3)                 # three branches that share s's text as their prefix
forks += gen("idea", max_tokens=16)            # or: for f in forks: f += ...
forks.join()                      # s["idea"] == [the three ideas]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from radixlm.lang import ir
from radixlm.lang.executor import Executor


class ProgramState:
    def __init__(self, executor: Executor) -> None:
        self._exec = executor
        self.ret_value: Any = None  # what the program function returned
        self._children: list[ForkGroup] = []

    # ---- building ------------------------------------------------------------------------------------
    def __iadd__(self, other: Any) -> ProgramState:
        self._exec.submit(ir.to_expr(other))
        return self

    def _role(self, role: str, expr: Any = None) -> Any:
        if expr is not None:
            self += ir.ExprList([ir.RoleBegin(role), ir.to_expr(expr), ir.RoleEnd(role)])
            return None
        return self._role_scope(role)

    @contextmanager
    def _role_scope(self, role: str) -> Iterator[None]:
        self += ir.RoleBegin(role)
        yield
        self += ir.RoleEnd(role)

    def system(self, expr: Any = None) -> Any:
        """`s.system("text")`, or `with s.system(): s += ...`."""
        return self._role("system", expr)

    def user(self, expr: Any = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: Any = None) -> Any:
        return self._role("assistant", expr)

    # ---- reading -------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        return self._exec.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self._exec.variables[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self._exec.variables

    def get_var(self, name: str) -> Any:
        return self._exec.get_var(name)

    def set_var(self, name: str, value: Any) -> None:
        self[name] = value

    def get_meta_info(self, name: str) -> Any:
        """What the engine returned with a variable: meta_info of its gen (prompt_tokens, cached_tokens,
        finish_reason, ...), or a select's scores."""
        self._exec.get_var(name)
        return self._exec.meta_info.get(name)

    def text(self) -> str:
        self._exec.sync()
        return self._exec.text

    def messages(self) -> list[dict[str, Any]]:
        self._exec.sync()
        return list(self._exec.messages)

    def sync(self) -> None:
        self._exec.sync()

    def error(self) -> BaseException | None:
        return self._exec.error

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text (or one variable) as it grows: pieces until it is complete. Without stream=True it
        yields the finished text once."""
        ex = self._exec
        if not ex.stream:
            yield self.text() if var_name is None else self.get_var(var_name)
            return
        shown = 0
        while True:
            with ex.cond:
                ex.cond.wait_for(partial(_ready, ex, var_name, shown))
                current = ex.text if var_name is None else ex.variables.get(var_name, "")
                done = _complete(ex, var_name)
            piece = current[shown:]
            shown = len(current)
            if piece:
                yield piece
            if done:
                ex.raise_error()
                return

    # ---- forks ---------------------------------------------------------------------------------------
    def fork(self, size: int = 1) -> ForkGroup:
        """`size` branches that continue from this state's text. With more than one, the text is computed
        once first, so every branch finds it in the radix cache (each reports it as cached_tokens)."""
        size = int(size)
        if size < 1:
            raise ValueError(f"fork needs at least one branch, got {size}")
        if size > 1:
            self += ir.CachePrefix()
        self._exec.sync()
        group = ForkGroup([ProgramState(self._exec.branch()) for _ in range(size)], self)
        self._children.append(group)
        return group

    @contextmanager
    def copy(self) -> Iterator[ProgramState]:
        """One branch, joined back when the block ends."""
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    def close(self) -> None:
        """End this state and any branches never joined (their worker threads)."""
        for group in self._children:
            group.close()
        self._exec.close()

    def __repr__(self) -> str:
        return f"ProgramState({self._exec.text!r})"


def _ready(ex: Executor, name: str | None, shown: int) -> bool:
    """text_iter has something to do: more text than it has shown, or the text is complete."""
    current = ex.text if name is None else ex.variables.get(name, "")
    return len(current) > shown or _complete(ex, name)


def _complete(ex: Executor, name: str | None) -> bool:
    if ex.error is not None or ex.finished:
        return True
    return name is not None and name in ex.variables and not ex.is_streaming(name)


class ForkGroup:
    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        self.states = states
        self.parent = parent
        self._closed = False

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        # `forks[i] += ...` assigns the same state back; anything else is a mistake.
        if value is not self.states[i]:
            raise TypeError("a fork's branches cannot be replaced")

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __iadd__(self, other: Any) -> ForkGroup:
        """Append to every branch: an expression or text, a list (one item per branch), or a function of
        the branch index."""
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"{len(other)} items for {len(self.states)} branches")
            items: list[Any] = list(other)
        elif callable(other) and not isinstance(other, ir.Expr):
            fn: Callable[[int], Any] = other
            items = [fn(i) for i in range(len(self.states))]
        else:
            items = [other] * len(self.states)
        for state, item in zip(self.states, items):
            state += item
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """gather_variable: each variable the branches set becomes a list in the parent (one value per
        branch). concate_and_append: the branches' own text is appended to the parent's, in order."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"unknown join mode {mode!r} (gather_variable, concate_and_append)")
        for s in self.states:
            s.sync()
        parent = self.parent._exec
        if mode == "gather_variable":
            before = set(parent.variables)
            for s in self.states:
                for k, v in s._exec.variables.items():
                    if k not in before:
                        parent.variables.setdefault(k, []).append(v)
        else:
            self.parent += "".join(s._exec.text[s._exec.fork_start or 0 :] for s in self.states)
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for s in self.states:
                s.close()
