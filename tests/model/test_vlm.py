"""Vision-language models through the Transformers backend (LLaVA, Gemma 3, Qwen2-VL), against transformers.

The oracle is transformers' `generate` on the same folder with the same processor inputs (fp32): the
greedy tokens must be identical and each token's logprob within 1e-4. Logprobs matter because the tiny
models' greedy tokens survive small errors: dropping Gemma 3's bidirectional image mask keeps the tokens
here but moves the logprobs by 0.27 (measured), so only the logprob check catches it. Likewise Qwen2-VL with
1-D positions instead of its M-RoPE rows (test_qwen2_vl_without_mrope_is_caught).
"""

from __future__ import annotations

import base64
import io

import pytest
import torch

from radixlm import Engine
from radixlm.core.images import check_images, fit_image_blocks, image_key_ids
from radixlm.frontend.multimodal import load_image, placeholder_runs
from radixlm.model.loader import ModelLoadError
from radixlm.model.mrope import span_rows
from radixlm.testing.vlm_models import cached_vlm_folder, random_image

LOGPROB_TOL = 1e-4
MAX_NEW = 6


ARCHS = ["llava", "gemma3", "qwen2_vl"]


def _processor(arch: str, folder):
    """The processor radixlm's front loads (frontend/multimodal.ImageProcessor): Qwen2-VL's without its
    torchvision video processor, the others through AutoProcessor."""
    from transformers import AutoProcessor

    from radixlm.frontend.qwen2_vl_processor import IMAGE_ONLY_PROCESSOR_TYPES, image_only_processor

    if arch in IMAGE_ONLY_PROCESSOR_TYPES:
        return image_only_processor(folder, arch)
    return AutoProcessor.from_pretrained(folder)


def _engine(arch: str, **options) -> Engine:
    return Engine(
        model_path=str(cached_vlm_folder(arch)),
        dtype="float32",
        device="cpu",
        max_total_tokens=4096,
        inline_core=True,
        log_level="warning",
        **options,
    )


@pytest.fixture(scope="module", params=ARCHS)
def vlm(request):
    arch = request.param
    from transformers import AutoModelForImageTextToText

    folder = cached_vlm_folder(arch)
    processor = _processor(arch, folder)
    hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    with _engine(arch) as llm:
        yield arch, processor, hf, llm


def _hf_greedy(processor, hf, text: str, images: list) -> tuple[list[int], list[float]]:
    inputs = processor(text=text, images=images or None, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(
            **inputs,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    ids = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
    lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, ids)]
    return ids, lps


def _ours(llm: Engine, text: str, images: list, **kw) -> dict:
    return llm.generate(
        text, {"max_new_tokens": MAX_NEW, "temperature": 0}, image_data=images, return_logprob=True, **kw
    )


def _assert_matches(result: dict, ref: tuple[list[int], list[float]], label: str) -> None:
    ids, lps = ref
    assert result["output_ids"] == ids, f"{label}: tokens {result['output_ids']} != transformers' {ids}"
    ours = [x[0] for x in result["meta_info"]["output_token_logprobs"]]
    worst = max(abs(a - b) for a, b in zip(ours, lps))
    assert worst < LOGPROB_TOL, f"{label}: logprobs differ from transformers' by {worst:.3g}"


def _model(llm: Engine):
    return llm._client.core.runner.model


def test_greedy_matches_transformers(vlm):
    arch, processor, hf, llm = vlm
    tok = processor.image_token
    cases = [
        (f"hello {tok} what is this picture about", [random_image(1)]),
        (f"describe {tok} in a few words please", [random_image(2)]),
        (f"first {tok} and then {tok} compared", [random_image(3), random_image(4)]),  # two images
        (f"wide {tok} then tall {tok} ok", [random_image(5, (64, 32)), random_image(6, (32, 64))]),
        ("no image at all here", []),  # the VLM's text path
    ]
    for text, images in cases:
        _assert_matches(
            _ours(llm, text, images), _hf_greedy(processor, hf, text, images), f"{arch}: {text!r}"
        )


