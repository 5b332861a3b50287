"""The core's vision-language plumbing (plugin API 1.9) on tiny real VLMs built in-process (Idefics3 and Gemma 3).

What every method relies on: images read from rows (one line per bad image), TRL's message conversion with
its placeholder check, one prompt through the processor, per-sample inputs batched as the processor batches
them, the online micro-batches carrying them to the log-prob forward, the rollout engine conditioning on them,
``load_pretrained`` returning the processor of a VLM directory, and ``freeze_vision_tower``.
"""

from __future__ import annotations

import io

import pytest
import torch

import posttrain
from posttrain import DataError
from posttrain.testing.tiny_vlm import build_vlm, colour_image, colour_rows, save_tiny_vlm, vlm_family_available

FAMILIES = ["idefics3", "gemma3"]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    model, processor = build_vlm(family=request.param, dtype=torch.float64)
    return request.param, model.eval(), processor


# -- images in rows ---------------------------------------------------------------------------------------


def test_load_image_accepts_pil_paths_bytes_and_dataset_dicts(tmp_path):
    image = colour_image("red", noise=0)
    path = tmp_path / "red.png"
    image.save(path)
    data = path.read_bytes()
    for value in (image.convert("L"), str(path), data, {"bytes": data, "path": None}, {"bytes": None, "path": str(path)}):
        loaded = posttrain.load_image(value, where="row 0")
        assert loaded.mode == "RGB" and loaded.size == (32, 32)


def test_bad_images_are_one_line_naming_the_row(tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cases = [
        ({"images": [None]}, "row 3 of train_dataset, column 'images': the image is missing"),
        ({"images": [str(tmp_path / "nope.png")]}, "does not exist"),
        ({"image": str(broken)}, "column 'image': the image cannot be read"),
        ({"images": [12]}, "an image must be a PIL.Image"),
    ]
    for row, expected in cases:
        with pytest.raises(DataError) as info:
            posttrain.row_images(row, where="row 3 of train_dataset")
        message = str(info.value)
        assert expected in message and "\n" not in message


def test_row_images_reads_both_columns_and_none_for_text_rows():
    assert posttrain.row_images({"prompt": "hi"}) is None
    assert len(posttrain.row_images({"image": colour_image("blue")})) == 1
    assert len(posttrain.row_images({"images": [colour_image("blue"), colour_image("red")]})) == 2
    assert posttrain.image_column(["prompt", "image"]) == "image" and posttrain.image_column(["images", "image"]) == "images"


def test_prepare_multimodal_messages_follows_trl():
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what?"}, {"role": "assistant", "content": "red"}]
    out = posttrain.prepare_multimodal_messages(messages, 2)
    assert out[0]["content"] == [{"type": "text", "text": "be brief"}]
    assert out[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "what?"}]
    assert out[2]["content"] == [{"type": "text", "text": "red"}]
    assert messages[1]["content"] == "what?"  # not modified
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    assert posttrain.prepare_multimodal_messages(parts, 1)[0]["content"] == parts[0]["content"]
    with pytest.raises(DataError, match=r"row 7: the messages have 1 image placeholder\(s\).*but the row has 2 image\(s\)"):
        posttrain.prepare_multimodal_messages(parts, 2, where="row 7")


# -- one prompt through the processor; batching ------------------------------------------------------------


def test_vision_prompt_inputs_expand_the_image_tokens(vlm):
    family, model, processor = vlm
    row = colour_rows(1, format="prompt")[0]
    ids, inputs = posttrain.vision_prompt_inputs(processor, row["prompt"], posttrain.row_images(row))
    image_token = processor.tokenizer.convert_tokens_to_ids({"idefics3": "<image>", "gemma3": "<image_soft_token>"}[family])
    assert ids.count(image_token) == 4  # 4 image tokens per image in the tiny processors
    assert "pixel_values" in inputs and "input_ids" not in inputs
    if family == "gemma3":
        assert inputs["token_type_ids"].shape == (1, len(ids)) and int(inputs["token_type_ids"].sum()) == 4
    with pytest.raises(DataError, match="row 5: the messages have 1 image placeholder"):
        posttrain.vision_prompt_inputs(processor, row["prompt"], [], where="row 5")


