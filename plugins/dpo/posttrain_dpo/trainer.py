"""DPO trainer: contrast the policy's and a frozen reference's log-probs of chosen and rejected completions.

Per pair ``i`` (sums over completion tokens only, chunked from the hidden states: ``causal_lm_states``)::

    lr_c = log pi(y_c | x) - log pi_ref(y_c | x)        lr_r = log pi(y_r | x) - log pi_ref(y_r | x)
    s_c, s_r = f'(lr_c), f'(lr_r)                       # f-DPO scores; identity for reverse_kl
    delta = s_c - s_r
    loss_i = sum_k loss_weights[k] * L_k(...)           # L_k per loss_type, formulas in dpo_pair_losses
    (WPO: each L_k is multiplied by w_c * w_r, the policy's length-normalized probabilities)

The micro-batch returns ``sum_i loss_i / num_items_in_batch`` with ``count_items`` = pairs, so for
every per-pair loss per-device batch 8 x accumulation 1 equals 1 x 8 exactly. The batch-coupled
losses cannot be split that way: ``aot``/``aot_unpaired`` sort the pairs of the micro-batch and
``sft`` is a token mean over the micro-batch (both as in TRL 1.16), so under gradient
accumulation they are computed per micro-batch and averaged over micro-batches, like TRL does.
Formulas match TRL 1.16 ``DPOTrainer._compute_loss`` (the tests check every loss type). The MoE
load-balancing loss of a micro-batch is weighted by its share of the step's pairs.

Vision-language models (rows with an ``images`` / ``image`` column, a processor as
``processing_class``): the texts are rendered and the completions tokenized once, before training;
each prompt goes through the processor with its images in :meth:`DPOTrainer.collate` (so in the
DataLoader workers with ``dataloader_num_workers > 0``, as TRL 1.16's ``DataCollatorForVisionPreference``),
and chosen and rejected share the prompt's image inputs, repeated for the two halves of the batch.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from posttrain import (
    BEMA,
    ConfigError,
    DataError,
    TrainerSurface,
    TrainingLoop,
    adapter_disabled,
    as_config,
    build_reference_model,
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
    sync_reference_model,
    undecoded_image_columns,
    vision_prompt_inputs,
)
from posttrain_dpo.config import DPOConfig

__all__ = ["DPOTrainer", "dpo_pair_losses", "extract_prompt", "tokenize_row"]

_FORMATS = (
    "accepted formats: standard {'prompt': str, 'chosen': str, 'rejected': str}; conversational "
    "{'prompt': [messages], 'chosen': [messages], 'rejected': [messages]}; implicit prompt {'chosen', 'rejected'} holding "
    "full texts or conversations (the shared prefix becomes the prompt); or pre-tokenized {'prompt_ids', 'chosen_ids', "
    "'rejected_ids'}"
)
_TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
_REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


# ---------------------------------------------------------------------------------------------- data
def _is_messages(value: Any) -> bool:
    """A non-empty list of message dicts (tool-call turns may have no 'content')."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


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


def _chat_kwargs(row: dict, default_tools: list | None) -> dict:
    """Keyword arguments of ``apply_chat_template`` for one row: its ``tools`` (else the config's) and ``chat_template_kwargs``."""
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools if tools is not None else default_tools, **(row.get("chat_template_kwargs") or {})}


def _render(tokenizer, messages: list, kwargs: dict, add_generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_row(row: dict, tokenizer, conversational: bool, *, tools: list | None = None) -> tuple[dict, bool]:
    """Return ``({"prompt_ids", "chosen_ids", "rejected_ids"}, clean)`` for one validated row with an explicit prompt.

    As TRL 1.16: the prompt (with the generation prompt, for conversations) and ``prompt + completion``
    are tokenized separately, and the completion starts where the tokens of the prompt and of both
    full sequences stop agreeing, so a token merging across the boundary is tokenized naturally.
    ``clean`` is False when that boundary cut the tokenized prompt short (the caller warns once).
    """
    if conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("the dataset is conversational but the tokenizer has no chat template: set tokenizer.chat_template, or give the rows as strings.")
        kwargs = _chat_kwargs(row, tools)
        prompt_ids = _render(tokenizer, row["prompt"], kwargs, add_generation_prompt=True)
        prompt_chosen = _render(tokenizer, row["prompt"] + row["chosen"], kwargs)
        prompt_rejected = _render(tokenizer, row["prompt"] + row["rejected"], kwargs)
    else:
        eos = tokenizer.eos_token or ""
        chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
        rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
        prompt_ids = list(tokenizer(row["prompt"])["input_ids"])
        prompt_chosen = list(tokenizer(row["prompt"] + chosen)["input_ids"])
        prompt_rejected = list(tokenizer(row["prompt"] + rejected)["input_ids"])
    n = min(prompt_completion_boundary(prompt_ids, prompt_chosen), prompt_completion_boundary(prompt_ids, prompt_rejected))
    item = {"prompt_ids": prompt_ids[:n], "chosen_ids": prompt_chosen[n:], "rejected_ids": prompt_rejected[n:]}
    return item, n == len(prompt_ids)


def _is_iterable_dataset(dataset: Any) -> bool:
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a core dependency
        return False
    return isinstance(dataset, IterableDataset)


def _accepts_logits_to_keep(model) -> bool:
    """Whether the (base) model's forward takes ``logits_to_keep`` (transformers >= 4.50 causal LMs)."""
    base = model.get_base_model() if is_peft_model(model) else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _concat_padded(arrays: list, pad_value: int = -100):
    """Concatenate ``(n_i, T_i, ...)`` numpy arrays on axis 0, padding axis 1 to the longest with ``pad_value``."""
    import numpy as np

    width = max(a.shape[1] for a in arrays)
    padded = [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2), constant_values=pad_value) for a in arrays]
    return np.concatenate(padded, axis=0)


