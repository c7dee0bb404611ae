"""Executor: one program state's text, messages and variables, and the code that runs each expression.

A top-level program runs its expressions inline, on the thread that runs the program. The branches of a
fork each get a worker thread, so `for f in forks: f += gen(...)` sends all branches' requests at once and
the engine batches them; reading a branch's variable waits for it. A failed expression stops its state:
later expressions are skipped and the error is raised where the program next reads the state.

Streaming (run(stream=True)): `gen` appends text as the engine sends it, and `notify` wakes `text_iter`.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

from radixlm.lang import ir
from radixlm.lang.backend import Backend
from radixlm.lang.chat import RoleTemplate
from radixlm.lang.scoring import select as run_select


class Executor:
    def __init__(
        self, backend: Backend, defaults: dict[str, Any], *, stream: bool = False, threaded: bool = False
    ) -> None:
        self.backend = backend
        self.defaults = defaults  # the run's sampling keys (Engine names): what gen() leaves unset
        self.stream = stream
        self.text = ""
        self.messages: list[dict[str, Any]] = []
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.role: str | None = None
        self._role_start = 0
        self._role_suffix = ""
        self.fork_start: int | None = None  # where a branch's own text begins
        self.error: BaseException | None = None
        self.finished = False  # no more expressions will run (the program returned, or the state closed)
        self.cond = threading.Condition()  # guards text/variables for readers on other threads
        self._pending: dict[str, threading.Event] = {}  # variables submitted and not yet set
        self._streaming: set[str] = set()  # variables a streaming gen is still writing
        self._queue: queue.Queue | None = None
        if threaded:
            self._queue = queue.Queue()
            threading.Thread(target=self._work, name="radixlm-lang-branch", daemon=True).start()

    # ---- submitting and waiting ------------------------------------------------------------------------
    def submit(self, expr: ir.Expr) -> None:
        for name in _names(expr):
            self._pending[name] = threading.Event()
        if self._queue is not None:
            self._queue.put(expr)
        else:
            self._run(expr)

    def sync(self) -> None:
        """Wait for everything submitted; raise the error that stopped this state, if one did."""
        if self._queue is not None:
            self._queue.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the program failed: {self.error}") from self.error

    def get_var(self, name: str) -> Any:
        event = self._pending.get(name)
        if event is not None:
            event.wait()
        self.raise_error()
        return self.variables[name]

    def close(self) -> None:
        """No more expressions: the worker thread (if any) ends once the queue is done."""
        if self._queue is not None:
            self._queue.put(None)
            self._queue.join()
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def _work(self) -> None:
        assert self._queue is not None
        while True:
            expr = self._queue.get()
            try:
                if expr is None:
                    return
                self._run(expr)
            finally:
                self._queue.task_done()

    def _run(self, expr: ir.Expr) -> None:
        if self.error is not None:
            return  # the state already failed: the program sees that error, not a second one
        try:
            self._execute(expr)
        except BaseException as e:  # kept for the reader; every waiting reader is woken to see it
            self.error = e
            for event in list(self._pending.values()):
                event.set()
            self.notify()
            if self._queue is None:
                raise

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # ---- executing -----------------------------------------------------------------------------------
    def _execute(self, expr: ir.Expr) -> None:
        if isinstance(expr, ir.Text):
            self._append(expr.value)
        elif isinstance(expr, ir.ExprList):
            for item in expr.items:
                self._execute(item)
        elif isinstance(expr, ir.Gen):
            self._gen(expr)
        elif isinstance(expr, ir.Select):
            decision = run_select(self.backend, self.text, expr.choices, expr.method)
            self._append(decision.decision)
            self._set(expr.name, decision.decision, decision.meta_info)
        elif isinstance(expr, ir.RoleBegin):
            self._role_begin(expr.role)
        elif isinstance(expr, ir.RoleEnd):
            self._role_end(expr.role)
        elif isinstance(expr, ir.CachePrefix):
            if self.text:
                self.backend.cache_prefix(self.text)
        elif isinstance(expr, ir.Image):
            raise NotImplementedError(
                "image() is reserved for multimodal programs; radixlm's engine does not take images yet"
            )
        else:
            raise TypeError(f"unknown expression {expr!r}")

    def _append(self, text: str) -> None:
        with self.cond:
            self.text += text
            self.cond.notify_all()

    def _set(self, name: str | None, value: Any, meta: Any) -> None:
        if name is None:
            return
        with self.cond:
            self.variables[name] = value
            self.meta_info[name] = meta
            self._streaming.discard(name)
            self.cond.notify_all()
        event = self._pending.get(name)
        if event is not None:
            event.set()

    def _gen(self, expr: ir.Gen) -> None:
        params = {**self.defaults, **expr.sampling}
        template = self._template() if self.role is not None else None
        end = template.end_of_turn() if template is not None else ""
        if end:  # inside a role block the model's turn ends where the template closes it
            stop = params.get("stop") or []
            stop = [stop] if isinstance(stop, str) else list(stop)
            params["stop"] = stop if end in stop else [*stop, end]
        if self.stream and params.get("n", 1) == 1 and not expr.logprobs:
            self._gen_streamed(expr.name, params)
            return
        outs = self.backend.generate([self.text], [params], **expr.logprobs)
        if len(outs) == 1:
            self._append(outs[0]["text"])
            self._set(expr.name, outs[0]["text"], outs[0]["meta_info"])
        else:  # n > 1: the variable holds every sample; the text continues with the first
            self._append(outs[0]["text"])
            self._set(expr.name, [o["text"] for o in outs], [o["meta_info"] for o in outs])

    def _gen_streamed(self, name: str | None, params: dict[str, Any]) -> None:
        meta: dict[str, Any] = {}
        if name is not None:
            with self.cond:
                self.variables[name] = ""
                self._streaming.add(name)
        for delta, chunk_meta in self.backend.stream(self.text, params):
            meta = chunk_meta  # the last chunk's meta_info is the finished request's
            with self.cond:
                self.text += delta
                if name is not None:
                    self.variables[name] += delta
                self.cond.notify_all()
        if name is not None:
            self._set(name, self.variables[name], meta)

    def is_streaming(self, name: str) -> bool:
        return name in self._streaming or (name in self._pending and not self._pending[name].is_set())

    # ---- roles ---------------------------------------------------------------------------------------
    def _template(self) -> RoleTemplate:
        template = self.backend.role_template()
        if template is None:
            raise ValueError(
                "role blocks need a chat template, and this backend has none (the model ships none, or "
                "its tokenizer cannot be read here); pass chat_template_name to RuntimeEndpoint"
            )
        return template

    def _role_begin(self, role: str) -> None:
        if self.role is not None:
            raise ValueError(
                f"a {role!r} block cannot start inside the {self.role!r} block (roles do not nest)"
            )
        prefix, suffix = self._template().prefix_suffix(role, self.messages)
        self._append(prefix)
        self.role, self._role_start, self._role_suffix = role, len(self.text), suffix

    def _role_end(self, role: str) -> None:
        if self.role != role:
            raise ValueError(f"the end of a {role!r} block, but the open block is {self.role!r}")
        content = self.text[self._role_start :].lstrip()
        self._append(self._role_suffix)
        self.messages.append({"role": role, "content": content})
        self.role = None

    # ---- forks ---------------------------------------------------------------------------------------
    def branch(self) -> Executor:
        """A copy of this state that continues on its own worker thread."""
        child = Executor(self.backend, self.defaults, stream=self.stream, threaded=True)
        child.text = self.text
        child.messages = list(self.messages)
        child.variables = dict(self.variables)
        child.meta_info = dict(self.meta_info)
        child.role, child._role_start, child._role_suffix = self.role, self._role_start, self._role_suffix
        child.fork_start = len(self.text)
        return child


def _names(expr: ir.Expr) -> list[str]:
    """The variables an expression will set (readers wait for these)."""
    if isinstance(expr, (ir.Gen, ir.Select)) and expr.name is not None:
        return [expr.name]
    if isinstance(expr, ir.ExprList):
        return [n for item in expr.items for n in _names(item)]
    return []