def test_collate_pads_trailing_dims_like_the_processor():
    a = {"pixel_values": torch.ones(1, 1, 3, 4, 4), "pixel_attention_mask": torch.ones(1, 1, 4, 4, dtype=torch.long)}
    b = {"pixel_values": torch.ones(1, 2, 3, 4, 4) * 2, "pixel_attention_mask": torch.ones(1, 2, 4, 4, dtype=torch.long)}
    out = posttrain.collate_model_inputs([a, b])
    assert out["pixel_values"].shape == (2, 2, 3, 4, 4) and out["pixel_values"][0, 1].abs().sum() == 0
    assert out["pixel_attention_mask"][0, 1].sum() == 0 and out["pixel_attention_mask"][1].sum() == 32
    qwen_like = [{"pixel_values": torch.ones(16, 8), "image_grid_thw": torch.tensor([[1, 4, 4]])},
                 {"pixel_values": torch.ones(4, 8), "image_grid_thw": torch.tensor([[1, 2, 2]])}]
    out = posttrain.collate_model_inputs(qwen_like)
    assert out["pixel_values"].shape == (20, 8) and out["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 2]]
    assert posttrain.collate_model_inputs([None, {}]) == {}
    with pytest.raises(ValueError, match="some samples have images and others none"):
        posttrain.collate_model_inputs([a, None])
    seq = posttrain.sequence_model_inputs([{"token_type_ids": torch.tensor([[0, 1, 1]])}, {"token_type_ids": torch.tensor([[1, 0]])}], [3, 2], 4, total_width=6)
    assert seq["token_type_ids"].tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]]


