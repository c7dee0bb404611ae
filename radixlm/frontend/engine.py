"""Engine: the offline Python API (sync, async and streaming) over an EngineCore: lifecycle and the front.

    llm = Engine(model_path=..., model_impl="auto")
    llm.generate(["The capital of France is"], {"max_new_tokens": 20})   # list in, list of dicts out
    for chunk in llm.generate(prompt="Hi", sampling_params={...}, stream=True): ...
    await llm.async_generate(input_ids=[1, 2, 3], sampling_params={...})
    llm.chat([{"role": "user", "content": "Hi"}], {...})   # one conversation (or a list of them)
    llm.encode(["a", "b"])   # an embedding / classification model: [{"embedding": [...], "meta_info": {...}}]

The front runs a private asyncio loop on a thread for the sync calls; async calls run on the caller's loop.
What a call was given is checked and grouped in `inputs.py` (one AddRequest per prompt, carrying its n
samples); outputs are detokenized on the core client's thread and handed to each call's loop by
`outputs.py`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

from tqdm.auto import tqdm

from radixlm.config import EngineConfig
from radixlm.frontend.generation_defaults import read_sampling_defaults, with_defaults
from radixlm.frontend.inputs import PreparedCall, chat_conversations, check_task, prepare_call
from radixlm.frontend.multimodal import ImageProcessor, chat_images, prepare_with_images
from radixlm.frontend.outputs import CallOutputs, CallSink, OutputProcessor, RequestState
from radixlm.frontend.tokenizer_manager import DetokState, TokenizerManager
from radixlm.messages import (
    AbortRequest,
    AddRequest,
    CheckInvariants,
    CoreFailed,
    FlushCache,
    GetServerInfo,
    StepOutputs,
)
from radixlm.sampling_params import GRAMMAR_KINDS, SamplingParams

logger = logging.getLogger("radixlm")

PROGRESS_BAR_MIN_REQUESTS = 8


class Engine:
    def __init__(
        self, model_path: str = "", model_impl: str = "auto", dtype: str = "auto", **options: Any
    ) -> None:
        self.config = EngineConfig.from_options(
            model_path=model_path, model_impl=model_impl, dtype=dtype, **options
        )
        _setup_logging(self.config.log_level)
        self._outputs: OutputProcessor | None = None  # needs the tokenizer, which needs the core's model path
        self._client = self._make_client()
        self.model_info = self._client.model_info
        tok_path = self.config.tokenizer_path or self.model_info["model_path"]
        try:
            self.tokenizer_manager = TokenizerManager(
                tok_path,
                chat_template=self.config.chat_template,
                trust_remote_code=self.config.trust_remote_code,
            )
            # What generation_config.json sets (temperature, top_p, ...), for requests that leave it unset.
            self.sampling_defaults: dict[str, Any] = (
                read_sampling_defaults(self.model_info["model_path"])
                if self.config.generation_config == "auto"
                else {}
            )
        except Exception:
            self._client.shutdown()  # do not leave a core running for an Engine that never existed
            raise
        self._outputs = OutputProcessor(self.tokenizer_manager.detokenizer, self.config.stream_interval)
        self._images: ImageProcessor | None = None  # a vision-language model's processor, on first use
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="radixlm-engine-loop", daemon=True
        )
        self._loop_thread.start()
        self._closed = False
        logger.info(
            "radixlm engine ready: %s (%s, %s) on %s",
            self.model_info["architecture"],
            self.model_info["model_impl"],
            self.model_info["dtype"],
            self.model_info["device"],
        )

    def _make_client(self):
        if self.config.dp_size > 1:
            from radixlm.frontend.router import DataParallelRouter

            return DataParallelRouter(self.config, self._on_core_message, _core_client)
        return _core_client(self.config, self._on_core_message)

    def is_alive(self) -> bool:
        """False once shut down, or once the core process exited (killed, crashed) on its own."""
        return not self._closed and self._client.is_alive()

    @property
    def core_pid(self) -> int | None:
        """The core process's pid (kept after it exits); None when the core runs inline."""
        return getattr(self._client, "pid", None)

    # ---- public API ----------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
        logprob_start_len: int = -1,
        image_data: Any = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """A single prompt returns a dict, a list returns a list; stream=True returns an iterator of dicts.
        image_data (vision-language models): per prompt an image or a list of images (a path, a data URL,
        bytes, a PIL image), placed at the prompt's image placeholders (or in front of it)."""
        self._check_alive()  # before touching the private loop, which is closed after shutdown()
        coro = self.async_generate(
            prompt,
            sampling_params,
            input_ids,
            stream,
            return_logprob,
            top_logprobs_num,
            rid,
            logprob_start_len,
            image_data,
        )
        result = asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        if stream:
            return self._iterate_sync(result)
        return result

    async def async_generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict[str, Any] | SamplingParams | list | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
        logprob_start_len: int = -1,
        image_data: Any = None,
    ) -> Any:
        """`logprob_start_len` k >= 0 (with return_logprob): meta_info also carries `input_token_logprobs`,
        [logprob, token id, None] for prompt positions k..len-1 (logprob None at position 0), and
        `input_top_logprobs` with top_logprobs_num > 0 (SGLang's). -1: none.

        `rid` names the requests (meta_info["id"]) so that `abort_request(rid)` can target them: a string
        when there is one request, else a list with one id per prompt and sample (prompt-major: with n=2,
        [p0 s0, p0 s1, p1 s0, ...]). None: fresh random ids.

        A stream yields chunks of all the call's requests as they come (each with its prompt's `index`
        and its `meta_info.id`): one every `stream_interval` tokens of a request, and one at its finish."""
        self._check_alive()
        check_task(self.model_info, "generate")
        outputs = self._outputs
        assert outputs is not None  # set before the Engine is returned to anyone
        prepare = functools.partial(
            prepare_call,
            prompt,
            input_ids,
            with_defaults(sampling_params, self.sampling_defaults),
            rid,
            return_logprob,
            top_logprobs_num,
            encode=self.tokenizer_manager.encode,
            model_info=self.model_info,
            in_use=outputs.in_use,
            max_n=self.config.max_n,
            max_chars_per_token=self.tokenizer_manager.max_chars_per_token,
            logprob_start_len=logprob_start_len,
        )
        # Text is tokenized on a worker thread: a long prompt takes seconds, and the caller's loop (the
        # server's) must keep answering meanwhile. Token ids need no tokenizer and stay here, unless a
        # constraint must be checked (parsing a large schema, or the first import of xgrammar, takes long).
        if image_data is not None:  # the model's processor tokenizes and places the images (multimodal.py)
            prepare = functools.partial(prepare_with_images, prepare, image_data, self.image_processor())
        on_thread = prompt is not None or _has_constraint(sampling_params)
        call = await asyncio.get_running_loop().run_in_executor(None, prepare) if on_thread else prepare()
        gen = self._run(call, stream)
        if stream:
            return gen
        rids = call.rids
        results: dict[str, dict[str, Any]] = {}
        with tqdm(total=len(rids), desc="generate", disable=len(rids) < PROGRESS_BAR_MIN_REQUESTS) as bar:
            async for result in gen:
                results[result["meta_info"]["id"]] = result
                bar.update(1)
        ordered = [results[r] for r in rids]
        return ordered[0] if call.single else ordered

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: dict[str, Any] | SamplingParams | list | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]] | Iterator[dict[str, Any]]:
        """`generate` over conversations, with the chat template applied (the tokenizer's, or
        --chat-template). One conversation (a list of {"role", "content"} dicts) returns a dict, a list of
        conversations a list, in order; stream=True an iterator of chunks, as `generate` does.
        `chat_template_kwargs`: extra template variables (e.g. {"enable_thinking": False})."""
        self._check_alive()
        coro = self.async_chat(
            messages, sampling_params, stream, return_logprob, top_logprobs_num, rid, chat_template_kwargs
        )
        result = asyncio.run_coroutine_threadsafe(coro, self._loop).result()
        if stream:
            return self._iterate_sync(result)
        return result

    async def async_chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: dict[str, Any] | SamplingParams | list | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        rid: str | list[str] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """The async form of `chat`."""
        self._check_alive()
        conversations, single = chat_conversations(messages)
        if any(chat_images(c) for c in conversations):  # the processor's chat template and image loading
            images = self.image_processor()
            if images is None:
                raise ValueError("image_url: this model takes no images (it is not a vision-language model)")
            texts = await asyncio.get_running_loop().run_in_executor(
                None, lambda: [images.render_chat(c, chat_template_kwargs) for c in conversations]
            )
            return await self.async_generate(
                prompt=texts[0] if single else texts,
                sampling_params=sampling_params,
                stream=stream,
                return_logprob=return_logprob,
                top_logprobs_num=top_logprobs_num,
                rid=rid,
                image_data=chat_images(conversations[0]) if single else [chat_images(c) for c in conversations],
            )

        def render() -> list[list[int]]:
            return [
                self.tokenizer_manager.apply_chat_template(c, template_kwargs=chat_template_kwargs)
                for c in conversations
            ]

        # Rendering and encoding are tokenizer work: a worker thread, so the caller's loop keeps running.
        ids = await asyncio.get_running_loop().run_in_executor(None, render)
        return await self.async_generate(
            input_ids=ids[0] if single else ids,
            sampling_params=sampling_params,
            stream=stream,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
            rid=rid,
        )

    def encode(
        self,
        prompt: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Pool each prompt's hidden states (an embedding model's vector, or a classifier's logits), as
        SGLang's Engine.encode: one `{"embedding": [...], "meta_info": {...}}` per prompt, in order; a single
        prompt (a string or one id list) returns a dict."""
        self._check_alive()
        coro = self.async_encode(prompt, input_ids, rid)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def async_encode(
        self,
        prompt: str | list[str] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        rid: str | list[str] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The async form of `encode`."""
        self._check_alive()
        check_task(self.model_info, "encode")
        outputs = self._outputs
        assert outputs is not None
        prepare = functools.partial(
            prepare_call,
            prompt,
            input_ids,
            SamplingParams(max_new_tokens=0),  # nothing is sampled: the prompt's states are pooled
            rid,
            False,
            0,
            encode=self.tokenizer_manager.encode,
            model_info=self.model_info,
            in_use=outputs.in_use,
            max_n=1,
            max_chars_per_token=self.tokenizer_manager.max_chars_per_token,
        )
        on_thread = prompt is not None
        call = await asyncio.get_running_loop().run_in_executor(None, prepare) if on_thread else prepare()
        results: dict[str, dict[str, Any]] = {}
        async for result in self._run(call, False, pooling=True):
            results[result["meta_info"]["id"]] = result
        ordered = [_encode_result(results[r]) for r in call.rids]
        return ordered[0] if call.single else ordered

    def image_processor(self) -> ImageProcessor | None:
        """The model's processor (loaded on first use); None for a model that takes no images."""
        if not self.model_info.get("multimodal"):
            return None
        if self._images is None:
            self._images = ImageProcessor(
                self.model_info["model_path"],
                trust_remote_code=self.config.trust_remote_code,
                allow_urls=self.config.allow_image_urls,
            )
        return self._images

    def get_model_info(self) -> dict[str, Any]:
        return {
            **self.model_info,
            "tokenizer_path": self.config.tokenizer_path or self.model_info["model_path"],
        }

    def get_server_info(self) -> dict[str, Any]:
        """The core's live counters, the user's `config`, and `runtime`: the defaults the core resolved
        (chunk size, context length, KV capacity, backends)."""
        self._check_alive()
        reply = self._client.call(GetServerInfo)
        if not reply.ok:
            raise RuntimeError(reply.error)
        return {
            **reply.result,
            "core_pid": self.core_pid,
            "config": {k: v for k, v in vars(self.config).items()},
            "runtime": dict(self.model_info.get("runtime") or {}),
        }

    def flush_cache(self) -> dict[str, Any]:
        reply = self._client.call(FlushCache)
        return {"success": reply.ok, "message": reply.result if reply.ok else (reply.error or reply.result)}

    def check(self) -> None:
        """Assert the KV accounting invariant (DESIGN.md invariant 2); for tests."""
        reply = self._client.call(CheckInvariants)
        if not reply.ok:
            raise AssertionError(reply.error)

    def abort_request(self, rid: str) -> None:
        self._client.send(AbortRequest(rid))

    def shutdown(self) -> None:
        """Stop the core (and its process), then the front's loop. Idempotent; safe in a signal handler."""
        if self._closed:
            return
        self._closed = True
        self._client.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._loop_thread:  # a thread cannot join itself
            self._loop_thread.join(timeout=10)
            if not self._loop_thread.is_alive():
                # A sync call after shutdown then fails at once ("Event loop is closed") instead of
                # waiting forever on a loop that no longer runs.
                self._loop.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- one call ------------------------------------------------------------------------------
    async def _run(
        self, call: PreparedCall, stream: bool, pooling: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Register the call's requests, send one AddRequest per prompt, yield their dicts as they come.

        Nothing is sent before the first iteration: a generator that is closed before it starts has
        nothing to clean up."""
        outputs = self._outputs
        assert outputs is not None
        rids = call.rids
        taken = [r for r in rids if outputs.in_use(r)]  # again: two calls may race since prepare_call
        if taken:
            raise ValueError(f"request id(s) {taken} are already in use")
        sink = CallSink(asyncio.get_running_loop())
        outputs.register(
            RequestState(
                r,
                g.index,
                stream,
                sink,
                DetokState(g.params),
                len(g.input_ids),
                input_ids=g.input_ids,
                logprob_start_len=call.logprob_start_len,
                top_logprobs_num=call.top_logprobs_num,
            )
            for g in call.groups
            for r in g.rids
        )
        unfinished = set(rids)
        dicts = CallOutputs(call.return_logprob)
        try:
            for g in call.groups:
                self._client.send(
                    AddRequest(
                        g.rids,
                        g.input_ids,
                        g.params.to_dict(),
                        call.return_logprob,
                        call.top_logprobs_num,
                        call.logprob_start_len,
                        pooling=pooling,
                        images=g.images,
                    )
                )
            while unfinished:
                update = await sink.queue.get()
                if update.finished:
                    unfinished.discard(update.rid)
                yield dicts.to_dict(update)
        finally:
            for r in rids:
                if r in unfinished:  # the caller went away (cancelled, disconnected): free its KV now
                    self._client.send(AbortRequest(r))
            outputs.unregister(rids)

    def _on_core_message(self, msg: Any) -> None:
        """Runs on the core client's thread: detokenize and route each output to the loop that waits."""
        outputs = self._outputs
        if outputs is None:  # the core failed while the Engine was still starting: nothing is waiting
            return
        if isinstance(msg, StepOutputs):
            outputs.process(msg.outputs)
        elif isinstance(msg, CoreFailed):
            outputs.fail_all(msg)

    def _check_alive(self) -> None:
        if self._closed:
            raise RuntimeError("this Engine was shut down")
        if not self._client.is_alive():
            reason = self._client.dead_reason or "its process exited"
            raise RuntimeError(f"the engine core is not running: {reason}")

    def _iterate_sync(self, agen: AsyncIterator[dict]) -> Iterator[dict]:
        try:
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(agen.__anext__(), self._loop).result()
                except StopAsyncIteration:
                    return
        finally:
            asyncio.run_coroutine_threadsafe(agen.aclose(), self._loop).result()


def _encode_result(d: dict[str, Any]) -> dict[str, Any]:
    """An encode request's dict; one that ended without a vector (refused, aborted) raises, naming why."""
    if "embedding" not in d:
        reason = d["meta_info"].get("finish_reason") or {}
        exc = ValueError if reason.get("status_code") == 400 else RuntimeError
        raise exc(f"encode request {d['meta_info']['id']} ended without an embedding: {reason.get('message')}")
    return {"embedding": d["embedding"], "meta_info": d["meta_info"]}


def _core_client(config: EngineConfig, on_message):
    """One core: on a thread of this process (inline_core) or in its own process (the default)."""
    if config.inline_core:
        from radixlm.frontend.core_client import InlineCoreClient

        return InlineCoreClient(config, on_message)
    from radixlm.frontend.core_process import ProcessCoreClient

    return ProcessCoreClient(config, on_message)


def _setup_logging(level: str) -> None:
    root = logging.getLogger("radixlm")
    root.setLevel(level.upper())
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[radixlm %(asctime)s %(levelname)s] %(message)s", "%H:%M:%S"))
        root.addHandler(handler)


def _has_constraint(sampling_params: Any) -> bool:
    """Whether any of a call's sampling params (a dict, a SamplingParams, or a list of them) sets a
    constraint (json_schema, regex, ebnf, structural_tag)."""
    items = sampling_params if isinstance(sampling_params, list) else [sampling_params]
    for p in items:
        if isinstance(p, SamplingParams):
            if p.grammar is not None:
                return True
        elif isinstance(p, dict) and any(p.get(k) is not None for k in GRAMMAR_KINDS):
            return True
    return False
