"""Process reward model (PRM) trainer: a token classifier predicts, at the end of every reasoning step, whether the step is correct.

Data (TRL's stepwise supervision)::

    {"prompt": "what is 3 + 4 * 2 ?", "completions": ["4 * 2 = 8", "3 + 8 = 11"], "labels": [True, True]}

Tokenization (``PRMTrainer.tokenize_row``, TRL 1.13's static method, same signature and output): ``[bos] + prompt`` then, per step, the
step's tokens followed by the tokens of ``step_separator``; the step's label (1 correct, 0 wrong)
sits on the separator's last token, every other position is -100. The completion is cut to
``max_completion_length`` tokens, then the whole sequence to ``max_length`` (both on the right).
With ``train_on_last_step_only`` only the last step keeps its label in the training set.

Loss (per labelled token, two classes)::

    loss = sum_t CE(logits_t, label_t) / (number of labelled tokens in the optimizer step)

TRL averages over each micro-batch's labelled tokens (transformers' token-classification loss);
dividing by the labelled tokens of the whole optimizer step is the same for a single micro-batch and
makes per-device batch 8 x accumulation 1 equal 1 x 8 exactly.
"""

from __future__ import annotations

import warnings
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F

from posttrain import ConfigError, DataError, TrainerSurface, TrainingLoop, as_config, disable_dropout, is_peft_model, load_pretrained
from posttrain_prm.config import PRMConfig
from posttrain_prm.reward import ProcessRewardFunction

__all__ = ["PRMTrainer", "ProcessRewardFunction"]

_FORMATS = (
    "stepwise supervision ('prompt' text, 'completions' = list of step texts, 'labels' = list of bools, one per step), "
    "one-step rows ('prompt', 'completion' text, 'label' bool), or pre-tokenized 'input_ids' and 'labels' (-100 where no label)"
)


