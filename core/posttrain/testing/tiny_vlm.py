"""Tiny vision-language models and processors built in-process (no downloads), and a task they can learn.

Three real transformers architectures, randomly initialised at a few tens of thousands of parameters:

* ``"idefics3"``: Idefics3 (the architecture of SmolVLM): ``pixel_values (B, images, C, H, W)`` and
  ``pixel_attention_mask``; an image is ``<fake_token_around_image><global-img><image>x4<fake_token_around_image>``.
* ``"gemma3"``: Gemma 3: ``pixel_values (images, C, H, W)`` and ``token_type_ids`` (1 at image tokens,
  which attend to each other bidirectionally).
* ``"qwen2_vl"``: Qwen2-VL: ``pixel_values (patches, dim)``, ``image_grid_thw`` and M-RoPE. Its
  processor needs a working ``torchvision`` (its video processor); :func:`vlm_family_available`
  says whether this environment has one (the CPU test environment does not: PyPI's torchvision
  wheels are built against CUDA torch).

Each processor is saved to a directory and loads with ``AutoProcessor.from_pretrained``; each model
with ``AutoModelForImageTextToText.from_pretrained``. The task: :func:`colour_rows` -- solid-colour
images, "What colour is this image?", answered with the colour's name.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["VLM_FAMILIES", "COLOURS", "vlm_family_available", "build_vlm_processor", "build_vlm", "save_tiny_vlm", "colour_image", "colour_rows", "main"]

VLM_FAMILIES = ("idefics3", "gemma3", "qwen2_vl")

#: The colours of :func:`colour_rows` (names in the tiny tokenizer's corpus) and their RGB values.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}

_PLACEHOLDER = {
    "idefics3": "<image>",
    "gemma3": "<start_of_image>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}


def _template(placeholder: str) -> str:
    """A ChatML template whose contents may be strings or lists of ``image`` / ``text`` parts, with generation markers."""
    content = (
        "{%- if message['content'] is string %}{{- message['content'] }}"
        "{%- else %}{%- for part in message['content'] %}"
        "{%- if part['type'] == 'image' %}{{- '" + placeholder + "' }}"
        "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
        "{%- endfor %}{%- endif %}"
    )
    return (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}{%- generation %}" + content + "{{- '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}" + content + "{{- '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def vlm_family_available(family: str) -> bool:
    """Whether :func:`build_vlm_processor` can build ``family``'s processor here (Qwen2-VL needs a working torchvision)."""
    if family not in VLM_FAMILIES:
        raise ValueError(f"family={family!r}: use one of {VLM_FAMILIES}.")
    if family != "qwen2_vl":
        return True
    try:
        import torchvision  # noqa: F401  (a CUDA build beside CPU torch fails here: 'operator torchvision::nms does not exist')
        from transformers.models.qwen2_vl import Qwen2VLVideoProcessor

        Qwen2VLVideoProcessor()
    except Exception:
        return False
    return True


def build_vlm_processor(family: str = "idefics3", *, seed: int = 0) -> Any:
    """Return a processor for ``family`` over the tiny byte-level BPE tokenizer (``posttrain.testing.build_tokenizer``).

    Images are resized to 32 x 32 (Idefics3, Gemma 3) or 56 x 56 (Qwen2-VL) pixels; every image
    becomes 4 image tokens in the text.

    Raises:
        ValueError: Unknown family.
        RuntimeError: ``qwen2_vl`` without a working torchvision (see :func:`vlm_family_available`).
    """
    from transformers import PreTrainedTokenizerFast

    from posttrain.testing.tiny_model import build_tokenizer

    if not vlm_family_available(family):
        raise RuntimeError("build_vlm_processor('qwen2_vl'): Qwen2VLProcessor needs a working torchvision (for its video processor); "
                           "this environment has none (or a CUDA build beside CPU torch). Use 'idefics3' or 'gemma3'.")
    base = build_tokenizer(seed=seed)
    template = _template(_PLACEHOLDER[family])
    if family == "idefics3":
        from transformers.models.idefics3 import Idefics3ImageProcessorPil, Idefics3Processor

        image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
        return Idefics3Processor(image_processor=image_processor, tokenizer=base, image_seq_len=4, chat_template=template)
    if family == "gemma3":
        from transformers.models.gemma3 import Gemma3ImageProcessorPil, Gemma3Processor

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=base.backend_tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=2048,
            extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        )
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
        tokenizer.chat_template = template
        return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
                               image_seq_length=4, chat_template=template)
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    base.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
    base.chat_template = template
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=base, video_processor=Qwen2VLVideoProcessor(), chat_template=template)


def _text_config(tokenizer: Any, hidden_size: int, num_layers: int) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=True)


