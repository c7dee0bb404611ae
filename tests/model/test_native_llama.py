"""Native Llama / Mistral / Qwen2 / Qwen3 against transformers on the same random weights (float32, CPU).

Each tiny model is checked for: full prefill, chunked prefill + decodes through the paged KV pool,
a mixed extend + decode batch, and load_weights' errors. Layer-level checks (rotary, RMSNorm) compare
against transformers' own modules.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from radixlm.layers.activation import get_act_and_mul
from radixlm.layers.attention_backends.torch_backend import TorchAttnBackend
from radixlm.layers.norm import RMSNorm
from radixlm.layers.rotary import get_rope
from radixlm.model.forward_batch import ForwardBatch
from radixlm.model.models import NATIVE_ARCHITECTURES
from tests.kv_utils import HandPool, HandRows

ATOL = 1e-4
VOCAB = 512
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so that the 45-token test sequence reaches every band of the llama3 frequency ramp
    "original_max_position_embeddings": 16,
}
# factor == max_position_embeddings / original_max_position_embeddings, as transformers expects
YARN_ROPE = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
}


def _configs() -> dict[str, object]:
    return {
        "llama": LlamaConfig(**COMMON, head_dim=16),
        "llama_llama3rope_bias": LlamaConfig(
            **COMMON, head_dim=16, rope_parameters=dict(LLAMA3_ROPE), attention_bias=True, mlp_bias=True
        ),
        "llama_tied": LlamaConfig(**COMMON, head_dim=16, tie_word_embeddings=True),
        "mistral_sliding": MistralConfig(**COMMON, head_dim=16, sliding_window=8),
        # bias on q/k/v; layers 1 and 2 slide (max_window_layers=1), layer 0 attends fully
        "qwen2_bias_sliding": Qwen2Config(
            **{**COMMON, "num_hidden_layers": 3},
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        ),
        "qwen3_qknorm": Qwen3Config(**COMMON, head_dim=16),
        # head_dim * heads != hidden_size, attention_bias (o_proj too), yarn rope
        "qwen3_wide_head_yarn": Qwen3Config(
            **COMMON, head_dim=32, attention_bias=True, rope_parameters=dict(YARN_ROPE)
        ),
    }


CONFIG_NAMES = list(_configs())


def _randomize(model: torch.nn.Module) -> None:
    """Weights with O(1) activations and logits, so that a wrong op shows up far above ATOL."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0.0, 0.1)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)


_CACHE: dict[str, tuple] = {}


