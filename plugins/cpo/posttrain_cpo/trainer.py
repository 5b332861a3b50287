"""CPO trainer: reference-free preference optimization (CPO, SimPO, AlphaPO) with an optional NLL term.

Per pair ``i`` (``logp``: completion log-probs from ``selective_log_softmax``, summed over the
completion tokens for 'sigmoid'/'hinge', averaged over them for 'ipo'/'simpo')::

    r_c, r_r = logp_c, logp_r                    alpha == 0 (the log reward)
    r_c, r_r = (1 - exp(-alpha * logp)) / alpha  alpha != 0 (AlphaPO: (1 - p^-alpha) / alpha)
    d = r_c - r_r
    sigmoid:  -(1 - eps) log sig(beta d) - eps log sig(-beta d)          CPO Eq. 3, conservative smoothing eps
    simpo:    the same on d - simpo_gamma / beta                         SimPO Eq. 6 (margin gamma)
    hinge:    relu(1 - beta d)                                           SLiC
    ipo:      (d - 1 / (2 beta))^2                                       IPO Eq. 17 without a reference
    loss = sum_i loss_i / num_pairs + cpo_alpha * NLL(chosen)            CPO's L_prefer + L_NLL

``NLL(chosen)`` is the token-mean cross-entropy of the chosen completions of the micro-batch (as
TRL 1.16), so it is batch-coupled: under gradient accumulation it is computed per micro-batch and
each micro-batch's value is weighted by its share of the step's pairs (the mean over equal
micro-batches, like TRL). The pair losses are summed over pairs and divided by the step's pairs,
so with ``cpo_alpha=0`` (SimPO, AlphaPO) per-device batch 8 x accumulation 1 equals 1 x 8 exactly.
Formulas match TRL 1.16 ``trl.experimental.cpo.CPOTrainer.cpo_loss`` (the tests check each loss
type and option against it on the same model and batch).
"""

from __future__ import annotations

import itertools
import json
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from posttrain import ConfigError, TrainerSurface, TrainingLoop, as_config, causal_lm_states, disable_dropout, pad
from posttrain_cpo.config import CPOConfig

__all__ = ["CPOTrainer", "cpo_pair_losses", "extract_prompt", "tokenize_row"]

_FORMATS = (
    "accepted formats: standard {'prompt': str, 'chosen': str, 'rejected': str}; conversational "
    "{'prompt': [messages], 'chosen': [messages], 'rejected': [messages]}; implicit prompt {'chosen', 'rejected'} holding "
    "full texts or conversations (the shared prefix becomes the prompt)"
)


# ---------------------------------------------------------------------------------------------- data
# Copied from posttrain_dpo.trainer._is_messages
def _is_messages(value: Any) -> bool:
    """A non-empty list of message dicts (tool-call turns may have no 'content')."""
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


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


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


