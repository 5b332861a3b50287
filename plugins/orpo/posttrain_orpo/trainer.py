"""ORPO: Odds Ratio Preference Optimization (Hong, Lee and Thorne 2024, arXiv:2403.07691), on the core loop.

For a prompt x with chosen response y_w and rejected response y_l, with
``log p(y|x) = (1/|y|) sum_t log pi(y_t | x, y_<t)`` (the mean token log-prob of the response) and
``log odds(y|x) = log p - log(1 - p)``:

    L = L_NLL(chosen) - beta * log sigmoid(log odds(y_w|x) - log odds(y_l|x))

as TRL 1.16's ``trl.experimental.orpo``: ``L_NLL`` is the mean next-token NLL over every non-padding
token of the chosen sequences (prompt included, as TRL), ``log(1 - p)`` is computed stably
(``log1mexp``), and there is no reference model. Log-probs are computed chunk by chunk from the hidden
states (``TrainingConfig.logprob_chunk_size``): no full (2B, T, V) logits. Heavy module: imports torch.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

from posttrain import ConfigError, TrainerSurface, TrainingLoop, as_config, causal_lm_states, disable_dropout, pad

from posttrain_orpo.config import ORPOConfig

__all__ = ["ORPOTrainer", "log1mexp", "odds_ratio_losses", "tokenize_pair"]

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


def _split_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Tokenize ``prompt + answer`` as one text; return ``(prompt_ids, answer_ids)`` split at the prompt's tokens.

    When the last prompt token merges with the answer's first characters, the boundary moves one
    token left (TRL's ``build_tokenized_answer``).
    """
    full = list(tokenizer(prompt + answer, add_special_tokens=False)["input_ids"])
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int | None) -> dict:
    """Return ``{"chosen_ids", "chosen_prompt_len", "rejected_ids", "rejected_prompt_len"}`` as TRL 1.16's ORPO tokenizes.

    BOS is prepended to each prompt when the tokenizer has one and it is missing, EOS appended to
    each response when missing; a sequence longer than ``max_length`` loses response tokens from the end.
    """
    out = {}
    parts = {key: _split_answer(tokenizer, prompt, text) for key, text in (("chosen", chosen), ("rejected", rejected))}
    (cp, _), (rp, _) = parts["chosen"], parts["rejected"]
    if sum(a != b for a, b in zip(cp, rp)) > 1 or abs(len(cp) - len(rp)) > 1:
        raise ConfigError("chosen and rejected tokenize the prompt differently in more than its last token; check the rows' prompt/response split.")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for key, (prompt_ids, answer_ids) in parts.items():
        if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
            prompt_ids = [bos] + prompt_ids
        if eos is not None and (not answer_ids or answer_ids[-1] != eos):
            answer_ids = answer_ids + [eos]
        if max_length is not None and len(prompt_ids) + len(answer_ids) > max_length:
            answer_ids = answer_ids[: max(0, max_length - len(prompt_ids))]
        out[f"{key}_ids"], out[f"{key}_prompt_len"] = prompt_ids + answer_ids, len(prompt_ids)
    return out