def _models(name: str) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(hf, native, config), built once per config: HF from_config with a fixed seed, native on meta."""
    if name not in _CACHE:
        cfg = _configs()[name]
        torch.manual_seed(0)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        _randomize(hf)
        cls = NATIVE_ARCHITECTURES[type(hf).__name__]
        with torch.device("meta"):
            native = cls(cfg)
        native.to_empty(device="cpu")
        loaded = native.load_weights(hf.state_dict().items())
        assert loaded == {n for n, _ in native.named_parameters()}
        _CACHE[name] = (hf, native.eval(), cfg)
    return _CACHE[name]


def _hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).logits[0]


def _seq(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


class _Runner:
    """A minimal stand-in for the engine: per-sequence KV slots in a KVPool, one ForwardBatch per step."""

    def __init__(self, native: torch.nn.Module, cfg: object, page_size: int = 1) -> None:
        self.native = native
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.pool = HandPool(
            capacity=512,
            page_size=page_size,
            num_layers=cfg.num_hidden_layers,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            dtype=torch.float32,
        )
        self.req = HandRows(4, 128)
        self.backend = TorchAttnBackend()
        self.rows: dict[str, int] = {}
        self.last_slot: dict[str, int | None] = {}

    def step(self, spans: list[tuple[str, list[int], int, int]]) -> list[torch.Tensor]:
        """spans: (seq name, its tokens, start, n). Returns each span's logits [n, vocab]."""
        ids, locs, rows, pre, ext = [], [], [], [], []
        for key, tokens, start, n in spans:
            if key not in self.rows:
                self.rows[key], self.last_slot[key] = self.req.alloc(), None
            slots = self.pool.alloc(n, last_slot=self.last_slot[key])
            self.req.write(self.rows[key], start, slots)
            self.last_slot[key] = int(slots[-1])
            ids += tokens[start : start + n]
            locs.append(slots)
            rows.append(self.rows[key])
            pre.append(start)
            ext.append(n)
        fb = ForwardBatch.from_spans(
            input_ids=ids,
            out_cache_loc=torch.cat(locs),
            req_pool_indices=rows,
            prefix_lens=pre,
            extend_lens=ext,
            sample_mask=[True] * len(spans),
            kv_pool=self.pool,
            req_to_token=self.req.table,
            attn_backend=self.backend,
            device=torch.device("cpu"),
        )
        with torch.no_grad():
            hidden = self.native(fb.input_ids, fb.positions, fb)
            assert hidden.shape == (len(ids), self.native.config.hidden_size)
            logits = self.native.compute_logits(hidden)
            # the engine's path: only the sampled rows go through the head
            sampled = self.native.compute_logits(hidden[fb.sample_indices])
        torch.testing.assert_close(sampled, logits[fb.sample_indices], atol=1e-5, rtol=1e-5)
        self.pool.check()
        return list(logits.split(ext))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_full_prefill_matches_hf(name: str) -> None:
    hf, native, cfg = _models(name)
    seq = _seq(40, seed=1)
    ref = _hf_logits(hf, seq)
    (out,) = _Runner(native, cfg).step([("a", seq, 0, 40)])
    assert _max_diff(out, ref) < ATOL, f"{name}: max abs logit diff {_max_diff(out, ref):.2e}"
    assert float(ref.std()) > 0.3  # the check above is meaningful: logits are O(1), not ~0


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_chunked_prefill_then_decode_matches_hf(name: str, page_size: int) -> None:
    hf, native, cfg = _models(name)
    seq = _seq(45, seed=2)
    ref = _hf_logits(hf, seq)  # causal, so position i of the full run is what step i must produce
    runner = _Runner(native, cfg, page_size=page_size)
    steps = [(0, 13), (13, 14), (27, 13)] + [(40 + i, 1) for i in range(5)]
    for start, n in steps:
        (out,) = runner.step([("a", seq, start, n)])
        diff = _max_diff(out, ref[start : start + n])
        assert diff < ATOL, f"{name}: span [{start}, {start + n}) max abs logit diff {diff:.2e}"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_mixed_extend_and_decode_batch_matches_hf(name: str) -> None:
    hf, native, cfg = _models(name)
    a, b = _seq(32, seed=3), _seq(22, seed=4)
    ref_a, ref_b = _hf_logits(hf, a), _hf_logits(hf, b)
    runner = _Runner(native, cfg, page_size=4)
    schedule = [
        [("a", a, 0, 12), ("b", b, 0, 20)],  # two prefills of different lengths
        [("b", b, 20, 1), ("a", a, 12, 18)],  # a decode packed before an extend
        [("a", a, 30, 1), ("b", b, 21, 1)],  # two decodes
        [("a", a, 31, 1)],
    ]
    refs = {"a": ref_a, "b": ref_b}
    for spans in schedule:
        outs = runner.step(spans)
        for (key, _, start, n), out in zip(spans, outs, strict=True):
            diff = _max_diff(out, refs[key][start : start + n])
            assert diff < ATOL, f"{name}: seq {key} span [{start}, {start + n}) max abs logit diff {diff:.2e}"


