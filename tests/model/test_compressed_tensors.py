"""compressed-tensors checkpoints written here by the compressed-tensors library's own compressors from the
tiny random Qwen2: pack-quantized int4 (symmetric and not), pack-quantized int8 (W8A16), int-quantized
int8 and float-quantized fp8. Each loads and runs; greedy tokens equal transformers' own on the same
checkpoint in float32 (transformers decompresses it on CPU through the library); the kernels' weights equal
the library's decompression exactly, and the log names what was dequantized rather than repacked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixlm.config import EngineConfig
from radixlm.core.engine_core import EngineCore
from radixlm.messages import ModelLoadError
from radixlm.model.quantization.int4 import Int4Weight
from radixlm.model.quantization.int8 import Int8Weight
from radixlm.testing import cached_model_folder
from tests.parity_utils import assert_greedy_match, drive_core, hf_greedy, random_prompts

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _qparams(w: torch.Tensor, args: QuantizationArgs) -> dict[str, torch.Tensor]:
    """weight_scale (and weight_zero_point) for w, as an observer would give them (min-max)."""
    if args.type == "float":
        return {"weight_scale": w.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max}
    cols = w.shape[1] if args.strategy == "channel" else args.group_size
    g = w.view(w.shape[0], -1, cols)
    levels = 2**args.num_bits - 1
    if args.symmetric:
        return {"weight_scale": g.abs().amax(-1) / (levels / 2)}
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    scale = (hi - lo) / levels
    zp = (torch.round(-lo / scale) - 2 ** (args.num_bits - 1)).clamp(-(2 ** (args.num_bits - 1)), levels // 2)
    return {"weight_scale": scale, "weight_zero_point": zp.to(torch.int8)}


def write_checkpoint(out: Path, fmt: str, args: QuantizationArgs) -> dict[str, torch.Tensor]:
    """The tiny Qwen2 with every decoder linear compressed by the library's `fmt` compressor; returns the
    library's own decompression of each (checkpoint name -> float weight)."""
    src = cached_model_folder("qwen2", "tiny")
    shutil.copytree(src, out)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    compressor = BaseCompressor.get_value_from_registry(fmt)
    state, reference = {}, {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        stem, _, kind = name.rpartition(".")
        if kind == "weight" and stem.rsplit(".", 1)[-1] in LINEARS:
            packed = compressor.compress({"weight": t.float(), **_qparams(t.float(), args)}, scheme)
            state.update({f"{stem}.{k}": v.contiguous() for k, v in packed.items()})
            reference[name] = compressor.decompress(dict(packed), scheme)["weight"].float()
        else:
            state[name] = t
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # The float checkpoint holding the library's decompression: the oracle where transformers cannot run
    # the compressed one (its CT loader expects asymmetric zero points unpacked, which this library
    # version packs).
    shutil.copytree(src, out.with_name(out.name + "-dense"))
    dense = {n: reference.get(n, t) for n, t in load_file(str(src / "model.safetensors")).items()}
    save_file(dense, str(out.with_name(out.name + "-dense") / "model.safetensors"), metadata={"format": "pt"})
    qc = QuantizationConfig(
        config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"], quantization_status="compressed"
    )
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qc.model_dump(mode="json")
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return reference


CASES = {
    "int4-sym-g32": ("pack-quantized", dict(num_bits=4, symmetric=True, strategy="group", group_size=32), Int4Weight),
    "int4-asym-g32": ("pack-quantized", dict(num_bits=4, symmetric=False, strategy="group", group_size=32), Int4Weight),
    "int4-channel": ("pack-quantized", dict(num_bits=4, symmetric=True, strategy="channel"), Int4Weight),
    "w8a16-packed": ("pack-quantized", dict(num_bits=8, symmetric=True, strategy="channel"), Int8Weight),
    "int8-quantized": ("int-quantized", dict(num_bits=8, symmetric=True, strategy="channel"), Int8Weight),
    "int8-groups": ("pack-quantized", dict(num_bits=8, symmetric=True, strategy="group", group_size=32), None),
    "fp8-channel": ("float-quantized", dict(num_bits=8, type="float", symmetric=True, strategy="channel"), None),
}  # fmt: skip


def _core(path: Path, impl: str = "native") -> EngineCore:
    return EngineCore(
        EngineConfig(
            model_path=str(path), model_impl=impl, dtype="float32", inline_core=True, linear_kernel="dense"
        )
    )


# One case of each kernel path in CI; the rest (same code, other schemes) behind the slow marker.
FAST = ("int4-asym-g32", "w8a16-packed")


@pytest.mark.parametrize("case", [c if c in FAST else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_compressed_tensors_checkpoint_matches_transformers(tmp_path, case) -> None:
    fmt, kw, kernel = CASES[case]
    reference = write_checkpoint(tmp_path / case, fmt, QuantizationArgs(**kw))
    impl = "transformers" if case == "int4-asym-g32" else "native"  # one case through the other backend
    core = _core(tmp_path / case, impl)
    info = core.model_info()
    assert info.quantization == "compressed-tensors"
    summary = core.runner.quant_report.summary()
    packed = {
        n: m.quant for n, m in core.runner.model.named_modules() if getattr(m, "quant", None) is not None
    }
    if kernel is None:  # fp8 / grouped int8: dequantized at load, and the log says so
        assert not packed and "dequantized at load" in summary, summary
    else:
        n_layers = core.runner.text_config.num_hidden_layers
        assert len(packed) == n_layers * (4 if impl == "native" else 7), summary  # every decoder linear
        assert all(isinstance(q, kernel) for q in packed.values())
        mapping = getattr(core.runner.model, "packed_modules_mapping", {})
        for name, q in packed.items():
            # Our linear's rows are its checkpoint pieces' rows (fused q/k/v, gate/up), in layer order.
            stem = name.removeprefix("hf.")
            leaf = stem.rpartition(".")[2]
            pieces = [c for c, (p, _) in mapping.items() if p == leaf] or [leaf]
            order = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "gate_proj": 0, "up_proj": 1}
            pieces.sort(key=lambda c: order.get(c, 0))
            ref = torch.cat([reference[stem[: -len(leaf)] + c + ".weight"] for c in pieces])
            torch.testing.assert_close(q.dequantize(), ref, rtol=0, atol=1e-6)
    prompts = random_prompts(core.runner.vocab_size, [4, 17], seed=5)
    params = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    ours = drive_core(core, prompts, params)["ids"]
    for prompt, got in zip(prompts, ours):
        ref_ids, margins = hf_greedy(tmp_path / f"{case}-dense", prompt, 10)
        assert_greedy_match(got, ref_ids, margins, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["int4-sym-g32", "w8a16-packed", "fp8-channel"])
def test_transformers_runs_the_same_compressed_checkpoint(tmp_path, case) -> None:
    """transformers' own compressed-tensors load (the library decompresses on CPU) is the oracle too."""
    fmt, kw, _ = CASES[case]
    write_checkpoint(tmp_path / case, fmt, QuantizationArgs(**kw))
    core = _core(tmp_path / case)
    prompts = random_prompts(core.runner.vocab_size, [4, 17], seed=5)
    ours = drive_core(core, prompts, {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True})["ids"]
    for prompt, got in zip(prompts, ours):
        ref_ids, margins = hf_greedy(tmp_path / case, prompt, 10)
        assert_greedy_match(got, ref_ids, margins, case)


def test_compressed_tensors_refusals(tmp_path) -> None:
    write_checkpoint(
        tmp_path / "c", "pack-quantized", QuantizationArgs(num_bits=4, strategy="group", group_size=32)
    )
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format"] = "nvfp4-pack-quantized"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(
        ModelLoadError, match=r"format 'nvfp4-pack-quantized' .* not supported; supported formats"
    ):
        _core(tmp_path / "c")
    cfg["quantization_config"]["format"] = "pack-quantized"
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="int 2-bit weights in format 'pack-quantized'"):
        _core(tmp_path / "c")
    with pytest.raises(ModelLoadError, match=r"'awq' was asked for.*says 'compressed-tensors'"):
        EngineCore(EngineConfig(model_path=str(tmp_path / "c"), inline_core=True, quantization="awq"))
