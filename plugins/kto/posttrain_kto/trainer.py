"""KTO trainer: Kahneman-Tversky Optimization on unpaired desirable/undesirable completions.

Loss per example (matches TRL 1.16 ``KTOTrainer._compute_loss``), with ``lr = log pi(y|x) - log
pi_ref(y|x)`` summed over completion tokens::

    kto                desirable:   w_D * (1 - sigmoid(beta * (lr - z)))
                       undesirable: w_U * (1 - sigmoid(beta * (z - lr)))
    apo_zero_unpaired  desirable:   w_D * (1 - sigmoid(beta * lr))
                       undesirable: w_U * sigmoid(beta * lr)

``z`` is the batch KL estimate: the mean of ``log pi(y'|x) - log pi_ref(y'|x)`` over mismatched
pairs, where ``y'`` is the completion of the previous example in the same micro-batch (rotation by
one, as TRL does), averaged across processes, clamped at 0 and detached. The example losses are
summed and divided by the number of examples in the optimizer step (TRL: mean over the micro-batch).
For a Mixture-of-Experts policy the load-balancing loss is added with ``router_aux_loss_coef``.

Because ``z`` is computed per micro-batch, KTO's gradient depends on how a step's examples are
split into micro-batches: per-device batch 8 x accumulation 1 is not 4 x 2 in general (it is when
``z`` clamps to 0 in every micro-batch, e.g. at step 0 with the reference equal to the policy).
``apo_zero_unpaired`` has no batch coupling and is exactly accumulation-invariant.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from posttrain import (
    ConfigError,
    TrainerSurface,
    TrainingLoop,
    adapter_disabled,
    as_config,
    build_reference_model,
    causal_lm_states,
    disable_dropout,
    is_peft_model,
    pad,
    prompt_completion_boundary,
    sync_reference_model,
)
from posttrain_kto.config import KTOConfig

__all__ = ["KTOTrainer"]

logger = logging.getLogger(__name__)

#: Rows per chunk when unpairing chosen/rejected data; TRL unpairs with ``datasets.map(batched=True)``,
#: whose default batch is 1000 rows, giving [chosen x1000, rejected x1000, ...]. Same order here.
_UNPAIR_CHUNK = 1000

#: Per-batch sums behind the metrics (train: reduced across processes per micro-batch; eval: over the whole set).
_STATS = (
    "kl", "count/chosen", "count/rejected", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
    "logits/chosen", "tokens/chosen", "logits/rejected", "tokens/rejected", "entropy", "tokens/all",
)
_FORMATS = (
    "unpaired 'prompt'/'completion'/'label' (label: bool, desirable or not), paired 'prompt'/'chosen'/'rejected' "
    "(or 'chosen'/'rejected' with an implicit prompt), unpaired automatically, or pre-tokenized "
    "'prompt_ids'/'completion_ids'/'label' (or 'prompt_ids'/'chosen_ids'/'rejected_ids')"
)


# ---------------------------------------------------------------------------- data helpers
def _is_conversational(example: dict) -> bool:
    for key in ("prompt", "completion", "chosen", "rejected"):
        value = example.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
            return True
    return False


def _extract_prompt(example: dict) -> dict:
    """Split the longest common prefix of ``chosen`` and ``rejected`` off as ``prompt`` (TRL's ``extract_prompt``)."""
    chosen, rejected = example["chosen"], example["rejected"]
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # keep the space with the completion
                idx -= 1
            break
    return {**example, "prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def _unpair(rows: list[dict], chosen: str = "chosen", rejected: str = "rejected", completion: str = "completion") -> list[dict]:
    """Turn each (prompt, chosen, rejected) row into a desirable and an undesirable row, in TRL's order."""
    out = []
    for start in range(0, len(rows), _UNPAIR_CHUNK):
        chunk = rows[start : start + _UNPAIR_CHUNK]
        extra = lambda r: {k: v for k, v in r.items() if k not in (chosen, rejected)}  # noqa: E731
        out += [{**extra(r), completion: r[chosen], "label": True} for r in chunk]
        out += [{**extra(r), completion: r[rejected], "label": False} for r in chunk]
    return out


def _tokenize(example: dict, tokenizer) -> tuple[dict, bool]:
    """Return ``({"prompt_ids", "completion_ids", "label"}, prompt_is_prefix)``.

    The completion starts where the tokenized prompt and prompt+completion diverge (TRL's rule).
    """
    if _is_conversational(example):
        tools = example.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
        encode = lambda msgs, **kw: list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw, **kwargs)["input_ids"])  # noqa: E731
        prompt_ids = encode(example["prompt"], add_generation_prompt=True)
        full_ids = encode(example["prompt"] + example["completion"])
    else:
        completion = example["completion"]
        completion = completion if completion.endswith(tokenizer.eos_token) else completion + tokenizer.eos_token
        prompt_ids = list(tokenizer(text=example["prompt"])["input_ids"])
        full_ids = list(tokenizer(text=example["prompt"] + completion)["input_ids"])
    boundary = prompt_completion_boundary(prompt_ids, full_ids)
    item = {"prompt_ids": prompt_ids[:boundary], "completion_ids": full_ids[boundary:], "label": bool(example["label"])}
    return item, boundary == len(prompt_ids)


