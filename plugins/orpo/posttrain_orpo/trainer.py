"""ORPO: Odds Ratio Preference Optimization (Hong, Lee and Thorne 2024, arXiv:2403.07691), on the core loop.

For a prompt x with chosen response y_w and rejected response y_l, with
``log p(y|x) = (1/|y|) sum_t log pi(y_t | x, y_<t)`` (the mean token log-prob of the response) and
``log odds(y|x) = log p - log(1 - p)``:

    L = L_NLL(chosen) - beta * log sigmoid(log odds(y_w|x) - log odds(y_l|x))

as TRL 1.16's ``trl.experimental.orpo``: ``L_NLL`` is the mean next-token NLL over every non-padding
token of the chosen sequences (prompt included, as TRL), ``log(1 - p)`` is computed stably
(``log1mexp``), and there is no reference model. Log-probs are computed chunk by chunk from the hidden
states (``TrainingConfig.logprob_chunk_size``): no full (2B, T, V) logits.

Encoder-decoder models (T5, BART) are trained as TRL 1.16 trains them: the prompt is the encoder's
input, each response the decoder's labels (decoder inputs: the labels shifted right after
``decoder_start_token_id``); log-probs and the NLL cover the response tokens only (there are no prompt
tokens on the decoder side). Heavy module: imports torch.

Vision-language models (rows with an ``images`` / ``image`` column, a processor as ``processing_class``):
as CPO (and DPO), the texts are rendered and the responses tokenized once; each prompt goes through the
processor with its images when the batch is collated (in the DataLoader workers with
``dataloader_num_workers > 0``), and chosen and rejected share the prompt's image inputs
(``batch["model_inputs"]``, given to the forward). The NLL leaves out the image tokens (they stand for
pixels, as in SFT); it still covers the prompt's text tokens.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
import torch.nn.functional as F

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
    image_token_ids,
    is_processor,
    pad,
    prepare_multimodal_messages,
    processor_tokenizer,
    row_images,
    sequence_model_inputs,
    undecoded_image_columns,
    vision_prompt_inputs,
)

from posttrain_orpo.config import ORPOConfig

__all__ = ["ORPOTrainer", "PaddingCollator", "concatenate_pair_batch", "log1mexp", "odds_ratio_losses", "tokenize_encoder_decoder_row", "tokenize_row"]

#: The processed columns (TRL 1.16's names) of a decoder-only and of an encoder-decoder model.
DECODER_COLUMNS = ("prompt_input_ids", "prompt_attention_mask", "chosen_input_ids", "chosen_attention_mask", "chosen_labels",
                   "rejected_input_ids", "rejected_attention_mask", "rejected_labels")
ENCODER_DECODER_COLUMNS = ("prompt_input_ids", "prompt_attention_mask", "chosen_labels", "rejected_labels")

_FORMATS = (
    "ORPO takes rows {'prompt', 'chosen', 'rejected'} as strings or as {'role', 'content'} message lists, or "
    "{'chosen', 'rejected'} alone (the shared prefix becomes the prompt)"
)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Return ``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2`` (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def odds_ratio_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(losses, log_sigmoid_ratio, log_odds)``, each (B,), from mean response log-probs (B,).

    ``losses = -beta * log sigmoid(log_odds)``, ``log_odds = (lw - ll) - (log(1 - e^lw) - log(1 - e^ll))``
    (the paper's Eqs. 4 and 7 in log space).
    """
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))
    ratio = F.logsigmoid(log_odds)
    return -beta * ratio, ratio, log_odds


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


def _as_text(row: dict, index: int, name: str, tokenizer, tools: Any) -> tuple[str, str, str]:
    """Return ``(prompt, chosen, rejected)`` strings; conversations are rendered with the chat template (as TRL)."""
    keys = ("prompt", "chosen", "rejected")
    if _is_messages(row["chosen"]):
        for key in keys:
            if not (_is_messages(row[key]) or (key == "prompt" and row[key] == [])):
                raise ConfigError(f"{name} row {index}, column {key!r}: expected a list of {{'role', 'content'}} messages (like 'chosen'), got {type(row[key]).__name__}; {_FORMATS}.")
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the dataset is conversational but the tokenizer has no chat template: set tokenizer.chat_template, or give the rows as strings.")
        kwargs = {"tools": row.get("tools", tools), **(row.get("chat_template_kwargs") or {})}
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True, **kwargs)
        texts = []
        for key in ("chosen", "rejected"):
            full = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False, **kwargs)
            if not full.startswith(prompt):
                raise ConfigError(f"{name} row {index}: the chat template renders prompt + {key} without the prompt as a prefix; ORPO needs a template that appends turns.")
            texts.append(full[len(prompt):])
        return prompt, texts[0], texts[1]
    for key in keys:
        if not isinstance(row[key], str):
            raise ConfigError(f"{name} row {index}, column {key!r}: expected a string (like 'chosen'), got {type(row[key]).__name__} {str(row[key])[:80]!r}; {_FORMATS}.")
    return row["prompt"], row["chosen"], row["rejected"]


