"""Function: a program (`@function def f(s, ...)`), and how it runs: `run`, `run_batch`, streaming.

state = f.run(question="...", temperature=0)          # sampling keywords set the run's defaults
states = f.run_batch([{"question": q} for q in qs], num_threads=32, progress_bar=True)
state = f.run(question="...", stream=True); for piece in state.text_iter("answer"): ...
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm.auto import tqdm

from radixlm.lang.backend import Backend
from radixlm.lang.defaults import resolve_backend
from radixlm.lang.executor import Executor
from radixlm.lang.sampling import RUN_SAMPLING_KEYS, run_defaults
from radixlm.lang.state import ProgramState

# run_batch with num_threads="auto": each thread holds at most one request in flight, so this bounds how
# many programs the engine sees at once (it batches them).
AUTO_THREADS = 64


class Function:
    def __init__(self, func: Callable[..., Any], bind_arguments: dict[str, Any] | None = None) -> None:
        params = list(inspect.signature(func).parameters)
        if not params:
            raise TypeError(f"a program's first parameter is its state (s): {func.__name__} takes none")
        self.func = func
        self.arg_names = params[1:]
        self.bind_arguments = dict(bind_arguments or {})

    def bind(self, **kwargs: Any) -> Function:
        """The same program with some arguments fixed."""
        unknown = [k for k in kwargs if k not in self.arg_names]
        if unknown:
            raise TypeError(f"{self.func.__name__} has no argument(s) {unknown}")
        return Function(self.func, {**self.bind_arguments, **kwargs})

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Called with a state first, the program runs on that state (a program inside a program);
        otherwise this is `run`."""
        if args and isinstance(args[0], ProgramState):
            return self.func(*args, **kwargs)
        return self.run(*args, **kwargs)

    def run(
        self, *args: Any, backend: Backend | Any = None, stream: bool = False, **kwargs: Any
    ) -> ProgramState:
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in RUN_SAMPLING_KEYS}
        be = resolve_backend(backend)
        state = ProgramState(Executor(be, run_defaults(sampling), stream=stream))
        call_kwargs = {**self.bind_arguments, **kwargs}
        if stream:
            # The program runs on its own thread; the caller reads text_iter() as it grows.
            threading.Thread(
                target=self._run_on,
                args=(state, args, call_kwargs, False),
                name="radixlm-lang-stream",
                daemon=True,
            ).start()
            return state
        self._run_on(state, args, call_kwargs, True)
        return state

    def _run_on(
        self, state: ProgramState, args: Sequence[Any], kwargs: dict[str, Any], reraise: bool
    ) -> None:
        try:
            state.ret_value = self.func(state, *args, **kwargs)
        except BaseException as e:
            if state._exec.error is None:
                state._exec.error = e
            if reraise:
                raise
        finally:
            state.close()

    def run_batch(
        self,
        batch_kwargs: Sequence[dict[str, Any]] | Sequence[Sequence[Any]],
        *,
        backend: Backend | Any = None,
        num_threads: int | str = "auto",
        progress_bar: bool = False,
        **sampling: Any,
    ) -> list[ProgramState]:
        """Run the program once per argument set, on a thread pool; states come back in order. The
        engine batches what the threads send, and the radix cache shares what their prompts share."""
        unknown = [k for k in sampling if k not in RUN_SAMPLING_KEYS]
        if unknown:
            raise TypeError(f"run_batch got unknown keyword(s) {unknown}")
        calls = [self._as_kwargs(b) for b in batch_kwargs]
        if not calls:
            return []
        be = resolve_backend(backend)
        threads = AUTO_THREADS if num_threads == "auto" else int(num_threads)
        threads = max(1, min(threads, len(calls)))

        def one(kwargs: dict[str, Any]) -> ProgramState:
            return self.run(backend=be, **sampling, **kwargs)

        with tqdm(total=len(calls), desc=self.func.__name__, disable=not progress_bar) as bar:
            with ThreadPoolExecutor(threads, thread_name_prefix="radixlm-lang") as pool:
                futures = [pool.submit(one, c) for c in calls]
                for f in futures:
                    f.add_done_callback(lambda _: bar.update(1))
                return [f.result() for f in futures]

    def _as_kwargs(self, item: dict[str, Any] | Sequence[Any]) -> dict[str, Any]:
        if isinstance(item, dict):
            return item
        values = list(item)
        if len(values) > len(self.arg_names):
            raise TypeError(f"{len(values)} arguments for {self.func.__name__}({', '.join(self.arg_names)})")
        return dict(zip(self.arg_names, values))


def function(func: Callable[..., Any] | None = None, num_api_spec_tokens: int | None = None) -> Any:
    """`@function` (or `@function()`): make `func(s, ...)` a program."""
    if num_api_spec_tokens is not None:
        # SGLang's speculative execution for chat-only APIs; radixlm's backends are not chat-only.
        raise NotImplementedError("num_api_spec_tokens (API speculative execution) is not supported")
    if func is not None:
        return Function(func)
    return Function
