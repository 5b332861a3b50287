"""TPO and TPO-L: Triple Preference Optimization (Saeidi et al., arXiv:2405.16681), on the core loop.

Each row holds a prompt x, a chosen response y_w, a rejected response y_l and a gold response y_ref.
With ``s(y) = sum_t log pi(y_t | x, y_<t)`` over the response's tokens (``loss_type`` 'sigmoid'/'hinge')
or ``s(y) = (1/|y|) sum_t ...`` (the length-normalized mean, 'ipo'/'tpo-l') and ``d = s(y_w) - s(y_l)``:

    sigmoid: -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
    hinge:   relu(1 - beta d)
    ipo:     (d - 1 / (2 beta))^2
    tpo-l:   the sigmoid loss with d replaced by d - gamma / beta
    L = mean over pairs + tpo_alpha * NLL(y_ref)

``NLL(y_ref)`` is the mean next-token NLL over the gold responses' tokens of the micro-batch, as TRL
1.16's ``trl.experimental.tpo``. There is no reference *model*: "reference" is the gold response.
One forward pass scores chosen, rejected and gold (batch 3B; 2B with ``tpo_alpha=0``, which skips the
gold rows as TRL). Heavy module: imports torch.

Vision-language models (rows with an ``images`` / ``image`` column, a processor as ``processing_class``):
as DPO, the texts are rendered and the responses tokenized once; each prompt goes through the processor
with its images in :meth:`TPOTrainer.collate` (in the DataLoader workers with ``dataloader_num_workers > 0``),
and chosen, rejected and gold rows share the prompt's image inputs (``batch["model_inputs"]``, given to
every forward: the loss's and ``compute_metrics``'s).
"""

from __future__ import annotations

import itertools
import json
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from datasets import IterableDataset

from posttrain import (
    ConfigError,
    DataError,
    TrainerSurface,
    TrainingLoop,
    as_config,
    causal_lm_states,
    check_images_present,
    check_vision_model,
    collate_model_inputs,
    disable_dropout,
    is_peft_model,
    is_processor,
    pad,
    prepare_multimodal_messages,
    processor_tokenizer,
    prompt_completion_boundary,
    row_images,
    sequence_model_inputs,
    undecoded_image_columns,
    vision_prompt_inputs,
)

from posttrain_tpo.config import TPOConfig

__all__ = ["TPOTrainer", "DataCollatorForTriplePreference", "tpo_losses", "tokenize_triple", "concatenated_logps"]

_FORMATS = (
    "TPO takes rows {'prompt', 'chosen', 'rejected', 'reference'} as strings or as {'role', 'content'} message lists "
    "(the 'reference' is the gold response), or {'chosen', 'rejected', 'reference'} full texts/conversations (the prefix "
    "shared by chosen and rejected becomes the prompt), or pre-tokenized {'prompt_ids', 'chosen_ids', 'rejected_ids', 'reference_ids'}"
)
_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "reference_ids")