def test_images_change_the_output(vlm):
    """The features reach the model: another image gives other logprobs (or the parity test proves little)."""
    arch, processor, _, llm = vlm
    text = f"hello {processor.image_token} what is this picture about"
    a = _ours(llm, text, [random_image(1)])["meta_info"]["output_token_logprobs"]
    b = _ours(llm, text, [random_image(9)])["meta_info"]["output_token_logprobs"]
    assert a != b


def test_same_image_hits_the_cache_and_skips_the_vision_tower(vlm):
    arch, processor, _, llm = vlm
    llm.flush_cache()
    model = _model(llm)
    text = f"again {processor.image_token} tell me what you see"
    image = random_image(5)
    first = _ours(llm, text, [image])
    model._features.clear()  # the tower would have to run again if a span covered the image
    runs = model.vision_runs
    second = _ours(llm, text, [image])
    assert second["output_ids"] == first["output_ids"]
    ids = processor(text=text, images=[image], return_tensors="pt")["input_ids"][0].tolist()
    image_end = max(i for i, t in enumerate(ids) if t == model.image_token_id) + 1
    assert first["meta_info"]["cached_tokens"] == 0
    assert second["meta_info"]["cached_tokens"] >= image_end  # the hit covers the whole image
    assert model.vision_runs == runs, "a prefix hit over the image ran the vision tower"


def test_different_images_never_share_the_cache(vlm):
    arch, processor, _, llm = vlm
    llm.flush_cache()
    model = _model(llm)
    text = f"which {processor.image_token} is this one"
    _ours(llm, text, [random_image(6)])
    other = _ours(llm, text, [random_image(7)])
    ids = processor(text=text, images=[random_image(7)], return_tensors="pt")["input_ids"][0].tolist()
    image_start = ids.index(model.image_token_id)
    assert 0 < other["meta_info"]["cached_tokens"] <= image_start  # the text before the image, no more


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [3, 7])
def test_chunked_prefill_through_an_image(arch, chunk):
    """LLaVA: chunks cut through the image and slice features computed once. Gemma 3: a chunk never ends
    inside an image block (its tokens attend both ways), so chunks end before it or run past it.
    Qwen2-VL: each chunk reads its slice of the prompt's M-RoPE rows."""
    from transformers import AutoModelForImageTextToText

    folder = cached_vlm_folder(arch)
    processor = _processor(arch, folder)
    hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    text = f"a {processor.image_token} b {processor.image_token} tail words"
    images = [random_image(11), random_image(12)]
    with _engine(arch, chunked_prefill_size=chunk) as llm:
        result = _ours(llm, text, images)
        assert _model(llm).vision_runs == 2  # once per image, however many chunks cover it
    _assert_matches(result, _hf_greedy(processor, hf, text, images), f"{arch} chunk {chunk}")


def test_image_data_forms(tmp_path):
    """A path, a file:// URL, a data URL, bytes and a PIL image are the same image; http(s) is refused."""
    image = random_image(3)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    path = tmp_path / "x.png"
    path.write_bytes(buf.getvalue())
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    expected = image.tobytes()
    for source in (str(path), path.as_uri(), data_url, buf.getvalue(), image):
        assert load_image(source).tobytes() == expected
    with pytest.raises(ValueError, match="allow-image-urls"):
        load_image("https://example.com/cat.png")
    with pytest.raises(ValueError, match="no image file"):
        load_image(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="base64"):
        load_image("data:image/png,rawtext")


def test_engine_generate_takes_a_path(tmp_path):
    path = tmp_path / "img.png"
    random_image(1).save(path)
    with _engine("llava") as llm:
        text = "hello <image> what is this picture about"
        from_path = _ours(llm, text, str(path))
        from_pil = _ours(llm, text, [random_image(1)])
    assert from_path["output_ids"] == from_pil["output_ids"]


def test_text_model_refuses_images():
    from radixlm.testing.model_folders import cached_model_folder

    with Engine(
        model_path=str(cached_model_folder("qwen2")), dtype="float32", inline_core=True, log_level="warning"
    ) as llm:
        with pytest.raises(ValueError, match="image_data"):
            llm.generate("hi", {"max_new_tokens": 2}, image_data=random_image(1))
        with pytest.raises(ValueError, match="image_url"):
            llm.chat(
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}],
                {"max_new_tokens": 2},
            )


