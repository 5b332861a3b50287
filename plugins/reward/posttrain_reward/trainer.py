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
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from posttrain import ConfigError, TrainerSurface, TrainingLoop, as_config, disable_dropout, is_peft_model, load_pretrained, pad
from posttrain_reward.config import RewardConfig

__all__ = ["RewardTrainer"]

_FORMATS = (
    "'chosen' and 'rejected' (and optionally 'prompt' and 'margin'), as text or as lists of {role, content} messages, "
    "or pre-tokenized 'chosen_ids' and 'rejected_ids'"
)
#: Per-batch sums behind the eval metrics (reduced over the whole eval set and every process).
_EVAL_SUMS = ("loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected", "mean_reward", "pairs")


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


# Copied from posttrain_kto.trainer._default_output_dir
def _default_output_dir(model: Any, suffix: str) -> str:
    """TRL's default output directory when ``args`` is None: ``<model name>-<suffix>``."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    return f"{str(name or 'model').rstrip('/').split('/')[-1]}-{suffix}"


# Copied from posttrain_kto.trainer._add_model_tags
def _add_model_tags(model: Any, tags: list[str]) -> None:
    """Tag the model as TRL does (``model.model_tags``, written to the model card on push)."""
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(tags)


def _clone_chat_template(model, tokenizer, source: str):
    """Give ``tokenizer`` the chat template, added tokens and EOS of the tokenizer at ``source``; grow ``model``'s embeddings to fit."""
    from transformers import AutoTokenizer

    donor = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = donor.get_chat_template()
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([token for token in donor.added_tokens_decoder.values() if token.content not in vocab])
    tokenizer.eos_token = donor.eos_token
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))