# Copied from posttrain_kto.trainer._default_output_dir
def _default_output_dir(model: Any, suffix: str) -> str:
    """TRL's default output directory when ``args`` is None: ``<model name>-<suffix>``."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    return f"{str(name or 'model').rstrip('/').split('/')[-1]}-{suffix}"


class PRMTrainer(TrainerSurface):
    """Train a process reward model: token classification (2 labels) at the step separators (TRL 1.13's ``PRMTrainer`` API).

    Features (flags in :class:`PRMConfig`):
        - TRL's stepwise-supervision rows (``prompt``, ``completions``, ``labels``), one-step rows
          (``prompt``, ``completion``, ``label``: the completion is a single step, an outcome label),
          or pre-tokenized ``input_ids`` + ``labels`` (used as they are, as TRL does).
        - ``step_separator`` (multi-token separators label their last token),
          ``train_on_last_step_only`` (evaluation still scores every step), ``max_length`` and
          ``max_completion_length`` (right truncation, as TRL).
        - The model is ``AutoModelForTokenClassification`` with ``num_labels=2`` (label 1 = correct
          step); a causal-LM checkpoint loads with a fresh classification head. The saved model
          loads with plain transformers and scores completions with :class:`ProcessRewardFunction`.

    Metrics: ``accuracy`` (argmax at labelled tokens equals the label; TRL's ``compute_accuracy``)
    and ``positive_rate`` (fraction of labelled steps predicted correct); evaluation reports them and
    the loss, weighted by labelled tokens over the whole eval set, with an ``eval_`` prefix.

    Raises:
        posttrain.ConfigError: no ``train_dataset``, a model object whose ``num_labels`` is not 2, or
            a constructor argument posttrain cannot honour (``optimizers``, ``model_init``).
        posttrain.DataError: a row in none of the accepted formats, a step list and label list of
            different lengths, a row without steps, or no labelled token left after truncation.
    """

    #: the tags the trained model carries (``model.model_tags``, written to its model card): posttrain's loop
    #: tags every model ``posttrain``, the method and ``trl``; TRL 1.13 used ``["trl", "prm"]``
    _tag_names = ["posttrain", "prm", "trl"]

    def __init__(
        self,
        model=None,
        args: PRMConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        allow_experimental: bool = False,
    ) -> None:
        args = as_config(args, PRMConfig, default_output_dir=_default_output_dir(model, "PRM"))
        self.args = args
        # first: the maturity gate refuses an experimental method without an opt-in before anything else
        self.loop = TrainingLoop(args, method="prm", allow_experimental=allow_experimental, callbacks=callbacks, compute_metrics=compute_metrics)
        if train_dataset is None:
            raise ConfigError("PRMTrainer: `train_dataset` is required: pass train_dataset=... (stepwise rows: prompt, completions, labels).")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError(
                "optimizers= is not supported: posttrain's loop builds the optimizer and schedule from the config (optim, "
                "optim_args, learning_rate, weight_decay, lr_scheduler_type, lr_scheduler_kwargs); set those instead."
            )
        if model_init is not None:
            raise ConfigError("model_init= is not supported (hyperparameter search): pass the model (object, Hub id or directory) as model=.")
        self.compute_metrics = compute_metrics
        self.preprocess_logits_for_metrics = preprocess_logits_for_metrics
        self._user_collator = data_collator
        self.model, self.processing_class = self._setup_model(model, processing_class, peft_config)
        self.pad_token_id = self.processing_class.pad_token_id
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)

    # ------------------------------------------------------------------ setup
    def _setup_model(self, model, processing_class, peft_config):
        import transformers

        args = self.args
        if peft_config is not None and is_peft_model(model):
            raise ConfigError(
                "model is already a PeftModel and peft_config was given: merge and unload its adapter first (model.merge_and_unload()), "
                "or omit peft_config to train the existing adapter."
            )
        if model is None or isinstance(model, str):
            name = model if model is not None else args.model_name_or_path
            if name is not None:  # (no name at all: load_model below says so)
                model, processing_class = load_pretrained(
                    name, role="reward", auto_class=transformers.AutoModelForTokenClassification,
                    model_init_kwargs={**(args.model_init_kwargs or {}), "num_labels": 2},
                    trust_remote_code=args.trust_remote_code, tokenizer=processing_class,
                )
        else:
            if args.model_init_kwargs is not None:
                warnings.warn("args.model_init_kwargs are ignored: the model is already built; they apply to a model given by name.", stacklevel=3)
            if getattr(getattr(model, "config", None), "num_labels", None) != 2:
                raise ConfigError(
                    f"the model has num_labels={getattr(getattr(model, 'config', None), 'num_labels', None)}, but a PRM is a token "
                    "classifier with `num_labels=2` (wrong / correct step): build it with "
                    "AutoModelForTokenClassification.from_pretrained(path, num_labels=2), or pass the path as a string."
                )
        model, processing_class = self.loop.load_model(
            model, processing_class=processing_class, peft_config=peft_config, auto_class=transformers.AutoModelForTokenClassification
        )
        if is_peft_model(model) and peft_config is None and args.gradient_checkpointing:
            model.enable_input_require_grads()  # reentrant checkpointing of an adapter needs grad-requiring inputs
        if args.disable_dropout:
            disable_dropout(model)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        return model, processing_class

    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` tokenized like the trainer's own: a ``datasets.Dataset`` of ``input_ids``/``labels`` rows.

        ``train_on_last_step_only`` applies to the training set only (``name == "train_dataset"``),
        as in TRL: evaluation scores every step.

        Raises:
            posttrain.DataError: the data is in none of the accepted formats, a row's steps and
                labels differ in number, a row has no step, or no labelled token is left.
        """
        from datasets import Dataset

        if isinstance(dataset, dict):
            raise ConfigError(f"{name} is a dict of datasets: pass one dataset here (only eval_dataset may be a dict of named datasets).")
        rows = [dict(example) for example in dataset]  # an IterableDataset is read to its end, once
        if not rows:
            raise DataError(f"{name} is empty: give the trainer at least one stepwise row (prompt, completions, labels).")
        columns = set(rows[0])
        args, tokenizer = self.args, self.processing_class
        out = []
        for index, row in enumerate(rows):
            if "input_ids" in columns:
                if "labels" not in row:
                    raise DataError(f"{name} row {index}: pre-tokenized rows need 'labels' (one per token, -100 where no label) beside 'input_ids'.")
                item = {"input_ids": [int(t) for t in row["input_ids"]], "labels": [int(v) for v in row["labels"]]}
                if len(item["input_ids"]) != len(item["labels"]):
                    raise DataError(f"{name} row {index}: {len(item['input_ids'])} input_ids but {len(item['labels'])} labels; give one label per token.")
            else:
                if {"completions", "labels"} <= columns:
                    steps, labels = row["completions"], row["labels"]
                elif {"completion", "label"} <= columns:
                    steps, labels = [row["completion"]], [row["label"]]
                else:
                    raise DataError(f"{name} has columns {sorted(columns)}, but PRM training needs {_FORMATS}.")
                prompt = row.get("prompt") or ""
                if not isinstance(prompt, str) or not isinstance(steps, (list, tuple)) or not all(isinstance(s, str) for s in steps):
                    raise DataError(
                        f"{name} row {index}: 'prompt' must be text and 'completions' a list of step texts (conversational messages are not "
                        f"supported by PRM training); got prompt {type(prompt).__name__}, completions {type(steps).__name__}."
                    )
                if not steps:
                    raise DataError(f"{name} row {index}: 'completions' is empty; give at least one step with its label, or drop the row.")
                if len(steps) != len(labels):
                    raise DataError(f"{name} row {index}: {len(steps)} steps but {len(labels)} labels; give one bool label per step.")
                item = self.tokenize_row({"prompt": prompt, "completions": list(steps), "labels": list(labels)}, tokenizer, args.step_separator,
                                         args.max_length, args.max_completion_length, args.train_on_last_step_only, is_eval=name != "train_dataset")
            out.append(item)
        if not any(v != -100 for item in out for v in item["labels"]):
            raise DataError(
                f"{name}: no step label is left after tokenization (max_length={args.max_length}, max_completion_length="
                f"{args.max_completion_length}): raise them, or shorten the prompts."
            )
        return Dataset.from_list(out)

    @staticmethod
    def tokenize_row(features: dict, tokenizer, step_separator: str, max_length: int | None, max_completion_length: int | None,
                     train_on_last_step_only: bool, is_eval: bool) -> dict:
        """Return ``{"input_ids", "labels"}`` of one stepwise row (TRL 1.13's ``PRMTrainer.tokenize_row``, same signature and output).

        ``[bos] + prompt`` (no other special tokens), then per step its tokens and the tokens of
        ``step_separator``; the step's label (``int``: 1 correct, 0 wrong) sits on the separator's last
        token, every other position is -100. With ``train_on_last_step_only`` and not ``is_eval``
        only the last step keeps its label. The completion is cut to ``max_completion_length``
        tokens, then the whole sequence to ``max_length`` (right truncation; None: no cut). The
        trainer tokenizes its datasets with this function.

        Args:
            features: A row with ``"prompt"`` (text), ``"completions"`` (list of step texts) and
                ``"labels"`` (one bool per step).
            tokenizer: The tokenizer (called as ``tokenizer(text, add_special_tokens=False)`` and
                ``tokenizer.encode(step_separator, add_special_tokens=False)``).

        Raises:
            posttrain.DataError: no step, or steps and labels differ in number.
        """
        steps, step_labels = list(features["completions"]), [int(v) for v in features["labels"]]
        if not steps or len(steps) != len(step_labels):
            raise DataError(f"a stepwise row needs one label per step and at least one step; got {len(steps)} steps and {len(step_labels)} labels.")
        if train_on_last_step_only and not is_eval:
            step_labels = [-100] * (len(step_labels) - 1) + step_labels[-1:]
        prompt_ids = list(tokenizer(features["prompt"], add_special_tokens=False)["input_ids"])
        separator_ids = list(tokenizer.encode(step_separator, add_special_tokens=False))
        step_ids = [list(tokenizer(step, add_special_tokens=False)["input_ids"]) + separator_ids for step in steps]
        completion_ids = list(chain.from_iterable(step_ids))
        completion_labels = list(chain.from_iterable([-100] * (len(ids) - 1) + [label] for ids, label in zip(step_ids, step_labels)))
        if tokenizer.bos_token_id is not None:
            prompt_ids = [tokenizer.bos_token_id] + prompt_ids
        if max_completion_length is not None:
            completion_ids, completion_labels = completion_ids[:max_completion_length], completion_labels[:max_completion_length]
        input_ids, labels = prompt_ids + completion_ids, [-100] * len(prompt_ids) + completion_labels
        if max_length is not None:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        return {"input_ids": input_ids, "labels": labels}

    @property
    def data_collator(self):
        """The collator of processed rows (TRL's attribute): :meth:`collate`, which calls a ``data_collator`` given to the trainer."""
        return self.collate

    @data_collator.setter
    def data_collator(self, collator) -> None:
        self._user_collator = collator

    # ------------------------------------------------------------------ the method protocol
    def collate(self, examples: list[dict]) -> dict:
        """Return ``input_ids``/``attention_mask``/``labels`` (B, T), padded on the tokenizer's ``padding_side`` (labels with -100).

        The same tensors as transformers' ``DataCollatorForTokenClassification`` (TRL's default). A
        ``data_collator`` given to the trainer receives the rows and must return these keys.
        """
        rows = list(examples)
        if self._user_collator is not None:
            batch = dict(self._user_collator(rows))
            missing = {"input_ids", "attention_mask", "labels"} - set(batch)
            if missing:
                raise ConfigError(f"data_collator returned keys {sorted(batch)}: the PRM loss also needs {sorted(missing)} (as DataCollatorForTokenClassification gives).")
            return batch
        length = max(len(r["input_ids"]) for r in rows)
        left = getattr(self.processing_class, "padding_side", "right") == "left"
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            span = slice(length - n, length) if left else slice(0, n)
            input_ids[i, span] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[i, span] = torch.tensor(row["labels"], dtype=torch.long)
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def count_items(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())  # labelled step tokens

    def _logits(self, model, batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits  # (B, T, 2)
        return logits if logits.dtype == torch.float64 else logits.float()  # half precision scores in float32; float64 stays

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        logits, labels = self._logits(model, batch), batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum") / num_items_in_batch
        with torch.no_grad():
            mask = labels != -100
            count = mask.sum().clamp(min=1)
            predicted = logits.argmax(-1)
            metrics = {
                "accuracy": ((predicted == labels) & mask).sum() / count,
                "positive_rate": ((predicted == 1) & mask).sum() / count,
            }
        return loss, metrics

    def eval_predictions(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logits (B, T, 2), labels (B, T))`` of one eval batch for a user's ``compute_metrics`` (TRL's ``EvalPrediction``)."""
        logits = self._logits(model, batch)
        if self.preprocess_logits_for_metrics is not None:
            logits = self.preprocess_logits_for_metrics(logits, batch["labels"])
        return logits, batch["labels"]