def _materialize(dataset, name: str) -> list[dict]:
    """Return the rows of a ``Dataset``, ``IterableDataset`` (read once, to the end) or list of dicts."""
    if isinstance(dataset, dict):
        raise ConfigError(f"{name} is a dict of datasets: pass one dataset here (only eval_dataset may be a dict of named datasets).")
    return [dict(example) for example in dataset]


def _is_iterable_dataset(dataset) -> bool:
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a core dependency
        return False
    return isinstance(dataset, IterableDataset)


def _default_output_dir(model: Any, suffix: str) -> str:
    """TRL's default output directory when ``args`` is None: ``<model name>-<suffix>``."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    return f"{str(name or 'model').rstrip('/').split('/')[-1]}-{suffix}"


def _add_model_tags(model: Any, tags: list[str]) -> None:
    """Tag the model as TRL does (``model.model_tags``, written to the model card on push)."""
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(tags)


def _to_numpy(values: list) -> Any:
    import numpy as np

    return np.asarray(values)


class KTOTrainer(TrainerSurface):
    """Train a causal LM with KTO (or unpaired APO-zero) against a frozen reference model (TRL's ``KTOTrainer`` API).

    Features (flags in :class:`KTOConfig`):
        - Unpaired ``prompt``/``completion``/``label`` data, standard or conversational (with a
          ``tools`` column and per-row ``chat_template_kwargs``); paired ``prompt``/``chosen``/
          ``rejected`` data (explicit or implicit prompt) is unpaired into one desirable and one
          undesirable row per pair, as TRL does; pre-tokenized ``prompt_ids``/``completion_ids``/
          ``label`` (or paired ``prompt_ids``/``chosen_ids``/``rejected_ids``) rows are used as they are.
          A ``datasets.IterableDataset`` is read to its end once, at construction.
        - Reference model: ``ref_model`` (a model or a path), else a frozen copy of the policy;
          with PEFT the policy with its adapter disabled; ``precompute_ref_log_probs`` scores the
          data once before training so no reference stays in memory; ``sync_ref_model`` moves
          the reference towards the policy every ``ref_model_sync_steps`` steps (TR-DPO).
        - ``loss_type``: ``kto`` (with the batch KL estimate ``z``) or ``apo_zero_unpaired``;
          ``beta``, ``desirable_weight``, ``undesirable_weight``; the MoE load-balancing loss with
          ``router_aux_loss_coef``.

    Metrics (TRL's names): ``kl``, ``entropy``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``logits/chosen``,
    ``logits/rejected`` (a class mean is logged for the micro-batches that hold the class) and
    ``aux_loss`` for MoE models. Evaluation reports exact means over the whole eval set with an
    ``eval_`` prefix, plus what ``compute_metrics`` returns.

    Raises:
        posttrain.ConfigError: no ``train_dataset``, data in none of the accepted formats, an empty
            dataset after the ``max_length`` filter, ``precompute_ref_log_probs`` with an
            ``IterableDataset``, ``sync_ref_model`` with a PEFT reference, or a constructor argument
            posttrain cannot honour (``optimizers``).
    """

    _tag_names = ["trl", "kto"]

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: KTOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        allow_experimental: bool = False,
    ) -> None:
        args = as_config(args, KTOConfig, default_output_dir=_default_output_dir(model, "KTO"))
        if train_dataset is None:
            raise ConfigError("KTOTrainer: `train_dataset` is required: pass train_dataset=... (a datasets.Dataset, IterableDataset or list of dicts).")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError(
                "optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config "
                "(optim, optim_args, learning_rate, weight_decay, lr_scheduler_type, lr_scheduler_kwargs); set those instead."
            )
        self.args = args
        self.loop = TrainingLoop(args, method="kto", allow_experimental=allow_experimental, callbacks=callbacks)
        self.calculate_kl = args.loss_type == "kto"
        self.compute_metrics = compute_metrics
        self._user_collator = data_collator
        self._warned_boundary = False
        if model is not None and not isinstance(model, str) and args.model_init_kwargs is not None and not isinstance(ref_model, str):
            warnings.warn("args.model_init_kwargs are ignored: the model (and the reference) are already built; they apply to models given by name.", stacklevel=2)
        self.model, self.processing_class = self._load_policy(model, processing_class, peft_config, quantization_config)
        if args.disable_dropout:
            disable_dropout(self.model)
        self.is_peft = is_peft_model(self.model)
        self._setup_aux_loss()
        if args.sync_ref_model and ref_model is None and self.is_peft:
            raise ConfigError(
                "sync_ref_model=True needs a separate reference model, but with a PEFT policy the reference is the policy "
                "with its adapter disabled: pass ref_model=... without PEFT, or set sync_ref_model=False."
            )
        if args.sync_ref_model and self.is_peft:
            raise ConfigError("sync_ref_model=True is not supported with a PEFT policy (the adapter's weights do not map onto the reference's): train without PEFT, or set sync_ref_model=False.")
        self.ref_model = build_reference_model(
            self.model, ref_model, loop=self.loop, model_init_kwargs=self._init_kwargs(), disable_dropout_in_ref=args.disable_dropout,
            needed=not args.precompute_ref_log_probs,
        )
        self.pad_token_id = self.processing_class.pad_token_id
        _add_model_tags(self.model, self._tag_names)
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)

    # ------------------------------------------------------------------ setup
    def _init_kwargs(self) -> dict:
        """``from_pretrained`` keyword arguments for models given by name: the config's, plus ``trust_remote_code``."""
        return {"trust_remote_code": self.args.trust_remote_code, **(self.args.model_init_kwargs or {})}

    def _load_policy(self, model, processing_class, peft_config, quantization_config):
        """Return ``(model, tokenizer)`` by ``TrainingLoop.load_model`` (``posttrain.load_pretrained``'s rules, then PEFT)."""
        args = self.args
        if peft_config is not None and is_peft_model(model):
            raise ConfigError(
                "model is already a PeftModel and peft_config was given: merge and unload its adapter first (model.merge_and_unload()), "
                "or omit peft_config to train the existing adapter."
            )
        model, processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config, quantization_config=quantization_config)
        if is_peft_model(model) and peft_config is None:
            if args.gradient_checkpointing:
                model.enable_input_require_grads()  # reentrant checkpointing of an adapter needs grad-requiring inputs
            warnings.warn(
                "model is already a PeftModel: the KTO reference is this model with its adapter disabled, i.e. the base "
                "model, which equals the initial policy only for a freshly initialized adapter. Pass ref_model= otherwise.",
                stacklevel=3,
            )
        return model, processing_class

    def _setup_aux_loss(self) -> None:
        """Decide whether the MoE load-balancing loss is added (TRL's rule), and with which coefficient."""
        text_config = self.model.config.get_text_config()
        coef = self.args.router_aux_loss_coef
        self.router_aux_loss_coef = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
        has_router = hasattr(text_config, "output_router_logits")
        if coef and not has_router:
            raise ConfigError(
                f"router_aux_loss_coef={coef} is set but {type(self.model).__name__} is not a Mixture-of-Experts model that "
                "returns router logits, so there is no auxiliary loss to weight: leave router_aux_loss_coef=None."
            )
        self.aux_loss_enabled = has_router and bool(self.router_aux_loss_coef)

    @property
    def data_collator(self):
        """The collator of processed rows (TRL's attribute): :meth:`collate`, which calls a ``data_collator`` given to the trainer."""
        return self.collate

    @data_collator.setter
    def data_collator(self, collator) -> None:
        self._user_collator = collator

    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` processed like the trainer's own: a ``datasets.Dataset`` of ``prompt_ids``/``completion_ids``/``label`` rows.

        Paired data is unpaired first; with ``precompute_ref_log_probs`` the rows also hold
        ``KL_completion_ids``, ``ref_logps`` and ``ref_KL_logps``.

        Raises:
            posttrain.ConfigError: the data is in none of the accepted formats, no example is left
                after the ``max_length`` filter, or the reference log-probs cannot be precomputed.
        """
        from datasets import Dataset

        args = self.args
        if args.precompute_ref_log_probs:
            if _is_iterable_dataset(dataset):
                raise ConfigError(
                    f"precompute_ref_log_probs=True is not supported with IterableDataset ({name}): the reference log-probs "
                    "are stored per row, so pass a map-style datasets.Dataset (e.g. Dataset.from_list(list(stream))) or set "
                    "precompute_ref_log_probs=False."
                )
            if name != "train_dataset" and self.ref_model is None and not self.is_peft and self.loop.state.global_step > 0:
                raise ConfigError(
                    f"Cannot compute reference log-probs for a dataset passed to evaluate() after training has started ({name}): "
                    "with precompute_ref_log_probs=True and no ref_model the reference is the initial policy, which is gone. "
                    "Give this dataset as eval_dataset= at construction, pass ref_model=..., or set precompute_ref_log_probs=False."
                )
        rows = _materialize(dataset, name)
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one example.")
        out = self._tokenize_rows(rows, name)
        max_length = args.max_length
        # a prompt that fills max_length leaves no completion token after truncation: no signal
        out = [r for r in out if max_length is None or len(r["prompt_ids"]) < max_length]
        if not out:
            raise ConfigError(f"every prompt of {name} is at least max_length={max_length} tokens long: raise max_length or set it to None.")
        if name == "train_dataset":
            self._check_class_weights(out)
        if args.precompute_ref_log_probs:
            batch_size = args.per_device_train_batch_size if name == "train_dataset" else args.per_device_eval_batch_size
            self._precompute_reference(out, args.precompute_ref_batch_size or batch_size)
        return Dataset.from_list(out)

    def _tokenize_rows(self, rows: list[dict], name: str) -> list[dict]:
        """Return ``{"prompt_ids", "completion_ids", "label"}`` per example (unpairing paired data first)."""
        columns = set(rows[0])
        if {"prompt_ids", "chosen_ids", "rejected_ids"} <= columns:
            rows = _unpair(rows, "chosen_ids", "rejected_ids", "completion_ids")
            columns = set(rows[0])
        if {"prompt_ids", "completion_ids", "label"} <= columns:
            return [{"prompt_ids": list(r["prompt_ids"]), "completion_ids": list(r["completion_ids"]), "label": bool(r["label"])} for r in rows]
        if "chosen" in columns and "rejected" in columns:
            rows = _unpair([r if "prompt" in r else _extract_prompt(r) for r in rows])
        if not {"prompt", "completion", "label"} <= set(rows[0]):
            raise ConfigError(f"{name} has columns {sorted(columns)}, but KTO needs {_FORMATS}.")
        out = []
        for index, row in enumerate(rows):
            for key in ("prompt", "completion", "label"):
                if row.get(key) is None:
                    raise ConfigError(f"{name} row {index}, column {key!r}: missing value; KTO needs {_FORMATS}.")
            item, prefix = _tokenize(row, self.processing_class)
            if not prefix and not self._warned_boundary:
                self._warned_boundary = True
                warnings.warn(
                    f"{name} row {index}: the tokenized prompt is not a prefix of the tokenized prompt+completion (the chat "
                    "template renders the prompt alone differently, or tokens merge across the boundary); the completion "
                    "starts where they diverge, as in TRL. Shown once; it likely applies to every row.",
                    stacklevel=4,
                )
            out.append(item)
        return out

    def _check_class_weights(self, rows: list[dict]) -> None:
        """Warn when the class weights are outside the KTO paper's range for this data (Eq. 8, as TRL does)."""
        n_d = max(sum(r["label"] for r in rows), 1)
        n_u = max(len(rows) - n_d, 1)
        if n_d == n_u:
            return
        w_d, w_u = self.args.desirable_weight, self.args.undesirable_weight
        if not 1.0 <= (w_d * n_d) / (w_u * n_u) <= 4 / 3:
            logger.warning(
                "KTO: %d desirable vs %d undesirable examples with desirable_weight=%s, undesirable_weight=%s. The paper "
                "recommends desirable_weight*n_D / (undesirable_weight*n_U) in [1, 4/3]: e.g. desirable_weight in [%.2f, %.2f].",
                n_d, n_u, w_d, w_u, n_u * w_u / n_d, n_u * w_u / n_d * 4 / 3,
            )

    def _precompute_reference(self, rows: list[dict], batch_size: int) -> None:
        """Score every row (and its fixed KL partner) with the reference once; store per-row floats in ``rows``."""
        if self.ref_model is None:  # the policy (adapter disabled under PEFT) is the reference before training
            self.model.to(self.loop.device).eval()
        if self.calculate_kl:
            # The KL partner must be fixed to precompute its reference log-prob: rotate by one within
            # consecutive chunks of per_device_train_batch_size, exactly TRL's dataset-level pairing.
            chunk = self.args.per_device_train_batch_size
            for start in range(0, len(rows), chunk):
                block = rows[start : start + chunk]
                partners = [block[i - 1]["completion_ids"] for i in range(len(block))]
                for row, partner in zip(block, partners):
                    row["KL_completion_ids"] = partner
        for start in range(0, len(rows), batch_size):
            block = rows[start : start + batch_size]
            ref_logps, ref_kl_logps = self._reference_logps(self.loop.to_device(self.collate(block)))
            for i, row in enumerate(block):
                row["ref_logps"] = float(ref_logps[i])
                if self.calculate_kl:
                    row["ref_KL_logps"] = float(ref_kl_logps[i])

    # ------------------------------------------------------------------ the method protocol
    def collate(self, examples: list[dict]) -> dict:
        """Pad rows into (B, T) tensors; add the mismatched KL sequences (completion of the previous row) for ``kto``.

        A ``data_collator`` given to the trainer receives the rows (with ``KL_completion_ids`` for
        ``kto``) and must return ``input_ids``/``attention_mask``/``completion_mask`` (and the
        ``KL_`` triple), as TRL's ``DataCollatorForUnpairedPreference`` does.
        """
        rows = list(examples)
        if self.calculate_kl and "KL_completion_ids" not in rows[0]:
            rows = [{**r, "KL_completion_ids": rows[i - 1]["completion_ids"]} for i, r in enumerate(rows)]
        if self._user_collator is not None:
            batch = dict(self._user_collator(rows))
            needed = ["input_ids", "attention_mask", "completion_mask"] + (["KL_input_ids", "KL_attention_mask", "KL_completion_mask"] if self.calculate_kl else [])
            missing = [k for k in needed if k not in batch]
            if missing:
                raise ConfigError(f"data_collator returned no {missing}: KTO needs {needed} (see trl's DataCollatorForUnpairedPreference).")
            batch["label"] = torch.as_tensor(batch.get("label", [r["label"] for r in rows]), dtype=torch.bool)
        else:
            batch = self._pad_rows(rows)
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        batch["num_chosen"] = int(sum(bool(r["label"]) for r in rows))  # on the CPU: which class means to log, without a sync
        return batch

    def _pad_rows(self, rows: list[dict]) -> dict:
        batch: dict[str, Any] = {}
        pairs = [("", [r["completion_ids"] for r in rows])]
        if self.calculate_kl:
            pairs.append(("KL_", [r["KL_completion_ids"] for r in rows]))
        for prefix, completions in pairs:
            ids, masks = [], []
            for row, completion in zip(rows, completions):
                full = list(row["prompt_ids"]) + list(completion)
                mask = [0] * len(row["prompt_ids"]) + [1] * len(completion)
                if self.args.max_length is not None:
                    full, mask = full[: self.args.max_length], mask[: self.args.max_length]
                ids.append(torch.tensor(full, dtype=torch.long))
                masks.append(torch.tensor(mask, dtype=torch.long))
            input_ids = pad(ids, padding_value=self.pad_token_id)  # (B, T)
            attention_mask = pad([torch.ones_like(x) for x in ids], padding_value=0)  # (B, T)
            completion_mask = pad(masks, padding_value=0)  # (B, T)
            multiple = self.args.pad_to_multiple_of
            if multiple and input_ids.shape[1] % multiple:
                extra = multiple - input_ids.shape[1] % multiple
                input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
                attention_mask, completion_mask = F.pad(attention_mask, (0, extra)), F.pad(completion_mask, (0, extra))
            batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"], batch[f"{prefix}completion_mask"] = input_ids, attention_mask, completion_mask
        batch["label"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)  # (B,)
        for key in ("ref_logps", "ref_KL_logps"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float)  # (B,)
        return batch

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]  # examples

    @staticmethod
    def _sequence_logps(model, input_ids, attention_mask, completion_mask, with_stats: bool = False, chunk_size: int | None = None, **model_kwargs):
        """Return the summed completion log-probs (B,) and, if asked, token statistics and the model output.

        The statistics are sums over completion tokens (for exact means): ``entropy``, ``logits``
        (the per-token mean over the vocabulary, per example) and ``tokens`` (per example). With
        ``chunk_size`` (``logprob_chunk_size``) everything comes from the hidden states and the LM head,
        ``chunk_size`` tokens at a time, never the (B, T, V) logits.
        """
        output, states = causal_lm_states(model, chunk_size=chunk_size, input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        scores = states[:, :-1].score(input_ids[:, 1:], return_entropy=with_stats, entropy_grad=False, stats=("mean_logit",) if with_stats else ())  # (B, T-1)
        mask = completion_mask[:, 1:].to(scores.logps.dtype)  # (B, T-1)
        logps = (scores.logps * mask).sum(-1).float()  # (B,)
        if not with_stats:
            return logps, None
        with torch.no_grad():
            stats = {
                "entropy": (scores.entropy * mask).sum().float(),
                "logits": (scores.stats["mean_logit"] * mask).sum(-1).float(),  # (B,)
                "tokens": mask.sum(-1).float(),  # (B,)
                "output": output,
            }
        return logps, stats

    def _reference_context(self):
        if self.ref_model is None and self.is_peft:
            return adapter_disabled(self.model, self.loop.accelerator)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _reference_logps(self, batch: dict):
        """Return the reference log-probs of the completions and of the KL sequences (None without KL)."""
        ref = self.ref_model if self.ref_model is not None else self.loop.accelerator.unwrap_model(self.model)
        with self._reference_context():
            ref_logps, _ = self._sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_size=self.args.logprob_chunk_size)  # (B,)
            ref_kl_logps = None
            if self.calculate_kl:
                ref_kl_logps, _ = self._sequence_logps(ref, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"], chunk_size=self.args.logprob_chunk_size)  # (B,)
        return ref_logps, ref_kl_logps

    def _losses(self, model, batch: dict):
        """Return the per-example weighted losses (B,), the implied rewards (B,), the aux loss (or None) and the batch sums of :data:`_STATS`."""
        args = self.args
        extra = {"output_router_logits": True} if self.aux_loss_enabled else {}
        logps, tok = self._sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], with_stats=True,
                                         chunk_size=args.logprob_chunk_size, **extra)  # (B,)
        if "ref_logps" in batch:
            ref_logps, ref_kl_logps = batch["ref_logps"], batch.get("ref_KL_logps")
        else:
            ref_logps, ref_kl_logps = self._reference_logps(batch)  # (B,), (B,) | None
        aux_loss = tok["output"].aux_loss if self.aux_loss_enabled else None

        accelerator = self.loop.accelerator
        labels = batch["label"]  # (B,) bool
        chosen, rejected = labels.float(), (~labels).float()
        with torch.no_grad():
            if self.calculate_kl:
                kl_logps, _ = self._sequence_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"], chunk_size=args.logprob_chunk_size)  # (B,)
                kl = (kl_logps - ref_kl_logps).mean()
            else:
                kl = torch.zeros((), device=logps.device)
            rewards = args.beta * (logps.detach() - ref_logps)  # (B,)
            sums = torch.stack([
                kl, chosen.sum(), rejected.sum(), (rewards * chosen).sum(), (rewards * rejected).sum(),
                (logps.detach() * chosen).sum(), (logps.detach() * rejected).sum(),
                (tok["logits"] * chosen).sum(), (tok["tokens"] * chosen).sum(), (tok["logits"] * rejected).sum(), (tok["tokens"] * rejected).sum(),
                tok["entropy"], tok["tokens"].sum(),
            ])
            if model.training and accelerator.num_processes > 1:
                sums = accelerator.reduce(sums, reduction="sum")  # TRL gathers z (and its metrics) across processes
                sums[0] = sums[0] / accelerator.num_processes  # z: the mean of the processes' estimates
            kl = sums[0].clamp(min=0)

        logratios = logps - ref_logps  # (B,)
        if args.loss_type == "kto":  # Eq. (7) of Ethayarajh et al. 2024
            desirable_losses = 1 - torch.sigmoid(args.beta * (logratios - kl))
            undesirable_losses = 1 - torch.sigmoid(args.beta * (kl - logratios))
        else:  # apo_zero_unpaired: unpaired Eq. (7) of D'Oosterlinck et al. 2024
            desirable_losses = 1 - torch.sigmoid(args.beta * logratios)
            undesirable_losses = torch.sigmoid(args.beta * logratios)
        losses = torch.where(labels, args.desirable_weight * desirable_losses, args.undesirable_weight * undesirable_losses)  # (B,)
        return losses, rewards, aux_loss, dict(zip(_STATS, sums))

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        losses, _, aux_loss, s = self._losses(model, batch)
        loss = losses.sum() / num_items_in_batch
        if aux_loss is not None:  # weighted by this micro-batch's share of the step's examples (TRL: coef * aux per micro-batch mean)
            loss = loss + self.router_aux_loss_coef * aux_loss * (losses.shape[0] / num_items_in_batch)
        metrics = {"kl": s["kl"].clamp(min=0), "entropy": s["entropy"] / s["tokens/all"].clamp(min=1)}
        # A class mean is logged for micro-batches that hold the class (TRL appends it only then). With
        # several processes the sums are global; a class absent everywhere then counts as 0.
        single = self.loop.accelerator.num_processes == 1 or not model.training
        has = {"chosen": batch["num_chosen"] > 0, "rejected": batch["num_chosen"] < losses.shape[0]}
        for side in ("chosen", "rejected"):
            if has[side] or not single:
                count = s[f"count/{side}"].clamp(min=1)
                metrics[f"rewards/{side}"] = s[f"rewards/{side}"] / count
                metrics[f"logps/{side}"] = s[f"logps/{side}"] / count
                metrics[f"logits/{side}"] = s[f"logits/{side}"] / s[f"tokens/{side}"].clamp(min=1)
        if (has["chosen"] and has["rejected"]) or not single:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        if aux_loss is not None:
            metrics["aux_loss"] = aux_loss.detach().float()
        return loss, metrics

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Score the eval set: exact class means of rewards, log-probs and logits over the whole set (all processes).

        With ``compute_metrics`` it also receives ``EvalPrediction(predictions=<implied rewards
        beta * log(pi/pi_ref), one per example>, label_ids=<labels>)`` and its results are added.
        """
        totals = torch.zeros(len(_STATS) + 2, device=self.loop.device)  # + loss sum, example count
        rewards_all: list[float] = []
        labels_all: list[bool] = []
        for batch in batches:
            n = self.count_items(batch)
            losses, rewards, aux_loss, s = self._losses(model, batch)
            loss_sum = losses.sum() + (self.router_aux_loss_coef * aux_loss * n if aux_loss is not None else 0.0)
            values = [s[k].clamp(min=0) * n if k == "kl" else s[k] for k in _STATS] + [loss_sum, n]
            totals = totals + torch.stack([torch.as_tensor(v, dtype=torch.float, device=totals.device) for v in values])
            if self.compute_metrics is not None:
                rewards_all += rewards.tolist()
                labels_all += batch["label"].tolist()
        if self.loop.accelerator.num_processes > 1:
            totals = self.loop.accelerator.reduce(totals, reduction="sum")
        s = dict(zip([*_STATS, "loss", "count/all"], totals.tolist()))
        n_all, n_c, n_r = max(s["count/all"], 1), max(s["count/chosen"], 1), max(s["count/rejected"], 1)
        out = {"loss": s["loss"] / n_all, "kl": s["kl"] / n_all, "entropy": s["entropy"] / max(s["tokens/all"], 1)}
        for side, count in (("chosen", n_c), ("rejected", n_r)):
            out[f"rewards/{side}"] = s[f"rewards/{side}"] / count
            out[f"logps/{side}"] = s[f"logps/{side}"] / count
            out[f"logits/{side}"] = s[f"logits/{side}"] / max(s[f"tokens/{side}"], 1)
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if self.compute_metrics is not None:
            out.update(self._user_metrics(rewards_all, labels_all))
        return out

    def _user_metrics(self, rewards: list[float], labels: list[bool]) -> dict[str, float]:
        from transformers import EvalPrediction

        if self.loop.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rewards, labels = gather_object(rewards), gather_object(labels)
        result = self.compute_metrics(EvalPrediction(predictions=_to_numpy(rewards), label_ids=_to_numpy(labels)))
        return {k.removeprefix("eval_"): float(v) for k, v in (result or {}).items()}

    def on_step_end(self, model, state) -> None:
        """``sync_ref_model``: every ``ref_model_sync_steps`` steps, reference <- alpha * policy + (1 - alpha) * reference."""
        args = self.args
        if not args.sync_ref_model or state.global_step % args.ref_model_sync_steps != 0:
            return
        sync_reference_model(self.ref_model, model, args.ref_model_mixup_alpha, accelerator=self.loop.accelerator)

    def state_dict(self) -> dict:
        """Return the method state for checkpoints: the reference weights when ``sync_ref_model`` changes them."""
        if not self.args.sync_ref_model:
            return {}
        return {"ref_model": {k: v.detach().cpu().clone() for k, v in self.ref_model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])
