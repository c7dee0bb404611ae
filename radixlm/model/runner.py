"""ModelRunner: load the model, own the KV pool, and turn a scheduled batch into sampled tokens."""

from __future__ import annotations

import logging

import torch

from radixlm.config import EngineConfig
from radixlm.core.scheduler import ScheduledBatch
from radixlm.kv.kv_pool import KVPool, ReqToTokenPool
from radixlm.layers.attention_backends.torch_backend import TorchAttnBackend
from radixlm.messages import ModelInfo
from radixlm.model import loader
from radixlm.model.forward_batch import ForwardBatch
from radixlm.model.registry import ImplChoice, choose_impl, native_architectures
from radixlm.model.sampler import Sampler, SamplerOutput, SamplingBatch

logger = logging.getLogger(__name__)

DEFAULT_MAX_RUNNING_REQUESTS = 256
DEFAULT_MEM_FRACTION = {"cpu": 0.25, "cuda": 0.85}


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = loader.resolve_device(config.device)
        self.model_path = loader.resolve_model_path(config.model_path, config.revision)
        self.hf_config = loader.load_config(
            self.model_path, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
        self.text_config = loader.text_config(self.hf_config)
        self.dtype = loader.resolve_dtype(self.text_config, config.dtype)
        self.choice: ImplChoice = choose_impl(self.hf_config, config.model_impl)
        logger.info(
            "model %s: %s implementation (%s)", self.choice.architecture, self.choice.impl, self.choice.reason
        )
        self.model = self._load_model()
        self.vocab_size = int(self.text_config.vocab_size)
        self.context_length = self._context_length()
        self.max_running_requests = config.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS
        self.kv_pool = self._make_kv_pool()
        # +1 row so that a retraction-and-readmission within a step never runs out of rows
        self.req_pool = ReqToTokenPool(self.max_running_requests + 1, self.context_length + 1, self.device)
        self.attn_backend = TorchAttnBackend()
        self.sampler = Sampler()

    # ---- set-up ----------------------------------------------------------------------------------
    def _load_model(self) -> torch.nn.Module:
        if self.choice.impl == "native":
            cls = native_architectures()[self.choice.architecture]
            with loader.params_on_meta():
                model = cls(self.text_config)
            loader.materialize_params(model, self.device, self.dtype)
        else:
            from radixlm.model.transformers_backend import TransformersCausalLM

            model = TransformersCausalLM(
                self.hf_config,
                self.model_path,
                trust_remote_code=self.config.trust_remote_code,
                dtype=self.dtype,
            )
        loaded = model.load_weights(
            (name, t.to(self.dtype) if t.is_floating_point() else t)
            for name, t in loader.iter_checkpoint(self.model_path)
        )
        loader.check_all_loaded(model, loaded)
        model.to(device=self.device, dtype=self.dtype)
        model.eval()
        return model

    def _context_length(self) -> int:
        model_max = getattr(self.text_config, "max_position_embeddings", None) or 4096
        if self.config.context_length is None:
            return int(model_max)
        return int(self.config.context_length)

    def kv_bytes_per_token(self) -> int:
        num_layers, num_kv_heads, head_dim = self._kv_shape()
        return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=self.dtype).element_size()

    def _kv_shape(self) -> tuple[int, int, int]:
        cfg = self.text_config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cfg.num_hidden_layers, kv_heads, head_dim

    def _make_kv_pool(self) -> KVPool:
        capacity = self.config.max_total_tokens
        if capacity is None:
            fraction = self.config.mem_fraction_static or DEFAULT_MEM_FRACTION[self.device.type]
            capacity = int(loader.default_mem_bytes(self.device) * fraction) // self.kv_bytes_per_token()
            # More than every running request at full context is never useful.
            capacity = min(capacity, self.max_running_requests * self.context_length)
        num_layers, kv_heads, head_dim = self._kv_shape()
        pool = KVPool(
            capacity=capacity,
            page_size=self.config.page_size,
            num_layers=num_layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        logger.info(
            "KV pool: %d tokens (%.1f MiB)", pool.capacity, pool.capacity * self.kv_bytes_per_token() / 2**20
        )
        return pool

    def info(self) -> ModelInfo:
        return ModelInfo(
            model_path=str(self.model_path),
            architecture=self.choice.architecture,
            model_impl=self.choice.impl,
            model_impl_reason=self.choice.reason,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            kv_capacity=self.kv_pool.capacity,
            max_running_requests=self.max_running_requests,
        )

    # ---- one step --------------------------------------------------------------------------------
    def build_forward_batch(self, batch: ScheduledBatch) -> ForwardBatch:
        spans = batch.spans
        input_ids: list[int] = []
        for s in spans:
            input_ids.extend(s.req.tokens[s.start : s.start + s.length])
        return ForwardBatch.from_spans(
            input_ids=input_ids,
            out_cache_loc=torch.cat([s.slots for s in spans]),
            req_pool_indices=[s.req.req_pool_idx for s in spans],
            prefix_lens=[s.start for s in spans],
            extend_lens=[s.length for s in spans],
            sample_mask=[s.samples for s in spans],
            kv_pool=self.kv_pool,
            req_to_token=self.req_pool.table,
            attn_backend=self.attn_backend,
            device=self.device,
        )

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> torch.Tensor:
        """Logits [S, V] for the spans that sample, in span order."""
        fb = self.build_forward_batch(batch)
        hidden = self.model(fb.input_ids, fb.positions, fb)
        return self.model.compute_logits(hidden[fb.sample_indices])

    @torch.inference_mode()
    def sample(
        self, logits: torch.Tensor, sampling: SamplingBatch, *, return_logprob: bool, top_logprobs_num: int
    ) -> SamplerOutput:
        return self.sampler(
            logits, sampling, return_logprob=return_logprob, top_logprobs_num=top_logprobs_num
        )
