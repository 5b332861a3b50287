"""Vision-language plumbing: images in rows, processors as ``processing_class``, extra model inputs in batches.

Every method that trains a vision-language model (SFT, DPO, GRPO, RLOO, ...) needs the same few
blocks, so they live here once, as plain public functions (plugin API 1.9):

* :func:`processor_tokenizer` / :func:`is_processor`: a processor (``AutoProcessor``: image
  processor + tokenizer + chat template) is accepted wherever a tokenizer is; the text side comes
  from its ``tokenizer``.
* :func:`image_column`, :func:`row_images`, :func:`load_image`: a row's ``images`` (a list) or
  ``image`` (one) column, decoded to RGB ``PIL.Image`` s from PIL images, paths, bytes or the
  ``{"bytes", "path"}`` dicts of ``datasets.Image``; a missing or unreadable image is one line
  naming the row and the fix.
* :func:`prepare_multimodal_messages`: TRL's conversion of a conversation to content parts, image
  placeholders inserted at the first user turn when the text has none, their count checked.
* :func:`vision_prompt_inputs`: one prompt through the processor -> its token ids (image tokens
  expanded) and its extra model inputs (``pixel_values``, ``image_grid_thw``, ``token_type_ids``, ...).
* :func:`collate_model_inputs` / :func:`sequence_model_inputs`: per-sample extra inputs batched the
  way transformers' processors batch them; inputs aligned with the tokens (``token_type_ids``)
  padded to the batch's sequence layout.
* :func:`check_vision_model` / :func:`freeze_vision_tower`: an image column on a text-only model
  is refused up front; the vision tower can be frozen.

Nothing here imports PIL or transformers' image code at import time.
"""

from __future__ import annotations

import io
import os
import re
from typing import Any, Iterable, Sequence

import torch

__all__ = [
    "IMAGE_COLUMNS", "SEQUENCE_INPUT_KEYS", "is_processor", "processor_tokenizer", "image_column", "load_image", "row_images",
    "prepare_multimodal_messages", "count_image_placeholders", "vision_prompt_inputs", "collate_model_inputs",
    "sequence_model_inputs", "is_vision_model", "check_vision_model", "freeze_vision_tower", "vision_tower_of",
    "image_token_ids", "undecoded_image_columns", "check_images_present",
]

#: The columns that hold a row's images, as in TRL: ``images`` (a list) or ``image`` (one image).
IMAGE_COLUMNS = ("images", "image")

#: Extra inputs aligned with the token sequence (one value per token): padded with the sequence,
#: 0 on padding and on completion tokens (Gemma 3's ``token_type_ids``: 1 at image tokens).
SEQUENCE_INPUT_KEYS = ("token_type_ids", "mm_token_type_ids")

# what a processor returns besides the text: never a model input of its own
_TEXT_KEYS = ("input_ids", "attention_mask")


def is_processor(processing_class: Any) -> bool:
    """Whether ``processing_class`` is a multimodal processor (it has an ``image_processor`` and a ``tokenizer``)."""
    return getattr(processing_class, "image_processor", None) is not None and getattr(processing_class, "tokenizer", None) is not None


def processor_tokenizer(processing_class: Any) -> Any:
    """The tokenizer of ``processing_class``: a processor's ``tokenizer``, else the object itself (a tokenizer or None)."""
    if processing_class is not None and getattr(processing_class, "tokenizer", None) is not None and hasattr(processing_class, "image_processor"):
        return processing_class.tokenizer
    return processing_class


def image_column(columns: Iterable[str]) -> str | None:
    """The image column among ``columns`` (``images`` before ``image``), or None for text-only data."""
    columns = set(columns)
    return next((c for c in IMAGE_COLUMNS if c in columns), None)