def render_conversation(row: dict, tokenizer) -> tuple[str, str, str]:
    """Return ``(prompt, chosen, rejected)`` texts of a conversational row with an explicit prompt (TRL 1.16's chat templating).

    The prompt is rendered with the generation prompt (or continuing a final assistant message); each
    completion is the text that ``prompt + completion`` adds after the part shared with the prompt.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the dataset is conversational but the tokenizer has no chat template: set tokenizer.chat_template, or give the rows as strings.")
    kwargs = _chat_kwargs(row, None)
    kwargs = {k: v for k, v in kwargs.items() if not (k == "tools" and not v)}  # tools=[] renders tool boilerplate on some templates
    continue_final = bool(row["prompt"]) and row["prompt"][-1]["role"] == "assistant"
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=not continue_final, continue_final_message=continue_final, **kwargs)
    prompt_chosen = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False, **kwargs)
    prompt_rejected = tokenizer.apply_chat_template(row["prompt"] + row["rejected"], tokenize=False, **kwargs)
    prompt = _common_prefix(_common_prefix(prompt, prompt_chosen), prompt_rejected)
    return prompt, prompt_chosen[len(prompt) :], prompt_rejected[len(prompt) :]


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


def tokenize_row(prompt: str, chosen: str, rejected: str, tokenizer, max_length: int | None) -> dict | None:
    """Return ``{"chosen_ids", "chosen_prompt_len", "rejected_ids", "rejected_prompt_len"}`` for one pair of texts, or None.

    As TRL 1.16's CPO: text is tokenized without special tokens, the BOS token (if the tokenizer has
    one) starts every prompt, an EOS ends every completion, and each completion is cut to
    ``max_length - prompt length``. None when that leaves no completion token (the pair is dropped).

    Raises:
        ValueError: the chosen and rejected prompts tokenize to sequences differing by more than one token.
    """
    chosen_prompt, chosen_ids = _split_answer(tokenizer, prompt, chosen)
    rejected_prompt, rejected_ids = _split_answer(tokenizer, prompt, rejected)
    differing = sum(a != b for a, b in zip(chosen_prompt, rejected_prompt))
    if differing > 1 or abs(len(chosen_prompt) - len(rejected_prompt)) > 1:
        raise ValueError("the chosen and rejected prompts tokenize differently beyond the last token")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        chosen_prompt = chosen_prompt if chosen_prompt[:1] == [bos] else [bos] + chosen_prompt
        rejected_prompt = rejected_prompt if rejected_prompt[:1] == [bos] else [bos] + rejected_prompt
    chosen_ids = chosen_ids if chosen_ids[-1:] == [eos] else chosen_ids + [eos]
    rejected_ids = rejected_ids if rejected_ids[-1:] == [eos] else rejected_ids + [eos]
    if max_length is not None:
        chosen_ids = chosen_ids[: max(0, max_length - len(chosen_prompt))]
        rejected_ids = rejected_ids[: max(0, max_length - len(rejected_prompt))]
    if not chosen_ids or not rejected_ids:
        return None
    return {
        "chosen_ids": chosen_prompt + chosen_ids,
        "chosen_prompt_len": len(chosen_prompt),
        "rejected_ids": rejected_prompt + rejected_ids,
        "rejected_prompt_len": len(rejected_prompt),
    }


# Copied from posttrain_dpo.trainer._is_iterable_dataset
def _is_iterable_dataset(dataset: Any) -> bool:
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a core dependency
        return False
    return isinstance(dataset, IterableDataset)


# ---------------------------------------------------------------------------------------------- loss
def cpo_pair_losses(args: CPOConfig, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(losses, chosen_rewards, rejected_rewards)``, each (B,): the per-pair preference loss and ``beta * r``.

    Args:
        args: The CPO config (loss_type, beta, label_smoothing, simpo_gamma, alpha).
        chosen_logps, rejected_logps: (B,) completion log-probs, averaged over tokens for 'ipo'/'simpo', else summed.
    """
    beta, eps, alpha = args.beta, args.label_smoothing, args.alpha
    if alpha != 0.0:  # AlphaPO: r = (1 - p^-alpha) / alpha with p = exp(logp)
        chosen_r = (1 - torch.exp(-alpha * chosen_logps)) / alpha
        rejected_r = (1 - torch.exp(-alpha * rejected_logps)) / alpha
    else:
        chosen_r, rejected_r = chosen_logps, rejected_logps
    d = chosen_r - rejected_r  # (B,)
    if args.loss_type == "simpo":
        d = d - args.simpo_gamma / beta
    if args.loss_type in ("sigmoid", "simpo"):
        losses = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
    elif args.loss_type == "hinge":
        losses = torch.relu(1 - beta * d)
    elif args.loss_type == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:  # pragma: no cover - CPOConfig validates loss_type
        raise ValueError(f"unknown loss_type {args.loss_type!r}")
    return losses, beta * chosen_r.detach(), beta * rejected_r.detach()