# ------------------------------------------------------------------------------------------- trainer
class ORPOTrainer(TrainerSurface):
    """Train a causal LM with ORPO on preference pairs; TRL 1.16's ``ORPOTrainer`` signature.

    Args:
        model: A model or a Hub id / local directory.
        args: An :class:`ORPOConfig` (or a dict / TRL ``ORPOConfig``).
        data_collator: Optional collator of processed rows (``chosen_ids``/``rejected_ids``/...) into
            ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels`` and the same for rejected.
        train_dataset: Preference rows (see the module docstring); a ``datasets.Dataset`` or a list of dicts.
        eval_dataset: Rows of the same shape, or a dict of them (metrics ``eval_<name>_...``).
        processing_class: The tokenizer (loaded with the model when omitted).
        model_init: Not supported (pass ``model``).
        callbacks: ``transformers.TrainerCallback`` objects.
        optimizers: Must be ``(None, None)``: set ``optim``/``lr_scheduler_type`` in the config.
        preprocess_logits_for_metrics: Not supported.
        peft_config: Optional PEFT config (the adapter is trained).
        compute_metrics: Not supported (the loop reports the loss and ORPO's metrics on eval sets).
        allow_experimental: Python opt-in for this experimental method.
    """

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
        for value, what in ((model_init, "model_init"), (preprocess_logits_for_metrics, "preprocess_logits_for_metrics"), (compute_metrics, "compute_metrics")):
            if value is not None:
                raise ConfigError(f"{what}= is not supported by posttrain's ORPO: pass model=... (model_init), and read the logged eval metrics (eval_rewards/..., eval_nll_loss).")
        if optimizers is not None and any(part is not None for part in optimizers):
            raise ConfigError("optimizers=(optimizer, scheduler) cannot be honoured: set optim, learning_rate, weight_decay and lr_scheduler_type in the config.")
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (a datasets.Dataset or a list of dicts).")
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        if args.disable_dropout:
            disable_dropout(self.model)
        if getattr(getattr(self.model, "config", None), "output_router_logits", False):
            warnings.warn("the model's config has output_router_logits=True: posttrain's ORPO does not add the MoE router auxiliary loss.", stacklevel=2)
        self.tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        if args.padding_value is not None:
            self.pad_token_id = args.padding_value
        else:
            self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ConfigError("the tokenizer has neither a pad nor an EOS token: set padding_value in the config (a token id).")
        self.data_collator = data_collator
        self._warned_empty = False
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)  # checks this object against posttrain.MethodProtocol

    # train(), evaluate(), save_model(), state, callbacks: posttrain.TrainerSurface, delegated to self.loop.

    # ------------------------------------------------------------------ data
    def process_dataset(self, dataset, name: str) -> list[dict]:
        """Validate and tokenize preference rows (also used by ``evaluate(eval_dataset=...)``).

        Raises:
            ConfigError: an empty dataset, missing columns, or an invalid row (named by index).
        """
        if isinstance(dataset, dict):
            raise ConfigError(f"{name} is a dict of datasets {sorted(dataset)}: pass one dataset (only eval_dataset may be a dict).")
        rows = dataset.to_list() if hasattr(dataset, "to_list") else [dict(r) if isinstance(r, dict) else r for r in dataset]
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one preference pair.")
        out = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"{name} row {index} is a {type(row).__name__}, not a dict of columns; {_FORMATS}.")
            if {"chosen_ids", "rejected_ids", "chosen_prompt_len", "rejected_prompt_len"} <= set(row):  # already processed
                out.append({k: row[k] for k in ("chosen_ids", "chosen_prompt_len", "rejected_ids", "rejected_prompt_len")})
                continue
            missing = [k for k in ("chosen", "rejected") if row.get(k) is None]
            if missing:
                hint = " Unpaired prompt/completion/label rows belong to the 'kto' method." if "label" in row else ""
                raise ConfigError(f"{name} row {index}: column {missing[0]!r} is missing (columns: {sorted(row)}); {_FORMATS}.{hint}")
            if row.get("prompt") is None:
                row = dict(row)
                row["prompt"], row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
            prompt, chosen, rejected = _as_text(row, index, name, self.tokenizer, None)
            item = tokenize_pair(self.tokenizer, prompt, chosen, rejected, self.args.max_length)
            if item["chosen_prompt_len"] >= len(item["chosen_ids"]) or item["rejected_prompt_len"] >= len(item["rejected_ids"]):
                if not self._warned_empty:
                    self._warned_empty = True
                    warnings.warn(
                        f"{name} row {index}: the prompt alone fills max_length={self.args.max_length}, so no response token is left; "
                        "such pairs are dropped (TRL keeps them and gets NaN log-probs). Raise max_length. Shown once.",
                        stacklevel=3,
                    )
                continue
            out.append(item)
        if not out:
            raise ConfigError(f"no pair of {name} keeps a response token within max_length={self.args.max_length}: raise max_length.")
        return out

    def collate(self, rows: list[dict]) -> dict:
        """Return ``input_ids``/``attention_mask``/``labels`` (2B, T): chosen rows first, then rejected (labels -100 on prompts and padding)."""
        if self.data_collator is not None:
            raw = dict(self.data_collator(rows))
            length = max(raw["chosen_input_ids"].shape[1], raw["rejected_input_ids"].shape[1])

            def cat(key, value):
                return torch.cat([F.pad(raw[f"{side}_{key}"], (0, length - raw[f"{side}_{key}"].shape[1]), value=value) for side in ("chosen", "rejected")])

            return {"input_ids": cat("input_ids", self.pad_token_id), "attention_mask": cat("attention_mask", 0), "labels": cat("labels", -100)}
        seqs, labels = [], []
        for side in ("chosen", "rejected"):
            for r in rows:
                ids, start = list(r[f"{side}_ids"]), r[f"{side}_prompt_len"]
                seqs.append(torch.tensor(ids, dtype=torch.long))
                labels.append(torch.tensor([-100] * start + ids[start:], dtype=torch.long))
        return {
            "input_ids": pad(seqs, padding_value=self.pad_token_id),  # (2B, T)
            "attention_mask": pad([torch.ones(len(s), dtype=torch.long) for s in seqs], padding_value=0),  # (2B, T)
            "labels": pad(labels, padding_value=-100),  # (2B, T)
        }

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    # ------------------------------------------------------------------ the loss
    def concatenated_forward(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """One forward over chosen + rejected; return mean response log-probs (2B,), the chosen NLL and logit means.

        Log-probs come from the hidden states and the LM head, ``logprob_chunk_size`` tokens at a time
        (``posttrain.causal_lm_states``): no (2B, T, V) logits are materialized. One scoring pass serves
        both terms: every non-padding token is scored, the response mask picks the odds-ratio tokens.
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        n = input_ids.shape[0] // 2
        _, states = causal_lm_states(model, chunk_size=self.args.logprob_chunk_size, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)  # (2B, T-1): prompt + response, as TRL's NLL
        scores = states[:, :-1].score(targets, stats=("mean_logit",))  # logps (2B, T-1), 0 on padding
        response = batch["labels"][:, 1:] != -100  # (2B, T-1)
        logps = (scores.logps * response).sum(-1) / response.sum(-1)  # (2B,)
        valid = targets[:n] != -100
        nll = -(scores.logps[:n] * valid).sum() / valid.sum()
        mean_logit = scores.stats["mean_logit"]  # (2B, T-1), every position (TRL averages the padding's logits too)
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
