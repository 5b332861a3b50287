"""Supervised fine-tuning on the posttrain loop (heavy: imports torch and transformers).

Read top to bottom: the trainer (``__init__`` -> ``train``), then dataset preparation (format
detection, tokenization, label masks, truncation, packing), then the method protocol the loop
calls (``collate``, ``count_items``, ``compute_loss``).
"""

from __future__ import annotations

import bisect
import re
import warnings
from typing import Any, Iterable

import torch

from posttrain import ConfigError, TrainerSurface, TrainingLoop, as_config, entropy_from_logits, prompt_completion_boundary, selective_log_softmax
from posttrain_sft.config import SFTConfig

__all__ = ["SFTTrainer"]

IGNORE_INDEX = -100
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_FORMATS = "'text' (or your dataset_text_field), 'messages' (a list of {role, content}), or 'prompt' + 'completion'"


class SFTTrainer(TrainerSurface):
    """Fine-tune a causal LM on demonstrations with a token-level loss (TRL's ``SFTTrainer`` API).

    Data formats (detected from the columns):
        * language modeling: ``text`` (or ``args.dataset_text_field``), a string; EOS is appended
          when missing. Loss on every token.
        * conversational: ``messages``, a list of ``{"role", "content"}``, rendered with the
          tokenizer's chat template. Loss on every token, or on assistant turns only with
          ``assistant_only_loss=True`` (the template needs ``{% generation %}`` markers).
        * prompt/completion: ``prompt`` and ``completion``, both strings (standard, EOS appended to
          the completion) or both message lists (conversational: the prompt is rendered with
          ``add_generation_prompt=True``). Loss on the completion only (``completion_only_loss``,
          default on for this format). The boundary is found in token space, so it never splits
          a special token.

    Losses (``loss_type``): ``nll``, the summed token NLL over label tokens divided by the number
    of label tokens of the whole optimizer step (so accumulation 8 x 1 equals 1 x 8 exactly), and
    ``dft`` (arXiv:2508.05629), each token's NLL times the detached probability of its target.
    Logits are computed only at positions that predict a label token (``logits_to_keep``).

    Packing (``packing=True``): sequences are binned into rows of ``max_length`` tokens by
    best-fit decreasing; a micro-batch is laid out padding-free (one row, ``position_ids``
    restarting at 0 for each sequence), transformers builds a block-diagonal causal mask from the
    position ids, and the first token of each sequence is never predicted from the previous one.
    ``padding_free=True`` uses the same layout without packing.

    Args:
        model: A ``PreTrainedModel``, or a Hub id / local directory (loaded with
            ``from_pretrained``; ``None`` uses ``args.model_name_or_path``).
        args: An :class:`~posttrain_sft.config.SFTConfig` (default: ``SFTConfig()``).
        train_dataset: A ``datasets.Dataset`` (or list of dicts) in one of the formats above.
        eval_dataset: Optional, same format; scored at ``eval_steps`` and at the end.
        processing_class: The tokenizer; loaded from the model's path when None.
        peft_config: A ``peft.PeftConfig`` to train an adapter (or set ``args.use_peft``).
        allow_experimental: Python opt-in for the maturity gate (``sft`` is stable; kept for a
            uniform signature).

    Raises:
        posttrain.ConfigError: invalid arguments or data; the message names the field or row and the fix.
    """

    def __init__(
        self,
        model=None,
        args: SFTConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        peft_config=None,
        formatting_func=None,
        allow_experimental: bool = False,
    ) -> None:
        args = as_config(args, SFTConfig)
        if train_dataset is None:
            raise ConfigError("train_dataset is None: pass train_dataset=... (a datasets.Dataset or a list of dicts).")
        self.args = args
        self.loop = TrainingLoop(args, method="sft", allow_experimental=allow_experimental, callbacks=callbacks)
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        self._setup_tokenizer()
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self._use_logits_to_keep = _accepts_logits_to_keep(self.model)
        self.loop.setup(self.model, method=self)

    def _setup_tokenizer(self) -> None:
        """Resolve the EOS string and the pad id; reject a tokenizer that cannot do what the config asks."""
        tok, args = self.processing_class, self.args
        self.eos_token = args.eos_token or getattr(tok, "eos_token", None)
        if self.eos_token is None:
            raise ConfigError("the tokenizer has no eos_token: set eos_token in the config (e.g. '</s>').")
        if self.eos_token not in tok.get_vocab():
            raise ConfigError(f"eos_token={self.eos_token!r} is not in the tokenizer's vocabulary: use one of its special tokens.")
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(self.eos_token)
        if args.assistant_only_loss:
            template = getattr(tok, "chat_template", None) or ""
            if not _GENERATION_MARKER.search(template):
                raise ConfigError(
                    "assistant_only_loss=True needs a chat template with {% generation %} ... {% endgeneration %} markers "
                    "around assistant content (transformers builds the assistant mask from them), and this tokenizer's "
                    "template has none. Add the markers to tokenizer.chat_template, or set assistant_only_loss=False."
                )

    # ================================================================== dataset preparation
    def process_dataset(self, dataset, name: str) -> list[dict[str, list[int]]]:
        """Return the tokenized (and, with packing, packed) examples of ``dataset``.

        Each example is ``{"input_ids": [...], "labels": [...]}`` (labels ``-100`` where no loss),
        plus ``"seq_lengths"`` for packed rows.

        Raises:
            ConfigError: an empty dataset, unknown columns, or an invalid row (named by index).
        """
        args = self.args
        columns = _column_names(dataset)
        if len(dataset) == 0:
            raise ConfigError(f"{name} is empty (0 rows): give the trainer at least one example.")
        fmt = _detect_format(columns, args.dataset_text_field, name)
        completion_only = args.completion_only_loss if args.completion_only_loss is not None else fmt == "prompt_completion"
        if completion_only and fmt != "prompt_completion":
            raise ConfigError(
                f"completion_only_loss=True needs prompt/completion data, but {name} is in the {fmt!r} format "
                f"(columns {sorted(columns)}). Set completion_only_loss=None/False, or use assistant_only_loss=True for chat data."
            )
        if args.assistant_only_loss and fmt == "text":
            raise ConfigError(
                f"assistant_only_loss=True needs conversational data ('messages' or conversational prompt/completion), but "
                f"{name} is plain text. Set assistant_only_loss=False."
            )
        examples, dropped = [], 0
        for index, row in enumerate(dataset):
            input_ids, labels = self._tokenize_row(row, fmt, completion_only, index, name)
            if args.max_length is not None:  # keep the start, like TRL's truncation_mode="keep_start"
                input_ids, labels = input_ids[: args.max_length], labels[: args.max_length]
            if all(label == IGNORE_INDEX for label in labels[1:]):  # nothing to predict: no loss, no gradient
                dropped += 1
                continue
            examples.append({"input_ids": input_ids, "labels": labels})
        if not examples:
            raise ConfigError(
                f"every row of {name} has no label token after truncation to max_length={args.max_length} (prompts fill "
                "the whole length?): raise max_length or shorten the prompts."
            )
        if dropped:
            warnings.warn(f"{name}: dropped {dropped} of {len(dataset)} rows with no label token after truncation to max_length={args.max_length}.", stacklevel=3)
        if args.packing:
            examples = pack_bfd(examples, args.max_length)
        return examples

    def _tokenize_row(self, row: dict, fmt: str, completion_only: bool, index: int, name: str) -> tuple[list[int], list[int]]:
        """Return ``(input_ids, labels)`` of one row; labels are ``-100`` where the loss is masked."""
        tok, args = self.processing_class, self.args
        if fmt == "text":
            text = row[args.dataset_text_field]
            if not isinstance(text, str):
                raise ConfigError(f"{name} row {index}: {args.dataset_text_field!r} is {type(text).__name__}, not a string: fix or drop the row.")
            input_ids = tok(text=_with_eos(text, self.eos_token))["input_ids"]
            return input_ids, list(input_ids)
        if fmt == "messages":
            messages = _check_messages(row["messages"], "messages", index, name)
            if args.assistant_only_loss and not any(m["role"] == "assistant" for m in messages):
                raise ConfigError(f"{name} row {index}: assistant_only_loss=True but the conversation has no assistant turn: add one or drop the row.")
            rendered = self._apply_chat_template(messages, row, return_assistant_tokens_mask=args.assistant_only_loss)
            input_ids = list(rendered["input_ids"])
            mask = rendered["assistant_masks"] if args.assistant_only_loss else [1] * len(input_ids)
            return input_ids, [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask)]
        return self._tokenize_prompt_completion(row, completion_only, index, name)

    def _tokenize_prompt_completion(self, row: dict, completion_only: bool, index: int, name: str) -> tuple[list[int], list[int]]:
        """Tokenize a prompt/completion row, finding the boundary in token space (never inside a token).

        The prompt is tokenized alone (as at inference) and the boundary is where its tokens stop
        matching the tokens of prompt + completion. Standard strings whose tokens merge across the
        boundary fall back to prompt tokens + completion tokens, so the prompt is still exact.
        """
        tok, args = self.processing_class, self.args
        prompt, completion = row["prompt"], row["completion"]
        assistant_mask = None
        if isinstance(prompt, str) and isinstance(completion, str):
            prompt_ids = tok(text=prompt)["input_ids"]
            completion = _with_eos(completion, self.eos_token)
            full_ids = tok(text=prompt + completion)["input_ids"]
            boundary = len(prompt_ids)
            if full_ids[:boundary] != prompt_ids:  # a BPE merge across the boundary: concatenate in token space
                full_ids = prompt_ids + tok(text=completion, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, list) and isinstance(completion, list):
            prompt = _check_messages(prompt, "prompt", index, name)
            completion = _check_messages(completion, "completion", index, name)
            if args.assistant_only_loss and not any(m["role"] == "assistant" for m in completion):
                raise ConfigError(f"{name} row {index}: assistant_only_loss=True but the completion has no assistant turn: add one or drop the row.")
            prompt_ids = list(self._apply_chat_template(prompt, row, add_generation_prompt=True)["input_ids"])
            rendered = self._apply_chat_template(prompt + completion, row, return_assistant_tokens_mask=args.assistant_only_loss)
            full_ids = list(rendered["input_ids"])
            assistant_mask = rendered["assistant_masks"] if args.assistant_only_loss else None
            boundary = prompt_completion_boundary(prompt_ids, full_ids)
            if boundary < len(prompt_ids):
                warnings.warn(
                    f"{name} row {index}: the chat template renders the prompt differently alone (with the generation prompt) "
                    f"than followed by the completion; the completion starts where they diverge (token {boundary}).",
                    stacklevel=4,
                )
        else:
            raise ConfigError(
                f"{name} row {index}: 'prompt' and 'completion' must both be strings or both be message lists; got "
                f"{type(prompt).__name__} and {type(completion).__name__}."
            )
        labels = [t if (not completion_only or i >= boundary) else IGNORE_INDEX for i, t in enumerate(full_ids)]
        if assistant_mask is not None:
            labels = [t if m else IGNORE_INDEX for t, m in zip(labels, assistant_mask)]
        return full_ids, labels

    def _apply_chat_template(self, messages: list[dict], row: dict, **kwargs) -> dict:
        """Return ``{"input_ids", ["assistant_masks"]}`` for ``messages`` (one conversation, not batched)."""
        tools = row.get("tools")
        return self.processing_class.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True, **kwargs)

    # ================================================================== the method protocol
    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
        """Return a CPU batch: padded rows, or one padding-free row (packing / ``padding_free``).

        Returns:
            ``input_ids`` (B, T); ``labels`` (B, T) unshifted, ``-100`` where masked; either
            ``attention_mask`` (B, T) or ``position_ids`` (1, T); ``logit_positions`` (K,), the
            positions whose next token is a label in some row; ``num_label_tokens`` and
            ``num_tokens`` as ints.
        """
        if self.args.packing or self.args.padding_free:
            # one row: sequences back to back, positions restarting at 0 (transformers then builds a block-diagonal mask)
            input_ids = torch.tensor([t for ex in examples for t in ex["input_ids"]]).unsqueeze(0)  # (1, T)
            labels = torch.tensor([t for ex in examples for t in ex["labels"]]).unsqueeze(0)  # (1, T)
            seq_lengths = [n for ex in examples for n in ex.get("seq_lengths", [len(ex["input_ids"])])]
            position_ids = torch.cat([torch.arange(n) for n in seq_lengths]).unsqueeze(0)  # (1, T)
            labels[position_ids == 0] = IGNORE_INDEX  # a sequence's first token is never predicted from the previous sequence
            batch = {"input_ids": input_ids, "position_ids": position_ids}
            num_tokens = input_ids.shape[1]
        else:
            length = max(len(ex["input_ids"]) for ex in examples)
            input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)  # (B, T)
            labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, T)
            for i, ex in enumerate(examples):
                n = len(ex["input_ids"])
                input_ids[i, :n] = torch.tensor(ex["input_ids"])
                labels[i, :n] = torch.tensor(ex["labels"])
                attention_mask[i, :n] = 1
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
            num_tokens = int(attention_mask.sum())
        is_target = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
        batch["labels"] = labels
        batch["logit_positions"] = is_target.any(dim=0).nonzero().flatten()  # (K,)
        batch["num_label_tokens"] = int(is_target.sum())
        batch["num_tokens"] = num_tokens
        return batch

    def count_items(self, batch: dict[str, Any]) -> int:
        """Return the number of predicted label tokens in ``batch`` (the loss is a per-token mean over the step)."""
        return batch["num_label_tokens"]

    def compute_loss(self, model, batch: dict[str, Any], num_items_in_batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(sum of per-token losses / num_items_in_batch, metrics)`` for one micro-batch.

        Args:
            model: The (possibly wrapped) causal LM.
            batch: A :meth:`collate` batch on the model's device.
            num_items_in_batch: Label tokens in the whole optimizer step (int or 0-dim tensor).

        Returns:
            The scalar loss and ``{"mean_token_accuracy", "entropy"}`` (means over this micro-batch's label tokens).
        """
        positions = batch["logit_positions"]  # (K,)
        # use_cache=False also matters for packing: with a KV cache, transformers skips the block-diagonal mask it
        # otherwise derives from restarting position_ids, and packed sequences would attend to each other.
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
        for key in ("attention_mask", "position_ids"):
            if key in batch:
                inputs[key] = batch[key]
        if self._use_logits_to_keep:
            logits = model(**inputs, logits_to_keep=positions).logits  # (B, K, V)
        else:
            logits = model(**inputs).logits[:, positions]  # (B, K, V)
        logits = logits.float()
        targets = batch["labels"][:, positions + 1]  # (B, K)
        mask = targets != IGNORE_INDEX  # (B, K)
        logps = selective_log_softmax(logits, targets.clamp(min=0))  # (B, K)
        per_token_loss = -logps
        if self.args.loss_type == "dft":  # DFT, arXiv:2508.05629: weight each token by its (detached) probability
            per_token_loss = per_token_loss * logps.detach().exp()
        loss = (per_token_loss * mask).sum() / torch.as_tensor(num_items_in_batch).clamp(min=1)

        with torch.no_grad():
            num_labels = mask.sum().clamp(min=1)
            accuracy = ((logits.argmax(dim=-1) == targets) & mask).sum() / num_labels
            entropy = (entropy_from_logits(logits) * mask).sum() / num_labels
        return loss, {"mean_token_accuracy": accuracy, "entropy": entropy}


# ====================================================================== helpers
def pack_bfd(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most ``max_length`` tokens by best-fit decreasing.

    Longest first, each sequence goes into the open row with the least room that still fits it
    (a new row when none does). Sequences are never split (they are already truncated to
    ``max_length``). Deterministic: ties keep dataset order.

    Args:
        examples: ``{"input_ids", "labels"}`` dicts, each at most ``max_length`` long.
        max_length: The row capacity in tokens.

    Returns:
        ``{"input_ids", "labels", "seq_lengths"}`` dicts, one per row.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    rows: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # sorted (room left, row index)
    for i in order:
        length = len(examples[i]["input_ids"])
        slot = bisect.bisect_left(free, (length, -1))  # the row with the least room >= length
        if slot < len(free):
            room, row = free.pop(slot)
        else:
            room, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (room - length, row))
    packed = []
    for members in rows:
        packed.append(
            {
                "input_ids": [t for i in members for t in examples[i]["input_ids"]],
                "labels": [t for i in members for t in examples[i]["labels"]],
                "seq_lengths": [len(examples[i]["input_ids"]) for i in members],
            }
        )
    return packed


def _column_names(dataset) -> set[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return set(names)
    if isinstance(dataset, (list, tuple)):
        return set(dataset[0]) if dataset else set()
    raise ConfigError(f"the dataset is a {type(dataset).__name__}: pass a datasets.Dataset or a list of dicts.")


def _detect_format(columns: Iterable[str], text_field: str, name: str) -> str:
    """Return ``"prompt_completion"``, ``"messages"`` or ``"text"`` from the dataset's columns."""
    columns = set(columns)
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "messages" in columns:
        return "messages"
    if text_field in columns:
        return "text"
    raise ConfigError(
        f"{name} has columns {sorted(columns)}, none of which SFT understands: use {_FORMATS}. "
        "Rename the column, or set dataset_text_field for plain text under another name."
    )


def _check_messages(messages, column: str, index: int, name: str) -> list[dict]:
    """Return ``messages`` if it is a list of ``{"role", "content"}`` dicts, else raise naming the row."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise ConfigError(f"{name} row {index}: {column!r} must be a non-empty list of {{'role': ..., 'content': ...}} dicts; got {messages!r:.120}.")
    return messages


def _with_eos(text: str, eos_token: str) -> str:
    return text if text.endswith(eos_token) else text + eos_token


def _accepts_logits_to_keep(model) -> bool:
    """Return whether the (base) model's forward takes ``logits_to_keep`` (all transformers >= 4.50 causal LMs)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False
