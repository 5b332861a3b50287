"""Vision-language SFT: rows with images stay raw; the collator encodes them with the processor, per batch.

TRL's ``DataCollatorForVisionLanguageModeling``, written for posttrain's loop: a dataset whose rows
have an ``images`` (a list) or ``image`` column is not tokenized at construction (decoding and
resizing images up front would hold every pixel in memory); :class:`VisionRows` hands the loop the
raw rows with their index, and :class:`VisionCollator` turns a list of them into a batch. The loop
calls the collator in its ``dataloader_num_workers`` DataLoader workers when there are any, so image
decoding and the processor run off the training thread.

Per row: the images are loaded (``posttrain.row_images``), the conversation gets its image
placeholders (``posttrain.prepare_multimodal_messages``), the text is rendered and run through the
processor with the images (``posttrain.vision_prompt_inputs``), and labels are built:

* ``messages``: every token, or the assistant tokens only (``assistant_only_loss``, from the chat
  template's ``{% generation %}`` markers, as TRL);
* ``prompt`` + ``completion``: the prompt is the common prefix of the rendered prompt and the
  rendered prompt + completion (TRL's rule); loss on the completion with ``completion_only_loss``
  (the default for this format);
* ``text``: every token (EOS appended when missing).

Image tokens never carry loss: labels are ``-100`` at the processor's image tokens and the tokens
that frame them (Idefics3's ``<fake_token_around_image>`` / ``<global-img>`` / ``<row_i_col_j>``,
Gemma 3's ``<start_of_image>`` / ``<end_of_image>``, Qwen2-VL's vision start / end). TRL 1.16
masks only padding there, which matters for ``messages`` rows without ``assistant_only_loss``
(elsewhere the images sit in the masked prompt).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from posttrain import (
    SEQUENCE_INPUT_KEYS,
    ConfigError,
    DataError,
    collate_model_inputs,
    image_token_ids,
    prepare_multimodal_messages,
    processor_tokenizer,
    row_images,
    vision_prompt_inputs,
)

__all__ = ["VisionRows", "VisionCollator", "image_token_ids", "check_vision_settings", "ROW_KEY", "DATASET_KEY"]

IGNORE_INDEX = -100
#: The key under which :class:`VisionRows` hands each row's index in its dataset to the collator.
ROW_KEY = "__sft_row_index__"
#: ... and the dataset's name (which collator encodes the row).
DATASET_KEY = "__sft_dataset__"



class VisionRows:
    """The raw rows of a vision dataset as the loop reads them: ``dataset[i]`` plus its index and the dataset's name.

    Args:
        dataset: A ``datasets.Dataset`` (images decoded when a row is read, i.e. in the workers) or a list of dicts.
        name: The dataset's name in messages (``"train_dataset"``).
    """

    def __init__(self, dataset: Any, name: str) -> None:
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], ROW_KEY: index, DATASET_KEY: self.name}

    def __getitems__(self, indices: list[int]) -> list[dict]:
        getitems = getattr(self.dataset, "__getitems__", None)
        rows = getitems(list(indices)) if callable(getitems) else [self.dataset[i] for i in indices]
        return [{**row, ROW_KEY: i, DATASET_KEY: self.name} for row, i in zip(rows, indices)]

    @property
    def column_names(self) -> list[str]:
        names = getattr(self.dataset, "column_names", None)
        return list(names) if names is not None else list(self.dataset[0])


class VisionCollator:
    """Raw rows with images -> a batch: ``input_ids``, ``attention_mask``, ``labels`` (right-padded) and ``model_inputs``.

    ``model_inputs`` holds every other tensor the processor returns (``pixel_values``,
    ``pixel_attention_mask``, ``image_grid_thw``, ...; ``posttrain.collate_model_inputs``), the
    token-aligned ones (Gemma 3's ``token_type_ids``) laid out like the tokens, 0 on padding and
    completion tokens.

    Args:
        processor: The model's processor (``AutoProcessor``).
        fmt: The rows' format: ``"messages"``, ``"prompt_completion"`` or ``"text"``.
        completion_only: Loss on completion tokens only (prompt/completion rows).
        assistant_only: Loss on assistant tokens only (``messages`` rows; needs ``{% generation %}`` markers).
        max_length: Truncate each sequence to this many tokens (keep the start); None: no truncation.
        pad_to_multiple_of: Pad the batch's width to a multiple of this; None: no extra padding.
        eos_token: Appended to ``text`` / completion strings that do not end with it.
        pad_token_id: The padding id.
        text_field: The column of ``text`` rows.
        masked_ids: Token ids never in the loss (:func:`image_token_ids`).
        name: The dataset's name in messages.
    """

    def __init__(self, processor: Any, *, fmt: str, completion_only: bool, assistant_only: bool, max_length: int | None,
                 pad_to_multiple_of: int | None, eos_token: str, pad_token_id: int, text_field: str, masked_ids: list[int], name: str) -> None:
        self.processor, self.tokenizer = processor, processor_tokenizer(processor)
        self.fmt, self.completion_only, self.assistant_only = fmt, completion_only, assistant_only
        self.max_length, self.pad_to_multiple_of = max_length, pad_to_multiple_of
        self.eos_token, self.pad_token_id, self.text_field = eos_token, pad_token_id, text_field
        self.masked_ids = frozenset(masked_ids)
        self.name = name

    # ------------------------------------------------------------------ one row
    def encode(self, row: dict, index: int | None) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        """Return ``(input_ids, labels, model_inputs)`` of one raw row (labels ``-100`` where no loss; truncated to ``max_length``).

        Raises:
            DataError: A missing / unreadable image, image placeholders that do not match the images,
                a malformed row, or ``max_length`` cutting into the image tokens; the message names the row.
        """
        where = f"{self.name} row {index}" if index is not None else f"a row of {self.name}"
        row = _to_chatml(row)
        images = row_images(row, where=where) or []
        if self.fmt == "messages":
            ids, labels, extras = self._encode_messages(row, images, where)
        elif self.fmt == "prompt_completion":
            ids, labels, extras = self._encode_prompt_completion(row, images, where)
        else:
            text = row.get(self.text_field)
            if not isinstance(text, str):
                raise DataError(f"{where}: {self.text_field!r} is {type(text).__name__}, not a string: fix or drop the row.")
            ids, extras = vision_prompt_inputs(self.processor, _with_eos(text, self.eos_token), images, where=where)
            labels = list(ids)
        labels = [IGNORE_INDEX if t in self.masked_ids else label for t, label in zip(ids, labels)]
        return self._truncate(ids, labels, extras, where)

    def _encode_messages(self, row: dict, images: list, where: str):
        messages = _check_messages(row.get("messages"), "messages", where)
        tools, kwargs = _template_extras(row)
        if not self.assistant_only:
            ids, extras = vision_prompt_inputs(self.processor, messages, images, where=where, add_generation_prompt=False,
                                               chat_template_kwargs=kwargs, tools=tools)
            return ids, list(ids), extras
        # assistant tokens: transformers' mask from the template's {% generation %} markers, the images placed in their parts
        parts = _with_images(prepare_multimodal_messages(messages, len(images), where=where), images)
        try:
            out = self.processor.apply_chat_template(parts, tools=tools, tokenize=True, return_dict=True, return_tensors="pt",
                                                     return_assistant_tokens_mask=True, processor_kwargs={"add_special_tokens": False}, **kwargs)
        except (ValueError, IndexError, TypeError) as exc:
            raise DataError(f"{where}: the processor refused the conversation and its {len(images)} image(s): {exc}") from None
        ids = out["input_ids"][0].tolist()
        mask = [int(m) for m in torch.as_tensor(out["assistant_masks"]).reshape(-1).tolist()]
        if 1 not in mask:
            raise DataError(f"{where}: assistant_only_loss=True but no token is marked as assistant output (no assistant turn, or the "
                            "template's {% generation %} markers enclose nothing): add an assistant turn or fix the template.")
        extras = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "assistant_masks") and isinstance(v, torch.Tensor)}
        return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask)], extras

    def _encode_prompt_completion(self, row: dict, images: list, where: str):
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt_text, completion_text = prompt, _with_eos(completion, self.eos_token)
        elif isinstance(prompt, list) and isinstance(completion, list):
            prompt = prepare_multimodal_messages(_check_messages(prompt, "prompt", where), len(images), where=where)
            completion = prepare_multimodal_messages(_check_messages(completion, "completion", where), 0, where=where)
            tools, kwargs = _template_extras(row)
            open_turn = prompt[-1]["role"] == "assistant"  # a prompt ending in an assistant prefix is continued
            render = self.processor.apply_chat_template
            alone = render(prompt, tools=tools, tokenize=False, add_generation_prompt=not open_turn, continue_final_message=open_turn, **kwargs)
            whole = render(prompt + completion, tools=tools, tokenize=False, **kwargs)
            n = next((i for i, (a, b) in enumerate(zip(alone, whole)) if a != b), min(len(alone), len(whole)))
            prompt_text, completion_text = whole[:n], whole[n:]  # TRL's rule: the prompt is the common prefix of both renderings
        else:
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both be message lists; got "
                            f"{type(prompt).__name__} and {type(completion).__name__}.")
        prompt_ids, extras = vision_prompt_inputs(self.processor, prompt_text, images, where=where)
        completion_ids = self.tokenizer(text=completion_text, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + list(completion_ids)
        labels = [IGNORE_INDEX] * len(prompt_ids) + list(completion_ids) if self.completion_only else list(ids)
        for key in SEQUENCE_INPUT_KEYS:  # token-aligned inputs cover the prompt; the completion gets 0
            if key in extras:
                extras[key] = torch.cat([extras[key].reshape(1, -1), torch.zeros(1, len(completion_ids), dtype=extras[key].dtype)], dim=1)
        return ids, labels, extras

    def _truncate(self, ids: list[int], labels: list[int], extras: dict, where: str):
        n = self.max_length
        if n is None or len(ids) <= n:
            return ids, labels, extras
        cut = [i for i in range(n, len(ids)) if ids[i] in self.masked_ids]
        if cut:
            raise DataError(f"{where}: max_length={n} cuts the sequence ({len(ids)} tokens) inside its image tokens (one at position {cut[0]}), "
                            "which would leave images without their tokens: raise max_length (or set it to None) or shorten the text.")
        for key in SEQUENCE_INPUT_KEYS:
            if key in extras:
                extras[key] = extras[key].reshape(1, -1)[:, :n]
        return ids[:n], labels[:n], extras

    # ------------------------------------------------------------------ a batch
    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        """Return the batch of ``rows`` (raw rows, each with its :data:`ROW_KEY` index)."""
        encoded = [self.encode(row, row.get(ROW_KEY)) for row in rows]
        width = max(len(ids) for ids, _, _ in encoded)
        width += (-width) % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
        for i, (ids, labs, _) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(labs)
            attention_mask[i, : len(ids)] = 1
        per_row = [extras for _, _, extras in encoded]
        try:
            model_inputs = collate_model_inputs(per_row)
        except ValueError as exc:
            rows_named = [row.get(ROW_KEY) for row in rows]
            raise DataError(f"{self.name} rows {rows_named}: {exc}") from None
        for key in SEQUENCE_INPUT_KEYS:  # right-padded like the tokens, 0 on padding
            if any(key in extras for extras in per_row):
                aligned = torch.zeros((len(rows), width), dtype=torch.long)
                for i, extras in enumerate(per_row):
                    if key in extras:
                        value = extras[key].reshape(-1)
                        aligned[i, : value.numel()] = value.long()
                model_inputs[key] = aligned
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "model_inputs": model_inputs}


def check_vision_settings(args: Any, fmt: str, processing_class: Any, name: str) -> None:
    """Refuse the options TRL refuses for vision datasets (packing, padding-free, keep_end truncation), and a tokenizer for a processor."""
    from posttrain import is_processor

    if not is_processor(processing_class):
        raise ConfigError(f"{name} has images but processing_class is a {type(processing_class).__name__}, not a processor: pass the model's "
                          "processor (AutoProcessor.from_pretrained(...)), or give the model by name so its processor is loaded.")
    if args.packing:
        raise ConfigError(f"packing=True is not supported for {name} with images (each row's image tokens must stay whole): set packing=False.")
    if args.padding_free:
        raise ConfigError(f"padding_free=True is not supported for {name} with images: set padding_free=False.")
    if args.max_length is not None and args.truncation_mode == "keep_end":
        raise ConfigError(f"truncation_mode='keep_end' is not supported for {name} with images (it may drop the image tokens at the start): "
                          "use truncation_mode='keep_start' or max_length=None.")
    if args.assistant_only_loss and fmt != "messages":
        raise ConfigError(f"assistant_only_loss=True with images needs 'messages' rows, but {name} is {fmt!r}: set assistant_only_loss=False "
                          "(prompt/completion rows train on the completion only by default).")


# ====================================================================== helpers
def _with_images(messages: list[dict], images: list) -> list[dict]:
    """Copies of ``messages`` whose ``{"type": "image"}`` parts carry the row's images, in order (tool messages skipped)."""
    out, pending = [], list(images)
    for message in messages:
        content = message.get("content")
        if message.get("role") != "tool" and isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image" and pending:
                    part = {k: v for k, v in part.items() if v is not None or k == "type"}
                    part["image"] = pending.pop(0)
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


def _template_extras(row: dict) -> tuple[Any, dict]:
    tools = row.get("tools")
    if isinstance(tools, str):
        tools = json.loads(tools)
    return tools, dict(row.get("chat_template_kwargs") or {})


def _check_messages(messages: Any, column: str, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and "role" in m and ("content" in m or "tool_calls" in m) for m in messages
    ):
        raise DataError(f"{where}: {column!r} must be a non-empty list of {{'role': ..., 'content': ...}} dicts; got {messages!r:.120}.")
    return messages


def _to_chatml(row: dict) -> dict:
    """ShareGPT ``conversations`` / ``from`` / ``value`` -> ``messages`` / ``role`` / ``content``."""
    if "conversations" in row and "messages" not in row:
        row = {**row, "messages": row["conversations"]}
    messages = row.get("messages")
    if isinstance(messages, list) and any(isinstance(m, dict) and ("from" in m or "value" in m) for m in messages):
        row = {**row, "messages": [{("role" if k == "from" else "content" if k == "value" else k): v for k, v in m.items()} for m in messages]}
    return row


def _with_eos(text: str, eos_token: str) -> str:
    return text if text.endswith(eos_token) else text + eos_token