# ---------------------------------------------------------------------------------------------- vision data
def _vision_texts(row: dict, processor, conversational: bool, num_images: int, *, where: str, tools: list | None = None) -> tuple[str, str, str]:
    """Return the ``(prompt, chosen, rejected)`` texts of one vision-language row (TRL 1.16's split).

    Conversations get one ``{"type": "image"}`` part per image (before the first user text when the
    prompt has none: ``posttrain.prepare_multimodal_messages``) and are rendered by the processor's chat
    template: the prompt with the generation prompt, and ``prompt + chosen``, ``prompt + rejected``; the
    prompt text is the longest prefix the three renderings share and each completion the rest. Text
    rows are used as they are (the prompt holds the model's image placeholders), the EOS token appended
    to completions that lack it, as DPO does for text-only rows.

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


# ---------------------------------------------------------------------------------------------- loss
def _f_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """Return f'(pi/pi_ref) expressed through the log-ratio (f-DPO, Wang et al. 2023, Table 1)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    if abs(alpha - 1.0) < 1e-6:  # alpha -> 1 is reverse KL
        return logratios
    t = torch.clamp(((alpha - 1.0) * logratios).float(), max={torch.float16: 11.0}.get(logratios.dtype, 80.0))
    return (torch.exp(t) - 1.0).to(logratios.dtype) / (alpha - 1.0)  # f'(t) = (t^(alpha-1) - 1) / (alpha - 1)


def loss_terms(args: DPOConfig) -> list[tuple[str, float]]:
    """Return the ``(loss_type, weight)`` pairs summed into the loss (``rpo_alpha`` adds ``("sft", rpo_alpha)``)."""
    terms = list(zip(args.loss_type, args.loss_weights or [1.0] * len(args.loss_type)))
    if args.rpo_alpha is not None:
        terms.append(("sft", float(args.rpo_alpha)))
    return terms