def test_qwen2_5_vl_is_refused_by_name():
    import transformers

    from radixlm.model.transformers_backend.multimodal import vlm_model_class

    with pytest.raises(ModelLoadError, match="qwen2_5_vl.*M-RoPE"):
        vlm_model_class(transformers.Qwen2_5_VLConfig())


def test_mrope_span_rows():
    """A span's slice of the prompt's rows; past the prompt, the 1-D position + delta in all three rows."""
    # text, a 2x2 image grid (t, h, w) starting at position 1, text again at 3: 6 tokens, delta 4 - 6
    rows = [[0, 1, 1, 1, 1, 3], [0, 1, 1, 2, 2, 3], [0, 1, 2, 1, 2, 3]]
    mrope = (rows, -2)
    assert span_rows(mrope, 0, 6) == rows
    assert span_rows(mrope, 2, 2) == [[1, 1], [1, 2], [2, 1]]  # a chunk inside the image
    assert span_rows(mrope, 6, 1) == [[4], [4], [4]]  # decode: 6 + delta
    assert span_rows(mrope, 5, 3) == [[3, 4, 5], [3, 4, 5], [3, 4, 5]]  # across the prompt's end


def test_qwen2_vl_checks_each_image_grid(vlm):
    """An image's image_grid_thw must give its placeholder count (t*h*w / merge^2), or the request is refused
    by name before the M-RoPE rows are built."""
    arch, _, _, llm = vlm
    if arch != "qwen2_vl":
        pytest.skip("only Qwen2-VL's positions come from the image grid")
    from radixlm.frontend.multimodal import tensor_to_wire

    model = _model(llm)
    grid = {"image_grid_thw": tensor_to_wire(torch.tensor([[1, 4, 6]]))}
    assert [g.tolist() for g in model.check_image_grids([{"length": 6, "tensors": grid}])] == [[1, 4, 6]]
    with pytest.raises(ValueError, match=r"images\[0\]: image_grid_thw \[1, 4, 6\] does not give its 5"):
        model.check_image_grids([{"length": 5, "tensors": grid}])
    with pytest.raises(ValueError, match="needs the processor's image_grid_thw"):
        model.check_image_grids([{"length": 6, "tensors": {}}])


def test_qwen2_vl_without_mrope_is_caught(vlm, monkeypatch):
    """The control for Qwen2-VL's parity: 1-D positions in all three rows (what the runner gave before
    M-RoPE) move the logprobs far past the tolerance, so the parity test sees the 3-D positions."""
    arch, processor, hf, llm = vlm
    if arch != "qwen2_vl":
        pytest.skip("only Qwen2-VL uses M-RoPE")
    import radixlm.model.forward_batch as forward_batch

    text = f"wide {processor.image_token} then tall {processor.image_token} ok"
    images = [random_image(5, (64, 32)), random_image(6, (32, 64))]
    llm.flush_cache()
    monkeypatch.setattr(forward_batch, "step_rows", lambda spans: None)
    try:
        result = _ours(llm, text, images)
    finally:
        monkeypatch.undo()
        llm.flush_cache()  # later tests may not reuse KV computed with the wrong positions
    ours = [x[0] for x in result["meta_info"]["output_token_logprobs"]]
    _, ref = _hf_greedy(processor, hf, text, images)
    assert max(abs(a - b) for a, b in zip(ours, ref)) > 100 * LOGPROB_TOL


def test_image_key_ids_and_blocks():
    images = [{"offset": 2, "length": 3, "hash": 12345, "bidirectional": True, "tensors": {}}]
    ids = [5, 6, 9, 9, 9, 7]
    key = image_key_ids(ids, images, vocab_size=100)
    assert key[:2] == [5, 6] and key[5] == 7 and len(set(key[2:5])) == 1 and key[2] >= 100
    other = image_key_ids(ids, [{**images[0], "hash": 54321}], vocab_size=100)
    assert other[2] != key[2]
    assert ids == [5, 6, 9, 9, 9, 7]  # not changed in place
    # A span never ends inside a bidirectional block: before it, or past it when it starts at / in it.
    assert fit_image_blocks(images, 0, 3) == 2
    assert fit_image_blocks(images, 0, 5) == 5
    assert fit_image_blocks(images, 2, 1) == 3
    assert fit_image_blocks(images, 3, 1) == 2  # a prefix hit ended inside the block: run to its end
    assert fit_image_blocks([{**images[0], "bidirectional": False}], 0, 3) == 3