# Copied from posttrain_cpo.trainer._split_answer
def _split_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Tokenize ``prompt + answer`` once; return ``(prompt_ids, answer_ids)`` split where the prompt's own tokens stop matching.

    A token merging across the boundary moves to the answer (TRL 1.16's ``build_tokenized_answer``).
    """
    full = list(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


# Copied from posttrain_cpo.trainer.tokenize_row
def tokenize_row(prompt: str, chosen: str, rejected: str, tokenizer, max_length: int | None) -> dict | None:
    """Return TRL 1.16's tokenized columns of one pair of texts for a decoder-only model, or None.

    Columns (:data:`DECODER_COLUMNS`): ``prompt_input_ids``/``prompt_attention_mask``, and per side
    ``<side>_input_ids`` (prompt + completion), ``<side>_attention_mask`` and ``<side>_labels`` (the
    input ids with -100 on the prompt). As TRL 1.16's ORPO: text is tokenized without special tokens,
    the BOS token (if the tokenizer has one) starts every prompt, the EOS token (if any) ends every completion, and
    each completion is cut to ``max_length - prompt length``. None when that leaves no completion
    token (the pair is dropped).

    Raises:
        ValueError: the chosen and rejected prompts tokenize to sequences differing by more than one token.
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    chosen_prompt, chosen_ids = _split_answer(tokenizer, prompt, chosen)
    rejected_prompt, rejected_ids = _split_answer(tokenizer, prompt, rejected)
    differing = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt))
    if differing > 1 or abs(len(chosen_prompt) - len(rejected_prompt)) > 1:
        raise ValueError("the chosen and rejected prompts tokenize differently beyond the last token")
    prompt_ids = prompt_ids[: min(len(chosen_prompt), len(rejected_prompt))]  # a last token merged into a completion is not the prompt's
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        prompt_ids = prompt_ids if prompt_ids[:1] == [bos] else [bos] + prompt_ids
        chosen_prompt = chosen_prompt if chosen_prompt[:1] == [bos] else [bos] + chosen_prompt
        rejected_prompt = rejected_prompt if rejected_prompt[:1] == [bos] else [bos] + rejected_prompt
    if eos is not None:
        chosen_ids = chosen_ids if chosen_ids[-1:] == [eos] else chosen_ids + [eos]
        rejected_ids = rejected_ids if rejected_ids[-1:] == [eos] else rejected_ids + [eos]
    if max_length is not None:
        chosen_ids = chosen_ids[: max(0, max_length - len(chosen_prompt))]
        rejected_ids = rejected_ids[: max(0, max_length - len(rejected_prompt))]
    if not chosen_ids or not rejected_ids:
        return None
    out = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
    for side, head, tail in (("chosen", chosen_prompt, chosen_ids), ("rejected", rejected_prompt, rejected_ids)):
        out[f"{side}_input_ids"] = head + tail
        out[f"{side}_attention_mask"] = [1] * (len(head) + len(tail))
        out[f"{side}_labels"] = [-100] * len(head) + tail
    return out


# Copied from posttrain_cpo.trainer.tokenize_encoder_decoder_row
def tokenize_encoder_decoder_row(prompt: str, chosen: str, rejected: str, tokenizer, max_completion_length: int) -> dict | None:
    """Return TRL 1.16's tokenized columns of one pair of texts for an encoder-decoder model, or None.

    Columns (:data:`ENCODER_DECODER_COLUMNS`): the prompt is the encoder's input
    (``prompt_input_ids``/``prompt_attention_mask``, tokenized with the tokenizer's special tokens and
    not truncated, as TRL); each completion is tokenized alone with special tokens (T5's tokenizer
    appends EOS), cut to ``max_completion_length`` tokens, and becomes the decoder's labels
    (``chosen_labels``/``rejected_labels``). None when a completion has no token (the pair is dropped).

    Raises:
        ValueError: the prompt has no token (the encoder needs an input).
    """
    prompt_tokens = tokenizer(prompt, add_special_tokens=True)
    if len(prompt_tokens["input_ids"]) == 0:
        raise ValueError("the prompt has no token, and an encoder-decoder model needs an encoder input")
    labels = {
        side: list(tokenizer(text, truncation=True, max_length=max_completion_length, add_special_tokens=True)["input_ids"])
        for side, text in (("chosen", chosen), ("rejected", rejected))
    }
    if not labels["chosen"] or not labels["rejected"]:
        return None
    return {
        "prompt_input_ids": list(prompt_tokens["input_ids"]),
        "prompt_attention_mask": list(prompt_tokens["attention_mask"]),
        "chosen_labels": labels["chosen"],
        "rejected_labels": labels["rejected"],
    }