def test_batched_forward_equals_one_sample_at_a_time(vlm):
    """Per-sample inputs batched by collate + sequence_model_inputs (left padding) give each sample's own log-probs."""
    family, model, processor = vlm
    rows = colour_rows(3, format="prompt", seed=1)
    per = [posttrain.vision_prompt_inputs(processor, r["prompt"], posttrain.row_images(r)) for r in rows]
    per[1] = posttrain.vision_prompt_inputs(processor, "<|im_start|>user\nlonger text here " + {"idefics3": "<image>", "gemma3": "<start_of_image>"}[family]
                                            + "?<|im_end|>\n<|im_start|>assistant\n", posttrain.row_images(rows[1]))
    completion = processor.tokenizer("red<|im_end|>", add_special_tokens=False)["input_ids"]
    rollout = posttrain.RolloutBatch([p[0] for p in per], [list(completion)] * 3, [[0.0] * len(completion)] * 3, [False] * 3,
                                     extras={"model_inputs": [p[1] for p in per]})
    (batch,) = posttrain.rollout_micro_batches(rollout, 3, processor.tokenizer.pad_token_id)
    assert "model_inputs" not in batch.get("extras", {}) and "pixel_values" in batch["model_inputs"]
    with torch.no_grad():
        logps, _, _ = posttrain.completion_logps(model, batch, 1.0, compute_entropy=False, chunk_size=4)
        for i, (ids, inputs) in enumerate(per):
            full = torch.tensor([ids + completion])
            out = model(input_ids=full, **{k: (torch.cat([v, torch.zeros(1, len(completion), dtype=v.dtype)], 1) if k in posttrain.SEQUENCE_INPUT_KEYS else v)
                                          for k, v in inputs.items()})
            lp = torch.log_softmax(out.logits[0, len(ids) - 1 : -1], -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
            assert torch.allclose(logps[i], lp, atol=1e-9), (family, i, (logps[i] - lp).abs().max())


def test_the_engine_generates_conditioned_on_the_images(vlm):
    family, model, processor = vlm
    tok = processor.tokenizer
    engine = posttrain.RolloutEngine("transformers", model=model, tokenizer=tok)
    rows = [colour_rows(1, format="prompt")[0]] * 2
    ids, inputs = zip(*[posttrain.vision_prompt_inputs(processor, r["prompt"], [colour_image(c)]) for r, c in zip(rows, ("red", "blue"))])
    batch = engine.generate(list(ids), posttrain.SamplingParams(n=2, max_tokens=3, temperature=1.0, seed=0), model_inputs=list(inputs))
    assert len(batch) == 4 and all(1 <= len(c) <= 3 for c in batch.completion_ids)
    # the sampler's log-prob of the first token is the model's, under each prompt's own image, with the image token
    # never sampled (TRL's suppression: its probability is spread over the other tokens)
    image_token = model.config.image_token_id
    with torch.no_grad():
        for j in (0, 2):
            first = batch.completion_ids[j][0]
            out = model(input_ids=torch.tensor([list(ids[j // 2])]), **inputs[j // 2])
            logits = out.logits[0, -1].double()
            assert first != image_token
            lp = torch.log_softmax(logits.index_fill(0, torch.tensor([image_token]), float("-inf")), -1)[first]
            assert abs(float(lp) - batch.logprobs[j][0]) < 1e-5
            assert abs(float(torch.log_softmax(logits, -1)[first]) - batch.logprobs[j][0]) > 1e-6  # the suppression is real


# -- models by name, text-only refusal, freezing ----------------------------------------------------------


def test_load_pretrained_returns_the_processor_of_a_vlm_directory(tmp_path):
    path = save_tiny_vlm(str(tmp_path / "vlm"), family="idefics3")
    model, processor = posttrain.load_pretrained(path)
    assert posttrain.is_vision_model(model) and posttrain.is_processor(processor)
    assert posttrain.processor_tokenizer(processor).pad_token == "<|endoftext|>"
    teacher, tokenizer = posttrain.load_pretrained(path, role="teacher")  # other roles keep the text tokenizer their methods use
    assert posttrain.is_vision_model(teacher) and not posttrain.is_processor(tokenizer) and tokenizer.pad_token == "<|endoftext|>"


def test_image_column_on_a_text_only_model_is_refused():
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    text_model = build_model(build_tokenizer())
    with pytest.raises(DataError, match=r"train_dataset has an image column 'images' \(vision-related data\) but the model \(Qwen2ForCausalLM\) is text-only"):
        posttrain.check_vision_model(text_model, ["prompt", "images"])
    assert posttrain.check_vision_model(text_model, ["prompt"]) is None


def test_freeze_vision_tower_leaves_the_projector_and_language_model_trainable():
    model, _ = build_vlm(family="idefics3")
    tower = posttrain.vision_tower_of(model)
    frozen = posttrain.freeze_vision_tower(model)
    assert frozen == sum(p.numel() for p in tower.parameters()) > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("connector" in n for n in trainable) and any("text_model" in n or "language_model" in n for n in trainable)
    assert not any("vision_model" in n for n in trainable)


def test_qwen2_vl_needs_a_working_torchvision():
    if vlm_family_available("qwen2_vl"):
        model, processor = build_vlm(family="qwen2_vl")
        row = colour_rows(1, format="prompt")[0]
        ids, inputs = posttrain.vision_prompt_inputs(processor, row["prompt"], posttrain.row_images(row))
        assert {"pixel_values", "image_grid_thw"} <= set(inputs)
    else:
        from posttrain.testing.tiny_vlm import build_vlm_processor

        with pytest.raises(RuntimeError, match="needs a working torchvision"):
            build_vlm_processor("qwen2_vl")


def test_image_bytes_round_trip_through_a_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    buffer = io.BytesIO()
    colour_image("green").save(buffer, format="PNG")
    ds = datasets.Dataset.from_dict({"prompt": ["x"], "images": [[{"bytes": buffer.getvalue(), "path": None}]]})
    (image,) = posttrain.row_images(ds[0])
    assert image.getpixel((0, 0)) == (30, 200, 40)


def test_qwen2_vl_model_path_without_its_processor():
    """Qwen2-VL's layout (patch-flattened ``pixel_values``, ``image_grid_thw``, M-RoPE positions from the image grid) through
    the same plumbing, on this machine: its processor needs torchvision, so the inputs come from its PIL image processor
    and the image tokens are expanded here as Qwen2VLProcessor does (4 per 56 x 56 image)."""
    import types

    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    from posttrain.testing.tiny_model import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    model, _ = build_vlm(types.SimpleNamespace(tokenizer=tok), family="qwen2_vl", dtype=torch.float64)
    model.eval()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)

    def prompt(colour: str, text: str):
        inputs = dict(image_processor(images=[colour_image(colour, size=56)], return_tensors="pt"))
        n = int(inputs["image_grid_thw"].prod()) // 4  # merge_size ** 2 patches per image token
        ids = tok("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n + f"<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n",
                  add_special_tokens=False)["input_ids"]
        image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
        inputs["mm_token_type_ids"] = torch.tensor([[1 if t == image_pad else 0 for t in ids]])  # token-aligned, as the processor gives
        return ids, {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}

    per = [prompt("red", "What colour?"), prompt("blue", "What colour is this image, please?"), prompt("green", "Colour?")]
    assert per[0][1]["pixel_values"].shape == (16, 1176) and per[0][1]["image_grid_thw"].tolist() == [[1, 4, 4]]
    completion = tok("red<|im_end|>", add_special_tokens=False)["input_ids"]
    rollout = posttrain.RolloutBatch([p[0] for p in per], [list(completion)] * 3, [[0.0] * len(completion)] * 3, [False] * 3,
                                     extras={"model_inputs": [p[1] for p in per]})
    (batch,) = posttrain.rollout_micro_batches(rollout, 3, tok.pad_token_id)  # left-padded prompts of different lengths
    assert batch["model_inputs"]["pixel_values"].shape == (48, 1176) and batch["model_inputs"]["image_grid_thw"].shape == (3, 3)
    with torch.no_grad():
        logps, _, _ = posttrain.completion_logps(model, batch, 1.0, compute_entropy=False, chunk_size=4)
        for i, (ids, inputs) in enumerate(per):
            full = {**inputs, "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(completion), dtype=torch.long)], 1)}
            out = model(input_ids=torch.tensor([ids + completion]), **full)
            lp = torch.log_softmax(out.logits[0, len(ids) - 1 : -1], -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
            assert torch.allclose(logps[i], lp, atol=1e-9), (i, (logps[i] - lp).abs().max())
        engine = posttrain.RolloutEngine("transformers", model=model, tokenizer=tok)
        sampled = engine.generate([per[0][0], per[1][0]], posttrain.SamplingParams(n=2, max_tokens=3, temperature=1.0, seed=0),
                                  model_inputs=[per[0][1], per[1][1]])
        assert len(sampled) == 4
        for j in (0, 2):  # M-RoPE generation through generate: the first token's log-prob is the model's, image token suppressed
            ids, inputs = per[j // 2]
            logits = model(input_ids=torch.tensor([ids]), **inputs).logits[0, -1].double()
            masked = logits.index_fill(0, torch.tensor([model.config.image_token_id, model.config.video_token_id]), float("-inf"))
            first = sampled.completion_ids[j][0]
            assert abs(float(torch.log_softmax(masked, -1)[first]) - sampled.logprobs[j][0]) < 1e-5


def test_image_token_ids_and_undecoded_columns(tmp_path):
    model, processor = build_vlm(family="gemma3")
    tok = processor.tokenizer
    ids = set(posttrain.image_token_ids(processor, model))
    assert {tok.convert_tokens_to_ids(t) for t in ("<image_soft_token>", "<start_of_image>", "<end_of_image>")} <= ids
    assert tok.convert_tokens_to_ids("<|im_end|>") not in ids
    model, processor = build_vlm(family="idefics3")
    assert processor.tokenizer.convert_tokens_to_ids("<fake_token_around_image>") in posttrain.image_token_ids(processor, model)

    datasets = pytest.importorskip("datasets")
    path = tmp_path / "red.png"
    colour_image("red").save(path)
    ds = datasets.Dataset.from_dict({"images": [[str(path)]]}).cast_column("images", datasets.Sequence(datasets.Image()))
    raw = posttrain.undecoded_image_columns(ds)[0]["images"][0]
    assert isinstance(raw, dict) and raw["path"] == str(path)  # read without decoding
    (image,) = posttrain.row_images(posttrain.undecoded_image_columns(ds)[0])
    assert image.size == (32, 32)
    posttrain.check_images_present([str(path), raw], "row 0")
    with pytest.raises(DataError, match=r"row 4, image 1: the image is missing"):
        posttrain.check_images_present([str(path), None], "row 4")
    with pytest.raises(DataError, match=r"row 4, image 0: the image file .* does not exist"):
        posttrain.check_images_present([str(tmp_path / "gone.png")], "row 4")
