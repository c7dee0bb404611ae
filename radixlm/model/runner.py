"""ModelRunner: load the model, hold its KV buffers and device slot table, and turn a StepInput into logits
and sampled tokens. It sees only StepInput (plain data), never a Request (DESIGN.md invariant 3)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from radixlm.config import EngineConfig, ModelFacts, RuntimeConfig
from radixlm.kv.kv_cache_dtype import KVScaleReader, resolve_kv_dtype
from radixlm.kv.kv_pool import KVPool, LayerKV
from radixlm.kv.req_to_token import DeviceReqToToken
from radixlm.layers.attention_backends.torch_backend import TorchAttnBackend
from radixlm.layers.packed_linear import default_decision_file, prepack_linears
from radixlm.messages import ModelInfo
from radixlm.model import lazy_tensor, loader, parallel, quantization
from radixlm.model.compiled_forward import CompiledForward, compile_unsupported
from radixlm.model.forward_batch import ForwardBatch
from radixlm.model.heads import pooling_impl, pooling_info, resolve_head
from radixlm.model.pooling import pool_step
from radixlm.model.prompt_logprobs import ForwardOutput, score_prompt
from radixlm.model.registry import ImplChoice, choose_impl, native_architectures
from radixlm.model.sampler import Sampler, SamplerOutput, SamplingBatch
from radixlm.model.step_input import StepInput

logger = logging.getLogger(__name__)


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters as this rank holds them (prepacked weights included)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for mod in model.modules():
        packed = getattr(mod, "packed", None)
        if packed is not None:  # oneDNN's copy, beside the dense weight or in place of it
            total += packed.packed_bytes
    return total + quantization.quantized_bytes(model)


class ModelRunner:
    def __init__(self, config: EngineConfig, *, tp_rank: int = 0, init_method: str | None = None) -> None:
        """Load the model (this rank's shard of it). The KV buffers come later (`allocate_kv`), once the
        runtime is resolved from what the loaded model leaves free.

        With config.tp_size > 1, rank 0 (the core's runner) starts the other ranks and sends them every
        step; those ranks are built by parallel.run_tp_worker with their tp_rank and the rendezvous."""
        self.config = config
        self.tp_rank, self.tp_size = tp_rank, config.tp_size
        local_rank = tp_rank % (config.tp_size // config.nnodes)  # this rank's GPU on its node
        self.device = parallel.rank_device(loader.resolve_device(config.device), local_rank)
        self.tp_leader: parallel.TPLeader | None = None
        self.tp_check_agreement = self.tp_size > 1 and parallel.agreement_check_enabled()
        if self.tp_size > 1:
            self._join_tp_group(init_method)
        try:
            self._load(config)
        except BaseException:
            self.close()  # a failed start must not leave ranks or a process group behind
            raise

    def _load(self, config: EngineConfig) -> None:
        self.model_path: Path = loader.resolve_model_path(
            config.model_path, config.revision, config.load_format
        )
        self.hf_config = loader.load_config(
            self.model_path, trust_remote_code=config.trust_remote_code, revision=config.revision
        )
        self.text_config = loader.text_config(self.hf_config)
        self.dtype = loader.resolve_dtype(self.text_config, config.dtype)
        # What the KV pool stores (--kv-cache-dtype), and the checkpoint's fp8 KV scales, if it has them.
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.dtype)
        self.kv_scales = KVScaleReader()
        self.choice: ImplChoice = choose_impl(self.hf_config, config.model_impl)
        # What the checkpoint's head is for (generate / embed / classify); pooling heads refuse the rest.
        self.head = resolve_head(self.hf_config, self.model_path)
        if self.head.task != "generate":
            self.choice = pooling_impl(self.head, config.model_impl)
        # Before any weight is read: a checkpoint quantized by a method we cannot run fails now, by name.
        self.checkpoint_format = loader.checkpoint_format(self.model_path, config.load_format)
        self.quantization = quantization.resolve_method(
            config.quantization, self.hf_config, self.checkpoint_format
        )
        logger.info(
            "model %s: %s implementation (%s)", self.choice.architecture, self.choice.impl, self.choice.reason
        )
        self.model = self._load_model()
        # Every rank's parameter bytes (rank 0 reports them): what the split saves, measured, not assumed.
        self.rank_param_bytes = [param_bytes(self.model)]
        logger.info(
            "weights: %.1f MiB on this rank (%s checkpoint, %s)",
            self.rank_param_bytes[0] / 2**20,
            self.checkpoint_format,
            self.quant_report.summary(),
        )
        self.rank_bytes_read: list[int] = []
        if self.tp_size > 1:
            self.rank_param_bytes = parallel.gather_ints(self.rank_param_bytes[0], self.device)
            read = self.checkpoint_bytes_read
            self.rank_bytes_read = parallel.gather_ints(-1 if read is None else read, self.device)
        self.vocab_size = int(self.text_config.vocab_size)
        self.eos_token_ids = loader.eos_token_ids(self.model_path, self.text_config)
        self.attn_backend = TorchAttnBackend()
        self.compiled = self._compiled_forward()
        self.sampler = Sampler()
        self.runtime: RuntimeConfig | None = None
        self.kv_pool: KVPool | None = None
        self.req_to_token: DeviceReqToToken | None = None

    def _compiled_forward(self) -> CompiledForward | None:
        """The compiled decoder when --enable-torch-compile asks for it and the model allows it."""
        if not self.config.enable_torch_compile:
            return None
        why = compile_unsupported(self.model, self.tp_size)
        if why is not None:
            logger.warning("--enable-torch-compile: running eager, because of %s", why)
            return None
        logger.info("--enable-torch-compile: the decoder compiles on its first steps (attention stays eager)")
        return CompiledForward(self.model)

    def _join_tp_group(self, init_method: str | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            torch.set_num_threads(parallel.threads_per_rank(self.tp_size))
        if self.tp_rank == 0:
            self.tp_leader = parallel.TPLeader(self.config, self.device)
        else:
            assert init_method is not None, "a tensor-parallel worker needs the rendezvous address"
            parallel.init_group(self.tp_rank, self.tp_size, init_method, self.device)

    def _load_model(self) -> torch.nn.Module:
        # The dtype weights load in; the model takes self.dtype once quantized (quantization.load_dtype).
        load_dtype = quantization.load_dtype(self.quantization, self.dtype)
        reader = quantization.checkpoint_reader(self.quantization, self.hf_config, self.tp_size)
        if self.choice.impl == "native":
            cls = native_architectures()[self.choice.architecture]
            with loader.params_on_meta():
                model = cls(self.text_config, tp_rank=self.tp_rank, tp_size=self.tp_size)
            loader.materialize_params(model, self.device, load_dtype)
        elif self.head.task != "generate":
            from radixlm.model.transformers_backend.encoder import TransformersPoolingModel

            model = TransformersPoolingModel(
                self.hf_config,
                self.model_path,
                self.head,
                trust_remote_code=self.config.trust_remote_code,
                dtype=load_dtype,
                tp_size=self.tp_size,
            )
        else:
            from radixlm.model.transformers_backend import TransformersCausalLM
            from radixlm.model.transformers_backend.multimodal import TransformersVLM, is_vision_language

            # A vision-language model: its vision tower embeds the image positions (multimodal.py).
            cls = TransformersVLM if is_vision_language(self.hf_config) else TransformersCausalLM
            model = cls(
                self.hf_config,
                self.model_path,
                trust_remote_code=self.config.trust_remote_code,
                dtype=load_dtype,
                tp_rank=self.tp_rank,
                tp_size=self.tp_size,
            )
        # A rank of a split reads only its slices; a checkpoint format that groups tensors (fp8, gptq) holds
        # them across the stream, so it reads them whole.
        lazy = self.tp_size > 1 and not quantization.streams_checkpoint(self.quantization)
        read_before = lazy_tensor.READ.bytes
        loaded = model.load_weights(
            (name, t.to(load_dtype) if t.is_floating_point() else t)
            for name, t in self.kv_scales(
                reader(
                    loader.iter_checkpoint(
                        self.model_path, self.text_config, self.config.load_format, lazy=lazy
                    )
                )
            )
        )
        self.checkpoint_bytes_read = lazy_tensor.READ.bytes - read_before if lazy else None
        loader.check_all_loaded(model, loaded)
        model.to(device=self.device, dtype=load_dtype)
        model.eval()
        self.quant_report = quantization.quantize_model(model, self.quantization, self.dtype, reader)
        model.to(dtype=self.dtype)
        self.linear_kernels = prepack_linears(
            model,
            self.config.linear_kernel,
            self.device,
            self.dtype,
            default_decision_file(),
            free_bytes=loader.default_mem_bytes(self.device),
        )
        logger.info("%s", self.linear_kernels.summary())
        measure = getattr(model, "measure_attention", None)
        if measure is not None:  # on every rank, at the same point: it runs the model once
            measure()
        return model

    def _kv_layout(self) -> list[LayerKV]:
        """This rank's K/V row shape per layer. A model that knows its own (the Transformers backend
        measures it) says so; else the config's counts, with ranks splitting the KV heads (with fewer KV
        heads than ranks each rank holds one, replicated, as QKVParallelLinear lays them out)."""
        own = getattr(self.model, "kv_layout", None)
        if own is not None:
            return own()
        cfg = self.text_config
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        local_kv = kv_heads // self.tp_size if self.tp_size < kv_heads else 1
        return LayerKV.uniform(cfg.num_hidden_layers, local_kv, head_dim)

    def facts(self) -> ModelFacts:
        """What the runtime defaults depend on (after the weights loaded, so free memory excludes them)."""
        context = getattr(self.text_config, "max_position_embeddings", None)
        cap = getattr(self.model, "max_context", None)  # what the model can run exactly (DSA: index_topk)
        if cap and (not context or cap < context):
            context = cap
        return ModelFacts(
            device_type=self.device.type,
            model_context_length=int(context) if context else None,
            kv_bytes_per_token=KVPool.layout_bytes_per_token(self._kv_layout(), self.kv_dtype),
            free_memory_bytes=loader.default_mem_bytes(self.device),
            total_memory_bytes=loader.total_mem_bytes(self.device),
        )

    def allocate_kv(self, runtime: RuntimeConfig, num_rows: int) -> None:
        """The KV buffers (allocated once) and the device slot table, as the runtime sized them."""
        layout = self._kv_layout()
        k_scales, v_scales = self.kv_scales.scales(len(layout), self.kv_dtype)
        self.runtime = runtime
        if self.tp_leader is not None:
            self.tp_leader.send_kv(runtime, num_rows)
        self.kv_pool = KVPool(
            num_pages=runtime.num_kv_pages,
            page_size=runtime.page_size,
            layers=layout,
            dtype=self.kv_dtype,
            device=self.device,
            k_scales=k_scales,
            v_scales=v_scales,
        )
        self.req_to_token = DeviceReqToToken(num_rows, runtime.context_length + 1, self.device)
        per_token = KVPool.layout_bytes_per_token(layout, self.kv_dtype)
        logger.info(
            "KV pool: %d tokens of %s (%.1f MiB), from %s",
            runtime.kv_capacity,
            str(self.kv_dtype).removeprefix("torch."),
            runtime.kv_capacity * per_token / 2**20,
            runtime.kv_capacity_reason,
        )

    def info(self) -> ModelInfo:
        assert self.runtime is not None, "allocate_kv first"
        return ModelInfo(
            model_path=str(self.model_path),
            architecture=self.choice.architecture,
            model_impl=self.choice.impl,
            model_impl_reason=self.choice.reason,
            dtype=str(self.dtype).removeprefix("torch."),
            device=str(self.device),
            context_length=self.runtime.context_length,
            vocab_size=self.vocab_size,
            kv_capacity=self.runtime.kv_capacity,
            max_running_requests=self.runtime.max_running_requests,
            eos_token_ids=list(self.eos_token_ids),
            quantization=self.quantization,
            weight_bytes=self.rank_param_bytes[0],
            checkpoint_format=self.checkpoint_format,
            task=self.head.task,
            multimodal=bool(getattr(self.model, "multimodal", False)),
            **pooling_info(self.model, self.hf_config),
            runtime={
                **self.runtime.as_dict(),
                "tp_size": self.tp_size,
                "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
                "param_bytes_per_rank": list(self.rank_param_bytes),
                # Checkpoint bytes each rank read (-1: read whole, no lazy slices); empty at tp_size 1.
                "checkpoint_bytes_read_per_rank": list(self.rank_bytes_read),
                "tp_worker_pids": self.tp_leader.pids if self.tp_leader is not None else [],
            },
        )

    # ---- one step --------------------------------------------------------------------------------
    def build_forward_batch(self, step: StepInput) -> ForwardBatch:
        assert self.kv_pool is not None and self.req_to_token is not None, "allocate_kv first"
        self.req_to_token.apply(step.table_writes)
        return ForwardBatch.from_step(
            step,
            kv_pool=self.kv_pool,
            req_to_token=self.req_to_token.table,
            req_to_token_host=self.req_to_token.host,
            attn_backend=self.attn_backend,
            device=self.device,
        )

    @torch.inference_mode()
    def forward(self, step: StepInput) -> ForwardOutput:
        """Logits [S, V] for the spans that sample, in span order; and the prompt logprobs of the rows the
        spans mark for scoring (prompt_logprobs.py)."""
        if self.tp_leader is not None:
            self.tp_leader.send_step(step)  # the other ranks run the same step on their shards
        fb = self.build_forward_batch(step)
        forward = self.model if self.compiled is None else self.compiled
        hidden = forward(fb.input_ids, fb.positions, fb)
        if step.pool_spans:  # a pooling model: every span is a whole prompt to pool, none samples
            return ForwardOutput(hidden.new_empty(0, 0), pooled=pool_step(self.model.pool, hidden, step))
        out = ForwardOutput(
            self.model.compute_logits(hidden if fb.samples_every_token else hidden[fb.sample_indices])
        )
        if step.scores_prompt:
            out.prompt_logprobs, out.prompt_top_ids, out.prompt_top_vals = score_prompt(
                self.model.compute_logits, hidden, step
            )
        return out

    def build_sampling_batch(self, step: StepInput, vocab_size: int) -> SamplingBatch:
        s = step.sampling
        return SamplingBatch.build(
            [x.params for x in s],
            [x.seed for x in s],
            [x.prompt_ids for x in s],
            [x.output_ids for x in s],
            self.eos_token_ids,
            vocab_size,
            self.device,
            steps=[x.num_output_tokens for x in s],
            grammar_rows=step.grammar_rows,
            grammar_bitmask=_bitmask_tensor(step),
        )

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, step: StepInput) -> SamplerOutput:
        if step.plain_greedy:  # every row takes its argmax: no sampling batch to build
            out = self.sampler.argmax(logits, len(step.sampling))
        else:
            sampling = self.build_sampling_batch(step, logits.shape[-1])
            out = self.sampler(
                logits, sampling, return_logprob=step.return_logprob, top_logprobs_num=step.top_logprobs_num
            )
        if self.tp_check_agreement:
            parallel.check_ranks_agree(out.next_token_ids)
        return out

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (a no-op without them)."""
        if self.tp_leader is not None:
            self.tp_leader.close()
            self.tp_leader = None


def _bitmask_tensor(step: StepInput) -> torch.Tensor | None:
    """The step's grammar bitmask as an int32 tensor (another tensor-parallel rank receives it as bytes)."""
    mask = step.grammar_bitmask
    if mask is None or isinstance(mask, torch.Tensor):
        return mask
    return torch.frombuffer(bytearray(mask), dtype=torch.int32).view(len(step.sampling), -1)