# ---------------------------------------------------------------------------------------------- trainer
class CPOTrainer(TrainerSurface):
    """Train a causal LM with CPO, SimPO or AlphaPO on preference pairs (TRL 1.16's ``trl.experimental.cpo.CPOTrainer`` API).

    Features (flags in :class:`CPOConfig`):
        - Data: ``prompt``/``chosen``/``rejected`` as strings or message lists (a ``tools`` column and
          ``chat_template_kwargs`` included); implicit prompts (only ``chosen``/``rejected``: the
          shared prefix becomes the prompt). ``datasets.Dataset``, ``IterableDataset`` (materialized
          once) or a list of dicts. ``max_length`` cuts completions (the prompt is kept).
        - No reference model. Chosen and rejected go through the model in one forward pass (2B rows).
        - ``loss_type`` sigmoid / hinge / ipo / simpo / alphapo, ``cpo_alpha`` (NLL of the chosen
          completions), ``label_smoothing``, ``simpo_gamma``, ``alpha`` (AlphaPO reward shape).

    Metrics (TRL names, means over the micro-batch): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/accuracies``, ``rewards/margins``, ``logps/chosen``, ``logps/rejected``,
    ``logits/chosen``, ``logits/rejected``, ``nll_loss``; the loop adds ``num_tokens``.

    Args:
        model: A causal LM, a ``PeftModel``, or a Hub id / directory (loaded with ``args.model_init_kwargs``).
        args: A :class:`CPOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        data_collator, model_init, preprocess_logits_for_metrics, compute_metrics: TRL's; must stay
            None (a ``ConfigError`` names the alternative).
        train_dataset, eval_dataset: Preference data (``eval_dataset`` may be a dict / ``DatasetDict``).
        processing_class: The tokenizer (default: loaded from the model's path).
        callbacks: ``transformers.TrainerCallback`` objects.
        optimizers: Must stay ``(None, None)``: the optimizer and schedule come from the config.
        peft_config: A ``peft.PeftConfig`` to train an adapter (or set ``args.use_peft``).
        allow_experimental: Python opt-in for the maturity gate (``cpo`` is experimental).

    Raises:
        posttrain.ConfigError: invalid data (row and column named), no pair left after truncation, or
            an argument that cannot be honoured (named, with the alternative).
    """

    def __init__(
        self,
        model=None,
        args: CPOConfig | None = None,
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
        name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
        self.args = args = as_config(args, CPOConfig, default_output_dir=f"{str(name).rstrip('/').split('/')[-1]}-CPO" if name else None)
        # The maturity gate first: an experimental method without the opt-in is refused before anything else.
        self.loop = TrainingLoop(args, method="cpo", allow_experimental=allow_experimental, callbacks=callbacks)
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (a datasets.Dataset, an IterableDataset or a list of dicts).")
        self._refuse_unsupported(data_collator, model_init, optimizers, preprocess_logits_for_metrics, compute_metrics)
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        if args.disable_dropout:
            disable_dropout(self.model)
        self._setup_tokenizer()
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):  # a dict or (Iterable)DatasetDict: metrics eval_<name>_<metric>
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _refuse_unsupported(data_collator, model_init, optimizers, preprocess_logits_for_metrics, compute_metrics) -> None:
        """Raise a ConfigError naming each TRL argument that cannot be honoured, and the alternative."""
        if data_collator is not None:
            raise ConfigError("data_collator= is not supported by posttrain's CPO: batches are built by CPOTrainer.collate; pass data_collator=None.")
        if model_init is not None:
            raise ConfigError("model_init= is not supported (no hyperparameter search): pass the model itself (or its Hub id) as model=.")
        if optimizers is not None and any(part is not None for part in optimizers):
            raise ConfigError(
                "optimizers=(optimizer, scheduler) cannot be honoured: posttrain builds the optimizer and schedule itself "
                "(they must follow resume and accumulation); set optim, optim_args, learning_rate, weight_decay, "
                "lr_scheduler_type and lr_scheduler_kwargs in the config instead."
            )
        if preprocess_logits_for_metrics is not None or compute_metrics is not None:
            raise ConfigError(
                "compute_metrics= / preprocess_logits_for_metrics= are not supported by posttrain's CPO (TRL passes them only "
                "the two logits/* means): evaluate() already returns every CPO metric; pass None."
            )

    def _setup_tokenizer(self) -> None:
        """Use the EOS token as padding when the tokenizer has none, and mirror the pad id onto the model's configs (TRL 1.16)."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id = tokenizer.pad_token_id
        config = getattr(self.model, "config", None)
        if config is not None:
            (config.get_text_config() if hasattr(config, "get_text_config") else config).pad_token_id = self.pad_token_id
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.pad_token_id = self.pad_token_id

    # ------------------------------------------------------------------ data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` validated and tokenized for CPO: a ``datasets.Dataset`` of ``chosen_ids``/``rejected_ids`` (+ prompt lengths).

        Also used by ``evaluate(eval_dataset=...)``.

        Raises:
            ConfigError: an empty dataset, missing columns, an invalid row (named by index), or no
                pair left after truncation.
        """
        from datasets import Dataset

        rows = self._materialize(dataset, name)
        columns = sorted(rows[0])
        if not {"chosen", "rejected"} <= set(columns):
            hint = " Unpaired prompt/completion/label rows belong to the 'kto' method." if "label" in columns else ""
            raise ConfigError(f"{name} has columns {columns}, but CPO needs 'chosen' and 'rejected'; {_FORMATS}.{hint}")
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        out = []
        for index, row in enumerate(rows):
            for key in ("chosen", "rejected"):
                if row.get(key) is None:
                    raise ConfigError(f"{name} row {index}, column {key!r}: missing value; {_FORMATS}.")
            if row.get("prompt") is None:
                conversational = _check_row(row, index, name)
                row["prompt"], row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
                if conversational and (not row["chosen"] or not row["rejected"]):
                    raise ConfigError(f"{name} row {index}: 'chosen' and 'rejected' are identical conversations or one contains the other; there is nothing to prefer.")
            conversational = _check_row(row, index, name)
            texts = render_conversation(row, tokenizer) if conversational else (row["prompt"], row["chosen"], row["rejected"])
            try:
                item = tokenize_row(*texts, tokenizer, self.args.max_length)
            except ValueError as exc:
                raise ConfigError(f"{name} row {index}: {exc} (a tokenizer merge across the prompt boundary); check the row's 'prompt', 'chosen' and 'rejected' texts.") from None
            if item is not None:
                out.append(item)
        if not out:
            raise ConfigError(f"every prompt of {name} has >= max_length={self.args.max_length} tokens, so no pair is left: raise max_length or shorten the prompts.")
        if len(out) < len(rows):
            warnings.warn(f"{name}: {len(rows) - len(out)} of {len(rows)} pairs dropped: their prompt alone fills max_length={self.args.max_length}.", stacklevel=3)
        return Dataset.from_list(out)

    # Copied from posttrain_dpo.trainer.DPOTrainer._materialize
    def _materialize(self, dataset, name: str) -> list[dict]:
        """Return the rows of ``dataset`` as a list of dicts (an ``IterableDataset`` is read once, here)."""
        args = self.args
        if isinstance(dataset, dict):
            raise ConfigError(f"{name} is a dict of datasets {sorted(dataset)}: pass one dataset (e.g. dataset['train']); only eval_dataset may be a dict.")
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

    # ------------------------------------------------------------------ the method protocol
    def collate(self, rows: list[dict]) -> dict:
        """Return ``input_ids``/``attention_mask``/``completion_mask`` (2B, T), right-padded: chosen rows first, then rejected."""
        seqs, masks = [], []
        for key in ("chosen", "rejected"):
            for r in rows:
                ids, n = list(r[f"{key}_ids"]), r[f"{key}_prompt_len"]
                seqs.append(torch.tensor(ids, dtype=torch.long))
                masks.append(torch.tensor([0] * n + [1] * (len(ids) - n), dtype=torch.long))
        input_ids = pad(seqs, padding_value=self.pad_token_id)  # (2B, T)
        attention_mask = pad([torch.ones_like(s) for s in seqs], padding_value=0)  # (2B, T)
        completion_mask = pad(masks, padding_value=0)  # (2B, T)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask, "num_tokens": int(attention_mask.sum())}

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def concatenated_logps(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Run ``model`` once on the 2B rows; return per-token completion log-probs and what the loss and metrics need.

        Returns:
            ``per_token`` (2B, T-1) log-probs of the completion tokens (0 elsewhere), ``mask`` (2B, T-1),
            ``logps`` (2B,) their sum, ``mean_logits`` (2B,) the mean logit over completion positions
            and vocabulary (no gradient).
        """
        input_ids = batch["input_ids"]
        # hidden states and the LM head, logprob_chunk_size tokens at a time (posttrain.causal_lm_states): no (2B, T-1, V) logits
        _, states = causal_lm_states(model, chunk_size=self.args.logprob_chunk_size, input_ids=input_ids,
                                     attention_mask=batch["attention_mask"], use_cache=False)
        scores = states[:, :-1].score(input_ids[:, 1:], stats=("mean_logit",))  # (2B, T-1) each
        mask = batch["completion_mask"][:, 1:].to(scores.logps.dtype)  # (2B, T-1)
        per_token = scores.logps * mask  # (2B, T-1)
        mean_logits = (scores.stats["mean_logit"] * mask).sum(1) / mask.sum(1).clamp(min=1)  # (2B,), no gradient
        return {"per_token": per_token, "mask": mask, "logps": per_token.sum(1), "mean_logits": mean_logits}

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        out = self.concatenated_logps(model, batch)
        mask = out["mask"]  # (2B, T-1)
        lengths = mask.sum(1).clamp(min=1)  # (2B,)
        logps = out["logps"] / lengths if self.args.loss_type in ("ipo", "simpo") else out["logps"]  # (2B,)
        chosen_logps, rejected_logps = logps.chunk(2)  # (B,), (B,)
        losses, chosen_rewards, rejected_rewards = cpo_pair_losses(self.args, chosen_logps, rejected_logps)  # (B,) each
        n_pairs = self.count_items(batch)
        loss = losses.sum() / num_items_in_batch
        chosen_mask = mask.chunk(2)[0]  # (B, T-1)
        if self.args.cpo_alpha != 0:  # token mean over the micro-batch's chosen completions, weighted by its share of the step's pairs
            nll = -out["per_token"].chunk(2)[0].sum() / chosen_mask.sum().clamp(min=1)
            loss = loss + self.args.cpo_alpha * nll * (n_pairs / num_items_in_batch)
        else:
            nll = torch.zeros((), device=loss.device)
        with torch.no_grad():
            chosen_logits, rejected_logits = out["mean_logits"].chunk(2)  # (B,) each
            chosen_len, rejected_len = lengths.chunk(2)
            metrics = {
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": chosen_logps.detach().mean(),
                "logps/rejected": rejected_logps.detach().mean(),
                "logits/chosen": (chosen_logits * chosen_len).sum() / chosen_len.sum(),
                "logits/rejected": (rejected_logits * rejected_len).sum() / rejected_len.sum(),
                "nll_loss": nll.detach(),
            }
        return loss, metrics