# Copied from posttrain_cpo.trainer.PaddingCollator
class PaddingCollator:
    """Pad processed preference rows into TRL 1.16's batch (the layout of ``DPODataCollatorWithPadding``).

    Every ``*_input_ids`` column becomes a tensor padded with ``pad_token_id``, ``*_attention_mask``
    with 0 and ``*_labels`` with -100; other columns stay lists. Decoder-only: the prompt columns are
    left-padded, the rest right-padded; encoder-decoder: all right-padded. The trainer turns this
    batch into the model's (chosen rows first, then rejected) with :func:`concatenate_pair_batch`.
    """

    def __init__(self, pad_token_id: int, is_encoder_decoder: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.is_encoder_decoder = is_encoder_decoder

    def __call__(self, rows: list[dict]) -> dict:
        batch: dict[str, Any] = {}
        for key in rows[0]:
            values = [row[key] for row in rows]
            if key.endswith("_input_ids"):
                value = self.pad_token_id
            elif key.endswith("_attention_mask"):
                value = 0
            elif key.endswith("_labels"):
                value = -100
            else:
                batch[key] = values
                continue
            side = "left" if key.startswith("prompt_") and not self.is_encoder_decoder else "right"
            batch[key] = pad([torch.tensor(v, dtype=torch.long) for v in values], padding_value=value, padding_side=side)
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pad_token_id={self.pad_token_id}, is_encoder_decoder={self.is_encoder_decoder})"


# Copied from posttrain_cpo.trainer.concatenate_pair_batch
def concatenate_pair_batch(batch: dict, *, is_encoder_decoder: bool, padding_value: int) -> dict:
    """Return the model's batch from a collated pair batch: chosen rows first, then rejected (TRL 1.16's ``concatenated_inputs``).

    Decoder-only: ``input_ids``/``attention_mask``/``labels`` (2B, T) from the ``chosen_*`` and
    ``rejected_*`` tensors, right-padded to the longer side with ``padding_value`` / 0 / -100.
    Encoder-decoder: ``labels`` (2B, L) from ``chosen_labels``/``rejected_labels`` (padded with -100)
    and the prompt twice, ``input_ids``/``attention_mask`` (2B, P).

    Raises:
        ConfigError: a column the model's batch needs is missing (a custom ``data_collator``).
    """
    needed = ENCODER_DECODER_COLUMNS if is_encoder_decoder else DECODER_COLUMNS[2:]
    missing = [key for key in needed if not isinstance(batch.get(key), torch.Tensor)]
    if missing:
        raise ConfigError(
            f"the data collator's batch has no tensor {missing[0]!r} (keys: {sorted(batch)}): a data_collator must return TRL's "
            f"padded columns {', '.join(needed)} (the default collator does)."
        )

    def cat(key: str, value: int) -> torch.Tensor:
        chosen, rejected = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
        width = max(chosen.shape[1], rejected.shape[1])
        return torch.cat([F.pad(t, (0, width - t.shape[1]), value=value) for t in (chosen, rejected)])

    if is_encoder_decoder:
        return {"input_ids": batch["prompt_input_ids"].repeat(2, 1), "attention_mask": batch["prompt_attention_mask"].repeat(2, 1), "labels": cat("labels", -100)}
    return {"input_ids": cat("input_ids", padding_value), "attention_mask": cat("attention_mask", 0), "labels": cat("labels", -100)}


# Copied from posttrain_cpo.trainer.encoder_decoder_auto_class
def encoder_decoder_auto_class(model, args):
    """Return ``transformers.AutoModelForSeq2SeqLM`` when ``model`` names (Hub id or directory) an encoder-decoder model, else None."""
    name = model if model is not None else args.model_name_or_path
    if not isinstance(name, str):
        return None
    import transformers

    revision = (args.model_init_kwargs or {}).get("revision")
    try:
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=args.trust_remote_code, **({"revision": revision} if revision else {}))
    except Exception:  # noqa: BLE001 - loading the model itself reports the problem with its own message
        return None
    return transformers.AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else None


# Copied from posttrain_cpo.trainer.resolve_encoder_decoder
def resolve_encoder_decoder(model, flag: bool | None) -> bool:
    """Return whether ``model`` is an encoder-decoder, read from ``model.config.is_encoder_decoder`` and checked against ``flag``.

    Raises:
        ConfigError: ``flag`` (the config's ``is_encoder_decoder``) contradicts the model, or an
            encoder-decoder model's config has no ``decoder_start_token_id`` or ``pad_token_id``.
    """
    config = getattr(model, "config", None)
    actual = bool(getattr(config, "is_encoder_decoder", False))
    if flag is not None and bool(flag) != actual:
        kind = "an encoder-decoder" if actual else "a decoder-only"
        raise ConfigError(
            f"is_encoder_decoder={flag} contradicts the model: {type(model).__name__} is {kind} model (config.is_encoder_decoder={actual}); "
            "leave is_encoder_decoder=None to read it from the model's config."
        )
    if actual:
        for name in ("decoder_start_token_id", "pad_token_id"):
            if getattr(config, name, None) is None:
                raise ConfigError(f"the encoder-decoder model's config has no {name}: set model.config.{name} (T5 uses the pad token id) before building the trainer.")
    return actual