def build_vlm(processor: Any = None, *, family: str = "idefics3", hidden_size: int = 32, num_layers: int = 2, seed: int = 0, dtype: Any = None) -> tuple[Any, Any]:
    """Return ``(model, processor)``: a randomly initialised tiny vision-language model of ``family`` and its processor.

    Args:
        processor: A processor from :func:`build_vlm_processor` (built when None).
        family: ``"idefics3"``, ``"gemma3"`` or ``"qwen2_vl"``.
        hidden_size / num_layers: The language model's size (the vision tower: 1 layer, width 32).
        seed: The initialisation seed.
        dtype: ``torch.float64`` for equivalence tests (default float32).
    """
    import torch
    import transformers

    processor = processor if processor is not None else build_vlm_processor(family)
    tok = processor.tokenizer
    text = _text_config(tok, hidden_size, num_layers)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if family == "idefics3":
        config = transformers.Idefics3Config(
            text_config={"model_type": "llama", **text}, vision_config={**vision, "image_size": 32, "patch_size": 8},
            scale_factor=2, image_token_id=processor.image_token_id, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        )
        cls = transformers.Idefics3ForConditionalGeneration
    elif family == "gemma3":
        config = transformers.Gemma3Config(
            text_config={**text, "head_dim": hidden_size // 4, "sliding_window": 64},
            vision_config={**vision, "image_size": 32, "patch_size": 8}, mm_tokens_per_image=4,
            image_token_id=tok.image_token_id, boi_token_index=tok.boi_token_id, eoi_token_index=tok.eoi_token_id,
        )
        cls = transformers.Gemma3ForConditionalGeneration
    elif family == "qwen2_vl":
        ids = tok.convert_tokens_to_ids
        config = transformers.Qwen2VLConfig(
            text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}},
            vision_config={"depth": 1, "embed_dim": 32, "hidden_size": hidden_size, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
                           "spatial_merge_size": 2, "temporal_patch_size": 2},
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
            vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True,
        )
        cls = transformers.Qwen2VLForConditionalGeneration
    else:
        raise ValueError(f"family={family!r}: use one of {VLM_FAMILIES}.")
    config.pad_token_id = tok.pad_token_id
    config.eos_token_id = tok.eos_token_id
    torch.manual_seed(seed)
    model = cls(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    if dtype is not None:
        model = model.to(dtype)
    return model, processor


def save_tiny_vlm(out_dir: str, *, family: str = "idefics3", hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> str:
    """Write a tiny VLM and its processor to ``out_dir`` (loads with ``AutoModelForImageTextToText`` / ``AutoProcessor``); return ``out_dir``."""
    model, processor = build_vlm(family=family, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def colour_image(name: str, *, size: int = 32, noise: int = 0, seed: int = 0) -> Any:
    """A solid image of colour ``name`` (:data:`COLOURS`), each pixel jittered by up to ``noise`` per channel."""
    from PIL import Image

    r, g, b = COLOURS[name]
    if not noise:
        return Image.new("RGB", (size, size), (r, g, b))
    rng = random.Random(seed)
    data = bytes(max(0, min(255, c + rng.randint(-noise, noise))) for _ in range(size * size) for c in (r, g, b))
    return Image.frombytes("RGB", (size, size), data)


def colour_rows(n: int, *, seed: int = 0, format: str = "prompt-completion", size: int = 32, noise: int = 20) -> list[dict]:
    """``n`` rows of the colour task: a solid-colour image and "What colour is this image?", answered with the colour.

    Args:
        n: Rows.
        seed: Draws the colours and the pixel noise.
        format: ``"prompt-completion"`` (conversational ``prompt`` / ``completion`` + ``images``),
            ``"messages"`` (one conversation + ``images``), ``"preference"`` (``prompt`` / ``chosen`` /
            ``rejected`` + ``images``; rejected: another colour) or ``"prompt"`` (``prompt`` + ``images`` +
            ``answer``, for online methods).
        size: Image side in pixels.
        noise: Pixel jitter per channel.
    """
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour = rng.choice(names)
        image = colour_image(colour, size=size, noise=noise, seed=seed * 100003 + i)
        prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this image?"}]}]
        answer = [{"role": "assistant", "content": colour}]
        if format == "prompt-completion":
            rows.append({"prompt": prompt, "completion": answer, "images": [image]})
        elif format == "messages":
            rows.append({"messages": prompt + answer, "images": [image]})
        elif format == "preference":
            wrong = rng.choice([c for c in names if c != colour])
            rows.append({"prompt": prompt, "chosen": answer, "rejected": [{"role": "assistant", "content": wrong}], "images": [image]})
        elif format == "prompt":
            rows.append({"prompt": prompt, "images": [image], "answer": colour})
        else:
            raise ValueError(f"format={format!r}: use 'prompt-completion', 'messages', 'preference' or 'prompt'.")
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m posttrain.testing.tiny_vlm OUT_DIR [--family gemma3|idefics3|qwen2_vl]``: write a tiny VLM + processor directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m posttrain.testing.tiny_vlm", description=main.__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="gemma3", choices=VLM_FAMILIES)
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    save_tiny_vlm(a.out_dir, family=a.family, seed=a.seed)
    print(f"wrote a tiny {a.family} vision-language model and its processor to {a.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