def test_check_images_refuses_bad_entries():
    good = {"offset": 1, "length": 2, "hash": 1, "bidirectional": False, "tensors": {}}
    check_images([good], [0, 9, 9, 0], {9})
    with pytest.raises(ValueError, match="takes no images"):
        check_images([good], [0, 9, 9, 0], None)
    with pytest.raises(ValueError, match="image token"):
        check_images([good], [0, 9, 8, 0], {9})
    with pytest.raises(ValueError, match="inside the prompt"):
        check_images([{**good, "length": 5}], [0, 9, 9, 0], {9})
    with pytest.raises(TypeError, match="hash"):
        check_images([{**good, "hash": "x"}], [0, 9, 9, 0], {9})


def test_placeholder_runs():
    assert placeholder_runs([1, 9, 9, 2, 9, 9], 9, 2) == [(1, 2), (4, 2)]
    assert placeholder_runs([1, 9, 9, 9, 9], 9, 2) == [(1, 2), (3, 2)]  # side by side: split evenly
    with pytest.raises(ValueError, match="image_data"):
        placeholder_runs([1, 9, 9, 2], 9, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_check_model_verdict(arch):
    from radixlm.check_model import inspect

    fields = dict(inspect(str(cached_vlm_folder(arch))).lines)
    assert fields["verdict"] == "runs"
    assert fields["images"].startswith("yes: transformers' vision tower")
    assert ("both ways" in fields["images"]) == (arch == "gemma3")
    assert fields["tensor parallel"].startswith("tp_size 1 ")  # the vision tower is not split


def test_check_model_refuses_qwen2_5_vl(tmp_path):
    import transformers
    from safetensors.torch import save_file

    from radixlm.check_model import inspect

    transformers.Qwen2_5_VLConfig(architectures=["Qwen2_5_VLForConditionalGeneration"]).save_pretrained(
        tmp_path
    )
    save_file({}, str(tmp_path / "model.safetensors"))  # the refusal comes from the config, not the weights
    fields = dict(inspect(str(tmp_path)).lines)
    assert "M-RoPE" in fields["verdict"]


def test_chat_image_url_parts_through_the_processor_template(vlm):
    """Engine.chat with OpenAI image_url parts: the processor's chat template places the image."""
    arch, processor, hf, llm = vlm
    image = random_image(8)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": url}}],
        }
    ]
    result = llm.chat(messages, {"max_new_tokens": MAX_NEW, "temperature": 0}, return_logprob=True)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert processor.image_token in text
    ref_ids, ref_lps = _hf_greedy(processor, hf, text, [image])
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    n = ref_ids.index(eos) + 1 if eos in ref_ids else len(ref_ids)  # the chat stops at the turn's end
    _assert_matches(result, (ref_ids[:n], ref_lps[:n]), f"{arch} chat")


def test_gemma3_without_its_image_mask_is_caught(vlm):
    """The control for the parity test: attending causally inside Gemma 3's images (what transformers does
    without token_type_ids) moves the logprobs far past the tolerance, so the parity test sees the mask."""
    arch, processor, hf, llm = vlm
    if arch != "gemma3":
        pytest.skip("only Gemma 3's images attend both ways")
    text = f"hello {processor.image_token} what is this picture about"
    images = [random_image(1)]
    model = _model(llm)
    model.bidirectional_images = False
    llm.flush_cache()  # an earlier test cached this prompt's KV with the mask
    try:
        result = _ours(llm, text, images)
    finally:
        model.bidirectional_images = True
        llm.flush_cache()  # nor may later tests reuse KV computed without it
    ours = [x[0] for x in result["meta_info"]["output_token_logprobs"]]
    _, ref = _hf_greedy(processor, hf, text, images)
    assert max(abs(a - b) for a, b in zip(ours, ref)) > 100 * LOGPROB_TOL