# Copied from posttrain_cpo.trainer._refuse_unsupported_arguments
def _refuse_unsupported_arguments(model, args, model_init, optimizers) -> None:
    """Raise a ConfigError naming each TRL argument or combination that cannot be honoured, and the alternative."""
    if model_init is not None:
        raise ConfigError("model_init= is not supported (no hyperparameter search): pass the model itself (or its Hub id) as model=.")
    if optimizers is not None and any(part is not None for part in optimizers):
        raise ConfigError(
            "optimizers=(optimizer, scheduler) cannot be honoured: posttrain builds the optimizer and schedule itself "
            "(they must follow resume and accumulation); set optim, optim_args, learning_rate, weight_decay, "
            "lr_scheduler_type and lr_scheduler_kwargs in the config instead."
        )
    if args.model_init_kwargs is not None and model is not None and not isinstance(model, str):
        raise ConfigError("model_init_kwargs is set but the model is already instantiated: pass the model by name (Hub id or directory), or leave model_init_kwargs=None.")
    if args.generate_during_eval:
        import importlib.util

        if importlib.util.find_spec("wandb") is None and importlib.util.find_spec("comet_ml") is None:
            raise ConfigError("generate_during_eval=True requires wandb or comet_ml to be installed (as TRL); set generate_during_eval=False.")


# ---------------------------------------------------------------------------------------------- vision data
# Copied from posttrain_dpo.trainer._check_row
def _check_row(row: dict, index: int, name: str) -> bool:
    """Raise naming the row and column when a value is not text/messages; return whether the row is conversational."""
    keys = [k for k in ("prompt", "chosen", "rejected") if k in row]
    conversational = _is_messages(row["chosen"])
    for key in keys:
        value = row[key]
        ok = _is_messages(value) or (key == "prompt" and value == []) if conversational else isinstance(value, str)
        if not ok:
            kind = "a list of {'role', 'content'} messages" if conversational else "a string"
            raise ConfigError(
                f"{name} row {index}, column {key!r}: expected {kind} (like the row's 'chosen'), got {type(value).__name__} "
                f"{str(value)[:80]!r}. Fix or drop this row; {_FORMATS}."
            )
    return conversational


