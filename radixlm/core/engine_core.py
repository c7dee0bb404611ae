"""EngineCore: add_request / abort / step() -> outputs. It owns the scheduler, the KV manager and the runner.

It runs inline (a thread of the Engine's process) or in its own process (frontend/core_process.py); either
way it sees only token ids and the messages of radixlm.messages, never text or sockets. The front has
validated every request against ModelInfo; the checks here are invariants, not user-facing validation.

One step:

    Scheduler.schedule() -> ScheduledStep (spans + StepInput) -> ModelRunner.forward(StepInput)
      -> ForwardOutput (sampling logits, prompt logprobs) -> ModelRunner.sample(logits, StepInput)
      -> Scheduler.commit -> append tokens, stop checks; finish max_new_tokens=0 requests -> outputs

Prompt logprobs of an n > 1 group are computed once, by the leader: a sample still waiting for the
leader's prompt takes the leader's values as they come (and then reuses the cached prompt).
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import Future, wait
from typing import Any

from radixlm.config import EngineConfig, RuntimeConfig
from radixlm.core.grammar import BitmaskBuffer, GrammarCompiler
from radixlm.core.images import check_images, image_key_ids
from radixlm.core.malloc_tuning import keep_freed_memory, runs_on_cpu
from radixlm.core.request import Request, RequestStatus
from radixlm.core.schedule_policy import make_policy
from radixlm.core.scheduler import Scheduler, Span
from radixlm.core.stop_checker import StopChecker
from radixlm.kv.kv_manager import KVManager
from radixlm.kv.no_prefix_cache import NoPrefixCache
from radixlm.kv.page_allocator import PageAllocator
from radixlm.kv.radix_cache import RadixCache
from radixlm.kv.req_to_token import ReqToToken
from radixlm.messages import ABORT_CLIENT, ABORT_REFUSED, AddRequest, FinishReason, ModelInfo, RequestOutput
from radixlm.model.prompt_logprobs import ForwardOutput
from radixlm.model.runner import ModelRunner
from radixlm.model.sampler import SamplerOutput
from radixlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long an otherwise idle step waits for a grammar compile before it returns to the message loop.
_GRAMMAR_POLL_S = 0.02


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        if runs_on_cpu(config.device):
            keep_freed_memory()  # before the weights load: malloc_tuning says why
        self.runner = ModelRunner(config)
        self.runtime = RuntimeConfig.resolve(config, self.runner.facts())
        rt = self.runtime
        # +1 row so that a retraction-and-readmission within a step never runs out of rows
        num_rows = rt.max_running_requests + 1
        self.runner.allocate_kv(rt, num_rows)
        # A pooling model never shares a prefix: its requests need every position's hidden state (a hit
        # would skip them), and an encoder's K/V depend on the tokens after them.
        self.task = self.runner.head.task
        pooling = self.task != "generate"
        cache = NoPrefixCache(rt.page_size) if rt.disable_radix_cache or pooling else RadixCache(rt.page_size)
        self.kv = KVManager(
            PageAllocator(rt.num_kv_pages, rt.page_size), ReqToToken(num_rows, rt.context_length + 1), cache
        )
        self.scheduler = Scheduler(
            kv=self.kv,
            policy=make_policy(rt.schedule_policy),
            max_running_requests=rt.max_running_requests,
            max_prefill_tokens=rt.max_prefill_tokens,
            chunked_prefill_size=rt.chunked_prefill_size,
        )
        self.stop_checker = StopChecker(
            config.tokenizer_path or str(self.runner.model_path), self.runner.eos_token_ids
        )
        self._rng = random.Random(config.random_seed)
        self.grammar: GrammarCompiler | None = None
        if config.grammar_backend == "xgrammar":
            self.grammar = GrammarCompiler(
                config.tokenizer_path or str(self.runner.model_path),
                self.runner.vocab_size,
                list(self.runner.eos_token_ids),
            )
        self._bitmask = BitmaskBuffer(self.runner.vocab_size)
        # AddRequests whose grammar is still compiling: they join the scheduler when it is done.
        self._compiling: list[tuple[AddRequest, SamplingParams, Future]] = []
        self._requests: dict[str, Request] = {}
        self.num_steps = 0
        self.num_tokens_computed = 0  # every token a forward pass computed (prefix hits are not computed)
        self.total_prompt_tokens = 0
        self.total_cached_tokens = 0

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, msg: AddRequest) -> None:
        """Queue one prompt and its samples. The front validated it; an AddRequest that still breaks an
        invariant raises ValueError and changes nothing."""
        self._check_prompt(msg)
        params = SamplingParams.from_any(msg.sampling_params)
        room = self.runtime.context_length - len(msg.input_ids)
        if params.logit_bias and max(params.logit_bias) >= self.runner.vocab_size:
            raise ValueError(
                f"sampling_params.logit_bias holds a token id outside [0, {self.runner.vocab_size})"
            )
        if params.max_new_tokens > room:
            params = SamplingParams.from_any({**params.to_dict(), "max_new_tokens": room})
        if params.grammar is not None:
            if self.grammar is None:
                raise ValueError(
                    f"sampling_params.{params.grammar[0]} needs constrained decoding, which this engine was "
                    "started without (--grammar-backend none)"
                )
            # Compiled off the step path; a grammar already in the cache lets the request in at once.
            fut = self.grammar.compile(params.grammar)
            if not (fut.done() and fut.exception() is None):
                self._compiling.append((msg, params, fut))
                return
            self._enqueue(msg, params, fut.result())
            return
        self._enqueue(msg, params, None)

    def _enqueue(self, msg: AddRequest, params: SamplingParams, compiled: Any) -> None:
        leader = None
        # Image positions are keyed by the image's hash (core/images.py); the model still sees its own ids.
        key_ids = (
            image_key_ids(msg.input_ids, msg.images, self.runner.vocab_size) if msg.images else msg.input_ids
        )
        # Whether an image's tokens attend both ways is the model's (Gemma 3's), not the sender's to say.
        both_ways = bool(getattr(self.runner.model, "bidirectional_images", False))
        images = [{**im, "bidirectional": both_ways} for im in msg.images]
        # M-RoPE (Qwen2-VL): the prompt's 3-D positions, once, by the model's own get_rope_index.
        rope_rows = getattr(self.runner.model, "mrope_prompt_positions", None)
        mrope = rope_rows(msg.input_ids, msg.images) if msg.images and rope_rows is not None else None
        for k, rid in enumerate(msg.rids):
            # n samples of one prompt draw from distinct but reproducible streams
            seed = params.seed + k if params.seed is not None else self._rng.getrandbits(63)
            req = Request(
                rid,
                list(key_ids),
                len(msg.input_ids),
                params,
                seed,
                return_logprob=msg.return_logprob,
                top_logprobs_num=msg.top_logprobs_num,
                leader=leader,
                logprob_start_len=msg.logprob_start_len if msg.return_logprob else -1,
                pooling=msg.pooling,
            )
            if msg.images:
                req.images, req.model_prompt_ids = images, list(msg.input_ids)
                req.mrope = mrope
            if compiled is not None:
                req.grammar = self.grammar.new_matcher(compiled)
            if leader is not None:
                leader.followers.append(req)
            leader = leader or req
            self._requests[rid] = req
            self.scheduler.add_request(req)

    def _check_prompt(self, msg: AddRequest) -> None:
        # Types first: a message off the socket decodes into any shapes (hole 8 of issue 10), and a string
        # of "token ids" accepted here would crash the next step, taking every other request with it.
        if not isinstance(msg.rids, list) or not all(isinstance(r, str) for r in msg.rids):
            raise TypeError("AddRequest.rids must be a list of strings")
        ids = msg.input_ids
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise TypeError("AddRequest.input_ids must be a list of ints")
        vocab = self.runner.vocab_size
        if ids and not (min(ids) >= 0 and max(ids) < vocab):
            raise ValueError(f"AddRequest.input_ids must lie in the vocabulary [0, {vocab})")
        top = msg.top_logprobs_num
        if not isinstance(msg.return_logprob, bool) or type(top) is not int or not 0 <= top <= vocab:
            raise TypeError(
                "AddRequest.return_logprob must be a bool and top_logprobs_num an int in [0, vocab]"
            )
        k = msg.logprob_start_len
        if type(k) is not int or not -1 <= k < max(len(ids), 1):
            raise ValueError("AddRequest.logprob_start_len must be an int in [-1, prompt length)")
        model = self.runner.model
        check_images(msg.images, ids, {model.image_token_id} if getattr(model, "multimodal", False) else None)
        if msg.images and hasattr(model, "check_image_grids"):  # M-RoPE positions need each image's grid
            model.check_image_grids(msg.images)
        if msg.images and msg.return_logprob and k >= 0:
            raise ValueError(
                "AddRequest.logprob_start_len: prompt logprobs of a prompt with images are not supported"
            )
        if msg.pooling is not (self.task != "generate"):
            raise ValueError(
                f"this engine runs a {self.task} model ({self.runner.head.head}): "
                + (
                    "use encode, not generate"
                    if self.task != "generate"
                    else "it cannot encode (no pooling head)"
                )
            )
        if msg.pooling and (len(msg.rids) != 1 or msg.return_logprob):
            raise ValueError("an encode request has one rid (n == 1) and no logprobs")
        if not msg.rids or len(set(msg.rids)) != len(msg.rids):
            raise ValueError(f"AddRequest needs distinct request ids, got {msg.rids!r}")
        compiling = {rid for m, _, _ in self._compiling for rid in m.rids}
        taken = [rid for rid in msg.rids if rid in self._requests or rid in compiling]
        if taken:
            raise ValueError(f"request id {taken[0]!r} is already in use")
        n = len(msg.input_ids)
        if not 0 < n < self.runtime.context_length or n + 1 > self.runtime.kv_capacity:
            raise ValueError(
                f"the prompt has {n} tokens; it must have at least one, fewer than the context length "
                f"{self.runtime.context_length} and fewer than the KV capacity {self.runtime.kv_capacity}"
            )

    def abort(self, rid: str, message: str) -> RequestOutput | None:
        for msg, _, _ in self._compiling:
            if rid in msg.rids:  # not yet a Request: the other samples of its prompt still go ahead
                msg.rids.remove(rid)
                self._compiling = [c for c in self._compiling if c[0].rids]
                reason = FinishReason.abort(ABORT_CLIENT, message)
                return RequestOutput(rid, [], reason, len(msg.input_ids), 0, 0)
        req = self.scheduler.abort(rid, message)
        if req is None:
            return None
        self._requests.pop(rid, None)
        return self._output(req, [], [], [])

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._compiling)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose grammar compiled join the scheduler; those whose grammar failed are refused."""
        if not self._compiling:
            return []
        if not self.scheduler.has_work():  # nothing else to do: wait a little rather than spin
            wait([f for _, _, f in self._compiling], timeout=_GRAMMAR_POLL_S, return_when="FIRST_COMPLETED")
        outputs, still = [], []
        for msg, params, fut in self._compiling:
            if not fut.done():
                still.append((msg, params, fut))
            elif fut.exception() is not None:
                reason = FinishReason.abort(ABORT_REFUSED, str(fut.exception()))
                outputs += [RequestOutput(rid, [], reason, len(msg.input_ids), 0, 0) for rid in msg.rids]
            else:
                self._enqueue(msg, params, fut.result())
        self._compiling = still
        return outputs

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._admit_compiled()
        step = self.scheduler.schedule()
        outputs += self._drain_scheduler_aborts()
        if step is None:
            return outputs
        step_input = step.step_input
        if not step_input.plain_greedy:  # plain greedy rows have no grammar
            self._fill_grammar_masks(step.sampling_spans, step_input)
        self.num_steps += 1
        self.num_tokens_computed += step.num_tokens
        fwd = self.runner.forward(step_input)
        sampled = self.runner.sample(fwd.logits, step_input) if step_input.sampling else None
        self.scheduler.commit(step)
        prompt = self._prompt_logprobs(step.spans, fwd)
        if fwd.pooled is not None:
            for i, vec in zip(step_input.pool_spans, fwd.pooled.float().tolist()):
                step.spans[i].req.embedding = vec
        if sampled is not None:
            outputs += self._process_samples(step.sampling_spans, sampled, prompt, step_input.plain_greedy)
        for span in step.spans:
            req = span.req
            if span.ends_without_sample and not req.finished:  # max_new_tokens=0: the prompt was all
                self._finish(req, FinishReason.of_length(0))
                outputs.append(self._output(req, [], [], [], *prompt.pop(req, ([], []))))
        # Prompt chunks (and waiting n > 1 samples) that reported prompt logprobs and nothing else.
        outputs += [self._output(req, [], [], [], lps, tops) for req, (lps, tops) in prompt.items()]
        return outputs

    def _fill_grammar_masks(self, spans: list[Span], step_input: Any) -> None:
        """The bitmask of every sampling row a grammar constrains, into the StepInput (the runner and the
        other tensor-parallel ranks read it from there)."""
        grammars = [span.req.grammar for span in spans]
        rows = [i for i, g in enumerate(grammars) if g is not None]
        if rows:
            step_input.grammar_rows = rows
            step_input.grammar_bitmask = self._bitmask.fill(grammars)

    def _prompt_logprobs(self, spans: list[Span], fwd: ForwardOutput) -> dict[Request, tuple[list, list]]:
        """The step's prompt logprobs per request: (values, top alternatives per value)."""
        if fwd.prompt_logprobs is None:
            return {}
        lps = fwd.prompt_logprobs.tolist()
        top_ids = fwd.prompt_top_ids.tolist() if fwd.prompt_top_ids is not None else None
        top_vals = fwd.prompt_top_vals.tolist() if fwd.prompt_top_vals is not None else None
        out: dict[Request, tuple[list, list]] = {}
        at = 0
        for span in spans:  # the scored rows come in span order
            n = span.num_scored
            if not n:
                continue
            req = span.req
            k = req.top_logprobs_num
            tops = []
            if k and top_ids is not None and top_vals is not None:
                tops = [list(zip(top_ids[i][:k], top_vals[i][:k])) for i in range(at, at + n)]
            entry = (lps[at : at + n], tops)
            out[req] = entry
            for f in req.followers:
                # Waiting (so not in this step) with every earlier position reported: the leader's values
                # are its values; it need not compute the prompt again.
                if f.status is RequestStatus.WAITING and f.next_logprob_pos == span.scored_from:
                    f.next_logprob_pos = span.scored_from + n
                    out[f] = entry
            at += n
        return out

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.finish(reason)
        self.scheduler.finish(req)
        self._requests.pop(req.rid, None)
        self.total_prompt_tokens += req.num_prompt_tokens
        self.total_cached_tokens += req.cached_tokens

    def _process_samples(
        self,
        spans: list[Span],
        sampled: SamplerOutput,
        prompt: dict[Request, tuple[list, list]],
        plain_greedy: bool = False,
    ) -> list[RequestOutput]:
        if plain_greedy and not prompt:
            return self._process_greedy(spans, sampled)
        tokens = sampled.next_token_ids.tolist()
        lps = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_ids = sampled.top_logprobs_ids.tolist() if sampled.top_logprobs_ids is not None else None
        top_vals = sampled.top_logprobs_vals.tolist() if sampled.top_logprobs_vals is not None else None
        context = self.runtime.context_length
        outputs = []
        for i, span in enumerate(spans):
            req = span.req
            req.token_ids.append(tokens[i])
            new_lp, new_top = [], []  # the front accumulates them; the core keeps none
            if req.return_logprob and lps is not None:
                new_lp = [lps[i]]
                if req.top_logprobs_num and top_ids is not None:
                    k = req.top_logprobs_num
                    new_top = [list(zip(top_ids[i][:k], top_vals[i][:k]))]
            reason = self._grammar_end(req, tokens[i]) if req.grammar is not None else None
            if reason is None:
                reason = self.stop_checker.check(req, context)
            if reason is not None:
                self._finish(req, reason)
            outputs.append(self._output(req, [tokens[i]], new_lp, new_top, *prompt.pop(req, ([], []))))
        return outputs

    def _process_greedy(self, spans: list[Span], sampled: SamplerOutput) -> list[RequestOutput]:
        """_process_samples for a step whose sampling rows are all plain greedy (no logprobs, no grammar)
        and that reports no prompt logprobs: the same outputs, without the per-row checks for those."""
        context = self.runtime.context_length
        check = self.stop_checker.check
        outputs = []
        for span, token in zip(spans, sampled.next_token_ids.tolist(), strict=True):
            req = span.req
            ids = req.token_ids
            ids.append(token)
            reason = check(req, context)
            if reason is not None:
                self._finish(req, reason)
            n = req.num_prompt_tokens
            outputs.append(RequestOutput(req.rid, [token], reason, n, len(ids) - n, req.cached_tokens))
        return outputs

    @staticmethod
    def _grammar_end(req: Request, token: int) -> FinishReason | None:
        """Advance the request's grammar by its new token: the grammar's end is a stop (at that token)."""
        if not req.grammar.accept(token):
            # The mask allows only accepted tokens; this means a mask and a matcher disagree.
            logger.error("request %s: the grammar rejected sampled token %d", req.rid, token)
            return FinishReason.abort(ABORT_REFUSED, f"the grammar rejected the sampled token {token}")
        if req.grammar.is_terminated:
            return FinishReason.stop(token)
        return None

    def _drain_scheduler_aborts(self) -> list[RequestOutput]:
        outs = []
        for req in self.scheduler.drain_aborted():
            self._requests.pop(req.rid, None)
            outs.append(self._output(req, [], [], []))
        return outs

    @staticmethod
    def _output(req: Request, new_ids, new_lp, new_top, input_lp=(), input_top=()) -> RequestOutput:
        return RequestOutput(
            rid=req.rid,
            new_token_ids=new_ids,
            finish_reason=req.finish_reason,
            prompt_tokens=req.num_prompt_tokens,
            completion_tokens=req.num_output_tokens,
            cached_tokens=req.cached_tokens,
            new_logprobs=new_lp,
            new_top_logprobs=new_top,
            new_input_logprobs=list(input_lp),
            new_input_top_logprobs=list(input_top),
            embedding=req.embedding if req.finished else None,
        )

    # ---- management ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release what outlives the object: the other tensor-parallel ranks' processes, the compile thread."""
        if self.grammar is not None:
            self.grammar.close()
        self.runner.close()

    def flush_cache(self) -> tuple[bool, str]:
        if self.scheduler.has_work():
            return False, "cannot flush the cache while requests are running or waiting"
        self.kv.flush()
        return True, "the prefix cache was flushed"

    def server_info(self) -> dict[str, Any]:
        alloc, cache = self.kv.allocator, self.kv.cache
        return {
            "kv_capacity": alloc.capacity,
            "kv_free": alloc.num_free_slots,
            "kv_used": alloc.num_used_slots,
            "kv_usage": alloc.num_used_slots / alloc.capacity,
            "cache_size": cache.total_size,
            "cache_evictable": cache.evictable_size,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_grammar_compiling": sum(len(m.rids) for m, _, _ in self._compiling),
            "num_retractions": self.scheduler.num_retractions,
            "num_steps": self.num_steps,
            "num_tokens_computed": self.num_tokens_computed,
            "cache_hit_rate": self.total_cached_tokens / max(1, self.total_prompt_tokens),
            "total_prompt_tokens": self.total_prompt_tokens,
            "total_cached_tokens": self.total_cached_tokens,
        }

    def check(self) -> None:
        self.scheduler.check()

    def model_info(self) -> ModelInfo:
        return self.runner.info()
