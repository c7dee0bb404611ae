"""EngineCore: add_request / abort / step() -> outputs. It owns the scheduler and the model runner.

It runs inline (a thread of the Engine's process) or in its own process (`core_process.py`); either way it
sees only token ids and plain messages, never text or sockets.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from radixlm.config import EngineConfig
from radixlm.core.request import Request
from radixlm.core.schedule_policy import make_policy
from radixlm.core.scheduler import Scheduler
from radixlm.core.stop_checker import StopChecker
from radixlm.kv.radix_cache import NoPrefixCache, RadixCache
from radixlm.messages import AddRequest, ModelInfo, RequestOutput
from radixlm.model.runner import ModelRunner
from radixlm.model.sampler import SamplingBatch
from radixlm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        pool = self.runner.kv_pool
        self.cache = NoPrefixCache(pool) if config.disable_radix_cache else RadixCache(pool)
        chunk = config.chunked_prefill_size
        if chunk is None:
            chunk = 8192 if self.runner.device.type == "cuda" else 1024
        self.scheduler = Scheduler(
            pool=pool,
            req_pool=self.runner.req_pool,
            cache=self.cache,
            policy=make_policy(config.schedule_policy),
            max_running_requests=self.runner.max_running_requests,
            max_prefill_tokens=config.max_prefill_tokens,
            chunked_prefill_size=chunk,
        )
        self.eos_token_ids = _eos_token_ids(self.runner)
        self.stop_checker = StopChecker(
            config.tokenizer_path or str(self.runner.model_path), self.eos_token_ids
        )
        self._rng = random.Random(config.random_seed)
        self._requests: dict[str, Request] = {}
        self._pending_outputs: list[RequestOutput] = []
        self.num_steps = 0
        self.num_tokens_computed = 0  # every token a forward pass computed (prefix hits are not computed)
        self.total_prompt_tokens = 0
        self.total_cached_tokens = 0

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, msg: AddRequest) -> None:
        """Queue one prompt and its samples. Bad input raises ValueError and leaves the engine untouched."""
        params = SamplingParams.from_any(msg.sampling_params)
        for rid in msg.rids:
            self._validate_prompt(rid, msg.input_ids)
        room = self.runner.context_length - len(msg.input_ids)
        if params.max_new_tokens > room:
            params = SamplingParams.from_any({**params.to_dict(), "max_new_tokens": room})
        for k, rid in enumerate(msg.rids):
            # n samples of one prompt draw from distinct but reproducible streams
            seed = params.seed + k if params.seed is not None else self._rng.getrandbits(63)
            req = Request(
                rid,
                list(msg.input_ids),
                params,
                seed,
                return_logprob=msg.return_logprob,
                top_logprobs_num=msg.top_logprobs_num,
            )
            self._requests[rid] = req
            self.scheduler.add_request(req)

    def _validate_prompt(self, rid: str, input_ids: list[int]) -> None:
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        if not input_ids:
            raise ValueError("the prompt is empty: input_ids must hold at least one token")
        if len(input_ids) >= self.runner.context_length:
            raise ValueError(
                f"the prompt has {len(input_ids)} tokens; the context length is {self.runner.context_length}, "
                f"leaving no room for output"
            )
        vocab = self.runner.vocab_size
        bad = [t for t in input_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"input_ids holds {bad[0]!r}, outside the vocabulary [0, {vocab})")
        if len(input_ids) + 1 > self.runner.kv_pool.capacity:
            raise ValueError(
                f"the prompt has {len(input_ids)} tokens, more than the KV cache holds ({self.runner.kv_pool.capacity})"
            )

    def abort(self, rid: str, message: str = "aborted by the client") -> RequestOutput | None:
        req = self.scheduler.abort(rid, message)
        if req is None:
            return None
        self._requests.pop(rid, None)
        return self._output(req, [], [], [])

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        outputs = self._drain_scheduler_aborts()
        if batch is None:
            return outputs
        self.num_steps += 1
        self.num_tokens_computed += batch.num_tokens
        logits = self.runner.forward(batch)
        sampling_spans = [s for s in batch.spans if s.samples]
        sampled = self._sample(logits, sampling_spans) if sampling_spans else None
        self.scheduler.commit(batch)
        if sampled is not None:
            outputs += self._process_samples(sampling_spans, sampled)
        return outputs

    def _sample(self, logits: torch.Tensor, spans) -> Any:
        reqs = [s.req for s in spans]
        sampling = SamplingBatch.build(
            [r.params for r in reqs],
            [r.seed for r in reqs],
            [r.prompt_ids for r in reqs],
            [r.output_ids for r in reqs],
            self.eos_token_ids,
            logits.shape[-1],
            logits.device,
        )
        want_lp = any(r.return_logprob for r in reqs)
        top_n = max((r.top_logprobs_num for r in reqs if r.return_logprob), default=0)
        return self.runner.sample(logits, sampling, return_logprob=want_lp, top_logprobs_num=top_n)

    def _process_samples(self, spans, sampled) -> list[RequestOutput]:
        tokens = sampled.next_token_ids.tolist()
        lps = sampled.logprobs.tolist() if sampled.logprobs is not None else None
        top_ids = sampled.top_logprobs_ids.tolist() if sampled.top_logprobs_ids is not None else None
        top_vals = sampled.top_logprobs_vals.tolist() if sampled.top_logprobs_vals is not None else None
        outputs = []
        for i, span in enumerate(spans):
            req = span.req
            req.output_ids.append(tokens[i])
            new_lp, new_top = [], []
            if req.return_logprob and lps is not None:
                new_lp = [lps[i]]
                req.output_logprobs.extend(new_lp)
                if req.top_logprobs_num and top_ids is not None:
                    new_top = [
                        list(zip(top_ids[i][: req.top_logprobs_num], top_vals[i][: req.top_logprobs_num]))
                    ]
                    req.output_top_logprobs.extend(new_top)
            reason = self.stop_checker.check(req, self.runner.context_length)
            if reason is not None:
                req.finish(reason)
                self.scheduler.finish(req)
                self._requests.pop(req.rid, None)
                self.total_prompt_tokens += len(req.prompt_ids)
                self.total_cached_tokens += req.cached_tokens
            outputs.append(self._output(req, [tokens[i]], new_lp, new_top))
        return outputs

    def _drain_scheduler_aborts(self) -> list[RequestOutput]:
        outs = []
        for req in self.scheduler.drain_aborted():
            self._requests.pop(req.rid, None)
            outs.append(self._output(req, [], [], []))
        return outs

    @staticmethod
    def _output(req: Request, new_ids, new_lp, new_top) -> RequestOutput:
        return RequestOutput(
            rid=req.rid,
            new_token_ids=new_ids,
            finish_reason=req.finish_reason,
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens,
            new_logprobs=new_lp,
            new_top_logprobs=new_top,
        )

    # ---- management ----------------------------------------------------------------------------
    def flush_cache(self) -> tuple[bool, str]:
        if self.scheduler.has_work():
            return False, "cannot flush the cache while requests are running or waiting"
        self.cache.reset()
        return True, "the prefix cache was flushed"

    def server_info(self) -> dict[str, Any]:
        pool = self.runner.kv_pool
        return {
            "kv_capacity": pool.capacity,
            "kv_free": pool.num_free_slots,
            "kv_used": pool.num_used_slots,
            "kv_usage": pool.num_used_slots / pool.capacity,
            "cache_size": self.cache.total_size,
            "cache_evictable": self.cache.evictable_size,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_retractions": self.scheduler.num_retractions,
            "num_steps": self.num_steps,
            "num_tokens_computed": self.num_tokens_computed,
            "cache_hit_rate": self.total_cached_tokens / max(1, self.total_prompt_tokens),
        }

    def check(self) -> None:
        self.scheduler.check()

    def model_info(self) -> ModelInfo:
        info = self.runner.info()
        info.eos_token_ids = list(self.eos_token_ids)
        return info


def _eos_token_ids(runner: ModelRunner) -> list[int]:
    import json

    ids: set[int] = set()
    for source in (runner.model_path / "generation_config.json", runner.model_path / "config.json"):
        if source.is_file():
            value = json.loads(source.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)