# Copied from posttrain_dpo.trainer._chat_kwargs
def _chat_kwargs(row: dict, default_tools: list | None) -> dict:
    """Keyword arguments of ``apply_chat_template`` for one row: its ``tools`` (else the config's) and ``chat_template_kwargs``."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools if tools is not None else default_tools, **(row.get("chat_template_kwargs") or {})}


# Copied from posttrain_dpo.trainer._vision_texts
def _vision_texts(row: dict, processor, conversational: bool, num_images: int, *, where: str, tools: list | None = None) -> tuple[str, str, str]:
    """Return the ``(prompt, chosen, rejected)`` texts of one vision-language row (TRL 1.16's split).

    Conversations get one ``{"type": "image"}`` part per image (before the first user text when the
    prompt has none: ``posttrain.prepare_multimodal_messages``) and are rendered by the processor's chat
    template: the prompt with the generation prompt, and ``prompt + chosen``, ``prompt + rejected``; the
    prompt text is the longest prefix the three renderings share and each completion the rest. Text
    rows are used as they are (the prompt holds the model's image placeholders), the EOS token appended
    to completions that lack it, as ORPO does for text-only rows.

    Raises:
        DataError: The number of image placeholders in the prompt differs from ``num_images``.
    """
    if not conversational:
        eos = processor_tokenizer(processor).eos_token or ""
        chosen, rejected = row["chosen"], row["rejected"]
        return row["prompt"], chosen if chosen.endswith(eos) else chosen + eos, rejected if rejected.endswith(eos) else rejected + eos
    if not getattr(processor, "chat_template", None):
        raise ConfigError("the dataset is conversational but the processor has no chat template: set processor.chat_template, or give the rows as strings.")
    kwargs = _chat_kwargs(row, tools)
    prompt = prepare_multimodal_messages(row["prompt"], num_images, where=where)
    chosen = prepare_multimodal_messages(row["chosen"], 0, where=f"{where}, column 'chosen'")
    rejected = prepare_multimodal_messages(row["rejected"], 0, where=f"{where}, column 'rejected'")
    prompt_text = processor.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    chosen_text = processor.apply_chat_template(prompt + chosen, tokenize=False, **kwargs)
    rejected_text = processor.apply_chat_template(prompt + rejected, tokenize=False, **kwargs)
    n = 0
    for a, b, c in zip(prompt_text, chosen_text, rejected_text):
        if not a == b == c:
            break
        n += 1
    return prompt_text[:n], chosen_text[n:], rejected_text[n:]


# Copied from posttrain_cpo.trainer._pair_columns
def _pair_columns(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int | None) -> dict:
    """Return :data:`DECODER_COLUMNS` of a prompt and two completions given as token ids (a vision-language row in collate).

    As :func:`tokenize_row`: each completion is cut to ``max_length - prompt length`` and its labels are -100
    on the prompt. The prompt's ids come from the processor (image tokens expanded, no BOS added: the chat
    template has its own).
    """
    if max_length is not None:
        chosen_ids, rejected_ids = chosen_ids[: max(0, max_length - len(prompt_ids))], rejected_ids[: max(0, max_length - len(prompt_ids))]
    out = {"prompt_input_ids": prompt_ids, "prompt_attention_mask": [1] * len(prompt_ids)}
    for side, tail in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        out[f"{side}_input_ids"] = prompt_ids + tail
        out[f"{side}_attention_mask"] = [1] * (len(prompt_ids) + len(tail))
        out[f"{side}_labels"] = [-100] * len(prompt_ids) + tail
    return out


# ------------------------------------------------------------------------------------------- trainer
class ORPOTrainer(TrainerSurface):
    """Train a causal LM or an encoder-decoder with ORPO on preference pairs; TRL 1.16's ``ORPOTrainer`` signature.

    Args:
        model: A causal LM or encoder-decoder (``model.config.is_encoder_decoder``, e.g. T5), or a Hub id / local directory.
        args: An :class:`ORPOConfig` (or a dict / TRL ``ORPOConfig``).
        data_collator: Rows of the processed dataset -> TRL's padded batch (``chosen_input_ids``, ...,
            see :class:`PaddingCollator`, the default); ``trainer.data_collator`` is the one used.
        train_dataset: Preference rows (see the module docstring); a ``datasets.Dataset`` or a list of dicts. With an
            ``images`` / ``image`` column (a vision-language model): ``prompt``, ``chosen_ids``, ``rejected_ids``,
            ``images``, ``where`` instead of TRL's columns.
            ``trainer.train_dataset`` has TRL's columns (``prompt_input_ids``, ``chosen_input_ids``,
            ``chosen_attention_mask``, ``chosen_labels``, ...; encoder-decoder: ``prompt_*`` and ``*_labels``).
        eval_dataset: Rows of the same shape, or a dict of them (metrics ``eval_<name>_...``).
        processing_class: The tokenizer, or a vision-language model's processor (loaded with the model when omitted).
        model_init: Not supported (pass ``model``).
        callbacks: ``transformers.TrainerCallback`` objects.
        optimizers: Must be ``(None, None)``: set ``optim``/``lr_scheduler_type`` in the config.
        preprocess_logits_for_metrics: ``f(predictions, labels)`` applied to each eval batch's predictions
            before ``compute_metrics`` (as transformers).
        peft_config: Optional PEFT config (the adapter is trained).
        compute_metrics: ``f(EvalPrediction) -> dict`` run at each evaluation; as TRL 1.16 the
            predictions are each eval batch's ``logits/chosen`` and ``logits/rejected`` and the labels zeros.
        allow_experimental: Python opt-in for this experimental method.

    Raises:
        posttrain.ConfigError: invalid data (row and column named), ``is_encoder_decoder`` contradicting
            the model, or an argument that cannot be honoured (named, with the alternative).
    """

    supports_encoder_decoder = True  # T5 and other seq2seq models train too (read by TrainingLoop.setup)

    def __init__(
        self,
        model=None,
        args: ORPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        compute_metrics=None,
        *,
        allow_experimental: bool = False,
    ) -> None:
        self.args = args = as_config(args, ORPOConfig)
        # The maturity gate runs first: TrainingLoop refuses an experimental method without an opt-in.
        self.loop = TrainingLoop(args, method="orpo", allow_experimental=allow_experimental, callbacks=callbacks)
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (a datasets.Dataset or a list of dicts).")
        _refuse_unsupported_arguments(model, args, model_init, optimizers)
        self.model, self.processing_class = self.loop.load_model(
            model, processing_class=processing_class, peft_config=peft_config, auto_class=encoder_decoder_auto_class(model, args)
        )
        if args.disable_dropout:
            disable_dropout(self.model)
        if getattr(getattr(self.model, "config", None), "output_router_logits", False):
            warnings.warn("the model's config has output_router_logits=True: posttrain's ORPO does not add the MoE router auxiliary loss.", stacklevel=2)
        # read from the model (the config field may have been set after the config was built, as TRL's tests do)
        self.is_encoder_decoder = resolve_encoder_decoder(self.model, args.is_encoder_decoder)
        self.max_completion_length = args.max_completion_length
        if self.is_encoder_decoder and self.max_completion_length is None:
            self.max_completion_length = 128  # TRL 1.16's default for encoder-decoder models
        self.tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        collator_pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_token_id = args.padding_value if args.padding_value is not None else collator_pad  # pads the concatenated input_ids
        if self.pad_token_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token: set padding_value in the config (a token id).")
        self.data_collator = data_collator if data_collator is not None else PaddingCollator(collator_pad, self.is_encoder_decoder)
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        if compute_metrics is not None:
            self.evaluate_batches = self._evaluate_with_compute_metrics  # the loop's default evaluation has no predictions
        self._warned_empty = False
        self._image_token_ids = None  # set by a vision-language dataset: the image tokens are kept out of the NLL
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)  # checks this object against posttrain.MethodProtocol

    # train(), evaluate(), save_model(), state, callbacks: posttrain.TrainerSurface, delegated to self.loop.

    # ------------------------------------------------------------------ data
    def process_dataset(self, dataset, name: str):
        """Validate and tokenize preference rows into a ``datasets.Dataset`` with TRL 1.16's columns (also used by ``evaluate(eval_dataset=...)``).

        :data:`DECODER_COLUMNS` for a decoder-only model, :data:`ENCODER_DECODER_COLUMNS` for an
        encoder-decoder; rows that already have them are kept as they are.

        Raises:
            ConfigError: an empty dataset, missing columns, or an invalid row (named by index).
        """
        from datasets import Dataset

        if isinstance(dataset, dict):
            raise ConfigError(f"{name} is a dict of datasets {sorted(dataset)}: pass one dataset (only eval_dataset may be a dict).")
        dataset = undecoded_image_columns(dataset)  # images are decoded in collate (DataLoader workers), not here
        rows = dataset.to_list() if hasattr(dataset, "to_list") else [dict(r) if isinstance(r, dict) else r for r in dataset]
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one preference pair.")
        column = check_vision_model(self.model, sorted(rows[0]), dataset_name=name) if isinstance(rows[0], dict) else None
        if column is not None:  # DataError above for a text-only model; images stay encoded until collate
            self._image_token_ids = torch.tensor(image_token_ids(self.processing_class, self.model), dtype=torch.long)
            return undecoded_image_columns(Dataset.from_list(self._prepare_vision_rows(rows, name, column)))
        processed = ENCODER_DECODER_COLUMNS if self.is_encoder_decoder else DECODER_COLUMNS
        out = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"{name} row {index} is a {type(row).__name__}, not a dict of columns; {_FORMATS}.")
            if set(processed) <= set(row):  # already tokenized (TRL's columns)
                out.append({key: row[key] for key in processed})
                continue
            missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
            if missing:
                hint = " Unpaired prompt/completion/label rows belong to the 'kto' method." if "label" in row else ""
                raise ConfigError(f"{name} row {index}: column {missing[0]!r} is missing (columns: {sorted(row)}); {_FORMATS}.{hint}")
            if row.get("prompt") is None:
                row = dict(row)
                row["prompt"], row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
            prompt, chosen, rejected = _as_text(row, index, name, self.tokenizer, None)
            try:
                if self.is_encoder_decoder:
                    item = tokenize_encoder_decoder_row(prompt, chosen, rejected, self.tokenizer, self.max_completion_length)
                else:
                    item = tokenize_row(prompt, chosen, rejected, self.tokenizer, self.args.max_length)
            except ValueError as exc:
                raise ConfigError(f"{name} row {index}: {exc}; check the row's 'prompt', 'chosen' and 'rejected' texts.") from None
            if item is None:
                if not self._warned_empty:
                    self._warned_empty = True
                    why = "a response has no token" if self.is_encoder_decoder else f"the prompt alone fills max_length={self.args.max_length}, so no response token is left"
                    warnings.warn(
                        f"{name} row {index}: {why}; such pairs are dropped (TRL keeps them and gets NaN log-probs). "
                        "Raise max_length (encoder-decoder: check the responses). Shown once.",
                        stacklevel=3,
                    )
                continue
            out.append(item)
        if not out:
            raise ConfigError(f"no pair of {name} keeps a response token within max_length={self.args.max_length}: raise max_length.")
        return Dataset.from_list(out)

    def collate(self, rows: list[dict]) -> dict:
        """Return the model's batch of ``rows``: ``self.data_collator(rows)`` concatenated, chosen rows first, then rejected.

        ``input_ids``/``attention_mask`` (2B, T) (encoder-decoder: the prompts, twice) and ``labels``
        (2B, T) (-100 on prompts and padding; encoder-decoder: the responses). Vision-language rows:
        see :meth:`_collate_vision`.
        """
        if "images" in rows[0]:
            return self._collate_vision(rows)
        return concatenate_pair_batch(self.data_collator(rows), is_encoder_decoder=self.is_encoder_decoder, padding_value=self.pad_token_id)

    # Copied from posttrain_cpo.trainer.CPOTrainer._prepare_vision_rows
    def _prepare_vision_rows(self, rows: list[dict], name: str, column: str) -> list[dict]:
        """Return vision-language rows ``{"prompt", "chosen_ids", "rejected_ids", "images", "where"}``: texts rendered, completions tokenized.

        As DPO's: ``prompt`` is the prompt's text (with the chat template's image placeholders) and
        ``images`` the row's images as given; both go through the processor in :meth:`collate`, where the
        image tokens are expanded, the images decoded and TRL's columns built. ``where`` names the row in
        the errors collate may raise. Missing images and image files that do not exist are refused here.
        """
        processor = self.processing_class
        if not is_processor(processor):
            raise ConfigError(
                f"{name} has an image column {column!r} but processing_class is a {type(processor).__name__}, not a processor: "
                "pass the model's processor (transformers.AutoProcessor.from_pretrained(<model>)) as processing_class."
            )
        columns = set(rows[0])
        if set(DECODER_COLUMNS) <= columns or not {"chosen", "rejected"} <= columns:
            raise ConfigError(
                f"{name} has columns {sorted(columns)}: rows with images need 'chosen' and 'rejected' (and 'prompt', or an implicit "
                "prompt) as text or messages; pre-tokenized rows cannot carry images."
            )
        tokenizer = processor_tokenizer(processor)
        out = []
        for index, row in enumerate(rows):
            where = f"{name} row {index}"
            for key in ("chosen", "rejected"):
                if row.get(key) is None:
                    raise ConfigError(f"{where}, column {key!r}: missing value; {_FORMATS}.")
            value = row.get(column)
            images = list(value) if column == "images" and isinstance(value, (list, tuple)) else [value]
            check_images_present(images, f"{where}, column {column!r}")
            if row.get("prompt") is None:  # implicit prompt: the shared prefix
                _check_row(row, index, name)
                row["prompt"], row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
                if not row["chosen"] or not row["rejected"]:
                    raise ConfigError(f"{where}: 'chosen' and 'rejected' are identical or one contains the other; there is nothing to prefer.")
            conversational = _check_row(row, index, name)
            prompt, chosen, rejected = _vision_texts(row, processor, conversational, len(images), where=where)
            out.append({
                "prompt": prompt,
                "chosen_ids": list(tokenizer(chosen, add_special_tokens=False)["input_ids"]),
                "rejected_ids": list(tokenizer(rejected, add_special_tokens=False)["input_ids"]),
                "images": images,
                "where": where,
            })
        return out

    # Copied from posttrain_cpo.trainer.CPOTrainer._collate_vision
    def _collate_vision(self, rows: list[dict]) -> dict:
        """The batch of vision-language rows: each prompt and its images through the processor, then the text batch plus ``model_inputs``.

        The processed prompt ids and the completion ids become TRL's columns (:func:`_pair_columns`), which
        ``self.data_collator`` pads as for text rows; ``model_inputs`` holds each prompt's ``pixel_values``, ...
        for its chosen row, then again for its rejected row (chosen and rejected share the prompt's images),
        token-aligned ones such as ``token_type_ids`` as (2B, T), 0 on completions and padding. Runs in the
        DataLoader workers when ``dataloader_num_workers > 0``.
        """
        rows, per_sample = self._process_prompts(rows)
        pairs = [_pair_columns(list(r["prompt_ids"]), list(r["chosen_ids"]), list(r["rejected_ids"]), self.args.max_length) for r in rows]
        batch = concatenate_pair_batch(self.data_collator(pairs), is_encoder_decoder=False, padding_value=self.pad_token_id)
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        both = per_sample + per_sample
        model_inputs = collate_model_inputs(both)
        model_inputs.update(sequence_model_inputs(both, [len(p["prompt_input_ids"]) for p in pairs] * 2, batch["input_ids"].shape[1], left=False))
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
        return batch["input_ids"].shape[0] // 2  # pairs

    # ------------------------------------------------------------------ the loss
    # Copied from posttrain_cpo.trainer.CPOTrainer._decoder_input_ids
    def _decoder_input_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's inputs for ``labels`` (2B, L): the model's ``prepare_decoder_input_ids_from_labels`` (T5, BART), else the
        labels shifted right after ``decoder_start_token_id`` with -100 replaced by the pad id (TRL 1.16's ``_shift_right``)."""
        prepare = getattr(self.model, "prepare_decoder_input_ids_from_labels", None)
        if callable(prepare):
            return prepare(labels=labels)
        config = self.model.config
        shifted = labels.new_full(labels.shape, config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == -100, config.pad_token_id)

    def concatenated_forward(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """One forward over chosen + rejected; return mean response log-probs (2B,), the chosen NLL and logit means.

        Log-probs come from the hidden states and the LM head, ``logprob_chunk_size`` tokens at a time
        (``posttrain.causal_lm_states``): no (2B, T, V) logits are materialized. Decoder-only: one
        scoring pass serves both terms: every non-padding token is scored (the NLL covers prompt and
        response, as TRL), the labels pick the odds-ratio tokens. Encoder-decoder: the decoder's
        positions score the labels (the responses) for both terms.
        """
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        n = input_ids.shape[0] // 2
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.is_encoder_decoder:
            inputs["decoder_input_ids"] = self._decoder_input_ids(labels)
        inputs.update(batch.get("model_inputs") or {})  # a vision-language batch: pixel_values, token_type_ids, ...
        _, states = causal_lm_states(model, chunk_size=self.args.logprob_chunk_size, **inputs)
        if self.is_encoder_decoder:
            targets = response_labels = labels  # (2B, L): label t is predicted at decoder position t
        else:
            states = states[:, :-1]
            targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (2B, T-1): prompt + response, as TRL's NLL
            if "model_inputs" in batch and self._image_token_ids is not None:  # image tokens stand for pixels: not in the NLL (as SFT)
                targets = targets.masked_fill(torch.isin(targets, self._image_token_ids.to(targets.device)), -100)
            response_labels = labels[:, 1:]
        scores = states.score(targets, stats=("mean_logit",))  # logps (2B, T'), 0 where not scored
        response = response_labels != -100  # (2B, T')
        logps = (scores.logps * response).sum(-1) / response.sum(-1)  # (2B,)
        valid = targets[:n] != -100
        nll = -(scores.logps[:n] * valid).sum() / valid.sum()
        mean_logit = scores.stats["mean_logit"]  # (2B, T'), every position (TRL averages the padding's logits too)
        return {"logps": logps, "nll": nll, "logits_chosen": mean_logit[:n].mean(), "logits_rejected": mean_logit[n:].mean()}

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        out = self.concatenated_forward(model, batch)
        chosen, rejected = out["logps"].chunk(2)  # (B,), (B,)
        losses, ratio, log_odds = odds_ratio_losses(chosen, rejected, self.args.beta)  # (B,)
        n = self.count_items(batch)
        # The NLL is a micro-batch token mean (as TRL); weighting it by the micro-batch's share of the
        # step's pairs makes the step's loss TRL's mean of micro-batch losses when micro-batches are equal.
        loss = (losses.sum() + out["nll"] * n) / num_items_in_batch
        with torch.no_grad():
            chosen_rewards, rejected_rewards = self.args.beta * chosen.detach(), self.args.beta * rejected.detach()
            metrics = {
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/rejected": rejected.detach().mean(),
                "logps/chosen": chosen.detach().mean(),
                "logits/rejected": out["logits_rejected"],
                "logits/chosen": out["logits_chosen"],
                "nll_loss": out["nll"].detach(),
                "log_odds_ratio": ratio.detach().mean(),
                "log_odds_chosen": log_odds.detach().mean(),
            }
        return loss, metrics

    # Copied from posttrain_cpo.trainer.CPOTrainer._evaluate_with_compute_metrics
    @torch.no_grad()
    def _evaluate_with_compute_metrics(self, model, batches) -> dict:
        """Evaluation with ``compute_metrics``: the item-weighted means of ``compute_loss`` plus ``compute_metrics(EvalPrediction)``.

        As TRL 1.16's ``prediction_step``: the predictions are each batch's ``logits/chosen`` and
        ``logits/rejected`` (two numbers per batch, concatenated over batches and processes) and the
        labels zeros of the same shape; ``preprocess_logits_for_metrics(predictions, labels)`` is
        applied to each batch's pair first, as transformers does.
        """
        import numpy as np
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
            logits = torch.stack([metrics["logits/chosen"], metrics["logits/rejected"]]).detach().float()  # (2,)
            zeros = torch.zeros_like(logits)
            if self.preprocess_logits_for_metrics is not None:
                logits = self.preprocess_logits_for_metrics(logits, zeros)
            predictions.append(np.atleast_1d(logits.cpu().numpy()))
            labels.append(zeros.cpu().numpy())
        keys = sorted(totals)
        stacked = torch.stack([torch.as_tensor(totals[k], device=self.loop.device) for k in keys] + [torch.tensor(float(weight), device=self.loop.device)])
        if accelerator.num_processes > 1:
            stacked = accelerator.reduce(stacked, reduction="sum")
            from accelerate.utils import gather_object

            predictions, labels = gather_object(predictions), gather_object(labels)
        result = {k: (stacked[i] / stacked[-1].clamp(min=1)).item() for i, k in enumerate(keys)}
        extra = self.compute_metrics(EvalPrediction(predictions=np.concatenate(predictions), label_ids=np.concatenate(labels)))
        result.update({k.removeprefix("eval_"): float(v) for k, v in (extra or {}).items()})
        return result
