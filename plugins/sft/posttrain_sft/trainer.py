"""Supervised fine-tuning on the posttrain loop (heavy: imports torch and transformers).

Read top to bottom: the trainer (``__init__``: arguments, model and tokenizer, datasets), then
dataset preparation (materializing, format detection, tokenization, label masks, truncation,
packing), then the method protocol the loop calls (``collate``, ``count_items``,
``compute_loss``, ``eval_predictions``), then helpers.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import random
import re
import warnings
from typing import Any

import torch

from posttrain import (
    BEMA,
    BEMASaver,
    ConfigError,
    TokenStates,
    TrainerSurface,
    TrainingLoop,
    as_config,
    causal_lm_states,
    check_vision_model,
    image_column,
    is_peft_model,
    processor_tokenizer,
    prompt_completion_boundary,
)
from posttrain_sft.config import SFTConfig
from posttrain_sft.vision import DATASET_KEY, ROW_KEY, VisionCollator, VisionRows, check_vision_settings, image_token_ids

__all__ = ["SFTTrainer"]

IGNORE_INDEX = -100
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_FORMATS = "'text' (or your dataset_text_field), 'messages' (a list of {role, content}), 'prompt' + 'completion', or pre-tokenized 'input_ids'"
_MESSAGE_COLUMNS = ("prompt", "completion", "messages", "conversations")
#: metrics of compute_loss that the run's summary row repeats (TRL's summary row carries them)


class SFTTrainer(TrainerSurface):
    """Fine-tune a causal LM on demonstrations with a token-level loss (TRL's ``SFTTrainer`` API).

    Data formats (detected from the columns):
        * language modeling: ``text`` (or ``args.dataset_text_field``), a string; EOS is appended
          when missing. Loss on every token. ``formatting_func(row) -> str`` turns any row into this.
        * conversational: ``messages`` (or ShareGPT-style ``conversations`` with ``from``/``value``),
          a list of ``{"role", "content"}`` (or ``"tool_calls"``) messages, rendered with the
          tokenizer's chat template (with the row's ``tools`` and ``chat_template_kwargs`` when
          present). Loss on every token, or on assistant turns only with ``assistant_only_loss=True``.
        * prompt/completion: ``prompt`` and ``completion``, both strings (standard, EOS appended to
          the completion) or both message lists (conversational: the prompt is rendered with
          ``add_generation_prompt=True``). Loss on the completion only (``completion_only_loss``,
          default on for this format). The boundary is found in token space, so it never splits
          a special token.
        * pre-tokenized: ``input_ids``, with optional ``labels`` (used as is) or mask columns
          ``assistant_masks`` / ``completion_mask`` (the latter with ``completion_only_loss=True``)
          from which labels are built.

        * vision-language: any of the raw formats above (``messages``, ``prompt`` + ``completion``,
          ``text``) with an ``images`` (list) or ``image`` column, for a vision-language model and its
          processor. Such rows are not tokenized at construction: :class:`~posttrain_sft.vision.VisionCollator`
          loads the images and runs the processor per batch (in DataLoader workers with
          ``dataloader_num_workers > 0``); image tokens never carry loss.

    A ``datasets.IterableDataset`` is read once, completely, at construction (SFT tokenizes every
    row up front); ``trainer.train_dataset`` / ``trainer.eval_dataset`` are ``datasets.Dataset``
    objects of the processed rows (``input_ids``, ``labels``, ``seq_lengths`` when packed).

    Losses (``loss_type``): ``nll``, the summed token NLL over label tokens divided by the number
    of label tokens of the whole optimizer step (so accumulation 8 x 1 equals 1 x 8 exactly), and
    ``dft`` (arXiv:2508.05629), each token's NLL times the detached probability of its target.
    Logits are computed only at positions that predict a label token (``logits_to_keep``).
    Mixture-of-Experts models add their load-balancing loss times ``router_aux_loss_coef``.

    Packing (``packing=True``): sequences are binned into rows of ``max_length`` tokens by
    best-fit decreasing (``bfd``; ``bfd_split`` first splits over-long sequences); a micro-batch is
    laid out padding-free (one row, ``position_ids`` restarting at 0 for each sequence),
    transformers builds a block-diagonal causal mask from the position ids, and the first token of
    each sequence is never predicted from the previous one. ``packing_strategy="wrapped"``
    concatenates everything and cuts rows every ``max_length`` tokens (attention crosses
    sequences). ``padding_free=True`` uses the padding-free layout without packing.

    Args:
        model: A ``PreTrainedModel``, or a Hub id / local directory (loaded with
            ``from_pretrained``; ``None`` uses ``args.model_name_or_path``).
        args: An :class:`~posttrain_sft.config.SFTConfig`, a ``transformers.TrainingArguments`` or a
            dict of fields (default: ``SFTConfig()``).
        data_collator: Optional ``callable(rows) -> {"input_ids", "labels", ["attention_mask"],
            ["position_ids"]}`` replacing :meth:`collate`'s layout (not with padding-free batches).
        train_dataset: A ``datasets.Dataset`` / ``IterableDataset`` (or list of dicts) in one of
            the formats above.
        eval_dataset: Optional, same formats, or a dict / ``DatasetDict`` of them (metrics
            ``eval_<name>_<metric>``); scored at ``eval_steps`` and at the end.
        processing_class: The tokenizer, or a vision-language model's processor (``AutoProcessor``:
            its ``tokenizer`` gives EOS, padding and the text side); loaded from the model's path when None.
        compute_loss_func: Optional ``f(outputs, labels, num_items_in_batch=...) -> loss`` (TRL's,
            deprecated there): receives the model's full outputs; the loss must be normalized by
            ``num_items_in_batch``.
        compute_metrics: Optional ``f(EvalPrediction) -> dict``, called at each evaluation with
            the full logits (an extra forward per eval batch) and labels.
        callbacks: ``transformers.TrainerCallback`` classes or instances.
        optimizers: Only ``(None, None)``: the loop builds optimizer and schedule from ``args``.
        optimizer_cls_and_kwargs: Only None, for the same reason.
        preprocess_logits_for_metrics: Optional ``f(logits, labels) -> logits`` applied before the
            logits are kept for ``compute_metrics``.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name (QLoRA with
            ``peft_config``); ignored, with a warning, for a model object.
        peft_config: A ``peft.PeftConfig`` to train an adapter (or set ``args.use_peft``).
        formatting_func: Optional ``f(row) -> str``; the rows become language-modeling text.
        allow_experimental: Python opt-in for the maturity gate (``sft`` is stable; kept for a
            uniform signature).

    Raises:
        ValueError (posttrain.ConfigError): invalid arguments or data; the message names the
            argument, field or row and the fix.
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
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        allow_experimental: bool = False,
    ) -> None:
        args = as_config(args, SFTConfig)
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (a datasets.Dataset, IterableDataset or list of dicts).")
        _check_trainer_arguments(args, data_collator, compute_loss_func, optimizers, optimizer_cls_and_kwargs)
        if peft_config is not None and is_peft_model(model):
            raise ConfigError(
                "model is already a PeftModel and peft_config was given: merge and unload its adapter first (model.merge_and_unload()), "
                "or omit peft_config to train the existing adapter."
            )
        self.args = args
        self._user_collator = data_collator
        self.compute_loss_func = compute_loss_func
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self.formatting_func = formatting_func
        # padding-free layout: asked for, or implied by packing that keeps sequence boundaries (as in TRL)
        self.padding_free = args.padding_free or (args.packing and args.packing_strategy in ("bfd", "bfd_split"))
        if self.padding_free and data_collator is not None:
            raise ConfigError("data_collator=... cannot be used with padding-free batches (padding_free=True, or bfd packing): drop the collator or set packing_strategy='wrapped' / padding_free=False.")
        if args.padding_free and not args.packing and args.max_length is not None:
            raise ConfigError(
                "padding_free=True without packing concatenates each micro-batch into one row, so `max_length` is not enforced "
                "on its length: set max_length=None (and truncate the data beforehand), or enable packing (packing=True)."
            )
        self._skip_prepare = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))
        if formatting_func is not None and args.completion_only_loss:
            raise ConfigError(
                "formatting_func=... turns the rows into language-modeling text, which has no completion, but completion_only_loss=True: "
                "apply the formatting yourself and keep prompt/completion columns, or set completion_only_loss=None/False."
            )

        self.loop = TrainingLoop(args, method="sft", allow_experimental=allow_experimental, callbacks=callbacks, compute_metrics=compute_metrics)
        model = self._with_quantization_config(model, quantization_config)
        _keep_liger_off_the_loss(args)
        # load_model also applies trust_remote_code, PEFT, gradient checkpointing, NEFTune, Liger and the model tags (posttrain, sft, trl)
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        self._set_chat_template()
        self._setup_tokenizer()
        self._setup_aux_loss()
        self._vision_collators: dict[str, VisionCollator] = {}  # per dataset name: datasets with images, encoded per batch

        self.train_dataset = self.process_dataset(train_dataset, "train_dataset", packing=args.packing)
        if eval_dataset is None:
            self.eval_dataset = None
        elif isinstance(eval_dataset, dict):  # also a DatasetDict / IterableDatasetDict
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset")
        self._use_logits_to_keep = _accepts_logits_to_keep(self.model)
        self._logit_offset = _virtual_token_count(self.model)
        self.bema = None
        if args.use_bema:  # BEMA (arXiv:2508.00180): the average is saved to output_dir/bema when training ends
            self.bema = BEMA(self.model, **bema_options(args))
            self.loop.callbacks.add(BEMASaver(self.bema, self.loop, self.processing_class))
        self.loop.setup(self.model, method=self)

    # ================================================================== model and tokenizer
    def _with_quantization_config(self, model, quantization_config):
        """Put ``quantization_config`` into ``args.model_init_kwargs`` for a model given by name (QLoRA, as TRL's argument)."""
        args = self.args
        if quantization_config is None:
            return model
        if not isinstance(model, str) and not (model is None and args.model_name_or_path):
            warnings.warn("quantization_config=... is ignored: the model is already instantiated (pass the model by name to quantize it).", stacklevel=3)
            return model
        kwargs = dict(args.model_init_kwargs or {})
        if "quantization_config" in kwargs:
            raise ConfigError("quantization_config is set both as a trainer argument and in args.model_init_kwargs: set it in one place only (the trainer argument).")
        args.model_init_kwargs = {**kwargs, "quantization_config": quantization_config}
        return model

    def _set_chat_template(self) -> None:
        """Apply ``chat_template_path``: a .jinja/.j2 file, or a tokenizer to clone the template (and its tokens) from."""
        path = self.args.chat_template_path
        if path is None:
            return
        tok = processor_tokenizer(self.processing_class)
        if path.endswith((".jinja", ".j2")):
            try:
                with open(path, encoding="utf-8") as fh:
                    tok.chat_template = fh.read()
            except OSError as exc:
                raise ConfigError(f"chat_template_path={path!r} cannot be read ({exc.strerror}): give an existing .jinja file or a tokenizer id/directory.") from None
            if tok is not self.processing_class:  # a processor renders conversations with its own template
                self.processing_class.chat_template = tok.chat_template
            return
        from transformers import AutoTokenizer

        try:
            source = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise ConfigError(f"chat_template_path={path!r} is neither a .jinja file nor a loadable tokenizer ({str(exc).splitlines()[0]}).") from None
        if not source.chat_template:
            raise ConfigError(f"chat_template_path={path!r}: that tokenizer has no chat template to clone.")
        vocab = tok.get_vocab()
        new_tokens = [t for t in source.added_tokens_decoder.values() if t.content not in vocab]
        if new_tokens and is_peft_model(self.model):
            raise ConfigError(
                f"chat_template_path={path!r} adds {len(new_tokens)} tokens, which needs the embeddings resized before the PEFT adapter "
                "is attached: resize the model and tokenizer first (or use a .jinja file whose tokens exist), then pass them with peft_config."
            )
        tok.chat_template = source.chat_template
        if tok is not self.processing_class:
            self.processing_class.chat_template = source.chat_template
        tok.add_tokens(new_tokens)
        tok.eos_token = source.eos_token
        text_config = self.model.config.get_text_config()
        text_config.eos_token_id = tok.eos_token_id
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.eos_token_id = tok.eos_token_id
        if len(tok) > self.model.get_input_embeddings().weight.shape[0]:
            self.model.resize_token_embeddings(len(tok), pad_to_multiple_of=64)

    def _setup_tokenizer(self) -> None:
        """Resolve the EOS string, the pad id and how assistant tokens are found; reject what cannot work.

        With a processor, the text side (EOS, padding, text-only rows) is its ``tokenizer``.
        """
        args = self.args
        tok = self._tokenizer = processor_tokenizer(self.processing_class)
        self.eos_token = args.eos_token or getattr(tok, "eos_token", None)
        if self.eos_token is None:
            raise ConfigError("the tokenizer has no eos_token: set eos_token in the config (e.g. '</s>').")
        if self.eos_token not in tok.get_vocab():
            raise ConfigError(f"eos_token={self.eos_token!r} is not in the tokenizer's vocabulary: use one of its special tokens.")
        if args.pad_token is not None:
            if args.pad_token not in tok.get_vocab():
                raise ConfigError(f"pad_token={args.pad_token!r} is not in the tokenizer's vocabulary: use one of its tokens.")
            tok.pad_token = args.pad_token
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids(self.eos_token)
        for config in (self.model.config.get_text_config(), getattr(self.model, "generation_config", None)):
            if config is not None and getattr(config, "pad_token_id", None) is None:
                config.pad_token_id = self.pad_token_id
        template = getattr(self.processing_class, "chat_template", None) or getattr(tok, "chat_template", None) or ""
        if isinstance(template, dict):
            template = template.get("default", "")
        #: assistant_only_loss: True -> transformers' mask from {% generation %} markers; False -> turn-by-turn rendering
        self._template_has_markers = bool(_GENERATION_MARKER.search(template))

    def _setup_aux_loss(self) -> None:
        """Decide whether the Mixture-of-Experts load-balancing loss is added (``router_aux_loss_coef``), as TRL does."""
        text_config = self.model.config.get_text_config()
        coef = self.args.router_aux_loss_coef
        if coef and not hasattr(text_config, "output_router_logits"):
            raise ConfigError(
                f"router_aux_loss_coef={coef} but {type(self.model).__name__} is not a Mixture-of-Experts model that returns router "
                "logits, so there is no auxiliary loss to weight: unset router_aux_loss_coef."
            )
        self.router_aux_loss_coef = float((getattr(text_config, "router_aux_loss_coef", None) or 0.0) if coef is None else coef)
        self.aux_loss_enabled = hasattr(text_config, "output_router_logits") and self.router_aux_loss_coef != 0.0
        if hasattr(text_config, "router_aux_loss_coef"):  # keep the model config in line with what is trained
            text_config.output_router_logits = self.aux_loss_enabled
            text_config.router_aux_loss_coef = self.router_aux_loss_coef

    # ================================================================== dataset preparation
    def process_dataset(self, dataset, name: str, *, packing: bool | None = None):
        """Return ``dataset`` tokenized (and packed) as a ``datasets.Dataset`` of ``input_ids``, ``labels`` (and ``seq_lengths``).

        Labels are ``-100`` where no loss is taken. Rows left without a predicted label token after
        truncation are dropped (with a warning). With ``dataset_kwargs={"skip_prepare_dataset": True}``
        the rows are returned as given (an ``IterableDataset`` materialized).

        Args:
            dataset: The raw dataset (``Dataset``, ``IterableDataset`` or list of dicts).
            name: How messages name it (``"train_dataset"``, ``"eval_dataset['test']"``).
            packing: Pack the rows; None = as evaluation data (``eval_packing``, default ``packing``).

        Raises:
            ConfigError: an empty dataset, unknown columns, or an invalid row (named by index).
        """
        import datasets

        args = self.args
        packing = (args.packing if args.eval_packing is None else args.eval_packing) if packing is None else packing
        vision_rows = self._vision_dataset(dataset, name)
        if vision_rows is not None:  # rows with images stay raw: the collator encodes them per batch
            return vision_rows
        if isinstance(dataset, datasets.Dataset) and dataset.format.get("type") == "custom" and not self._skip_prepare:
            raise ConfigError(
                f"{name} uses Dataset.with_transform(): SFT tokenizes every row once at construction, which would bake a random or stateful "
                "transform into the data. Pass dataset_kwargs={'skip_prepare_dataset': True} with a transform that returns trainer-ready "
                "rows (input_ids, labels), or apply a deterministic transform with Dataset.map() first."
            )
        if self._skip_prepare:
            return self._skipped_preparation(dataset, name)
        rows = _materialize(dataset, name)
        if not rows:
            raise ConfigError(f"{name} is empty (0 rows): give the trainer at least one example.")
        if "input_ids" in rows[0]:
            if self.formatting_func is not None:
                warnings.warn(f"{name} is already tokenized (has input_ids): formatting_func is ignored for it.", stacklevel=3)
            fmt = "tokenized"
        else:
            if self.formatting_func is not None:
                rows = [{args.dataset_text_field: self._format(row, index, name)} for index, row in enumerate(rows)]
            rows = [_to_chatml(row) for row in rows]
            fmt = _detect_format(rows[0], args.dataset_text_field, name)
        completion_only = self._check_loss_masks(fmt, rows[0], name)
        examples, dropped = [], 0
        for index, row in enumerate(rows):
            if fmt == "tokenized":
                input_ids, labels = self._labels_from_columns(row, completion_only, index, name)
            else:
                input_ids, labels = self._tokenize_row(row, fmt, completion_only, index, name)
            for ids, labs in self._fit_to_max_length(input_ids, labels, packing):
                if all(label == IGNORE_INDEX for label in labs[1:]):  # nothing to predict: no loss, no gradient
                    dropped += 1
                    continue
                examples.append({"input_ids": ids, "labels": labs})
        if not examples:
            raise ConfigError(
                f"every row of {name} has no label token after truncation to max_length={args.max_length} (prompts fill "
                "the whole length?): raise max_length or shorten the prompts."
            )
        if dropped:
            warnings.warn(f"{name}: dropped {dropped} of {len(rows)} rows with no label token after truncation to max_length={args.max_length}.", stacklevel=3)
        if args.shuffle_dataset:
            random.Random(args.seed).shuffle(examples)
        if packing:
            examples = pack_wrapped(examples, args.max_length) if args.packing_strategy == "wrapped" else pack_bfd(examples, args.max_length)
            if args.shuffle_dataset:
                random.Random(args.seed).shuffle(examples)
        return datasets.Dataset.from_list(examples)

    def _vision_dataset(self, dataset, name: str) -> VisionRows | None:
        """A dataset with an ``images`` / ``image`` column: checked, its collator built, its rows kept raw; None for text-only data.

        Raises:
            DataError: The model is text-only (``posttrain.check_vision_model``), or the first row is
                invalid (a missing / unreadable image, image placeholders that do not match).
            ConfigError: A tokenizer instead of a processor, pre-tokenized rows, ``formatting_func``,
                or an option TRL refuses for images (packing, padding-free, ``keep_end``).
        """
        import datasets

        args = self.args
        if isinstance(dataset, datasets.Dataset):
            columns = list(dataset.column_names)
        elif isinstance(dataset, (list, tuple)):
            columns = list(dataset[0]) if dataset and isinstance(dataset[0], dict) else []
        elif isinstance(dataset, datasets.IterableDataset):
            columns = list(dataset.column_names or next(iter(dataset), {}))
        else:
            return None
        column = image_column(columns)
        if column is None:
            return None
        check_vision_model(self.model, columns, dataset_name=name)
        rows = dataset if isinstance(dataset, datasets.Dataset) else _materialize(dataset, name)
        if len(rows) == 0:
            raise ConfigError(f"{name} is empty (0 rows): give the trainer at least one example.")
        first = _to_chatml(dict(rows[0]))
        if "input_ids" in first:
            raise ConfigError(f"{name} has input_ids and an image column {column!r}: rows with images must be raw ('messages', 'prompt' + "
                              "'completion' or 'text'), the processor encodes them with their images per batch.")
        if self.formatting_func is not None:
            raise ConfigError(f"formatting_func=... cannot be used with {name}'s images (the rows are encoded per batch by the processor): "
                              "format the rows beforehand (Dataset.map) into 'messages', 'prompt' + 'completion' or 'text'.")
        fmt = _detect_format(first, args.dataset_text_field, name)
        check_vision_settings(args, fmt, self.processing_class, name)
        completion_only = self._check_loss_masks(fmt, first, name)
        if args.assistant_only_loss and not self._template_has_markers:
            raise ConfigError("assistant_only_loss=True with images needs {% generation %} ... {% endgeneration %} markers around the assistant "
                              "output in the processor's chat template (set chat_template_path), or assistant_only_loss=False.")
        collator = VisionCollator(
            self.processing_class, fmt=fmt, completion_only=completion_only, assistant_only=args.assistant_only_loss,
            max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of, eos_token=self.eos_token,
            pad_token_id=self.pad_token_id, text_field=args.dataset_text_field,
            masked_ids=image_token_ids(self.processing_class, self.model),
            name=name,
        )
        collator.encode(dict(rows[0]), 0)  # the first row now: a wrong format or processor fails at construction, not in a worker
        self._vision_collators[name] = collator
        return VisionRows(rows, name)

    def _skipped_preparation(self, dataset, name: str):
        """``skip_prepare_dataset``: the rows as given (a Dataset), refusing mask columns without labels."""
        import datasets

        if isinstance(dataset, datasets.Dataset):
            columns = set(dataset.column_names)
        else:
            dataset = datasets.Dataset.from_list(_materialize(dataset, name))
            columns = set(dataset.column_names)
        if len(dataset) == 0:
            raise ConfigError(f"{name} is empty (0 rows): give the trainer at least one example.")
        if "labels" not in columns and columns & {"assistant_masks", "completion_mask"}:
            raise ConfigError(
                f"{name} has mask columns {sorted(columns & {'assistant_masks', 'completion_mask'})} but no 'labels', and "
                "skip_prepare_dataset=True skips building labels, so it would train on every token. Add a 'labels' column "
                "(-100 on tokens without loss) or drop skip_prepare_dataset."
            )
        if "input_ids" not in columns and dataset.format.get("type") != "custom":
            raise ConfigError(f"{name} has columns {sorted(columns)}: with skip_prepare_dataset=True the rows must already hold input_ids (and labels).")
        return dataset

    def _format(self, row: dict, index: int, name: str) -> str:
        text = self.formatting_func(row)
        if not isinstance(text, str):
            raise ConfigError(f"{name} row {index}: formatting_func returned a {type(text).__name__}, not a string: return one string per row.")
        return text

    def _check_loss_masks(self, fmt: str, first_row: dict, name: str) -> bool:
        """Validate completion_only_loss / assistant_only_loss against the data's format; return whether completion-only applies."""
        args = self.args
        completion_only = args.completion_only_loss if args.completion_only_loss is not None else fmt == "prompt_completion"
        own_labels = fmt == "tokenized" and ("labels" in first_row or "completion_mask" in first_row)  # given labels are used as is
        if completion_only and fmt != "prompt_completion" and not own_labels:
            raise ConfigError(
                f"completion_only_loss=True needs prompt/completion data (or a pre-tokenized completion_mask column), but {name} is in the "
                f"{fmt!r} format (columns {sorted(first_row)}). Set completion_only_loss=None/False, or use assistant_only_loss=True for chat data."
            )
        if args.assistant_only_loss:
            conversational = fmt == "messages" or (fmt == "prompt_completion" and isinstance(first_row["prompt"], list))
            if not conversational and not (fmt == "tokenized" and ("assistant_masks" in first_row or "labels" in first_row)):
                raise ConfigError(
                    f"assistant_only_loss=True needs conversational data ('messages' or conversational prompt/completion, or pre-tokenized "
                    f"assistant_masks), but {name} is {'plain text' if fmt == 'text' else repr(fmt)}. Set assistant_only_loss=False."
                )
            if conversational and not getattr(self.processing_class, "chat_template", None):
                raise ConfigError("assistant_only_loss=True needs a chat template, and the tokenizer has none: set tokenizer.chat_template or chat_template_path.")
        return completion_only

    def _labels_from_columns(self, row: dict, completion_only: bool, index: int, name: str) -> tuple[list[int], list[int]]:
        """Pre-tokenized row: ``labels`` as given, else ``input_ids`` masked by ``assistant_masks`` (and ``completion_mask``)."""
        input_ids = list(row["input_ids"])
        if not input_ids or not all(isinstance(t, int) for t in input_ids):
            raise ConfigError(f"{name} row {index}: 'input_ids' must be a non-empty list of token ids; got {row['input_ids']!r:.80}.")
        if row.get("labels") is not None:
            columns = ["labels"]
        else:
            columns = (["completion_mask"] if completion_only and "completion_mask" in row else []) + (["assistant_masks"] if "assistant_masks" in row else [])
        for column in columns:
            if len(row[column]) != len(input_ids):
                raise ConfigError(f"{name} row {index}: {column!r} has a different length than 'input_ids' ({len(input_ids)}): fix or drop the row.")
        if columns == ["labels"]:
            return input_ids, list(row["labels"])
        return input_ids, [t if all(row[column][i] for column in columns) else IGNORE_INDEX for i, t in enumerate(input_ids)]

    def _tokenize_row(self, row: dict, fmt: str, completion_only: bool, index: int, name: str) -> tuple[list[int], list[int]]:
        """Return ``(input_ids, labels)`` of one raw row; labels are ``-100`` where the loss is masked."""
        tok, args = self._tokenizer, self.args
        if fmt == "text":
            text = row[args.dataset_text_field]
            if not isinstance(text, str):
                raise ConfigError(f"{name} row {index}: {args.dataset_text_field!r} is {type(text).__name__}, not a string: fix or drop the row.")
            input_ids = tok(text=_with_eos(text, self.eos_token))["input_ids"]
            return input_ids, list(input_ids)
        if fmt == "messages":
            messages = _check_messages(row["messages"], "messages", index, name)
            input_ids, mask = self._render_conversation(messages, row, index, name)
            return input_ids, [t if m else IGNORE_INDEX for t, m in zip(input_ids, mask)]
        return self._tokenize_prompt_completion(row, completion_only, index, name)

    def _tokenize_prompt_completion(self, row: dict, completion_only: bool, index: int, name: str) -> tuple[list[int], list[int]]:
        """Tokenize a prompt/completion row, finding the boundary in token space (never inside a token).

        The prompt is tokenized alone (as at inference) and the boundary is where its tokens stop
        matching the tokens of prompt + completion. Standard strings whose tokens merge across the
        boundary fall back to prompt tokens + completion tokens, so the prompt is still exact.
        """
        tok = self._tokenizer
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
            prompt_ids = list(self._apply_chat_template(prompt, row, add_generation_prompt=True)["input_ids"])
            full_ids, assistant_mask = self._render_conversation(prompt + completion, row, index, name)
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

    def _render_conversation(self, messages: list[dict], row: dict, index: int, name: str) -> tuple[list[int], list[int]]:
        """Return ``(input_ids, mask)`` of a conversation; the mask is 1 on assistant tokens with ``assistant_only_loss``, else everywhere.

        With ``{% generation %}`` markers in the template, transformers builds the assistant mask.
        Without them, each assistant turn is located by rendering the conversation up to it: its
        tokens run from the end of ``messages[:i]`` with the generation prompt to the end of
        ``messages[:i + 1]`` (both must be prefixes of the whole conversation's tokens).
        """
        if not self.args.assistant_only_loss:
            input_ids = list(self._apply_chat_template(messages, row)["input_ids"])
            return input_ids, [1] * len(input_ids)
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"{name} row {index}: assistant_only_loss=True but the conversation has no assistant turn: add one or drop the row.")
        if self._template_has_markers:
            rendered = self._apply_chat_template(messages, row, return_assistant_tokens_mask=True)
            input_ids, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
            if 1 not in mask:
                raise ConfigError(
                    f"{name} row {index}: assistant_only_loss=True but the chat template's {{% generation %}} markers mark no token: check "
                    "that they enclose the assistant content."
                )
            return input_ids, mask
        input_ids = list(self._apply_chat_template(messages, row)["input_ids"])
        mask = [0] * len(input_ids)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._prefix_ids(messages[:i], row, input_ids, i, index, name)) if i else 0
            end = len(self._prefix_ids(messages[: i + 1], row, input_ids, i, index, name, generation_prompt=False))
            mask[start:end] = [1] * (end - start)
        return input_ids, mask

    def _prefix_ids(self, messages, row, full_ids, turn, index, name, generation_prompt=True) -> list[int]:
        ids = list(self._apply_chat_template(messages, row, add_generation_prompt=generation_prompt)["input_ids"])
        if full_ids[: len(ids)] != ids:
            raise ConfigError(
                f"{name} row {index}: assistant_only_loss=True and the chat template has no {{% generation %}} markers, so assistant "
                f"turns are located by rendering the conversation turn by turn; but it renders turn {turn} differently once later "
                "messages follow (e.g. it drops earlier reasoning). Add {% generation %} ... {% endgeneration %} around the assistant "
                "output in tokenizer.chat_template (or chat_template_path), or set assistant_only_loss=False."
            )
        return ids

    def _apply_chat_template(self, messages: list[dict], row: dict, **kwargs) -> dict:
        """Return ``{"input_ids", ["assistant_masks"]}`` for ``messages`` (one conversation, not batched), with the row's tools and kwargs."""
        tools = row.get("tools")
        if isinstance(tools, str):
            tools = json.loads(tools)
        extra = dict(row.get("chat_template_kwargs") or {})
        tok = self._tokenizer
        if tok is not self.processing_class and not getattr(tok, "chat_template", None):  # text rows for a processor: its template
            extra.setdefault("chat_template", self.processing_class.chat_template)
        return tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True, **extra, **kwargs)

    def _fit_to_max_length(self, input_ids: list[int], labels: list[int], packing: bool) -> list[tuple[list[int], list[int]]]:
        """Return the sequence as pieces of at most ``max_length`` tokens: truncated, split (bfd_split) or whole (wrapped)."""
        args = self.args
        n = args.max_length
        if n is None or len(input_ids) <= n or (packing and args.packing_strategy == "wrapped"):
            return [(input_ids, labels)]
        if packing and args.packing_strategy == "bfd_split":
            return [(input_ids[i : i + n], labels[i : i + n]) for i in range(0, len(input_ids), n)]
        if args.truncation_mode == "keep_end":
            return [(input_ids[-n:], labels[-n:])]
        return [(input_ids[:n], labels[:n])]

    @property
    def data_collator(self):
        """The collator of processed rows (TRL's attribute): :meth:`collate`, which calls a ``data_collator`` given to the trainer."""
        return self.collate

    @data_collator.setter
    def data_collator(self, collator) -> None:
        self._user_collator = collator

    # ================================================================== the method protocol
    def collate(self, examples: list[dict[str, list[int]]]) -> dict[str, Any]:
        """Return a CPU batch: padded rows, or one padding-free row (bfd packing / ``padding_free``).

        Returns:
            ``input_ids`` (B, T); ``labels`` (B, T) unshifted, ``-100`` where masked; either
            ``attention_mask`` (B, T) or ``position_ids`` (1, T); ``logit_positions`` (K,), the
            positions whose next token is a label in some row; ``num_label_tokens`` and
            ``num_tokens`` (non-padding tokens) as ints.
        """
        if examples and ROW_KEY in examples[0]:
            return self._collate_vision(examples)
        multiple = self.args.pad_to_multiple_of
        if self._user_collator is not None:
            batch = dict(self._user_collator(examples))
            labels = batch["labels"]
            num_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        elif self.padding_free:
            # one row: sequences back to back, positions restarting at 0 (transformers then builds a block-diagonal mask)
            ids = [t for ex in examples for t in ex["input_ids"]]
            labs = [t for ex in examples for t in ex.get("labels", ex["input_ids"])]
            positions = [p for ex in examples for n in (ex.get("seq_lengths") or [len(ex["input_ids"])]) for p in range(n)]
            num_tokens = len(ids)
            pad = _padding(num_tokens, multiple)  # each padding token is a sequence of its own (position 0, no label)
            input_ids = torch.tensor(ids + [self.pad_token_id] * pad).unsqueeze(0)  # (1, T)
            labels = torch.tensor(labs + [IGNORE_INDEX] * pad).unsqueeze(0)  # (1, T)
            position_ids = torch.tensor(positions + [0] * pad).unsqueeze(0)  # (1, T)
            labels[position_ids == 0] = IGNORE_INDEX  # a sequence's first token is never predicted from the previous sequence
            batch = {"input_ids": input_ids, "position_ids": position_ids}
        else:
            length = max(len(ex["input_ids"]) for ex in examples)
            length += _padding(length, multiple)
            input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)  # (B, T)
            labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(examples), length), dtype=torch.long)  # (B, T)
            for i, ex in enumerate(examples):
                n = len(ex["input_ids"])
                input_ids[i, :n] = torch.tensor(ex["input_ids"])
                labels[i, :n] = torch.tensor(ex.get("labels", ex["input_ids"]))
                attention_mask[i, :n] = 1
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
            num_tokens = int(attention_mask.sum())
        return _with_targets(batch, labels, num_tokens)

    def _collate_vision(self, rows: list[dict]) -> dict[str, Any]:
        """A batch of raw rows with images (:class:`~posttrain_sft.vision.VisionRows`): encoded by the dataset's collator.

        A ``data_collator`` given to the trainer gets the raw rows (as TRL's); the tensors it returns
        besides ``input_ids`` / ``attention_mask`` / ``labels`` go to the model as they are.
        """
        if self._user_collator is not None:
            batch = dict(self._user_collator([{k: v for k, v in row.items() if k not in (ROW_KEY, DATASET_KEY)} for row in rows]))
            text_keys = ("input_ids", "attention_mask", "labels", "position_ids")
            model_inputs = {k: v for k, v in batch.items() if k not in text_keys and isinstance(v, torch.Tensor)}
            batch = {**{k: batch[k] for k in text_keys if k in batch}, "model_inputs": model_inputs}
        else:
            batch = self._vision_collators[rows[0][DATASET_KEY]](rows)
        labels = batch.pop("labels")
        num_tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return _with_targets(batch, labels, num_tokens)

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
            The scalar loss and ``{"mean_token_accuracy", "entropy"}`` (means over this
            micro-batch's label tokens), plus ``"aux_loss"`` for Mixture-of-Experts models.
        """
        positions = batch["logit_positions"]  # (K,)
        at = positions + self._logit_offset  # prompt-tuning adapters prepend virtual tokens to the sequence
        inputs = self._model_inputs(batch)
        offload = torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if self.args.activation_offloading and torch.is_grad_enabled() else contextlib.nullcontext()
        targets = batch["labels"][:, positions + 1]  # (B, K)
        mask = targets != IGNORE_INDEX  # (B, K)
        with offload:
            if self.compute_loss_func is not None:  # the user's loss gets the model's own full outputs
                outputs = model(**inputs)
                loss = self.compute_loss_func(outputs, batch["labels"], num_items_in_batch=num_items_in_batch)
                with torch.no_grad():
                    _, scores = TokenStates(outputs.logits[:, at]).nll_loss(targets, stats=("argmax", "entropy"))  # (B, K)
            else:
                # hidden states and the LM head, logprob_chunk_size tokens at a time: no (B, K, V) logits (nor their gradient)
                kwargs = {"logits_to_keep": at} if self._use_logits_to_keep else {}
                outputs, states = causal_lm_states(model, chunk_size=self.args.logprob_chunk_size, **inputs, **kwargs)
                if not self._use_logits_to_keep:
                    states = states[:, at]  # (B, K, .)
                # DFT, arXiv:2508.05629: each token's NLL weighted by its (detached) probability
                loss_sum, scores = states.nll_loss(targets, dft=self.args.loss_type == "dft", stats=("argmax", "entropy"))  # (B, K)
                loss = loss_sum / torch.as_tensor(num_items_in_batch).clamp(min=1)
        metrics = {}
        if self.aux_loss_enabled:  # the MoE load-balancing loss of this micro-batch, weighted by its share of the step's tokens
            aux = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux * (batch["num_label_tokens"] / torch.as_tensor(num_items_in_batch).clamp(min=1))
            metrics["aux_loss"] = aux.detach().float()
        with torch.no_grad():
            num_labels = mask.sum().clamp(min=1)
            metrics["mean_token_accuracy"] = ((scores.stats["argmax"] == targets) & mask).sum() / num_labels
            metrics["entropy"] = (scores.entropy * mask).sum() / num_labels
        return loss, metrics

    def _model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        # use_cache=False also matters for packing: with a KV cache, transformers skips the block-diagonal mask it
        # otherwise derives from restarting position_ids, and packed sequences would attend to each other.
        inputs = {"input_ids": batch["input_ids"], "use_cache": False}
        for key in ("attention_mask", "position_ids"):
            if key in batch:
                inputs[key] = batch[key]
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        inputs.update(batch.get("model_inputs") or {})  # a vision batch: pixel_values, pixel_attention_mask, token_type_ids, ...
        return inputs

    @torch.no_grad()
    def eval_predictions(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits, labels)`` of one eval batch for the user's ``compute_metrics`` (an extra, full-logits forward, as in TRL).

        The logits (B, T, V) pass through ``preprocess_logits_for_metrics(logits, labels)`` when
        given; labels (B, T) are unshifted, ``-100`` where masked.
        """
        logits = model(**self._model_inputs(batch)).logits[:, self._logit_offset :]  # (B, T, V)
        if self.preprocess_logits_for_metrics is not None:
            logits = self.preprocess_logits_for_metrics(logits, batch["labels"])
        return logits, batch["labels"]

    # ================================================================== BEMA
    def on_step_end(self, model, state) -> None:
        """Update the BEMA average (``use_bema``) after each optimizer step."""
        if self.bema is not None:
            self.bema.step(self.loop.unwrapped_model(), state.global_step)

    def state_dict(self) -> dict:
        """Return the method state for checkpoints: the BEMA buffers (``use_bema``), so a resumed run averages exactly."""
        return {"bema": self.bema.state_dict()} if self.bema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "bema" in state and self.bema is not None:
            self.bema.load_state_dict(state["bema"])


# ====================================================================== helpers
def _with_targets(batch: dict[str, Any], labels: torch.Tensor, num_tokens: int) -> dict[str, Any]:
    """Add ``labels`` and what the loss needs: ``logit_positions`` (K,), ``num_label_tokens``, ``num_tokens``."""
    is_target = labels[:, 1:] != IGNORE_INDEX  # (B, T-1): position t predicts token t+1
    batch["labels"] = labels
    batch["logit_positions"] = is_target.any(dim=0).nonzero().flatten()  # (K,)
    batch["num_label_tokens"] = int(is_target.sum())
    batch["num_tokens"] = num_tokens
    return batch


def pack_bfd(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Pack examples into rows of at most ``max_length`` tokens by best-fit decreasing.

    Longest first, each sequence goes into the open row with the least room that still fits it
    (a new row when none does). Sequences are never split (they are already truncated or split to
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


def pack_wrapped(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Concatenate every example (in order) and cut the stream into rows of ``max_length`` tokens (the last may be shorter).

    Sequences are cut mid-way and a row's tokens attend to every earlier token of the row, also
    across sequences (TRL's ``"wrapped"`` strategy).
    """
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    return [{"input_ids": ids[i : i + max_length], "labels": labels[i : i + max_length]} for i in range(0, len(ids), max_length)]


def _check_trainer_arguments(args: SFTConfig, data_collator, compute_loss_func, optimizers, optimizer_cls_and_kwargs) -> None:
    """Refuse TRL trainer arguments that posttrain's loop cannot honour, naming the alternative."""
    if optimizers is not None and tuple(optimizers) != (None, None):
        raise ConfigError(
            "optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds the optimizer and schedule itself (after "
            "preparing the model); set optim, optim_args, learning_rate, weight_decay, lr_scheduler_type and lr_scheduler_kwargs instead."
        )
    if optimizer_cls_and_kwargs is not None:
        raise ConfigError(
            "optimizer_cls_and_kwargs=... is not supported: posttrain's loop builds the optimizer itself; set optim (adamw_torch_fused, "
            "adamw_torch, sgd, adagrad) and optim_args='key=value,...' instead."
        )
    if data_collator is not None and not callable(data_collator):
        raise ConfigError(f"data_collator is a {type(data_collator).__name__}, not a callable: pass a function of a list of rows, or None.")
    if compute_loss_func is not None and args.loss_type == "dft":
        raise ConfigError("compute_loss_func=... and loss_type='dft' both define the loss: drop compute_loss_func or use loss_type='nll'.")
    if compute_loss_func is not None:
        warnings.warn(
            "compute_loss_func is deprecated (TRL 1.x) and costs full logits at every position: subclass SFTTrainer and override compute_loss instead.",
            FutureWarning,
            stacklevel=3,
        )


def _keep_liger_off_the_loss(args: SFTConfig) -> None:
    """With Liger kernels, keep its fused linear cross-entropy off: SFT computes the loss from logits at label positions (as TRL does)."""
    if not args.use_liger_kernel:
        return
    config = dict(args.liger_kernel_config or {})
    if config.get("fused_linear_cross_entropy"):
        raise ConfigError("liger_kernel_config={'fused_linear_cross_entropy': True} is not supported: SFT computes the loss from logits at label positions; drop that key.")
    args.liger_kernel_config = {**config, "fused_linear_cross_entropy": False}


def _materialize(dataset, name: str) -> list[dict]:
    """Return the rows of a ``Dataset``, ``IterableDataset`` (read once, completely) or list of dicts."""
    import datasets

    if isinstance(dataset, (list, tuple)):
        rows = list(dataset)
    elif isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        rows = list(dataset)
    else:
        raise ConfigError(f"{name} is a {type(dataset).__name__}: pass a datasets.Dataset, a datasets.IterableDataset or a list of dicts.")
    if rows and not isinstance(rows[0], dict):
        raise ConfigError(f"{name} row 0 is a {type(rows[0]).__name__}, not a dict of columns: pass rows as dicts.")
    return rows


def _to_chatml(row: dict) -> dict:
    """Rename ShareGPT-style ``from``/``value`` message keys to ``role``/``content``, and ``conversations`` to ``messages``."""
    if not any(isinstance(row.get(key), list) for key in _MESSAGE_COLUMNS):
        return row
    row = dict(row)
    for key in _MESSAGE_COLUMNS:
        messages = row.get(key)
        if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages) and any("from" in m or "value" in m for m in messages):
            row[key] = [{("role" if k == "from" else "content" if k == "value" else k): v for k, v in m.items()} for m in messages]
    if "conversations" in row and "messages" not in row:
        row["messages"] = row.pop("conversations")
    return row


def _detect_format(row: dict, text_field: str, name: str) -> str:
    """Return ``"prompt_completion"``, ``"messages"`` or ``"text"`` from the first row's columns."""
    columns = set(row)
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "messages" in columns:
        return "messages"
    if text_field in columns:
        return "text"
    raise ConfigError(
        f"{name} has columns {sorted(columns)}, none of which SFT understands: use {_FORMATS}. "
        "Rename the column, set dataset_text_field for plain text under another name, or pass formatting_func."
    )


def _check_messages(messages, column: str, index: int, name: str) -> list[dict]:
    """Return ``messages`` if it is a list of ``{"role", "content" or "tool_calls"}`` dicts, else raise naming the row."""
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and "role" in m and ("content" in m or "tool_calls" in m) for m in messages
    ):
        raise ConfigError(f"{name} row {index}: {column!r} must be a non-empty list of {{'role': ..., 'content': ...}} dicts; got {messages!r:.120}.")
    return messages


def _with_eos(text: str, eos_token: str) -> str:
    return text if text.endswith(eos_token) else text + eos_token


def _padding(length: int, multiple: int | None) -> int:
    """Tokens to add so that ``length`` is a multiple of ``multiple`` (0 when None)."""
    return (-length) % multiple if multiple else 0


def _accepts_logits_to_keep(model) -> bool:
    """Return whether the (base) model's forward takes ``logits_to_keep`` (all transformers >= 4.50 causal LMs)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def _virtual_token_count(model) -> int:
    """Return how many virtual tokens a prompt-learning adapter (prompt tuning, p-tuning) prepends to the logits (0 otherwise)."""
    if not is_peft_model(model):
        return 0
    config = model.active_peft_config
    if not getattr(config, "is_prompt_learning", False) or str(getattr(config.peft_type, "value", config.peft_type)) == "PREFIX_TUNING":
        return 0
    return int(config.num_virtual_tokens)


def bema_options(args) -> dict:
    """Return :class:`posttrain.BEMA`'s keyword arguments from the config's ``bema_*`` fields."""
    return {
        "update_freq": args.bema_update_freq,
        "ema_power": args.bema_ema_power,
        "bias_power": args.bema_bias_power,
        "lag": args.bema_lag,
        "update_after": args.bema_update_after,
        "multiplier": args.bema_multiplier,
        "min_ema_multiplier": args.bema_min_ema_multiplier,
        "device": args.bema_device,
    }