def test_load_weights_errors_name_the_tensor() -> None:
    _, native, _ = _models("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.bogus\.weight"):
        native.load_weights([("model.layers.0.self_attn.bogus.weight", torch.zeros(4))])
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        native.load_weights([("model.layers.1.self_attn.k_proj.weight", torch.zeros(33, 64))])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        native.load_weights([("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 63))])
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        native.load_weights([("model.norm.weight", torch.zeros(65))])
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        native.load_weights([("lm_head.weight", torch.zeros(VOCAB + 1, 64))])


def test_load_weights_reports_only_complete_parameters() -> None:
    _, native, _ = _models("llama_tied")
    hf_state = _models("llama_tied")[0].state_dict()
    # a tied checkpoint's lm_head.weight and rotary buffers are skipped, not errors
    got = native.load_weights(
        [
            ("lm_head.weight", hf_state["lm_head.weight"]),
            ("model.rotary_emb.inv_freq", torch.ones(8)),
            ("model.layers.0.self_attn.q_proj.weight", hf_state["model.layers.0.self_attn.q_proj.weight"]),
            ("model.layers.0.self_attn.k_proj.weight", hf_state["model.layers.0.self_attn.k_proj.weight"]),
            ("model.layers.0.mlp.gate_proj.weight", hf_state["model.layers.0.mlp.gate_proj.weight"]),
            ("model.layers.0.mlp.up_proj.weight", hf_state["model.layers.0.mlp.up_proj.weight"]),
        ]
    )
    assert got == {"model.layers.0.mlp.gate_up_proj.weight"}  # qkv_proj still lacks its "v" shard
    assert "lm_head.weight" not in dict(native.named_parameters())  # tied: one parameter, one name


@pytest.mark.parametrize(
    "rope",
    [None, {"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}, dict(LLAMA3_ROPE), dict(YARN_ROPE)],
    ids=["default", "linear", "llama3", "yarn"],
)
def test_rotary_matches_hf_at_arbitrary_positions(rope: dict | None) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(**COMMON, head_dim=16, rope_parameters=rope)
    ours = get_rope(cfg, 16)
    hf = LlamaRotaryEmbedding(cfg)
    # unsorted positions, several beyond max_position_embeddings=256 (the table grows lazily)
    positions = torch.tensor([0, 5, 255, 256, 1000, 3, 4095, 17])
    q, k = torch.randn(8, 4 * 16), torch.randn(8, 2 * 16)
    cos, sin = hf(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.view(1, 8, 4, 16), k.view(1, 8, 2, 16), cos, sin, unsqueeze_dim=2)
    q_out, k_out = ours(positions, q, k)
    assert torch.equal(q_out, q_ref.reshape(8, -1)) and torch.equal(k_out, k_ref.reshape(8, -1))


def test_partial_rotary_matches_hf_stablelm() -> None:
    from transformers import StableLmConfig
    from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding, apply_rotary_pos_emb

    cfg = StableLmConfig(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.25)
    ours = get_rope(cfg, 16)
    assert ours.rotary_dim == 4
    positions = torch.tensor([7, 0, 300, 2])
    q = torch.randn(4, 4 * 16)
    cos, sin = StableLmRotaryEmbedding(cfg)(q, positions[None])
    qh = q.view(1, 4, 4, 16).transpose(1, 2)
    rot, _ = apply_rotary_pos_emb(qh[..., :4], qh[..., :4], cos, sin)
    ref = torch.cat([rot, qh[..., 4:]], dim=-1).transpose(1, 2).reshape(4, -1)
    q_out, _ = ours(positions, q, q)
    assert torch.equal(q_out, ref)


def test_length_dependent_rope_is_refused() -> None:
    cfg = LlamaConfig(**COMMON, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
    with pytest.raises(NotImplementedError, match="dynamic"):
        get_rope(cfg, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_bitwise_hf(dtype: torch.dtype, monkeypatch) -> None:
    """The torch form (what float32 always runs; bf16 where cpu_elementwise.cpp is off, see
    tests/layers/test_cpu_elementwise.py for the fused form)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from radixlm.layers import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "ELEMENTWISE", False)

    hf = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    ours = RMSNorm(64, eps=1e-5).to(dtype)
    w = torch.rand(64).to(dtype) + 0.5
    hf.weight.data.copy_(w)
    ours.weight.data.copy_(w)
    x, r = torch.randn(5, 64).to(dtype), torch.randn(5, 64).to(dtype)
    assert torch.equal(ours(x), hf(x))
    out, res = ours(x, r)
    assert torch.equal(res, r + x) and torch.equal(out, hf(r + x))


def test_unsupported_activation_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="gelu"):
        get_act_and_mul("gelu")


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tensor_parallel_shards_reassemble_the_checkpoint(tp_size: int) -> None:
    """Each rank loads only its slice; the slices put back together are the HF tensors (no distributed needed)."""
    hf, _, cfg = _models("qwen2_bias_sliding")
    state = hf.state_dict()
    ranks = []
    for rank in range(tp_size):
        with torch.device("meta"):
            m = NATIVE_ARCHITECTURES["Qwen2ForCausalLM"](cfg, tp_rank=rank, tp_size=tp_size)
        m.to_empty(device="cpu")
        assert m.load_weights(state.items()) == {n for n, _ in m.named_parameters()}
        ranks.append(dict(m.named_parameters()))
    p = "model.layers.1."
    kv_replicas = max(1, tp_size // cfg.num_key_value_heads)  # a KV head lives on this many consecutive ranks
    q_rows = cfg.num_attention_heads * 16 // tp_size
    kv_rows = max(1, cfg.num_key_value_heads // tp_size) * 16
    qkv = [r[f"{p}self_attn.qkv_proj.weight"] for r in ranks]
    for proj, start, rows, step in [
        ("q", 0, q_rows, 1),
        ("k", q_rows, kv_rows, kv_replicas),
        ("v", q_rows + kv_rows, kv_rows, kv_replicas),
    ]:
        parts = [w[start : start + rows] for w in qkv[::step]]
        assert torch.equal(torch.cat(parts), state[f"{p}self_attn.{proj}_proj.weight"]), proj
        biases = [r[f"{p}self_attn.qkv_proj.bias"][start : start + rows] for r in ranks[::step]]
        assert torch.equal(torch.cat(biases), state[f"{p}self_attn.{proj}_proj.bias"]), proj
    gate_up = [r[f"{p}mlp.gate_up_proj.weight"] for r in ranks]
    half = gate_up[0].shape[0] // 2
    assert torch.equal(torch.cat([g[:half] for g in gate_up]), state[f"{p}mlp.gate_proj.weight"])
    assert torch.equal(torch.cat([g[half:] for g in gate_up]), state[f"{p}mlp.up_proj.weight"])
    for name in (f"{p}self_attn.o_proj.weight", f"{p}mlp.down_proj.weight"):
        assert torch.equal(torch.cat([r[name] for r in ranks], dim=1), state[name])
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(torch.cat([r[name] for r in ranks]), state[name])