def dpo_pair_losses(args: DPOConfig, lp: dict[str, torch.Tensor], ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """Return the ``(B,)`` per-pair loss, summed over ``args.loss_type`` with ``args.loss_weights`` (see :func:`loss_terms`).

    Args:
        args: The DPO config (beta, loss types and weights, label smoothing, f-divergence, ...).
        lp: Policy log-prob outputs of :meth:`DPOTrainer.policy_logps`: ``chosen``/``rejected`` (B,),
            ``per_token`` (2B, T-1), ``mask`` (2B, T-1), and ``wpo_weights`` (B,) when WPO is on.
        ref_chosen, ref_rejected: Reference log-probs (B,).
    """
    beta, eps = args.beta, args.label_smoothing
    chosen_lr, rejected_lr = lp["chosen"] - ref_chosen, lp["rejected"] - ref_rejected  # (B,)
    chosen_s = _f_scores(chosen_lr, args.f_divergence_type, args.f_alpha_divergence_coef)
    rejected_s = _f_scores(rejected_lr, args.f_divergence_type, args.f_alpha_divergence_coef)
    delta = chosen_s - rejected_s  # (B,)
    chosen_mask, rejected_mask = lp["mask"].chunk(2)  # (B, T-1) each
    chosen_len, rejected_len = chosen_mask.sum(1).clamp(min=1.0), rejected_mask.sum(1).clamp(min=1.0)  # (B,)
    total = torch.zeros_like(delta)
    for loss_type, weight in loss_terms(args):
        if loss_type == "sigmoid":  # DPO Eq. 7
            loss = -F.logsigmoid(beta * delta)
        elif loss_type == "hinge":  # SLiC-HF, margin 1/beta
            loss = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":  # IPO Eq. 17 on per-token-averaged scores (as confirmed by the IPO authors to TRL)
            loss = (chosen_s / chosen_len - rejected_s / rejected_len - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":  # EXO Eq. 16: KL(softmax(beta * scores) || [1 - eps, eps])
            qw, ql = torch.sigmoid(beta * delta), torch.sigmoid(-beta * delta)
            loss = qw * (F.logsigmoid(beta * delta) - math.log1p(-eps)) + ql * (F.logsigmoid(-beta * delta) - math.log(eps))
        elif loss_type == "nca_pair":
            rc, rr = beta * chosen_lr, beta * rejected_lr
            loss = -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)
        elif loss_type == "robust":  # unbiased under label flips with rate eps
            loss = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif loss_type == "bco_pair":  # TRL 1.16: no running-mean reward shift
            loss = -F.logsigmoid(beta * chosen_lr) - F.logsigmoid(-beta * rejected_lr)
        elif loss_type == "sppo_hard":
            loss = (chosen_lr - 0.5 / beta) ** 2 + (rejected_lr + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):  # batch-coupled: sorts the pairs of the micro-batch
            if loss_type == "aot":
                gap = torch.sort(lp["chosen"] - lp["rejected"])[0] - torch.sort(ref_chosen - ref_rejected)[0]
            else:
                gap = torch.sort(chosen_lr)[0] - torch.sort(rejected_lr)[0]
            loss = -F.logsigmoid(beta * gap) * (1 - eps) - F.logsigmoid(-beta * gap) * eps
        elif loss_type == "apo_zero":  # APO Eq. 7
            loss = (1 - torch.sigmoid(beta * chosen_lr)) + torch.sigmoid(beta * rejected_lr)
        elif loss_type == "apo_down":  # APO Eq. 8
            loss = torch.sigmoid(beta * chosen_lr) + (1 - torch.sigmoid(beta * (chosen_lr - rejected_lr)))
        elif loss_type == "discopop":  # DiscoPOP Eq. 5
            logits = beta * delta
            gate = torch.sigmoid(logits / args.discopop_tau)
            loss = -F.logsigmoid(logits) * (1 - gate) + torch.exp(-logits) * gate
        elif loss_type == "sft":  # NLL of the chosen tokens, a token mean over the micro-batch (batch-coupled, as TRL)
            chosen_tok = lp["per_token"].chunk(2)[0]
            nll = -(chosen_tok * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)
            loss = nll.expand_as(delta)
        elif loss_type == "sigmoid_norm":  # Tulu 3 length-normalized DPO
            loss = -F.logsigmoid(beta * (chosen_s / chosen_len - rejected_s / rejected_len))
        else:  # pragma: no cover - DPOConfig validates loss_type
            raise ValueError(f"unknown loss_type {loss_type!r}")
        if "wpo_weights" in lp:
            loss = loss * lp["wpo_weights"]
        total = total + weight * loss
    return total




# ---------------------------------------------------------------------------------------------- trainer
class DPOTrainer(TrainerSurface):
    """Train a causal LM with Direct Preference Optimization or one of its variants (TRL 1.16's ``DPOTrainer`` API).

    Features (flags in :class:`DPOConfig`):
        - Data: ``prompt``/``chosen``/``rejected`` as strings (an EOS is appended to completions)
          or message lists (tool calls, a ``tools`` column and ``chat_template_kwargs`` included);
          implicit prompts (only ``chosen``/``rejected``: the shared prefix becomes the prompt);
          pre-tokenized ``prompt_ids``/``chosen_ids``/``rejected_ids`` (optionally with
          ``ref_chosen_logps``/``ref_rejected_logps``). ``datasets.Dataset``, ``IterableDataset``
          (materialized once) or a list of dicts. ``max_length``/``truncation_mode`` as TRL 1.16,
          ``max_prompt_length``.
        - Vision-language models: the rows above (text or messages, explicit or implicit prompt) with
          an ``images`` (list) or ``image`` column and the model's processor; chosen and rejected share
          the prompt's images; images are decoded and processed when batches are collated.
        - Chosen and rejected go through the model in one forward pass (batch 2B).
        - Reference: ``ref_model`` (a model or a path), else a frozen copy of the initial policy; with
          a PEFT policy built here, the policy with its adapter disabled (no copy); with a model that
          already is a ``PeftModel``, a frozen copy of its adapter (``"ref"``, as TRL).
          ``precompute_ref_log_probs`` scores train and eval rows once before training.
        - 15 loss types combinable with ``loss_weights`` (and ``rpo_alpha``); ``f_divergence_type``
          (f-DPO), ``use_weighting`` (WPO), ``ld_alpha`` (LD-DPO), ``sync_ref_model`` (TR-DPO); the
          MoE load-balancing loss (``router_aux_loss_coef``).

    Metrics (TRL names, means over the micro-batch): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
    ``logits/chosen``, ``logits/rejected``, ``entropy``, ``mean_token_accuracy`` (and ``aux_loss``
    for MoE models); the loop adds ``num_tokens``.

    Args:
        model: A causal LM, a ``PeftModel``, or a Hub id / directory (loaded with ``args.model_init_kwargs``).
        ref_model: The reference: a model or a Hub id / directory; None for the defaults above.
        args: A :class:`DPOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        data_collator: Turns processed rows (``prompt_ids``/``chosen_ids``/``rejected_ids``) into the
            batch ``compute_loss`` reads (``input_ids``, ``attention_mask``, ``completion_mask``, chosen
            rows first); default: right padding with ``max_length``/``truncation_mode``/``pad_to_multiple_of``.
        train_dataset, eval_dataset: Preference data (``eval_dataset`` may be a dict / ``DatasetDict``).
        processing_class: The tokenizer, or a vision-language model's processor (default: loaded from the model's path).
        compute_metrics: ``f(EvalPrediction) -> dict``, given the logits (an extra forward pass) and
            ``input_ids`` of every eval row, as TRL 1.16 (deprecated there).
        callbacks: ``transformers.TrainerCallback`` objects.
        optimizers: Must stay ``(None, None)``: the optimizer and schedule come from the config.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name (QLoRA with ``peft_config``).
        peft_config: A ``peft.PeftConfig`` to train an adapter (or set ``args.use_peft``).
        allow_experimental: Python opt-in for the maturity gate (``dpo`` is stable).

    Raises:
        posttrain.ConfigError: invalid data (row and column named), ``ref_model is model``,
            ``sync_ref_model`` with a PEFT reference, no pair left after truncation, or an argument
            that cannot be honoured (named, with the alternative).
    """

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        *,
        allow_experimental: bool = False,
    ) -> None:
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        self.args = args = as_config(args, DPOConfig, default_output_dir=f"{str(name).rstrip('/').split('/')[-1]}-DPO" if name else None)
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (a datasets.Dataset, an IterableDataset or a list of dicts).")
        if ref_model is not None and ref_model is model:
            raise ConfigError("model and ref_model are the same object: omit ref_model (a frozen copy of the policy is made) or pass a separate model.")
        if optimizers is not None and any(part is not None for part in optimizers):
            raise ConfigError(
                "optimizers=(optimizer, scheduler) cannot be honoured: posttrain builds the optimizer and schedule itself "
                "(they must follow resume and accumulation); set optim, optim_args, learning_rate, weight_decay, "
                "lr_scheduler_type and lr_scheduler_kwargs in the config instead."
            )
        self.loop = TrainingLoop(args, method="dpo", allow_experimental=allow_experimental, callbacks=callbacks)
        self.model, self.processing_class = self._setup_model(model, processing_class, peft_config, quantization_config)
        self._setup_tokenizer()
        self.ref_model = self._setup_ref_model(ref_model, quantization_config)
        self._setup_aux_loss()
        self._use_logits_to_keep = args.use_logits_to_keep and _accepts_logits_to_keep(self.model)
        if args.use_logits_to_keep and not self._use_logits_to_keep:
            warnings.warn(f"use_logits_to_keep=True: {type(self.model).__name__}.forward takes no logits_to_keep; the full logits are computed.", stacklevel=2)
        self._user_collator = data_collator
        self.compute_metrics = compute_metrics
        if compute_metrics is not None:
            self.evaluate_batches = self._evaluate_with_compute_metrics  # the loop's default evaluation has no predictions
        self._precomputing = False
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):  # a dict or (Iterable)DatasetDict: metrics eval_<name>_<metric>
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        if args.precompute_ref_log_probs and self.ref_model is not None:
            self.ref_model.to("cpu")  # kept for datasets given to evaluate() later; the stored values serve training
        self.bema = None
        if args.bema_ref_model:  # the reference follows the policy's BEMA (trl.experimental.bema_for_ref_model)
            if self.ref_model is None:
                raise ConfigError(
                    "bema_ref_model=True needs a separate reference model: with a PEFT policy the reference is an adapter "
                    "(or the base model), which BEMA weights of the full model cannot update. Train without peft_config, or "
                    "set bema_ref_model=False."
                )
            self.bema = BEMA(self.model, **bema_options(args))
        self.loop.setup(self.model, method=self)

    # ------------------------------------------------------------------ setup
    def _setup_model(self, model, processing_class, peft_config, quantization_config):
        args = self.args
        self._adapter_given = is_peft_model(model)
        if peft_config is not None and self._adapter_given:
            raise ConfigError(
                "model is already a PeftModel and peft_config is given too: merge and unload the existing adapter "
                "(model.merge_and_unload()) and pass that model with peft_config, or pass the PeftModel without peft_config."
            )
        extra = {}
        if isinstance(model, str):
            if args.trust_remote_code:
                extra["trust_remote_code"] = True
            if quantization_config is not None:
                if "quantization_config" in (args.model_init_kwargs or {}):
                    raise ConfigError("quantization_config is given both to the trainer and in model_init_kwargs: set it in one place (preferably the trainer argument).")
                extra["quantization_config"] = quantization_config
        elif quantization_config is not None:
            raise ConfigError(
                "quantization_config= applies only to a model given by name (it is used when loading): pass the model as a "
                "Hub id or directory, or quantize it yourself and omit quantization_config."
            )
        if args.use_liger_kernel:
            liger = dict(args.liger_kernel_config or {})
            if liger.get("fused_linear_cross_entropy"):
                raise ConfigError(
                    'liger_kernel_config={"fused_linear_cross_entropy": True} cannot be used with DPO: the loss needs the '
                    "log-probs of every completion token, which the fused loss never builds. Drop that key."
                )
            args.liger_kernel_config = {**liger, "fused_linear_cross_entropy": False}
        saved = args.model_init_kwargs
        if extra:  # the loop loads with args.model_init_kwargs; add what the trainer arguments ask for, for this load only
            args.model_init_kwargs = {**extra, **(saved or {})}
        try:
            model, processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        finally:
            args.model_init_kwargs = saved
        if args.disable_dropout:
            disable_dropout(model)
        return model, processing_class

    def _setup_tokenizer(self) -> None:
        """Resolve the pad token (the deprecated ``pad_token`` field wins) and mirror its id onto the model's configs."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad_token = self.args.pad_token or tokenizer.pad_token or tokenizer.eos_token
        if pad_token not in tokenizer.get_vocab():
            raise ConfigError(
                f"pad_token={pad_token!r} is not in the vocabulary of the {type(tokenizer).__name__}: use one of its tokens "
                "(e.g. its eos_token), or add it with tokenizer.add_special_tokens and resize the model's embeddings."
            )
        if tokenizer.pad_token != pad_token:
            tokenizer.pad_token = pad_token
        self.pad_token_id = tokenizer.pad_token_id
        config = getattr(self.model, "config", None)
        if config is not None:
            (config.get_text_config() if hasattr(config, "get_text_config") else config).pad_token_id = self.pad_token_id
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.pad_token_id = self.pad_token_id

    def _setup_ref_model(self, ref_model, quantization_config):
        """Return the frozen reference model, or None when the PEFT policy itself or precomputed log-probs serve."""
        args = self.args
        if ref_model is None and is_peft_model(self.model):
            if args.sync_ref_model:
                raise ConfigError(
                    "sync_ref_model=True needs a separate reference model, but with a PEFT policy the reference is the policy "
                    "with its adapter disabled: pass ref_model=..., or set sync_ref_model=False."
                )
            if self._adapter_given:
                self._add_reference_adapter()
            return None
        init_kwargs = dict(args.model_init_kwargs or {})
        if args.trust_remote_code:
            init_kwargs.setdefault("trust_remote_code", True)
        if quantization_config is not None:
            init_kwargs.setdefault("quantization_config", quantization_config)
        return build_reference_model(
            self.model, ref_model, loop=self.loop, model_init_kwargs=init_kwargs, disable_dropout_in_ref=args.disable_dropout,
            needed=not args.precompute_ref_log_probs,  # without a given ref_model, the initial policy scores the rows itself
        )

    def _add_reference_adapter(self) -> None:
        """Give a pre-existing ``PeftModel`` a frozen copy of its active adapter, ``"ref"``: the initial policy (TRL 1.16)."""
        model = self.model
        if "ref" in model.peft_config:
            return  # the user's own "ref" adapter is the reference, as in TRL
        active = model.active_adapter
        model.add_adapter("ref", model.peft_config[active])
        for name, param in model.named_parameters():
            if f".{active}." in name:
                ref_param = model.get_parameter(name.replace(f".{active}.", ".ref."))
                with torch.no_grad():
                    ref_param.copy_(param)
        for name, param in model.named_parameters():
            if ".ref." in name:
                param.requires_grad_(False)

    def _setup_aux_loss(self) -> None:
        """Decide the Mixture-of-Experts load-balancing loss weight (TRL 1.16: on by default for MoE models)."""
        config = getattr(self.model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        coef = self.args.router_aux_loss_coef
        has_router = hasattr(text_config, "output_router_logits")
        if coef and not has_router:
            raise ConfigError(
                f"router_aux_loss_coef={coef} but {type(self.model).__name__} is not a Mixture-of-Experts model that returns "
                "router logits, so there is no auxiliary loss to weight: leave router_aux_loss_coef=None."
            )
        self.router_aux_loss_coef = float((getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0) if coef is None else coef)
        self.aux_loss_enabled = has_router and self.router_aux_loss_coef != 0.0

    # ------------------------------------------------------------------ data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` processed for DPO: a ``datasets.Dataset`` of ``prompt_ids``/``chosen_ids``/``rejected_ids``.

        Rows are validated, tokenized and truncated (``max_prompt_length``; with ``keep_start``, pairs
        whose prompt alone fills ``max_length`` are dropped). With ``precompute_ref_log_probs`` the
        reference also scores every row (``ref_chosen_logps``/``ref_rejected_logps``). Also used by
        ``evaluate(eval_dataset=...)``.

        Raises:
            ConfigError: an empty dataset, missing columns, an invalid row (named by index), an
                ``IterableDataset`` with ``precompute_ref_log_probs``, or a reference that is gone.
        """
        from datasets import Dataset

        args = self.args
        if args.precompute_ref_log_probs:
            if _is_iterable_dataset(dataset):
                raise ConfigError(
                    f"precompute_ref_log_probs=True is not supported with IterableDataset ({name}): the reference log-probs "
                    "are stored per row, which needs a finite dataset. Pass a datasets.Dataset (e.g. "
                    "Dataset.from_list(list(stream.take(n)))) or set precompute_ref_log_probs=False."
                )
            self._check_reference_available(name)
        rows = self._materialize(dataset, name)
        processed = self._tokenize_rows(rows, name)
        if args.precompute_ref_log_probs and not all(k in processed[0] for k in _REF_COLUMNS):
            self._precompute_reference(processed, name)
        return undecoded_image_columns(Dataset.from_list(processed))  # vision rows: images stay encoded until collate

    def _materialize(self, dataset, name: str) -> list[dict]:
        """Return the rows of ``dataset`` as a list of dicts (an ``IterableDataset`` is read once, here)."""
        args = self.args
        if isinstance(dataset, dict):
            raise ConfigError(f"{name} is a dict of datasets {sorted(dataset)}: pass one dataset (e.g. dataset['train']); only eval_dataset may be a dict.")
        dataset = undecoded_image_columns(dataset)  # images are decoded in collate (DataLoader workers), not here
        if _is_iterable_dataset(dataset):
            limit = None
            if name == "train_dataset" and args.max_steps > 0:  # no more rows than max_steps can consume
                limit = args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * self.loop.accelerator.num_processes
            rows = list(itertools.islice(dataset, limit))
        elif hasattr(dataset, "to_list"):
            rows = dataset.to_list()
        else:  # a list of dicts: copied, tokenization fills in implicit prompts
            rows = [dict(row) if isinstance(row, dict) else row for row in dataset]
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"{name} row {index} is a {type(row).__name__}, not a dict of columns; {_FORMATS}.")
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one preference pair.")
        return rows

    def _tokenize_rows(self, rows: list[dict], name: str) -> list[dict]:
        """Return rows ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` (+ stored reference log-probs) after validation and truncation."""
        args = self.args
        columns = sorted(rows[0])
        image_column = check_vision_model(self.model, columns, dataset_name=name)  # DataError for a text-only model
        if image_column is not None:
            return self._prepare_vision_rows(rows, name, image_column)
        pretokenized = set(_TOKEN_COLUMNS) <= set(columns)
        if not pretokenized and not {"chosen", "rejected"} <= set(columns):
            hint = " Unpaired prompt/completion/label rows belong to the 'kto' method." if "label" in columns else ""
            raise ConfigError(f"{name} has columns {columns}, but DPO needs 'chosen' and 'rejected'; {_FORMATS}.{hint}")
        keys = _TOKEN_COLUMNS + (_REF_COLUMNS if pretokenized and set(_REF_COLUMNS) <= set(columns) else ())
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        out, boundary_warned = [], False
        for index, row in enumerate(rows):
            if pretokenized:
                missing = [k for k in keys if row.get(k) is None]
                if missing:
                    raise ConfigError(f"{name} row {index}, column {missing[0]!r}: missing value; every row needs {list(keys)}.")
                item = {k: (list(row[k]) if k in _TOKEN_COLUMNS else float(row[k])) for k in keys}
            else:
                for key in ("chosen", "rejected"):
                    if row.get(key) is None:
                        raise ConfigError(f"{name} row {index}, column {key!r}: missing value; {_FORMATS}.")
                if row.get("prompt") is None:
                    conversational = _check_row(row, index, name)
                    row["prompt"], row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
                    if conversational and (not row["chosen"] or not row["rejected"]):
                        raise ConfigError(f"{name} row {index}: 'chosen' and 'rejected' are identical conversations or one contains the other; there is nothing to prefer.")
                conversational = _check_row(row, index, name)
                item, clean = tokenize_row(row, tokenizer, conversational, tools=args.tools)
                if not clean and not boundary_warned:
                    boundary_warned = True
                    warnings.warn(
                        f"{name} row {index}: the tokenized prompt is not a prefix of the tokenized prompt + completion (the chat "
                        "template renders the prompt alone differently, or tokens merge across the boundary); the completion "
                        "starts where they diverge (as in TRL). Shown once; it likely applies to other rows too.",
                        stacklevel=3,
                    )
            if args.max_prompt_length is not None:
                item["prompt_ids"] = item["prompt_ids"][-args.max_prompt_length :]
            if args.max_length is not None and args.truncation_mode == "keep_start" and len(item["prompt_ids"]) >= args.max_length:
                continue  # every completion token would be truncated away (TRL drops these pairs too)
            out.append(item)
        if not out:
            raise ConfigError(f"every prompt of {name} has >= max_length={args.max_length} tokens, so no pair is left: raise max_length, set max_prompt_length, or use truncation_mode='keep_end'.")
        return out

    def _prepare_vision_rows(self, rows: list[dict], name: str, column: str) -> list[dict]:
        """Return vision-language rows ``{"prompt", "chosen_ids", "rejected_ids", "images", "where"}``: texts rendered, completions tokenized.

        ``prompt`` is the prompt's text (with the chat template's image placeholders) and ``images`` the
        row's images as given (PIL images, paths, bytes or ``{"bytes", "path"}`` dicts): both go through
        the processor in :meth:`collate`, where the image tokens are expanded and the images decoded.
        ``where`` names the row in the errors collate may raise (an unreadable image, a placeholder count
        the processor refuses, a prompt longer than ``max_length``). Missing images and image files that
        do not exist are refused here, before training.
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
                "truncation_mode='keep_end' cannot be used with images (as in TRL 1.16): the image tokens are in the prompt, which "
                "keep_end would cut, leaving images without their tokens. Use truncation_mode='keep_start' or max_length=None."
            )
        if args.max_prompt_length is not None:
            raise ConfigError(
                f"max_prompt_length={args.max_prompt_length} cannot be used with images: cutting the prompt would cut its image "
                "tokens. Set max_prompt_length=None (max_length still bounds prompt + completion)."
            )
        columns = set(rows[0])
        if set(_TOKEN_COLUMNS) <= columns or not {"chosen", "rejected"} <= columns:
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
            if row.get("prompt") is None:  # implicit prompt: the shared prefix (TRL 1.16's vision collator needs 'prompt')
                conversational = _check_row(row, index, name)
                row["prompt"], row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
                if not row["chosen"] or not row["rejected"]:
                    raise ConfigError(f"{where}: 'chosen' and 'rejected' are identical or one contains the other; there is nothing to prefer.")
            conversational = _check_row(row, index, name)
            prompt, chosen, rejected = _vision_texts(row, processor, conversational, len(images), where=where, tools=args.tools)
            out.append({
                "prompt": prompt,
                "chosen_ids": list(tokenizer(chosen, add_special_tokens=False)["input_ids"]),
                "rejected_ids": list(tokenizer(rejected, add_special_tokens=False)["input_ids"]),
                "images": images,
                "where": where,
            })
        return out

    # ------------------------------------------------------------------ the reference
    def _check_reference_available(self, name: str) -> None:
        """Refuse to score new rows with the trained policy: without ref_model or PEFT, the reference is gone once training started."""
        if self.ref_model is None and not is_peft_model(self.model) and self.loop.state.global_step > 0:
            raise ConfigError(
                f"Cannot compute reference log-probs for a dataset passed to evaluate() after training has started ({name}): "
                "precompute_ref_log_probs=True and no ref_model was given (full fine-tuning), so the reference (the initial "
                "policy) no longer exists. Pass this dataset as eval_dataset= at construction, give ref_model=, or set "
                "precompute_ref_log_probs=False."
            )

    @contextlib.contextmanager
    def _reference_on_device(self):
        """Move a reference kept on the CPU (precompute) to the training device for the duration."""
        ref = self.ref_model
        moved = ref is not None and next(ref.parameters()).device != self.loop.device
        if moved:
            ref.to(self.loop.device)
        try:
            yield
        finally:
            if moved:
                ref.to("cpu")

    def _precompute_reference(self, rows: list[dict], name: str) -> None:
        """Store ``ref_chosen_logps``/``ref_rejected_logps`` in every row, scored by the reference (or the untouched initial policy)."""
        args = self.args
        size = args.precompute_ref_batch_size or (args.per_device_train_batch_size if name == "train_dataset" else args.per_device_eval_batch_size)
        policy = self.model.to(self.loop.device)
        was_training = policy.training
        policy.eval()
        self._precomputing = True
        try:
            with self._reference_on_device():
                for start in range(0, len(rows), size):
                    chunk = rows[start : start + size]
                    ref_chosen, ref_rejected = self.reference_logps(policy, self.loop.to_device(self.collate(chunk)))
                    for row, c, r in zip(chunk, ref_chosen.tolist(), ref_rejected.tolist()):
                        row["ref_chosen_logps"], row["ref_rejected_logps"] = c, r
        finally:
            self._precomputing = False
            policy.train(was_training)

    @contextlib.contextmanager
    def _reference_adapter(self, model):
        """Run ``model`` (a PEFT policy) as the reference: its ``"ref"`` adapter when it has one, else with adapters disabled."""
        accelerator = self.loop.accelerator
        unwrapped = accelerator.unwrap_model(model)
        if "ref" not in unwrapped.peft_config:
            with adapter_disabled(model, accelerator):
                yield
            return
        flags = [(p, p.requires_grad) for p in unwrapped.parameters()]  # set_adapter changes requires_grad: restore it exactly
        previous = unwrapped.active_adapter
        unwrapped.set_adapter("ref")
        try:
            yield
        finally:
            unwrapped.set_adapter(previous)
            for param, flag in flags:
                param.requires_grad_(flag)

    @property
    def data_collator(self):
        """The collator of processed rows (TRL's attribute): :meth:`collate`, which calls a ``data_collator`` given to the trainer."""
        return self.collate

    @data_collator.setter
    def data_collator(self, collator) -> None:
        self._user_collator = collator

    # ------------------------------------------------------------------ the method protocol
    def collate(self, rows: list[dict]) -> dict:
        """Return ``input_ids``/``attention_mask``/``completion_mask`` (2B, T): chosen rows first, then rejected.

        Vision-language rows also give ``model_inputs`` (the processor's ``pixel_values``, ...: each
        prompt's inputs for its chosen row, then again for its rejected row; token-aligned ones such as
        ``token_type_ids`` as (2B, T), 0 on completions and padding): the images are decoded and
        processed here, in the DataLoader workers when ``dataloader_num_workers > 0``.
        """
        if self._user_collator is not None:
            batch = dict(self._user_collator(rows))
            batch.setdefault("num_tokens", int(batch["attention_mask"].sum()))
            return batch
        vision = "images" in rows[0]
        if vision:  # each prompt with its images through the processor: ids with the image tokens, pixel inputs
            rows, per_sample = self._process_prompts(rows)
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for r in rows:
                seqs.append(list(r["prompt_ids"]) + list(r[key]))
                masks.append([0] * len(r["prompt_ids"]) + [1] * len(r[key]))
        if self.args.max_length is not None:
            cut = slice(None, self.args.max_length) if self.args.truncation_mode == "keep_start" else slice(-self.args.max_length, None)
            seqs, masks = [s[cut] for s in seqs], [m[cut] for m in masks]
        input_ids = pad([torch.tensor(s, dtype=torch.long) for s in seqs], padding_value=self.pad_token_id)  # (2B, T)
        attention_mask = pad([torch.ones(len(s), dtype=torch.long) for s in seqs], padding_value=0)  # (2B, T)
        completion_mask = pad([torch.tensor(m, dtype=torch.long) for m in masks], padding_value=0)  # (2B, T)
        multiple = self.args.pad_to_multiple_of
        if multiple and input_ids.shape[1] % multiple:
            extra = multiple - input_ids.shape[1] % multiple
            input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
            attention_mask, completion_mask = F.pad(attention_mask, (0, extra)), F.pad(completion_mask, (0, extra))
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "num_tokens": int(attention_mask.sum()),
        }
        if vision:  # chosen and rejected share their prompt's images: the per-sample inputs twice, in the batch's order
            both = per_sample + per_sample
            model_inputs = collate_model_inputs(both)
            model_inputs.update(sequence_model_inputs(both, [len(r["prompt_ids"]) for r in rows] * 2, input_ids.shape[1], left=False))
            batch["model_inputs"] = model_inputs
        if rows[0].get("ref_chosen_logps") is not None:
            batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float)  # (B,)
            batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float)  # (B,)
        return batch

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

    def _sum_logps(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return ``(2B,)`` sums of ``per_token`` over completion tokens (LD-DPO: tail tokens scaled by ld_alpha)."""
        if self.args.ld_alpha is None:
            return (per_token * mask).sum(1)
        position = mask.cumsum(1)  # (2B, T'): 1-based index of each completion token
        shared = torch.minimum(*mask.sum(1).chunk(2)).repeat(2).unsqueeze(1)  # (2B, 1): the shorter completion's length
        shared_mask, tail_mask = (position > 0) & (position <= shared) & (mask > 0), (position > shared) & (mask > 0)
        return (per_token * shared_mask).sum(1) + self.args.ld_alpha * (per_token * tail_mask).sum(1)

    def _forward(self, model, batch: dict, with_stats: bool) -> dict[str, torch.Tensor]:
        """Run ``model`` on the batch; return per-token log-probs of the completion tokens, their mask and the summed ``logps``.

        The logits cover positions ``start - 1 .. T - 2`` and predict tokens ``start .. T - 1``; ``start``
        is 1, or the batch's first completion position with ``use_logits_to_keep`` (T' = T - start).
        """
        input_ids, completion_mask = batch["input_ids"], batch["completion_mask"]
        start, kwargs = 1, {}
        if self._use_logits_to_keep:
            start = max(1, int(completion_mask.int().argmax(1).min()))  # argmax: the first 1 (0 for a row without completion)
            kwargs["logits_to_keep"] = input_ids.shape[1] - start + 1
        if with_stats and self.aux_loss_enabled:
            kwargs["output_router_logits"] = True
        # hidden states and the LM head, logprob_chunk_size tokens at a time: no (2B, T', V) logits
        kwargs.update(batch.get("model_inputs") or {})  # a vision-language batch: pixel_values, token_type_ids, ...
        outputs, states = causal_lm_states(model, chunk_size=self.args.logprob_chunk_size, input_ids=input_ids,
                                           attention_mask=batch["attention_mask"], use_cache=False, **kwargs)
        labels = input_ids[:, start:]  # (2B, T')
        stats = (("mean_logit", "argmax") + (("log_sum_sq",) if self.args.use_weighting else ())) if with_stats else ()
        scores = states[:, :-1].score(labels, return_entropy=with_stats, entropy_grad=False, stats=stats)  # (2B, T') each
        mask = completion_mask[:, start:].to(scores.logps.dtype)  # (2B, T')
        per_token = scores.logps * mask  # (2B, T')
        out = {"per_token": per_token, "mask": mask, "logps": self._sum_logps(per_token, mask)}
        if with_stats:
            if kwargs.get("output_router_logits") and getattr(outputs, "aux_loss", None) is not None:
                out["aux_loss"] = outputs.aux_loss
            with torch.no_grad():
                out["mean_logits"] = scores.stats["mean_logit"]  # (2B, T')
                out["entropy"] = scores.entropy  # (2B, T')
                out["is_top1"] = scores.stats["argmax"] == labels  # (2B, T')
                if self.args.use_weighting:  # WPO Eq. 2: log p(y_t) - log sum_v p(v)^2, averaged over the completion
                    log_sum_sq = scores.stats["log_sum_sq"]  # (2B, T')
                    aligned = ((per_token.detach() - log_sum_sq) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (2B,)
                    out["wpo_weights"] = torch.prod(torch.stack(torch.exp(aligned).chunk(2)), 0)  # (B,): w_c * w_r
        return out

    def policy_logps(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Return the policy's summed completion log-probs ``chosen``/``rejected`` (B,) and per-token tensors."""
        offload = self.args.activation_offloading and model.training and self.loop.device.type != "cpu"
        with torch.autograd.graph.save_on_cpu(pin_memory=True) if offload else contextlib.nullcontext():
            out = self._forward(model, batch, with_stats=True)
        out["chosen"], out["rejected"] = out["logps"].chunk(2)
        return out

    @torch.no_grad()
    def reference_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the reference's ``(chosen, rejected)`` summed completion log-probs, each (B,)."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.args.precompute_ref_log_probs and not self._precomputing:
            # Never silently score with the trained policy (trl#6443).
            raise ConfigError("precompute_ref_log_probs=True but this batch has no precomputed reference log-probs: pass the dataset to the trainer at construction.")
        if self.ref_model is not None:
            logps = self._forward(self.ref_model, batch, with_stats=False)["logps"]
        elif is_peft_model(self.loop.accelerator.unwrap_model(model)):
            with self._reference_adapter(model):
                logps = self._forward(model, batch, with_stats=False)["logps"]
        else:  # before training, when precomputing: the initial policy is the reference
            logps = self._forward(model, batch, with_stats=False)["logps"]
        return logps.detach().chunk(2)

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        # The reference first: a PEFT "ref" adapter is switched on and off before the policy's graph exists.
        ref_chosen, ref_rejected = self.reference_logps(model, batch)  # (B,), (B,)
        lp = self.policy_logps(model, batch)  # chosen/rejected: (B,)
        losses = dpo_pair_losses(self.args, lp, ref_chosen, ref_rejected)  # (B,)
        loss = losses.sum() / num_items_in_batch
        if "aux_loss" in lp:  # a micro-batch mean: weighted by the micro-batch's share of the step's pairs
            loss = loss + self.router_aux_loss_coef * lp["aux_loss"] * (self.count_items(batch) / num_items_in_batch)
        with torch.no_grad():
            chosen_rewards = self.args.beta * (lp["chosen"] - ref_chosen).detach()  # (B,)
            rejected_rewards = self.args.beta * (lp["rejected"] - ref_rejected).detach()  # (B,)
            mask = lp["mask"]
            chosen_mask, rejected_mask = mask.chunk(2)
            chosen_logits, rejected_logits = lp["mean_logits"].chunk(2)
            metrics = {
                "entropy": (lp["entropy"] * mask).sum() / mask.sum().clamp(min=1),
                "mean_token_accuracy": (lp["is_top1"].chunk(2)[0] * chosen_mask).sum() / chosen_mask.sum().clamp(min=1),
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": lp["chosen"].detach().mean(),
                "logps/rejected": lp["rejected"].detach().mean(),
                "logits/chosen": (chosen_logits * chosen_mask).sum() / chosen_mask.sum().clamp(min=1),
                "logits/rejected": (rejected_logits * rejected_mask).sum() / rejected_mask.sum().clamp(min=1),
            }
            if "aux_loss" in lp:
                metrics["aux_loss"] = lp["aux_loss"].detach().float()
        return loss, metrics

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

    def on_step_end(self, model, state) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` steps, reference <- alpha * policy + (1 - alpha) * reference.

        BEMA reference: the policy's BEMA is updated every ``bema_update_freq`` steps, and copied into the
        reference every ``bema_ref_model_update_freq`` steps after ``bema_ref_model_update_after`` (as TRL's callback).
        """
        args = self.args
        step = state.global_step
        if self.bema is not None:
            self.bema.step(self.loop.unwrapped_model(), step)
            if step >= args.bema_ref_model_update_after and (step - args.bema_ref_model_update_after) % args.bema_ref_model_update_freq == 0:
                self.bema.copy_to(self.ref_model)
        if not args.sync_ref_model or step % args.ref_model_sync_steps != 0:
            return
        sync_reference_model(self.ref_model, model, args.ref_model_mixup_alpha, accelerator=self.loop.accelerator)

    def state_dict(self) -> dict:
        """Return the method state for checkpoints: the reference weights when they change (TR-DPO, BEMA) and the BEMA buffers."""
        state = {}
        if self.args.sync_ref_model or self.bema is not None:
            state["ref_model"] = {k: v.detach().cpu().clone() for k, v in self.ref_model.state_dict().items()}
        if self.bema is not None:
            state["bema"] = self.bema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])
        if "bema" in state and self.bema is not None:
            self.bema.load_state_dict(state["bema"])


# Copied from posttrain_sft.trainer.bema_options
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