def tpo_losses(args: TPOConfig, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Return the per-pair preference losses (B,) of ``args.loss_type`` from the scores ``s(y_w)``, ``s(y_l)`` (B,)."""
    delta = chosen - rejected
    beta, eps = args.beta, args.label_smoothing
    if args.loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta) * (1 - eps) - F.logsigmoid(-beta * delta) * eps
    if args.loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if args.loss_type == "ipo":  # IPO's Eq. 17, beta being its tau
        return (delta - 1 / (2 * beta)) ** 2
    if args.loss_type == "tpo-l":  # the target margin gamma, in log-prob units gamma / beta
        shifted = delta - args.tpo_l_gamma / beta
        return -F.logsigmoid(beta * shifted) * (1 - eps) - F.logsigmoid(-beta * shifted) * eps
    raise ConfigError(f"loss_type={args.loss_type!r} is invalid: use 'sigmoid', 'hinge', 'ipo' or 'tpo-l'.")


def concatenated_logps(model, batch: dict, chunk_size: int | None = 256) -> dict[str, torch.Tensor]:
    """One forward over the batch's rows; return per-token log-probs of the response tokens and their statistics.

    Returns ``per_token`` (N, T-1, zero off the responses), ``mask`` (N, T-1, the response tokens),
    and, detached, ``mean_logits`` (N, T-1: each position's mean logit), ``entropy`` (N, T-1) and
    ``is_top1`` (N, T-1: the argmax is the next token). N is 3B (chosen, rejected, gold) or 2B.
    ``batch["model_inputs"]`` (a vision-language batch: ``pixel_values``, ... per row) goes to the model too.
    """
    input_ids = batch["input_ids"]
    # hidden states and the LM head, chunk_size tokens at a time (posttrain.causal_lm_states): no (N, T-1, V) logits;
    # a vision-language batch also carries the prompts' model_inputs (pixel_values, token_type_ids, ...)
    _, states = causal_lm_states(model, chunk_size=chunk_size, input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False,
                                 **(batch.get("model_inputs") or {}))
    labels = input_ids[:, 1:]  # (N, T-1)
    scores = states[:, :-1].score(labels, return_entropy=True, entropy_grad=False, stats=("mean_logit", "argmax"))  # (N, T-1) each
    mask = batch["completion_mask"][:, 1:].to(scores.logps.dtype)  # (N, T-1)
    per_token = scores.logps * mask  # (N, T-1)
    stats = {"mean_logits": scores.stats["mean_logit"], "entropy": scores.entropy.detach(), "is_top1": scores.stats["argmax"] == labels}
    return {"per_token": per_token, "mask": mask, **stats}


# ---------------------------------------------------------------------------------------------- data
# Copied from posttrain_dpo.trainer._is_messages
def _is_messages(value: Any) -> bool:
    """A non-empty list of message dicts (tool-call turns may have no 'content')."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


# Copied from posttrain_dpo.trainer.extract_prompt
def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """Return ``(prompt, chosen, rejected)``: the longest shared prefix (messages or characters) becomes the prompt.

    For text, a space just before the split point stays with the completions (as in TRL).
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if isinstance(chosen, str) and n > 0 and chosen[n - 1] == " ":
        n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


# Copied from posttrain_dpo.trainer._chat_kwargs
def _chat_kwargs(row: dict, default_tools: list | None) -> dict:
    """Keyword arguments of ``apply_chat_template`` for one row: its ``tools`` (else the config's) and ``chat_template_kwargs``."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools if tools is not None else default_tools, **(row.get("chat_template_kwargs") or {})}


# Copied from posttrain_dpo.trainer._render
def _render(tokenizer, messages: list, kwargs: dict, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_row(row: dict, index: int, name: str, keys: tuple[str, ...]) -> bool:
    """Raise naming the row and column when a value is not text/messages; return whether the row is conversational."""
    conversational = _is_messages(row["chosen"])
    for key in (k for k in keys if row.get(k) is not None):
        value = row[key]
        ok = _is_messages(value) or (key == "prompt" and value == []) if conversational else isinstance(value, str)
        if not ok:
            kind = "a list of {'role', 'content'} messages" if conversational else "a string"
            raise ConfigError(
                f"{name} row {index}, column {key!r}: expected {kind} (like the row's 'chosen'), got {type(value).__name__} "
                f"{str(value)[:80]!r}. Fix or drop this row; {_FORMATS}."
            )
    return conversational


def tokenize_triple(row: dict, tokenizer, conversational: bool, responses: tuple[str, ...]) -> tuple[dict, bool]:
    """Return ``({"prompt_ids", "<response>_ids"...}, clean)`` for one validated row with an explicit prompt.

    As TRL 1.16's TPO: the prompt (with the generation prompt, for conversations) and each
    ``prompt + response`` are tokenized separately (an EOS appended to text responses), and the
    responses start where the prompt's tokens and all full sequences stop agreeing. ``clean`` is False
    when that boundary cut the tokenized prompt short (the caller warns once).
    """
    full = {}
    if conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the dataset is conversational but the tokenizer has no chat template: set tokenizer.chat_template, or give the rows as strings.")
        kwargs = _chat_kwargs(row, None)
        prompt_ids = _render(tokenizer, row["prompt"], kwargs, add_generation_prompt=True)
        for key in responses:
            full[key] = _render(tokenizer, row["prompt"] + row[key], kwargs)
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = list(tokenizer(row["prompt"])["input_ids"])
        for key in responses:
            text = row[key] if row[key].endswith(eos) else row[key] + eos
            full[key] = list(tokenizer(row["prompt"] + text)["input_ids"])
    n = min(prompt_completion_boundary(prompt_ids, ids) for ids in full.values())
    item = {"prompt_ids": prompt_ids[:n], **{f"{key}_ids": ids[n:] for key, ids in full.items()}}
    return item, n == len(prompt_ids)


@dataclass
class DataCollatorForTriplePreference:
    """Collate processed rows into one batch laid out chosen, rejected, gold (TRL 1.16's collator of the same name and fields).

    Each row holds ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and (with ``include_reference``)
    ``reference_ids``. Returns ``input_ids`` (prompt + response, right-padded with ``pad_token_id``),
    ``attention_mask`` and ``completion_mask`` (the response tokens), each (3B, T) or, without the
    gold rows, (2B, T); sequences are truncated to ``max_length`` per ``truncation_mode`` first and
    padded to a multiple of ``pad_to_multiple_of``.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"
    include_reference: bool = True

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.return_tensors != "pt":
            raise ConfigError(f"return_tensors={self.return_tensors!r} is not supported: DataCollatorForTriplePreference returns torch tensors ('pt').")
        seqs, masks = [], []
        for key in ("chosen", "rejected", "reference") if self.include_reference else ("chosen", "rejected"):
            for r in examples:
                seqs.append(list(r["prompt_ids"]) + list(r[f"{key}_ids"]))
                masks.append([0] * len(r["prompt_ids"]) + [1] * len(r[f"{key}_ids"]))
        if self.max_length is not None:
            if self.truncation_mode not in ("keep_start", "keep_end"):
                raise ConfigError(f"truncation_mode={self.truncation_mode!r} is invalid: use 'keep_start' or 'keep_end'.")
            cut = slice(None, self.max_length) if self.truncation_mode == "keep_start" else slice(-self.max_length, None)
            seqs, masks = [s[cut] for s in seqs], [m[cut] for m in masks]
        input_ids = pad([torch.tensor(s, dtype=torch.long) for s in seqs], padding_value=self.pad_token_id)  # (3B, T)
        attention_mask = pad([torch.ones(len(s), dtype=torch.long) for s in seqs], padding_value=0)  # (3B, T)
        completion_mask = pad([torch.tensor(m, dtype=torch.long) for m in masks], padding_value=0)  # (3B, T)
        multiple = self.pad_to_multiple_of
        if multiple and input_ids.shape[1] % multiple:
            extra = multiple - input_ids.shape[1] % multiple
            input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
            attention_mask, completion_mask = F.pad(attention_mask, (0, extra)), F.pad(completion_mask, (0, extra))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


# ---------------------------------------------------------------------------------------------- vision data
def _vision_texts(row: dict, processor, conversational: bool, num_images: int, responses: tuple[str, ...], *, where: str) -> tuple[str, dict[str, str]]:
    """Return the prompt text and each response's text of one vision-language row.

    DPO's ``_vision_texts`` with the gold response beside chosen and rejected: conversations get one
    ``{"type": "image"}`` part per image (``posttrain.prepare_multimodal_messages``) and are rendered by the
    processor's chat template, the prompt with the generation prompt and each ``prompt + response``; the
    prompt text is the longest prefix all renderings share and each response the rest. Text rows are used
    as they are (the prompt holds the model's image placeholders), the EOS token appended to responses
    that lack it, as for text-only rows.

    Raises:
        DataError: The number of image placeholders in the prompt differs from ``num_images``.
    """
    if not conversational:
        eos = processor_tokenizer(processor).eos_token or ""
        return row["prompt"], {key: row[key] if row[key].endswith(eos) else row[key] + eos for key in responses}
    if not getattr(processor, "chat_template", None):
        raise ConfigError("the dataset is conversational but the processor has no chat template: set processor.chat_template, or give the rows as strings.")
    kwargs = _chat_kwargs(row, None)
    prompt = prepare_multimodal_messages(row["prompt"], num_images, where=where)
    prompt_text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    full = {key: processor.apply_chat_template(prompt + prepare_multimodal_messages(row[key], 0, where=f"{where}, column {key!r}"), tokenize=False, **kwargs)
            for key in responses}
    n = 0
    for chars in zip(prompt_text, *full.values()):
        if len(set(chars)) > 1:
            break
        n += 1
    return prompt_text[:n], {key: text[n:] for key, text in full.items()}


# Copied from posttrain_dpo.trainer._concat_padded
def _concat_padded(arrays: list, pad_value: int = -100):
    """Concatenate ``(n_i, T_i, ...)`` numpy arrays on axis 0, padding axis 1 to the longest with ``pad_value``."""
    import numpy as np

    width = max(a.shape[1] for a in arrays)
    padded = [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=pad_value) for a in arrays]
    return np.concatenate(padded, axis=0)


# ------------------------------------------------------------------------------------------- trainer
class TPOTrainer(TrainerSurface):
    """Train a causal LM with TPO / TPO-L on (prompt, chosen, rejected, gold reference) rows; TRL 1.16's ``TPOTrainer`` signature.

    Metrics (TRL's names, means over the micro-batch): ``rewards/chosen``, ``rewards/rejected`` (beta
    times the scores), ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
    ``logits/chosen``, ``logits/rejected``, ``entropy`` (over every response token, gold included),
    ``mean_token_accuracy`` (chosen tokens); the loop adds ``num_tokens``.

    Args:
        model: A causal LM, a ``PeftModel``, or a Hub id / local directory.
        args: A :class:`TPOConfig` (or a dict / TRL ``TPOConfig``).
        data_collator: Optional collator of processed rows (``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
            ``reference_ids``) into ``input_ids``/``attention_mask``/``completion_mask`` laid out chosen,
            rejected, gold (TRL's ``DataCollatorForTriplePreference`` works); it must truncate itself.
            Default: :class:`DataCollatorForTriplePreference` from the config (``trainer.data_collator``).
        train_dataset: Rows (see the module docstring); a ``datasets.Dataset``, an ``IterableDataset`` or a list of dicts.
        eval_dataset: Rows of the same shape, or a dict of them (metrics ``eval_<name>_...``).
        processing_class: The tokenizer, or a vision-language model's processor (loaded with the model when omitted).
        compute_metrics: ``f(EvalPrediction) -> dict`` run at each evaluation, given the logits (an extra forward
            pass) and the ``input_ids`` of every collated row, as TRL 1.16's ``prediction_step``.
        callbacks: ``transformers.TrainerCallback`` objects.
        optimizers: Must be ``(None, None)``: set ``optim``/``lr_scheduler_type`` in the config.
        peft_config: Optional PEFT config (the adapter is trained).
        allow_experimental: Python opt-in for this experimental method.

    Raises:
        posttrain.ConfigError: invalid data (row and column named), no row left after truncation, an
            encoder-decoder model, a ``PeftModel`` with ``peft_config`` (as TRL), or an argument that
            cannot be honoured (named, with the alternative).
    """

    def __init__(
        self,
        model=None,
        args: TPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        *,
        allow_experimental: bool = False,
    ) -> None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        self.args = args = as_config(args, TPOConfig, default_output_dir=f"{str(name).rstrip('/').split('/')[-1]}-TPO" if name else None)
        # The maturity gate runs first: TrainingLoop refuses an experimental method without an opt-in.
        self.loop = TrainingLoop(args, method="tpo", allow_experimental=allow_experimental, callbacks=callbacks)
        if optimizers is not None and any(part is not None for part in optimizers):
            raise ConfigError("optimizers=(optimizer, scheduler) cannot be honoured: set optim, learning_rate, weight_decay and lr_scheduler_type in the config.")
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (a datasets.Dataset, an IterableDataset or a list of dicts).")
        if peft_config is not None and is_peft_model(model):
            raise ConfigError(
                "model is already a PeftModel and peft_config is given (TRL refuses this too): merge and unload the existing adapter "
                "(or pass the base model) with peft_config, or pass the PeftModel without peft_config to train its adapter."
            )
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        base = self.model.get_base_model() if is_peft_model(self.model) else self.model
        if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
            raise ConfigError(f"{type(base).__name__} is an encoder-decoder model; posttrain's TPO trains decoder-only causal LMs (as TRL 1.16's TPO).")
        if args.disable_dropout:
            disable_dropout(self.model)
        self.tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if self.tokenizer.pad_token is None:  # as TRL: EOS pads, and the model's configs agree
            if self.tokenizer.eos_token is None:
                raise ConfigError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token to one of its tokens.")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_token_id = self.tokenizer.pad_token_id
        config = getattr(self.model, "config", None)
        if config is not None:
            (config.get_text_config() if hasattr(config, "get_text_config") else config).pad_token_id = self.pad_token_id
        self.responses = ("chosen", "rejected", "reference") if args.tpo_alpha != 0.0 else ("chosen", "rejected")
        if data_collator is None:  # TRL's default: the gold rows are dropped from the batch when tpo_alpha == 0
            data_collator = DataCollatorForTriplePreference(pad_token_id=self.pad_token_id, max_length=args.max_length, truncation_mode=args.truncation_mode,
                                                            pad_to_multiple_of=args.pad_to_multiple_of, include_reference=args.tpo_alpha != 0.0)
        self.data_collator = data_collator
        self.compute_metrics = compute_metrics
        if compute_metrics is not None:
            self.evaluate_batches = self._evaluate_with_compute_metrics  # the loop's default evaluation has no predictions
        self._warned = set()
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)  # checks this object against posttrain.MethodProtocol

    # train(), evaluate(), save_model(), state, callbacks: posttrain.TrainerSurface, delegated to self.loop.

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message + " Shown once; it likely applies to other rows too.", stacklevel=4)

    # ------------------------------------------------------------------ data
    def process_dataset(self, dataset, name: str):
        """Validate and tokenize rows into a ``datasets.Dataset`` of ``prompt_ids``/``chosen_ids``/``rejected_ids`` (+ ``reference_ids``),
        TRL's columns; also used by ``evaluate(eval_dataset=...)``.

        Raises:
            ConfigError: an empty dataset, missing columns, an invalid row (named by index), or no row left.
        """
        args = self.args
        if isinstance(dataset, dict):
            raise ConfigError(f"{name} is a dict of datasets {sorted(dataset)}: pass one dataset (e.g. dataset['train']); only eval_dataset may be a dict.")
        dataset = undecoded_image_columns(dataset)  # images are decoded in collate (DataLoader workers), not here
        if isinstance(dataset, IterableDataset):
            limit = None
            if name == "train_dataset" and args.max_steps > 0:  # no more rows than max_steps can consume
                limit = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * self.loop.accelerator.num_processes
            rows = [dict(r) for r in itertools.islice(dataset, limit)]
        elif hasattr(dataset, "to_list"):
            rows = dataset.to_list()
        else:
            rows = [dict(r) if isinstance(r, dict) else r for r in dataset]
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one (prompt, chosen, rejected, reference) row.")
        column = check_vision_model(self.model, sorted(rows[0]), dataset_name=name) if isinstance(rows[0], dict) else None
        if column is not None:  # DataError above for a text-only model; images stay encoded until collate
            from datasets import Dataset

            return undecoded_image_columns(Dataset.from_list(self._prepare_vision_rows(rows, name, column)))
        keys = self.responses
        out = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"{name} row {index} is a {type(row).__name__}, not a dict of columns; {_FORMATS}.")
            token_keys = ("prompt_ids",) + tuple(f"{k}_ids" for k in keys)
            if all(row.get(k) is not None for k in token_keys):  # already tokenized
                item = {k: list(row[k]) for k in token_keys}
            else:
                missing = [k for k in keys if row.get(k) is None]
                if missing:
                    hint = " Unpaired prompt/completion/label rows belong to the 'kto' method." if "label" in row else ""
                    if missing == ["reference"]:
                        hint += " Without gold responses, set tpo_alpha=0.0 (no NLL term) or use the 'cpo'/'dpo' methods."
                    raise ConfigError(f"{name} row {index}: column {missing[0]!r} is missing (columns: {sorted(row)}); {_FORMATS}.{hint}")
                conversational = _check_row(row, index, name, ("prompt",) + keys)
                if row.get("prompt") is None:
                    self._split_implicit_prompt(row, index, name, conversational)
                item, clean = tokenize_triple(row, self.tokenizer, conversational, keys)
                if not clean:
                    self._warn_once(
                        "boundary",
                        f"{name} row {index}: the tokenized prompt is not a prefix of the tokenized prompt + response (the chat template "
                        "renders the prompt alone differently, or tokens merge across the boundary); the responses start where they "
                        "diverge (as in TRL).",
                    )
            if args.max_length is not None and args.truncation_mode == "keep_start" and len(item["prompt_ids"]) >= args.max_length:
                self._warn_once(
                    "empty",
                    f"{name} row {index}: the prompt alone fills max_length={args.max_length}, so no response token is left; such rows are "
                    "dropped (TRL keeps them: they add a constant to the loss, and the NLL is NaN when a whole batch is such rows). Raise max_length.",
                )
                continue
            out.append(item)
        if not out:
            raise ConfigError(f"every prompt of {name} has >= max_length={args.max_length} tokens, so no row is left: raise max_length or use truncation_mode='keep_end'.")
        from datasets import Dataset

        return Dataset.from_list(out)

    def _split_implicit_prompt(self, row: dict, index: int, name: str, conversational: bool) -> None:
        """Fill in ``row["prompt"]`` of a row without one: the prefix shared by chosen and rejected, cut from them and from the gold response.

        Raises:
            ConfigError: the gold response does not start with that prompt, or chosen and rejected
                conversations leave nothing to prefer.
        """
        prompt, row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
        if "reference" in self.responses:
            if row["reference"][: len(prompt)] != prompt:
                raise ConfigError(
                    f"{name} row {index}, column 'reference': it does not start with the implicit prompt shared by 'chosen' and "
                    f"'rejected' ({str(prompt)[:60]!r}); give an explicit 'prompt' column, or start the reference with that prompt."
                )
            row["reference"] = row["reference"][len(prompt):]
        row["prompt"] = prompt
        if conversational and (not row["chosen"] or not row["rejected"]):
            raise ConfigError(f"{name} row {index}: 'chosen' and 'rejected' are identical conversations or one contains the other; there is nothing to prefer.")

    def _prepare_vision_rows(self, rows: list[dict], name: str, column: str) -> list[dict]:
        """Return vision-language rows ``{"prompt", "chosen_ids", "rejected_ids"[, "reference_ids"], "images", "where"}``.

        As DPO's: ``prompt`` is the prompt's text (with the chat template's image placeholders) and
        ``images`` the row's images as given; both go through the processor in :meth:`collate`, where the
        image tokens are expanded and the images decoded; the responses are tokenized here. ``where`` names
        the row in the errors collate may raise. Missing images and image files that do not exist are
        refused here; so are ``truncation_mode='keep_end'`` and pre-tokenized rows.
        """
        args = self.args
        processor = self.processing_class
        if not is_processor(processor):
            raise ConfigError(
                f"{name} has an image column {column!r} but processing_class is a {type(processor).__name__}, not a processor: "
                "pass the model's processor (transformers.AutoProcessor.from_pretrained(<model>)) as processing_class."
            )
        if args.max_length is not None and args.truncation_mode == "keep_end":
            raise ConfigError(
                "truncation_mode='keep_end' cannot be used with images: the image tokens are in the prompt, which keep_end "
                "would cut, leaving images without their tokens. Use truncation_mode='keep_start' or max_length=None."
            )
        keys = self.responses
        out = []
        for index, row in enumerate(rows):
            where = f"{name} row {index}"
            missing = [k for k in keys if row.get(k) is None]
            if missing:
                hint = " Without gold responses, set tpo_alpha=0.0 (no NLL term)." if missing == ["reference"] else ""
                tokenized = " (pre-tokenized rows cannot carry images)" if row.get("prompt_ids") is not None else ""
                raise ConfigError(f"{where}: column {missing[0]!r} is missing{tokenized} (columns: {sorted(row)}); {_FORMATS}.{hint}")
            value = row.get(column)
            images = list(value) if column == "images" and isinstance(value, (list, tuple)) else [value]
            check_images_present(images, f"{where}, column {column!r}")
            conversational = _check_row(row, index, name, ("prompt",) + keys)
            if row.get("prompt") is None:
                self._split_implicit_prompt(row, index, name, conversational)
                if not row["chosen"] or not row["rejected"]:
                    raise ConfigError(f"{where}: 'chosen' and 'rejected' are identical or one contains the other; there is nothing to prefer.")
            prompt, texts = _vision_texts(row, processor, conversational, len(images), keys, where=where)
            tokenizer = processor_tokenizer(processor)
            ids = {f"{key}_ids": list(tokenizer(text, add_special_tokens=False)["input_ids"]) for key, text in texts.items()}
            out.append({"prompt": prompt, **ids, "images": images, "where": where})
        return out

    def collate(self, rows: list[dict]) -> dict:
        """Return ``data_collator(rows)`` (``input_ids``/``attention_mask``/``completion_mask``, (3B or 2B, T): chosen rows,
        rejected rows, then gold rows) plus ``num_tokens``.

        Vision-language rows: each prompt and its images go through the processor first (here, so in the
        DataLoader workers with ``dataloader_num_workers > 0``), the collator gets the rows with their
        ``prompt_ids``, and ``model_inputs`` holds each prompt's ``pixel_values``, ... for each of its
        chosen, rejected (and gold) rows, which share the prompt's images; token-aligned ones such as
        ``token_type_ids`` as (3B or 2B, T), 0 on responses and padding.
        """
        vision = "images" in rows[0]
        if vision:
            rows, per_sample = self._process_prompts(rows)
        batch = dict(self.data_collator(list(rows)))
        batch.setdefault("num_tokens", int(batch["attention_mask"].sum()))
        if vision:
            repeats = batch["input_ids"].shape[0] // len(rows)  # the branches, each laid out like the rows
            every = per_sample * repeats
            model_inputs = collate_model_inputs(every)
            model_inputs.update(sequence_model_inputs(every, [len(r["prompt_ids"]) for r in rows] * repeats, batch["input_ids"].shape[1], left=False))
            batch["model_inputs"] = model_inputs
        return batch

    # Copied from posttrain_dpo.trainer.DPOTrainer._process_prompts
    def _process_prompts(self, rows: list[dict]) -> tuple[list[dict], list[dict]]:
        """Decode each row's images and run its prompt through the processor: rows with ``prompt_ids``, and their extra model inputs.

        Raises:
            DataError: An image cannot be read, the processor refuses the prompt's placeholders for its
                images, or the prompt (image tokens included) has ``>= max_length`` tokens; the row is named.
        """
        out, per_sample = [], []
        for row in rows:
            where = row["where"]
            images = row_images({"images": row["images"]}, where=where)
            ids, model_inputs = vision_prompt_inputs(self.processing_class, row["prompt"], images, where=where)
            if self.args.max_length is not None and len(ids) >= self.args.max_length:
                raise DataError(
                    f"{where}: the prompt has {len(ids)} tokens with its image tokens, >= max_length={self.args.max_length}, so "
                    "truncation would cut its image tokens and leave no completion: raise max_length, or use fewer / smaller images."
                )
            out.append({**row, "prompt_ids": ids})
            per_sample.append(model_inputs)
        return out, per_sample

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // len(self.responses)  # rows (pairs)

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, batch: dict, num_items_in_batch):
        args = self.args
        out = concatenated_logps(model, batch, chunk_size=self.args.logprob_chunk_size)
        per_token, mask = out["per_token"], out["mask"]  # (N, T-1)
        n_branches = len(self.responses)
        logps = per_token.sum(1)  # (N,)
        if args.loss_type in ("ipo", "tpo-l"):  # length-normalized scores (TPO-L's, and TRL's IPO)
            logps = logps / mask.sum(1).clamp(min=1)
        chosen, rejected = logps.chunk(n_branches)[:2]  # (B,), (B,)
        losses = tpo_losses(args, chosen, rejected)  # (B,)
        loss = losses.sum() / num_items_in_batch
        if n_branches == 3:
            # The gold NLL is a token mean over the micro-batch (as TRL); weighting it by the micro-batch's share
            # of the step's rows makes the step's loss TRL's mean of micro-batch losses when micro-batches are equal.
            gold_per_token, gold_mask = per_token.chunk(3)[2], mask.chunk(3)[2]
            nll = -gold_per_token.sum() / gold_mask.sum()
            loss = loss + args.tpo_alpha * nll * (self.count_items(batch) / num_items_in_batch)
        with torch.no_grad():
            chosen_mask, rejected_mask = mask.chunk(n_branches)[:2]
            chosen_logits, rejected_logits = out["mean_logits"].chunk(n_branches)[:2]
            chosen_rewards, rejected_rewards = args.beta * chosen.detach(), args.beta * rejected.detach()
            metrics = {
                "entropy": (out["entropy"] * mask).sum() / mask.sum().clamp(min=1),
                "logits/chosen": (chosen_logits * chosen_mask).sum() / chosen_mask.sum().clamp(min=1),
                "logits/rejected": (rejected_logits * rejected_mask).sum() / rejected_mask.sum().clamp(min=1),
                "mean_token_accuracy": (out["is_top1"].chunk(n_branches)[0] * chosen_mask).sum() / chosen_mask.sum().clamp(min=1),
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": chosen.detach().mean(),
                "logps/rejected": rejected.detach().mean(),
            }
        return loss, metrics

    # Copied from posttrain_dpo.trainer.DPOTrainer._evaluate_with_compute_metrics
    @torch.no_grad()
    def _evaluate_with_compute_metrics(self, model, batches) -> dict:
        """Evaluation with ``compute_metrics``: the item-weighted means of ``compute_loss`` plus ``compute_metrics(EvalPrediction)``.

        The predictions are the logits of an extra forward pass and the labels the ``input_ids``
        (chosen rows, then rejected, per batch), padded with -100 across batches, as in TRL 1.16.
        """
        from transformers import EvalPrediction

        accelerator = self.loop.accelerator
        totals: dict[str, torch.Tensor] = {}
        weight = 0
        predictions, labels = [], []
        for batch in batches:
            n = self.count_items(batch)
            loss, metrics = self.compute_loss(model, batch, n)
            for key, value in {"loss": loss, **metrics}.items():
                totals[key] = totals.get(key, 0) + value.detach().float() * n
            weight += n
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **(batch.get("model_inputs") or {})).logits
            predictions.append(logits.float().cpu().numpy())
            labels.append(batch["input_ids"].cpu().numpy())
        keys = sorted(totals)
        stacked = torch.stack([torch.as_tensor(totals[k], device=self.loop.device) for k in keys] + [torch.tensor(float(weight), device=self.loop.device)])
        if accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked, reduction="sum")
            from accelerate.utils import gather_object

            predictions, labels = gather_object(predictions), gather_object(labels)
        result = {k: (stacked[i] / stacked[-1].clamp(min=1)).item() for i, k in enumerate(keys)}
        extra = self.compute_metrics(EvalPrediction(predictions=_concat_padded(predictions), label_ids=_concat_padded(labels)))
        result.update({k: float(v) for k, v in (extra or {}).items()})
        return result