def load_image(value: Any, *, where: str = "the row") -> Any:
    """Return ``value`` as an RGB ``PIL.Image``.

    Args:
        value: A ``PIL.Image``, a file path, raw bytes, or ``datasets.Image``'s ``{"bytes": ..., "path": ...}``.
        where: What to name in an error (``"row 3 of train_dataset, column 'images'"``).

    Raises:
        DataError: The image is missing (None), its file does not exist or cannot be decoded, or the
            value is of another type; the message names ``where`` and the fix.
    """
    from posttrain._errors import DataError

    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{where}: reading images needs Pillow, which is not installed: pip install 'posttrain[vision]' (or pillow).") from None
    if value is None:
        raise DataError(f"{where}: the image is missing (None); give every row its images or drop the row.")
    if isinstance(value, Image.Image):
        return value if value.mode == "RGB" else value.convert("RGB")
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        value = value.get("bytes") or value.get("path")
        if value is None:
            raise DataError(f"{where}: the image has neither bytes nor a path; give every row its images or drop the row.")
    try:
        if isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, (str, os.PathLike)):
            if not os.path.exists(value):
                raise DataError(f"{where}: the image file {os.fspath(value)!r} does not exist; fix the path or drop the row.")
            image = Image.open(value)
        else:
            raise DataError(f"{where}: an image must be a PIL.Image, a file path, bytes or a {{'bytes', 'path'}} dict, got {type(value).__name__}.")
        image.load()
    except DataError:
        raise
    except Exception as exc:  # PIL.UnidentifiedImageError, OSError on a truncated file, ...
        raise DataError(f"{where}: the image cannot be read ({type(exc).__name__}: {exc}); replace the file or drop the row.") from None
    return image if image.mode == "RGB" else image.convert("RGB")


def row_images(row: dict, *, where: str = "the row") -> list | None:
    """The row's images as RGB ``PIL.Image`` s (``images``: a list; ``image``: one), or None when it has no image column.

    Raises:
        DataError: An image is missing or unreadable (see :func:`load_image`).
    """
    column = image_column(row)
    if column is None:
        return None
    value = row[column]
    if column == "image" or not isinstance(value, (list, tuple)):
        value = [value]
    return [load_image(v, where=f"{where}, column {column!r}" + (f" image {i}" if len(value) > 1 else "")) for i, v in enumerate(value)]


def count_image_placeholders(messages: Sequence[dict]) -> int:
    """The number of ``{"type": "image"}`` parts in ``messages`` (tool messages excluded, as in TRL)."""
    return sum(
        1
        for message in messages
        if message.get("role") != "tool" and isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, dict) and part.get("type") == "image"
    )


def prepare_multimodal_messages(messages: Sequence[dict], num_images: int, *, where: str = "the row") -> list[dict]:
    """Return ``messages`` with every content as a list of parts and one image placeholder per image (TRL's conversion).

    String contents become ``[{"type": "text", "text": ...}]``; when the conversation has no image
    part, ``num_images`` ``{"type": "image"}`` parts are put before the text of the first user
    message. The messages given are not modified.

    Raises:
        DataError: A message has an unknown role, or the number of image parts differs from
            ``num_images`` (the message names ``where`` and both counts).
    """
    from posttrain._errors import DataError

    has_parts = any(isinstance(m.get("content"), list) and any(isinstance(p, dict) and p.get("type") == "image" for p in m["content"]) for m in messages)
    out, inserted = [], has_parts
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: message role {role!r} is not one of 'system', 'user', 'assistant', 'tool'.")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
            if role == "user" and not inserted:
                parts = [{"type": "image"} for _ in range(num_images)] + parts
                inserted = True
            message = {**message, "content": parts}
        out.append(message)
    found = count_image_placeholders(out)
    if found != num_images:
        raise DataError(
            f"{where}: the messages have {found} image placeholder(s) ({{'type': 'image'}} parts) but the row has {num_images} image(s); "
            "give one placeholder per image (or none, and the images go before the first user message)."
        )
    return out


def _as_messages(prompt: Any) -> bool:
    return isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt)


