"""The transformers baselines, measured in the same run as radixlm.

Two ways to serve many requests with plain transformers 5:

- `generate` with static batches (`generate_static`): requests in arrival order, `batch_size` at a
  time, left-padded with an attention mask. `generate` takes one `max_new_tokens` per call, so a batch
  decodes for its longest request; EOS is disabled (`model.generation_config.eos_token_id = None`, and
  `min_new_tokens = max_new_tokens` in case an EOS id leaks back in from a config) so that every row
  decodes exactly that many tokens. Only each request's requested tokens count as useful output.
- continuous batching (`ContinuousBatching`): the engine behind `model.generate_batch` (paged KV,
  FIFO scheduler, prefix block sharing). `generate_batch` itself takes a single `max_new_tokens` for all
  inputs, so we drive the same manager through `continuous_batching_context_manager` and give each
  request its own `max_new_tokens` (and `eos_token_id=-1`, no EOS) with `manager.add_request`, exactly
  as `transformers serve --continuous-batching` does per request.

Both run greedy, in the model's dtype, with attention "sdpa" (continuous batching accepts "sdpa" and
switches to flash attention by itself only where flash kernels exist, never on CPU).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The row name of transformers' continuous batching in every bench table.
GENERATE_BATCH = "transformers generate_batch (CB)"

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# (prompt ids, max_new_tokens) of one request
Job = tuple[list[int], int]


def load_hf_model(model_path: str, dtype: str = "auto", device: str = "auto") -> Any:
    """AutoModelForCausalLM in eval mode, attention "sdpa", with EOS disabled for benchmarking."""
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = _DTYPES.get(dtype, "auto")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, attn_implementation="sdpa")
    model.to(device).eval()
    # generate() fills every None of the config it is given from model.generation_config: EOS must be
    # unset here, or the Hub-style [im_end, endoftext] list comes back and batches stop early.
    model.generation_config.eos_token_id = None
    return model


def pad_token_id(model: Any) -> int:
    for cfg in (model.generation_config, model.config):
        pad = getattr(cfg, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return 0


@torch.inference_mode()
def generate_padded_batch(model: Any, prompts: Sequence[list[int]], max_new_tokens: int) -> list[list[int]]:
    """One `generate` call over left-padded prompts; every row decodes exactly `max_new_tokens` tokens."""
    from transformers import GenerationConfig

    pad = pad_token_id(model)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=pad,
    )
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        generation_config=config,
    )
    return [row[width:].tolist() for row in out.cpu()]


def generate_static(model: Any, jobs: Sequence[Job], batch_size: int) -> tuple[list[list[int]], float]:
    """Static batches in arrival order. Returns every row's generated ids (the batch's max length) and seconds."""
    outputs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(jobs), batch_size):
        batch = jobs[i : i + batch_size]
        outputs += generate_padded_batch(model, [p for p, _ in batch], max(n for _, n in batch))
    return outputs, time.perf_counter() - start


@dataclass
class ContinuousBatchingOptions:
    page_size: int = 256  # transformers' default
    num_blocks: int | None = None  # None: enough for every request of the workload at once
    # None: CPU_MAX_BATCH_TOKENS on CPU, transformers' own default (8192) elsewhere
    max_batch_tokens: int | None = None


# transformers' continuous batching packs up to max_batch_tokens query tokens per step and, with sdpa, builds a
# dense [tokens, cache + tokens] mask for them. On CPU its default of 8192 made the shared-prefix workload ~3x
# slower than 1024 (measured: 130 s vs 43 s; 512 and 2048 were within noise of 1024), so the baseline gets
# 1024 there, which is also radixlm's chunked-prefill size on CPU.
CPU_MAX_BATCH_TOKENS = 1024


class ContinuousBatching:
    """A transformers continuous-batching session (the manager behind `generate_batch`).

    `run` submits jobs, and whenever one finishes calls `on_finish(key, generated)`, which may return
    follow-up jobs (the next turn of a conversation): that is how multi-turn chats keep their turns
    sequential while conversations overlap, as they do against radixlm.
    """

    def __init__(
        self,
        model: Any,
        max_prompt_len: int,
        max_new_tokens: int,
        max_concurrent: int,
        options: ContinuousBatchingOptions | None = None,
    ) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        options = options or ContinuousBatchingOptions()
        self.model = model
        # Sized for the whole workload at once (never preempts): the most favourable setting, and it
        # avoids sizing the cache from all free RAM, which on CPU costs tens of seconds and a huge mask.
        blocks_per_request = math.ceil((max_prompt_len + max_new_tokens) / options.page_size) + 1
        num_blocks = options.num_blocks or blocks_per_request * max_concurrent + 4
        max_batch_tokens = options.max_batch_tokens
        if max_batch_tokens is None and model.device.type == "cpu":
            max_batch_tokens = CPU_MAX_BATCH_TOKENS
        self.cb_config = ContinuousBatchingConfig(
            **{_page_field(ContinuousBatchingConfig): options.page_size},
            num_blocks=num_blocks,
            max_batch_tokens=max_batch_tokens,
        )
        self.hints = WorkloadHints(
            max_prompt_length=max_prompt_len,
            max_generated_length=max_new_tokens,
            num_requests=max_concurrent,
        )
        # eos -1: no EOS at all (the manager's own spelling); each request sets its own max_new_tokens.
        self.generation_config = GenerationConfig(
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=-1, pad_token_id=pad_token_id(model)
        )

    def describe(self) -> dict[str, Any]:
        """The settings this baseline ran with, for the report."""
        cfg = self.cb_config
        return {
            "cb_page_size": getattr(cfg, _page_field(type(cfg))),
            "cb_num_blocks": cfg.num_blocks,
            "cb_max_batch_tokens": cfg.max_batch_tokens,
            "cb_prefix_sharing": cfg.allow_block_sharing,
            "attn_implementation": self.model.config._attn_implementation,
        }

    def run(
        self,
        jobs: dict[str, Job],
        on_finish: Callable[[str, list[int]], dict[str, Job]] | None = None,
        warmup: Sequence[Job] = (),
    ) -> tuple[dict[str, list[int]], float]:
        """Returns generated ids per key (follow-ups included) and the seconds from first submit to last result.

        Warmup jobs run first in the same session (the cache is allocated once per session), untimed.
        """
        with self.model.continuous_batching_context_manager(
            generation_config=self.generation_config,
            continuous_batching_config=self.cb_config,
            workload_hints=self.hints,
            block=True,
            timeout=10,
        ) as manager:
            if warmup:
                self._drain(manager, {f"warmup-{i}": job for i, job in enumerate(warmup)}, None)
            start = time.perf_counter()
            results = self._drain(manager, dict(jobs), on_finish)
            return results, time.perf_counter() - start

    @staticmethod
    def _drain(
        manager: Any, jobs: dict[str, Job], on_finish: Callable[[str, list[int]], dict[str, Job]] | None
    ) -> dict[str, list[int]]:
        def submit(batch: dict[str, Job]) -> None:
            for key, (prompt, n) in batch.items():
                manager.add_request(prompt, request_id=key, max_new_tokens=n, eos_token_id=-1)

        results: dict[str, list[int]] = {}
        pending = set(jobs)
        submit(jobs)
        while pending:
            out = manager.get_result(timeout=1)
            if out is None:
                if not manager.is_running():
                    raise RuntimeError("transformers continuous batching stopped with requests pending")
                continue
            if not out.is_finished():
                continue
            if out.error is not None:
                raise RuntimeError(f"transformers continuous batching failed {out.request_id}: {out.error}")
            pending.discard(out.request_id)
            results[out.request_id] = list(out.generated_tokens)
            if on_finish is not None:
                follow = on_finish(out.request_id, results[out.request_id])
                pending |= set(follow)
                submit(follow)
        return results


def _page_field(config_cls: type) -> str:
    """The name transformers gives the KV page size: `page_size` since 5.25, `block_size` before (5.17 on
    the CUDA image we test on)."""
    fields = getattr(config_cls, "__dataclass_fields__", {})
    return "page_size" if "page_size" in fields or "block_size" not in fields else "block_size"


class _DropPsutilNotice(logging.Filter):
    # Logged at ERROR on every CPU session without psutil; harmless here because num_blocks is set.
    def filter(self, record: logging.LogRecord) -> bool:
        return "psutil" not in record.getMessage()


def quiet_transformers_logs() -> None:
    """Continuous batching logs every session start and stop; keep the tables readable (errors still show)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cb_logger = logging.getLogger("ContinuousBatchingLogger")
    cb_logger.setLevel(logging.ERROR)
    if not any(isinstance(f, _DropPsutilNotice) for f in cb_logger.filters):
        cb_logger.addFilter(_DropPsutilNotice())
