"""Reward-model trainer: a sequence-classification model scores chosen and rejected completions.

Loss (Bradley-Terry, per pair; matches TRL 1.16 ``RewardTrainer.compute_loss``)::

    loss_i = -log sigmoid(r_chosen_i - r_rejected_i - margin_i)            # margin_i = 0 without a margin column
           + center_rewards_coefficient * (r_chosen_i + r_rejected_i) ** 2  # when the coefficient is set

TRL averages over the micro-batch; here the pair losses are summed and divided by the number of
pairs in the whole optimizer step, which is the same for equal micro-batches and makes
per-device batch 8 x accumulation 1 equal 1 x 8 exactly.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from posttrain import ConfigError, TrainingLoop, pad
from posttrain_reward.config import RewardConfig

__all__ = ["RewardTrainer"]


def _is_conversational(example: dict) -> bool:
    """Return whether ``example``'s text fields are lists of ``{"role", "content"}`` messages."""
    for key in ("prompt", "chosen", "rejected"):
        value = example.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
            return True
    return False


def _tokenize_pair(example: dict, tokenizer, eos_token: str) -> dict:
    """Return ``{"chosen_ids", "rejected_ids"}`` for one preference row, the way TRL 1.16 tokenizes it.

    Standard text gets ``eos_token`` appended to chosen and rejected (when missing); an explicit
    prompt is prepended to both; conversational rows go through the chat template (with the
    row's ``tools`` and ``chat_template_kwargs``, if any).
    """
    chosen, rejected, prompt = example["chosen"], example["rejected"], example.get("prompt")
    if _is_conversational(example):
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        if prompt is not None:
            chosen, rejected = prompt + chosen, prompt + rejected

        def encode(messages):
            return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    else:
        chosen = chosen if chosen.endswith(eos_token) else chosen + eos_token
        rejected = rejected if rejected.endswith(eos_token) else rejected + eos_token
        if prompt is not None:
            chosen, rejected = prompt + chosen, prompt + rejected

        def encode(text):
            return list(tokenizer(text=text)["input_ids"])

    return {"chosen_ids": encode(chosen), "rejected_ids": encode(rejected)}


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class RewardTrainer:
    """Train an outcome reward model with the Bradley-Terry pairwise loss.

    Features (flags in :class:`RewardConfig`):
        - Preference data with an explicit (``prompt``/``chosen``/``rejected``) or implicit prompt
          (``chosen``/``rejected`` hold the full texts), standard text or conversational messages,
          or pre-tokenized ``chosen_ids``/``rejected_ids``.
        - Optional ``margin`` column (Llama 2): ``-log sigmoid(r_c - r_r - margin)``.
        - ``center_rewards_coefficient``: adds ``eta * (r_c + r_r)^2`` (Eisenstein et al. 2023).
        - Pairs longer than ``max_length`` (either side) are dropped, as TRL does.
        - The model is ``AutoModelForSequenceClassification`` with ``num_labels=1``; a causal-LM
          checkpoint loads with a fresh score head. The saved model scores text with plain
          transformers.

    Metrics: ``accuracy`` (r_c > r_r), ``margin`` (mean r_c - r_r), ``rewards/chosen``,
    ``rewards/rejected``, ``mean_reward``; evaluation reports the same with an ``eval_`` prefix.

    Raises:
        posttrain.ConfigError: a model object without ``num_labels=1``, a dataset without
            ``chosen``/``rejected`` columns, an unknown ``eos_token``, or no pair left after the
            ``max_length`` filter.
    """

    def __init__(
        self,
        model=None,
        args: RewardConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        *,
        allow_experimental: bool = False,
    ) -> None:
        self.args = args or RewardConfig()
        self.loop = TrainingLoop(self.args, method="reward", allow_experimental=allow_experimental)
        self.model, self.processing_class = self._setup_model(model, processing_class, peft_config)
        self.pad_token_id = self.processing_class.pad_token_id
        self.train_dataset = self._prepare_dataset(train_dataset, "train_dataset") if train_dataset is not None else None
        self.eval_dataset = self._prepare_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model)

    # ------------------------------------------------------------------ setup
    def _setup_model(self, model, processing_class, peft_config):
        import transformers

        args = self.args
        if model is None or isinstance(model, str):
            # The only output of a reward model is one score per sequence (TRL forces this too).
            user_kwargs = args.model_init_kwargs
            args.model_init_kwargs = {**(user_kwargs or {}), "num_labels": 1}
            try:
                model, processing_class = self.loop.load_model(
                    model, processing_class=processing_class, peft_config=peft_config, auto_class=transformers.AutoModelForSequenceClassification
                )
            finally:
                args.model_init_kwargs = user_kwargs
        else:
            if getattr(model.config, "num_labels", None) != 1:
                raise ConfigError(
                    f"the model has num_labels={getattr(model.config, 'num_labels', None)}, but a reward model needs num_labels=1 "
                    "(one scalar score per sequence): build it with AutoModelForSequenceClassification.from_pretrained(path, "
                    "num_labels=1), or pass the path as a string so the trainer sets it."
                )
            model, processing_class = self.loop.load_model(
                model, processing_class=processing_class, peft_config=peft_config, auto_class=transformers.AutoModelForSequenceClassification
            )
        if args.eos_token is not None:
            if args.eos_token not in processing_class.get_vocab():
                raise ConfigError(f"eos_token={args.eos_token!r} is not in the tokenizer's vocabulary: use one of its tokens, or None for its eos_token.")
            processing_class.eos_token = args.eos_token
        if args.disable_dropout:
            _disable_dropout(model)
        # Sequence-classification models locate the last non-pad token with config.pad_token_id.
        model.config.get_text_config().pad_token_id = processing_class.pad_token_id
        return model, processing_class

    def _prepare_dataset(self, dataset, name: str) -> list[dict]:
        """Return tokenized rows ``{"chosen_ids", "rejected_ids"[, "margin"]}``, dropping pairs over ``max_length``."""
        rows = [dict(example) for example in dataset]
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one preference pair.")
        first = rows[0]
        tokenized = "chosen_ids" in first and "rejected_ids" in first
        if not tokenized and not ("chosen" in first and "rejected" in first):
            raise ConfigError(
                f"{name} has columns {sorted(first)}, but reward modelling needs 'chosen' and 'rejected' (and optionally "
                "'prompt' and 'margin'), or pre-tokenized 'chosen_ids' and 'rejected_ids'. Rename the columns, or unpaired "
                "prompt/completion/label data belongs to the 'kto' method."
            )
        eos = self.processing_class.eos_token
        out = []
        for example in rows:
            item = {k: list(example[k]) for k in ("chosen_ids", "rejected_ids")} if tokenized else _tokenize_pair(example, self.processing_class, eos)
            if "margin" in example:
                item["margin"] = float(example["margin"])
            max_length = self.args.max_length
            if max_length is None or (len(item["chosen_ids"]) <= max_length and len(item["rejected_ids"]) <= max_length):
                out.append(item)
        if not out:
            raise ConfigError(
                f"every pair of {name} is longer than max_length={self.args.max_length} tokens and was dropped: raise max_length "
                "or set it to None."
            )
        return out

    # ------------------------------------------------------------------ the method protocol
    def collate(self, rows: list[dict]) -> dict:
        """Return ``input_ids``/``attention_mask`` of shape (2B, T): chosen rows first, then rejected."""
        ids = [torch.tensor(r["chosen_ids"], dtype=torch.long) for r in rows] + [torch.tensor(r["rejected_ids"], dtype=torch.long) for r in rows]
        input_ids = pad(ids, padding_value=self.pad_token_id)  # (2B, T)
        attention_mask = pad([torch.ones_like(x) for x in ids], padding_value=0)  # (2B, T)
        multiple = self.args.pad_to_multiple_of
        if multiple and input_ids.shape[1] % multiple:
            extra = multiple - input_ids.shape[1] % multiple
            input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
            attention_mask = F.pad(attention_mask, (0, extra), value=0)
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "num_tokens": int(attention_mask.sum())}
        if "margin" in rows[0]:
            batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float)  # (B,)
        return batch

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits  # (2B, 1)
        rewards = rewards.squeeze(-1).float()  # (2B,)
        rewards_chosen, rewards_rejected = rewards.chunk(2)  # (B,), (B,)
        diff = rewards_chosen - rewards_rejected  # (B,)
        logits = diff - batch["margin"] if "margin" in batch else diff
        losses = -F.logsigmoid(logits)  # (B,)
        if self.args.center_rewards_coefficient is not None:
            losses = losses + self.args.center_rewards_coefficient * (rewards_chosen + rewards_rejected) ** 2
        loss = losses.sum() / num_items_in_batch
        with torch.no_grad():
            metrics = {
                "accuracy": (diff > 0).float().mean(),
                "margin": diff.mean(),
                "rewards/chosen": rewards_chosen.mean(),
                "rewards/rejected": rewards_rejected.mean(),
                "mean_reward": rewards.mean(),
            }
        return loss, metrics

    # ------------------------------------------------------------------ entry points
    def train(self):
        """Train and return a :class:`posttrain.TrainOutput`; the final model is saved to ``output_dir``."""
        return self.loop.train(self)