def vision_prompt_inputs(processor: Any, prompt: Any, images: Sequence[Any] | None, *, where: str = "the row",
                         chat_template_kwargs: dict | None = None, add_generation_prompt: bool = True,
                         continue_final_message: bool = False, tools: Any = None) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Run one prompt with its images through ``processor``: its token ids (image tokens expanded) and extra model inputs.

    Args:
        processor: The processor (``AutoProcessor``).
        prompt: A conversation (rendered by the processor's chat template, with a generation prompt
            unless ``continue_final_message``) or a string (used as is; it must contain the model's
            image placeholder once per image).
        images: The prompt's images (RGB ``PIL.Image`` s), or None / [] for a text-only prompt.
        where: What to name in an error.
        chat_template_kwargs: Extra arguments of the chat template.
        add_generation_prompt: Append the assistant header (conversations).
        continue_final_message: Leave the last message open (a conversational prompt that ends in an
            assistant prefix); excludes ``add_generation_prompt``.
        tools: Tool schemas for the chat template.

    Returns:
        ``(ids, model_inputs)``: ``model_inputs`` holds every tensor the processor returned besides
        ``input_ids`` / ``attention_mask`` (``pixel_values``, ``pixel_attention_mask``,
        ``image_grid_thw``, ``token_type_ids``, ...), each with the leading dimension the processor
        gives one sample.

    Raises:
        DataError: The image placeholders do not match the images, or the processor refused the input
            (its message is kept, with ``where``).
    """
    from posttrain._errors import DataError

    images = list(images or [])
    if _as_messages(prompt):
        messages = prepare_multimodal_messages(prompt, len(images), where=where)
        kwargs = dict(chat_template_kwargs or {})
        if tools is not None:
            kwargs["tools"] = tools
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt and not continue_final_message,
                                             continue_final_message=continue_final_message, **kwargs)
    elif isinstance(prompt, str):
        text = prompt
    else:
        raise DataError(f"{where}: a vision-language prompt must be a string or a list of messages, got {type(prompt).__name__}.")
    try:
        encoded = processor(text=[text], images=[images] if images else None, return_tensors="pt", add_special_tokens=False)
    except (ValueError, IndexError, TypeError) as exc:
        raise DataError(f"{where}: the processor refused the prompt and its {len(images)} image(s): {exc}") from None
    ids = encoded["input_ids"][0].tolist()
    inputs = {k: v for k, v in encoded.items() if k not in _TEXT_KEYS and isinstance(v, torch.Tensor)}
    return ids, inputs


def _pad_to(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(tensor.shape[1:]) == tuple(shape):
        return tensor
    pad: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape)):
        pad += [0, want - have]
    return torch.nn.functional.pad(tensor, pad)


def collate_model_inputs(per_sample: Sequence[dict | None]) -> dict[str, torch.Tensor]:
    """Batch per-sample extra model inputs the way transformers' processors batch them.

    Every tensor is concatenated along dim 0 (the batch axis of ``pixel_values`` of shape
    ``(1, images, C, H, W)`` (Idefics3 / SmolVLM), the image axis of ``(images, C, H, W)``
    (Gemma 3, LLaVA), the patch axis of Qwen2-VL's ``(patches, dim)``; ``image_grid_thw`` stacks
    per image); trailing dimensions that differ between samples (Idefics3's number of images per
    sample) are zero-padded to the largest, which is what the processor's own padding gives
    (``pixel_attention_mask`` 0 there). :data:`SEQUENCE_INPUT_KEYS` are not collated here: see
    :func:`sequence_model_inputs`.

    Args:
        per_sample: One dict of tensors per sample (None or ``{}`` for a text-only sample: then
            every sample must be text-only).

    Returns:
        The batched inputs (``{}`` when no sample has any).

    Raises:
        ValueError: Some samples have inputs and others none, or their keys differ.
    """
    present = [d for d in per_sample if d]
    if not present:
        return {}
    if len(present) != len(per_sample):
        raise ValueError("collate_model_inputs: some samples have images and others none; put text-only and image rows in separate batches "
                         "(or give every row an image).")
    keys = [k for k in present[0] if k not in SEQUENCE_INPUT_KEYS]
    if any(sorted(k for k in d if k not in SEQUENCE_INPUT_KEYS) != sorted(keys) for d in present):
        raise ValueError(f"collate_model_inputs: the samples' extra inputs have different keys ({sorted(present[0])} vs others); batch them separately.")
    out = {}
    for key in keys:
        tensors = [d[key] for d in present]
        if any(t.dim() == 0 for t in tensors):
            out[key] = torch.stack(tensors)
            continue
        shape = [max(t.shape[i] for t in tensors) for i in range(1, tensors[0].dim())]
        out[key] = torch.cat([_pad_to(t, shape) for t in tensors], dim=0)
    return out


def sequence_model_inputs(per_sample: Sequence[dict | None], lengths: Sequence[int], width: int, *, left: bool = True,
                          total_width: int | None = None) -> dict[str, torch.Tensor]:
    """Pad the token-aligned inputs (:data:`SEQUENCE_INPUT_KEYS`) of prompts into a batch's sequence layout.

    Args:
        per_sample: One dict per sample, each token-aligned input of shape ``(1, length)``.
        lengths: The prompt length of each sample (the unpadded token count its value covers).
        width: The padded prompt width ``P`` of the batch.
        left: Prompts are left-padded (the online methods' layout); else right-padded.
        total_width: The full width ``P + C`` of the sequences the model sees (completion positions
            get 0); ``None`` = ``width``.

    Returns:
        ``{key: (B, total_width) long}`` for each token-aligned key the samples have.
    """
    present = [d for d in per_sample if d]
    if not present:
        return {}
    total = width if total_width is None else total_width
    out = {}
    for key in SEQUENCE_INPUT_KEYS:
        if key not in present[0]:
            continue
        batch = torch.zeros(len(per_sample), total, dtype=torch.long)
        for i, (d, n) in enumerate(zip(per_sample, lengths)):
            value = (d or {}).get(key)
            if value is None:
                continue
            row = value.reshape(-1)[-n:] if n else value.reshape(-1)[:0]
            start = width - n if left else 0
            batch[i, start : start + row.numel()] = row.long()
        out[key] = batch
    return out


_VISION_CONFIG_KEYS = ("vision_config", "vision_tower", "visual")


def is_vision_model(model: Any) -> bool:
    """Whether ``model`` (or the model under a PEFT / DDP wrapper) takes images: its config has a ``vision_config``."""
    seen = model
    for _ in range(4):
        config = getattr(seen, "config", None)
        if config is not None and getattr(config, "vision_config", None) is not None:
            return True
        seen = getattr(seen, "module", None) or getattr(seen, "base_model", None)
        if seen is None:
            break
    return False


def check_vision_model(model: Any, columns: Iterable[str], *, dataset_name: str = "train_dataset") -> str | None:
    """Refuse an image column for a text-only model; return the image column (or None for text-only data).

    Raises:
        DataError: The data has an ``images`` / ``image`` column and the model has no vision tower.
    """
    from posttrain._errors import DataError

    column = image_column(columns)
    if column is not None and model is not None and not isinstance(model, str) and not is_vision_model(model):
        name = type(model).__name__
        raise DataError(
            f"{dataset_name} has an image column {column!r} (vision-related data) but the model ({name}) is text-only (its config has no vision_config): "
            "train a vision-language model (AutoModelForImageTextToText) with its processor, or drop the column."
        )
    return column


def vision_tower_of(model: Any) -> torch.nn.Module | None:
    """The vision encoder of a vision-language model (``visual`` / ``vision_tower`` / ``vision_model``), or None."""
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf in ("visual", "vision_tower", "vision_model"):
            return module
    return None


def freeze_vision_tower(model: Any) -> int:
    """Freeze the vision encoder of ``model`` (``requires_grad=False``); return the number of parameters frozen.

    The multimodal projector stays trainable (it maps image features into the language model).

    Raises:
        ValueError: The model has no vision tower.
    """
    tower = vision_tower_of(model)
    if tower is None:
        raise ValueError(f"freeze_vision_tower: {type(model).__name__} has no vision tower (visual / vision_tower / vision_model module).")
    frozen = 0
    for param in tower.parameters():
        if param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


# processor / tokenizer attributes naming image tokens, and model-config attributes holding their ids
_TOKEN_ATTRS = ("image_token", "boi_token", "eoi_token", "fake_image_token", "global_image_tag", "global_image_token",
                "video_token", "vision_start_token", "vision_end_token", "image_start_token", "image_end_token")
_CONFIG_ID_ATTRS = ("image_token_id", "image_token_index", "boi_token_index", "boi_token_id", "eoi_token_index", "eoi_token_id",
                    "video_token_id", "vision_start_token_id", "vision_end_token_id")
_TILE_TOKEN = re.compile(r"^<row_\d+_col_\d+>$")  # Idefics3 / SmolVLM: the position tag of each image tile


def image_token_ids(processor: Any, model: Any = None) -> list[int]:
    """The ids of the tokens that stand for or frame an image (never in a loss), from the processor and the model config.

    The processor's image token and the tokens around it: Idefics3 / SmolVLM ``<fake_token_around_image>``,
    ``<global-img>`` and the ``<row_i_col_j>`` tile tags, Gemma 3 ``<start_of_image>`` / ``<end_of_image>``,
    Qwen2-VL's vision start / end, and the ids the model's config names.
    """
    tok = processor_tokenizer(processor)
    vocab = tok.get_vocab()
    ids: set[int] = set()
    for source in (processor, tok):
        for attr in _TOKEN_ATTRS:
            token = getattr(source, attr, None)
            if isinstance(token, str) and token in vocab:
                ids.add(vocab[token])
        for attr in ("image_token_id", "image_token_ids", "fake_image_token_id", "global_image_token_id", "video_token_ids"):
            value = getattr(source, attr, None)
            ids.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, int))
    config = getattr(model, "config", None)
    for attr in _CONFIG_ID_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value >= 0:
            ids.add(value)
    if getattr(processor, "fake_image_token", None) is not None:  # Idefics3's tiles
        ids.update(i for token, i in vocab.items() if _TILE_TOKEN.match(token))
    return sorted(ids)


def undecoded_image_columns(dataset: Any) -> Any:
    """Return a ``datasets`` dataset with its ``datasets.Image`` columns left encoded (``{"bytes", "path"}`` dicts).

    Reading the rows then decodes no image: images are decoded where the batches are collated (the
    DataLoader workers). Other datasets are returned as given.
    """
    features = getattr(dataset, "features", None)
    if not features:
        return dataset
    from datasets import Image

    def undecoded(feature):
        if isinstance(feature, Image):
            return Image(mode=feature.mode, decode=False)
        if isinstance(feature, list):
            return [undecoded(f) for f in feature]
        inner = getattr(feature, "feature", None)
        if inner is not None and hasattr(feature, "length"):  # datasets' List / Sequence of images
            return type(feature)(undecoded(inner), length=feature.length)
        return feature

    for column in IMAGE_COLUMNS:
        if column in features:
            feature = undecoded(features[column])
            if feature != features[column]:
                dataset = dataset.cast_column(column, feature)
    return dataset


def check_images_present(images: Sequence[Any], where: str) -> None:
    """Raise for a missing image or a path that does not exist, without decoding anything (decoding happens when batches are collated).

    Raises:
        DataError: One line naming ``where``, the image's index and the fix (see :func:`load_image`).
    """
    for i, value in enumerate(images):
        missing = value is None or (isinstance(value, dict) and value.get("bytes") is None and value.get("path") is None)
        if missing or (isinstance(value, (str, os.PathLike)) and not os.path.exists(value)):
            load_image(value, where=f"{where}, image {i}")  # raises DataError naming the row and the fix