class RewardTrainer(TrainerSurface):
    """Train an outcome reward model with the Bradley-Terry pairwise loss (TRL's ``RewardTrainer`` API).

    Features (flags in :class:`RewardConfig`):
        - Preference data with an explicit (``prompt``/``chosen``/``rejected``) or implicit prompt
          (``chosen``/``rejected`` hold the full texts), standard text or conversational messages
          (with a ``tools`` column and per-row ``chat_template_kwargs``), or pre-tokenized
          ``chosen_ids``/``rejected_ids`` (TRL's deprecated ``chosen_input_ids``/``rejected_input_ids``
          are renamed, with TRL's warning). A ``datasets.IterableDataset`` is read to its end once.
        - Optional ``margin`` column (Llama 2): ``-log sigmoid(r_c - r_r - margin)``.
        - ``center_rewards_coefficient``: adds ``eta * (r_c + r_r)^2`` (Eisenstein et al. 2023).
        - Pairs longer than ``max_length`` (either side) are dropped, as TRL does.
        - ``chat_template_path``: a Jinja file or another tokenizer's template.
        - The model is ``AutoModelForSequenceClassification`` with ``num_labels=1``; a causal-LM
          checkpoint loads with a fresh score head. The saved model scores text with plain
          transformers.

    Metrics (TRL's names): ``accuracy`` (r_c > r_r), ``margin`` (mean r_c - r_r),
    ``mean_reward``, ``min_reward``, ``max_reward``, plus ``rewards/chosen`` and
    ``rewards/rejected``; evaluation reports the same over the whole eval set with an ``eval_``
    prefix, plus what ``compute_metrics`` returns.

    Raises:
        posttrain.ConfigError: no ``train_dataset``, a model object without ``num_labels=1``, a
            dataset without ``chosen``/``rejected`` columns, an unknown ``eos_token`` or
            ``pad_token``, no pair left after the ``max_length`` filter, or a constructor argument
            posttrain cannot honour (``optimizers``, ``optimizer_cls_and_kwargs``).
    """

    _tag_names = ["trl", "reward-trainer"]

    def __init__(
        self,
        model=None,
        args: RewardConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        allow_experimental: bool = False,
    ) -> None:
        args = as_config(args, RewardConfig, default_output_dir=_default_output_dir(model, "Reward"))
        if train_dataset is None:
            raise ConfigError("RewardTrainer: `train_dataset` is required: pass train_dataset=... (a datasets.Dataset, IterableDataset or list of dicts).")
        if tuple(optimizers or (None, None)) != (None, None) or optimizer_cls_and_kwargs is not None:
            name = "optimizers" if optimizer_cls_and_kwargs is None else "optimizer_cls_and_kwargs"
            raise ConfigError(
                f"{name}= is not supported: posttrain's loop builds the optimizer and schedule from the config (optim, "
                "optim_args, learning_rate, weight_decay, lr_scheduler_type, lr_scheduler_kwargs); set those instead."
            )
        self.args = args
        self.loop = TrainingLoop(args, method="reward", allow_experimental=allow_experimental, callbacks=callbacks)
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self._user_collator = data_collator
        self.model, self.processing_class = self._setup_model(model, processing_class, peft_config, quantization_config)
        self.pad_token_id = self.processing_class.pad_token_id
        _add_model_tags(self.model, self._tag_names)
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)

    # ------------------------------------------------------------------ setup
    def _setup_model(self, model, processing_class, peft_config, quantization_config):
        import transformers

        args = self.args
        auto_class = transformers.AutoModelForSequenceClassification
        if peft_config is not None and is_peft_model(model):
            raise ConfigError(
                "model is already a PeftModel and peft_config was given: merge and unload its adapter first (model.merge_and_unload()), "
                "or omit peft_config to train the existing adapter."
            )
        if model is None or isinstance(model, str):
            name = model if model is not None else args.model_name_or_path
            if name is not None:  # (no name at all: load_model below says so)
                # The only output of a reward model is one score per sequence (TRL forces this too).
                model, processing_class = load_pretrained(
                    name, role="reward", model_init_kwargs={**(args.model_init_kwargs or {}), "num_labels": 1},
                    trust_remote_code=args.trust_remote_code, quantization_config=quantization_config, tokenizer=processing_class,
                )
        else:
            if args.model_init_kwargs is not None:
                warnings.warn("args.model_init_kwargs are ignored: the model is already built; they apply to a model given by name.", stacklevel=3)
            if quantization_config is not None:
                warnings.warn("quantization_config= is ignored: the model is already built (pass the model id as a string to quantize it).", stacklevel=3)
            if getattr(model.config, "num_labels", None) != 1:
                raise ConfigError(
                    f"the model has num_labels={getattr(model.config, 'num_labels', None)}, but reward models require `num_labels=1` "
                    "(one scalar score per sequence): build it with AutoModelForSequenceClassification.from_pretrained(path, "
                    "num_labels=1), or pass the path as a string so the trainer sets it."
                )
        model, processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config, auto_class=auto_class)
        if is_peft_model(model) and peft_config is None and args.gradient_checkpointing:
            model.enable_input_require_grads()  # reentrant checkpointing of an adapter needs grad-requiring inputs
        if args.eos_token is not None:
            if args.eos_token not in processing_class.get_vocab():
                raise ConfigError(f"eos_token={args.eos_token!r} is not in the tokenizer's vocabulary: use one of its tokens, or None for its eos_token.")
            processing_class.eos_token = args.eos_token
            model.config.get_text_config().eos_token_id = processing_class.eos_token_id
        if args.chat_template_path is not None:
            path = args.chat_template_path
            if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
                with open(path, encoding="utf-8") as fh:
                    processing_class.chat_template = fh.read()
            else:
                _clone_chat_template(model, processing_class, path)
        if args.disable_dropout:
            disable_dropout(model)
        pad_token = args.pad_token or processing_class.pad_token or processing_class.eos_token
        if pad_token not in processing_class.get_vocab():
            raise ConfigError(f"pad_token={pad_token!r} is not in the tokenizer's vocabulary: use one of its tokens, or set tokenizer.pad_token.")
        processing_class.pad_token = pad_token
        # Sequence-classification models locate the last non-pad token with config.pad_token_id.
        model.config.get_text_config().pad_token_id = processing_class.pad_token_id
        return model, processing_class

    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` processed like the trainer's own: a ``datasets.Dataset`` of ``chosen_ids``/``rejected_ids`` (``margin``) rows.

        Pairs whose chosen or rejected side is longer than ``max_length`` are dropped.

        Raises:
            posttrain.ConfigError: the data is in none of the accepted formats, or every pair is
                longer than ``max_length``.
        """
        from datasets import Dataset

        if isinstance(dataset, dict):
            raise ConfigError(f"{name} is a dict of datasets: pass one dataset here (only eval_dataset may be a dict of named datasets).")
        rows = [dict(example) for example in dataset]  # an IterableDataset is read to its end, once
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one preference pair.")
        columns = set(rows[0])
        if {"chosen_input_ids", "rejected_input_ids"} <= columns and not {"chosen_ids", "rejected_ids"} <= columns:
            warnings.warn(
                f"{name}: the columns chosen_input_ids/rejected_input_ids are deprecated and will not be supported in v1 (as in "
                "TRL); they are read as chosen_ids/rejected_ids. Rename them to chosen_ids/rejected_ids.",
                FutureWarning,
                stacklevel=3,
            )
            rows = [{**r, "chosen_ids": r.pop("chosen_input_ids"), "rejected_ids": r.pop("rejected_input_ids")} for r in rows]
            columns = set(rows[0])
        tokenized = {"chosen_ids", "rejected_ids"} <= columns
        if not tokenized and not {"chosen", "rejected"} <= columns:
            raise ConfigError(
                f"{name} has columns {sorted(columns)}, but reward modelling needs {_FORMATS}. Rename the columns; unpaired "
                "prompt/completion/label data belongs to the 'kto' method."
            )
        eos, max_length = self.processing_class.eos_token, self.args.max_length
        out = []
        for index, example in enumerate(rows):
            if tokenized:
                item = {k: list(example[k]) for k in ("chosen_ids", "rejected_ids")}
            else:
                for key in ("chosen", "rejected"):
                    if example.get(key) is None:
                        raise ConfigError(f"{name} row {index}, column {key!r}: missing value; reward modelling needs {_FORMATS}.")
                item = _tokenize_pair(example, self.processing_class, eos)
            if "margin" in example:
                item["margin"] = float(example["margin"])
            if max_length is None or (len(item["chosen_ids"]) <= max_length and len(item["rejected_ids"]) <= max_length):
                out.append(item)
        if not out:
            raise ConfigError(f"every pair of {name} is longer than max_length={max_length} tokens and was dropped: raise max_length or set it to None.")
        return Dataset.from_list(out)

    @property
    def data_collator(self):
        """The collator of processed rows (TRL's attribute): :meth:`collate`, which calls a ``data_collator`` given to the trainer."""
        return self.collate

    @data_collator.setter
    def data_collator(self, collator) -> None:
        self._user_collator = collator

    # ------------------------------------------------------------------ the method protocol
    def collate(self, examples: list[dict]) -> dict:
        """Return ``input_ids``/``attention_mask`` of shape (2B, T): chosen rows first, then rejected.

        A ``data_collator`` given to the trainer receives the rows and must return the same keys
        (and ``margin`` when the rows have one), as TRL's ``DataCollatorForPreference`` does.
        """
        rows = list(examples)
        if self._user_collator is not None:
            batch = dict(self._user_collator(rows))
            if "input_ids" not in batch or "attention_mask" not in batch:
                raise ConfigError(f"data_collator returned keys {sorted(batch)}: the reward loss needs 'input_ids' and 'attention_mask' (2B rows, chosen first), as trl's DataCollatorForPreference gives.")
        else:
            ids = [torch.tensor(r["chosen_ids"], dtype=torch.long) for r in rows] + [torch.tensor(r["rejected_ids"], dtype=torch.long) for r in rows]
            input_ids = pad(ids, padding_value=self.pad_token_id)  # (2B, T)
            attention_mask = pad([torch.ones_like(x) for x in ids], padding_value=0)  # (2B, T)
            multiple = self.args.pad_to_multiple_of
            if multiple and input_ids.shape[1] % multiple:
                extra = multiple - input_ids.shape[1] % multiple
                input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
                attention_mask = F.pad(attention_mask, (0, extra), value=0)
            batch = {"input_ids": input_ids, "attention_mask": attention_mask}
            if "margin" in rows[0]:
                batch["margin"] = torch.tensor([r["margin"] for r in rows], dtype=torch.float)  # (B,)
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def _rewards(self, model, batch: dict):
        """Return the per-pair losses (B,) and the chosen and rejected rewards (B,), (B,)."""
        rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits  # (2B, 1)
        rewards = rewards.squeeze(-1)  # (2B,)
        rewards = rewards if rewards.dtype == torch.float64 else rewards.float()  # half precision scores in float32; float64 stays
        rewards_chosen, rewards_rejected = rewards.chunk(2)  # (B,), (B,)
        diff = rewards_chosen - rewards_rejected  # (B,)
        logits = diff - batch["margin"] if "margin" in batch else diff
        losses = -F.logsigmoid(logits)  # (B,)
        if self.args.center_rewards_coefficient is not None:
            losses = losses + self.args.center_rewards_coefficient * (rewards_chosen + rewards_rejected) ** 2
        return losses, rewards_chosen, rewards_rejected

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        losses, rewards_chosen, rewards_rejected = self._rewards(model, batch)
        loss = losses.sum() / num_items_in_batch
        with torch.no_grad():
            diff = rewards_chosen - rewards_rejected
            rewards = torch.cat([rewards_chosen, rewards_rejected])
            metrics = {
                "accuracy": (diff > 0).float().mean(),
                "margin": diff.mean(),
                "rewards/chosen": rewards_chosen.mean(),
                "rewards/rejected": rewards_rejected.mean(),
                "mean_reward": rewards.mean(),
                "min_reward": rewards.min(),
                "max_reward": rewards.max(),
            }
        return loss, metrics

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Score the eval set: pair-weighted means of the loss and metrics, the exact minimum and maximum reward (all processes).

        With ``compute_metrics`` it also receives ``EvalPrediction(predictions=<(N, 2) array of
        [r_chosen, r_rejected]>, label_ids=<N zeros: the chosen column should win>)``, after
        ``preprocess_logits_for_metrics`` when given, and its results are added.
        """
        accelerator = self.loop.accelerator
        sums = torch.zeros(len(_EVAL_SUMS), device=self.loop.device)
        low = torch.full((), float("inf"), device=self.loop.device)
        high = torch.full((), float("-inf"), device=self.loop.device)
        predictions: list = []
        for batch in batches:
            losses, chosen, rejected = self._rewards(model, batch)
            diff, rewards = chosen - rejected, torch.cat([chosen, rejected])
            values = [losses.sum(), (diff > 0).float().sum(), diff.sum(), chosen.sum(), rejected.sum(), rewards.mean() * len(chosen), len(chosen)]
            sums = sums + torch.stack([torch.as_tensor(v, dtype=torch.float, device=sums.device) for v in values])
            low, high = torch.minimum(low, rewards.min()), torch.maximum(high, rewards.max())
            if self.compute_metrics is not None:
                pairs = torch.stack([chosen, rejected], dim=1)  # (B, 2)
                if self.preprocess_logits_for_metrics is not None:
                    pairs = self.preprocess_logits_for_metrics(pairs, torch.zeros(len(chosen), dtype=torch.long, device=pairs.device))
                predictions += pairs.detach().float().cpu().tolist()
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, reduction="sum")
            low, high = accelerator.gather(low[None]).min(), accelerator.gather(high[None]).max()
        s = dict(zip(_EVAL_SUMS, sums.tolist()))
        n = max(s.pop("pairs"), 1)
        out = {k: v / n for k, v in s.items()}
        out.update({"min_reward": float(low), "max_reward": float(high)})
        if self.compute_metrics is not None:
            out.update(self._user_metrics(predictions))
        return out

    def _user_metrics(self, predictions: list) -> dict[str, float]:
        import numpy as np
        from transformers import EvalPrediction

        if self.loop.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            predictions = gather_object(predictions)
        array = np.asarray(predictions)
        result = self.compute_metrics(EvalPrediction(predictions=array, label_ids=np.zeros(len(array), dtype=np.int64)))
        return {k.removeprefix("eval_"): float(v) for k, v in (result or {}).items()}
