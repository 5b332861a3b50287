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

Because ``z`` is computed per micro-batch, KTO's gradient depends on how a step's examples are
split into micro-batches: per-device batch 8 x accumulation 1 is not 4 x 2 in general (it is when
``z`` clamps to 0 in every micro-batch, e.g. at step 0 with the reference equal to the policy).
``apo_zero_unpaired`` has no batch coupling and is exactly accumulation-invariant.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from posttrain import ConfigError, TrainingLoop, entropy_from_logits, pad, selective_log_softmax
from posttrain_kto.config import KTOConfig

__all__ = ["KTOTrainer"]

logger = logging.getLogger(__name__)

#: Rows per chunk when unpairing chosen/rejected data; TRL unpairs with ``datasets.map(batched=True)``,
#: whose default batch is 1000 rows, giving [chosen x1000, rejected x1000, ...]. Same order here.
_UNPAIR_CHUNK = 1000

#: Metrics summed over examples for :meth:`KTOTrainer.evaluate` (then divided by their counts).
_EVAL_SUMS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "count/chosen", "count/rejected", "count/all")


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


def _unpair(rows: list[dict]) -> list[dict]:
    """Turn each (prompt, chosen, rejected) row into a desirable and an undesirable row, in TRL's order."""
    out = []
    for start in range(0, len(rows), _UNPAIR_CHUNK):
        chunk = rows[start : start + _UNPAIR_CHUNK]
        extra = lambda r: {k: v for k, v in r.items() if k not in ("chosen", "rejected")}  # noqa: E731
        out += [{**extra(r), "completion": r["chosen"], "label": True} for r in chunk]
        out += [{**extra(r), "completion": r["rejected"], "label": False} for r in chunk]
    return out


def _tokenize(example: dict, tokenizer) -> dict:
    """Return ``{"prompt_ids", "completion_ids", "label"}``; the completion starts where prompt and prompt+completion diverge."""
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
    prompt_len = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        prompt_len += 1
    return {"prompt_ids": prompt_ids[:prompt_len], "completion_ids": full_ids[prompt_len:], "label": bool(example["label"])}


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


class KTOTrainer:
    """Train a causal LM with KTO (or unpaired APO-zero) against a frozen reference model.

    Features (flags in :class:`KTOConfig`):
        - Unpaired ``prompt``/``completion``/``label`` data, standard or conversational; paired
          ``prompt``/``chosen``/``rejected`` data (explicit or implicit prompt) is unpaired into one
          desirable and one undesirable row per pair, as TRL does.
        - Reference model: ``ref_model`` (a model or a path), else a frozen copy of the policy;
          with PEFT the policy with its adapter disabled; ``precompute_ref_log_probs`` scores the
          data once before training so no reference stays in memory.
        - ``loss_type``: ``kto`` (with the batch KL estimate ``z``) or ``apo_zero_unpaired``;
          ``beta``, ``desirable_weight``, ``undesirable_weight``.

    Metrics per micro-batch: ``kl``, ``entropy``, ``rewards/chosen_sum``, ``rewards/rejected_sum``,
    ``logps/chosen_sum``, ``logps/rejected_sum``, ``count/chosen``, ``count/rejected`` (a class
    mean is ``<x>/chosen_sum / count/chosen``: micro-batches may lack a class). Evaluation reports
    the exact means ``eval_rewards/chosen``, ``eval_rewards/rejected``, ``eval_rewards/margins``,
    ``eval_logps/*``, ``eval_kl`` and ``eval_loss``.

    Raises:
        posttrain.ConfigError: data without ``completion``/``label`` (or ``chosen``/``rejected``),
            an empty dataset after the ``max_length`` filter.
    """

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: KTOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        *,
        allow_experimental: bool = False,
    ) -> None:
        self.args = args or KTOConfig()
        self.loop = TrainingLoop(self.args, method="kto", allow_experimental=allow_experimental)
        self.calculate_kl = self.args.loss_type == "kto"
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        if self.args.disable_dropout:
            _disable_dropout(self.model)
        self.is_peft = hasattr(self.model, "disable_adapter") and hasattr(self.model, "peft_config")
        self.ref_model = self._setup_ref_model(ref_model)
        self.pad_token_id = self.processing_class.pad_token_id
        self.train_dataset = self._prepare_dataset(train_dataset, "train_dataset") if train_dataset is not None else None
        self.eval_dataset = self._prepare_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        if self.args.precompute_ref_log_probs:
            self._setup_precomputed_ref()
        self.loop.setup(self.model)

    # ------------------------------------------------------------------ setup
    def _setup_ref_model(self, ref_model):
        """Return the frozen reference model, or None when the adapter-disabled policy or a pre-pass serves instead."""
        args = self.args
        if isinstance(ref_model, str):
            import transformers

            kwargs = dict(args.model_init_kwargs or {})
            dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
            dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
            ref_model = transformers.AutoModelForCausalLM.from_pretrained(ref_model, dtype=dtype or self.model.dtype, **kwargs)
        elif ref_model is None:
            if self.is_peft or args.precompute_ref_log_probs:
                return None
            ref_model = copy.deepcopy(self.model)  # the policy before any update
        if args.disable_dropout:
            _disable_dropout(ref_model)
        return self.loop.prepare_frozen(ref_model)

    def _prepare_dataset(self, dataset, name: str) -> list[dict]:
        """Return tokenized rows ``{"prompt_ids", "completion_ids", "label"}`` (unpairing paired data first)."""
        rows = [dict(example) for example in dataset]
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one example.")
        if "chosen" in rows[0] and "rejected" in rows[0]:
            rows = _unpair([r if "prompt" in r else _extract_prompt(r) for r in rows])
        if not all(k in rows[0] for k in ("prompt", "completion", "label")):
            raise ConfigError(
                f"{name} has columns {sorted(rows[0])}, but KTO needs 'prompt', 'completion' and 'label' (bool: desirable "
                "or not), or paired 'prompt'/'chosen'/'rejected' data, which is unpaired automatically."
            )
        max_length = self.args.max_length
        out = [_tokenize(r, self.processing_class) for r in rows]
        # a prompt that fills max_length leaves no completion token after truncation: no signal
        out = [r for r in out if max_length is None or len(r["prompt_ids"]) < max_length]
        if not out:
            raise ConfigError(f"every prompt of {name} is at least max_length={max_length} tokens long: raise max_length or set it to None.")
        if name == "train_dataset":
            self._check_class_weights(out)
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

    def _setup_precomputed_ref(self) -> None:
        """Score every example (and its fixed KL partner) with the reference once; store per-row floats."""
        args = self.args
        if self.ref_model is None:  # the policy (adapter disabled under PEFT) is the reference before training
            self.model.to(self.loop.device).eval()
        for dataset, batch_size in ((self.train_dataset, args.per_device_train_batch_size), (self.eval_dataset, args.per_device_eval_batch_size)):
            if dataset is None:
                continue
            if self.calculate_kl:
                # The KL partner must be fixed to precompute its reference log-prob: rotate by one within
                # consecutive chunks of per_device_train_batch_size, exactly TRL's dataset-level pairing.
                chunk = args.per_device_train_batch_size
                for start in range(0, len(dataset), chunk):
                    block = dataset[start : start + chunk]
                    for i, row in enumerate(block):
                        row["KL_completion_ids"] = block[i - 1]["completion_ids"]
            size = args.precompute_ref_batch_size or batch_size
            for start in range(0, len(dataset), size):
                rows = dataset[start : start + size]
                batch = {k: v.to(self.loop.device) if isinstance(v, torch.Tensor) else v for k, v in self.collate(rows).items()}
                ref_logps, ref_kl_logps = self._reference_logps(batch)
                for i, row in enumerate(rows):
                    row["ref_logps"] = float(ref_logps[i])
                    if self.calculate_kl:
                        row["ref_KL_logps"] = float(ref_kl_logps[i])

    # ------------------------------------------------------------------ the method protocol
    def collate(self, rows: list[dict]) -> dict:
        """Pad rows into (B, T) tensors; add the mismatched KL sequences (completion of the previous row) for ``kto``."""
        batch: dict[str, Any] = {}
        pairs = [("", [r["completion_ids"] for r in rows])]
        if self.calculate_kl:
            kl_ids = [r["KL_completion_ids"] for r in rows] if "KL_completion_ids" in rows[0] else [rows[i - 1]["completion_ids"] for i in range(len(rows))]
            pairs.append(("KL_", kl_ids))
        for prefix, completions in pairs:
            ids, masks = [], []
            for row, completion in zip(rows, completions):
                full = row["prompt_ids"] + completion
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
        batch["label"] = torch.tensor([r["label"] for r in rows], dtype=torch.bool)  # (B,)
        for key in ("ref_logps", "ref_KL_logps"):
            if key in rows[0]:
                batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.float)  # (B,)
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        return batch

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]  # examples

    @staticmethod
    def _sequence_logps(model, input_ids, attention_mask, completion_mask, with_entropy: bool = False):
        """Return the summed completion log-probs (B,) and, if asked, the mean completion-token entropy."""
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]  # (B, T-1, V)
        mask = completion_mask[:, 1:].to(logits.dtype)  # (B, T-1)
        per_token = selective_log_softmax(logits, input_ids[:, 1:])  # (B, T-1)
        logps = (per_token * mask).sum(-1).float()  # (B,)
        if not with_entropy:
            return logps, None
        with torch.no_grad():
            entropy = (entropy_from_logits(logits.detach()) * mask).sum() / mask.sum().clamp(min=1)
        return logps, entropy.float()

    def _reference_context(self):
        if self.ref_model is None and self.is_peft:
            return self.loop.accelerator.unwrap_model(self.model).disable_adapter()
        return contextlib.nullcontext()

    @torch.no_grad()
    def _reference_logps(self, batch: dict):
        """Return the reference log-probs of the completions and of the KL sequences (None without KL)."""
        ref = self.ref_model if self.ref_model is not None else self.loop.accelerator.unwrap_model(self.model)
        with self._reference_context():
            ref_logps, _ = self._sequence_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])  # (B,)
            ref_kl_logps = None
            if self.calculate_kl:
                ref_kl_logps, _ = self._sequence_logps(ref, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])  # (B,)
        return ref_logps, ref_kl_logps

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        args = self.args
        logps, entropy = self._sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], with_entropy=True)  # (B,)
        if "ref_logps" in batch:
            ref_logps, ref_kl_logps = batch["ref_logps"], batch.get("ref_KL_logps")
        else:
            ref_logps, ref_kl_logps = self._reference_logps(batch)  # (B,), (B,) | None

        if self.calculate_kl:
            with torch.no_grad():
                kl_logps, _ = self._sequence_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])  # (B,)
                kl = (kl_logps - ref_kl_logps).mean()
                if model.training and self.loop.accelerator.num_processes > 1:
                    kl = self.loop.accelerator.reduce(kl, reduction="mean")  # TRL gathers z across processes
                kl = kl.clamp(min=0)
        else:
            kl = torch.zeros((), device=logps.device)

        logratios = logps - ref_logps  # (B,)
        labels = batch["label"]  # (B,) bool
        if args.loss_type == "kto":  # Eq. (7) of Ethayarajh et al. 2024
            desirable_losses = 1 - torch.sigmoid(args.beta * (logratios - kl))
            undesirable_losses = 1 - torch.sigmoid(args.beta * (kl - logratios))
        else:  # apo_zero_unpaired: unpaired Eq. (7) of D'Oosterlinck et al. 2024
            desirable_losses = 1 - torch.sigmoid(args.beta * logratios)
            undesirable_losses = torch.sigmoid(args.beta * logratios)
        losses = torch.where(labels, args.desirable_weight * desirable_losses, args.undesirable_weight * undesirable_losses)  # (B,)
        loss = losses.sum() / num_items_in_batch

        with torch.no_grad():
            rewards = args.beta * logratios.detach()  # (B,)
            chosen, rejected = labels.float(), (~labels).float()
            metrics = {
                "kl": kl.detach(),
                "entropy": entropy,
                "rewards/chosen_sum": (rewards * chosen).sum(),
                "rewards/rejected_sum": (rewards * rejected).sum(),
                "logps/chosen_sum": (logps.detach() * chosen).sum(),
                "logps/rejected_sum": (logps.detach() * rejected).sum(),
                "count/chosen": chosen.sum(),
                "count/rejected": rejected.sum(),
            }
        return loss, metrics

    # ------------------------------------------------------------------ entry points
    def train(self):
        """Train and return a :class:`posttrain.TrainOutput`; the final model is saved to ``output_dir``."""
        return self.loop.train(self)

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Score ``eval_dataset``: exact class means of rewards and log-probs over the whole set (all processes)."""
        sums = torch.zeros(len(_EVAL_SUMS), device=self.loop.device)
        for batch in batches:
            n = self.count_items(batch)
            loss, m = self.compute_loss(model, batch, n)
            values = [loss * n, m["kl"] * n, m["rewards/chosen_sum"], m["rewards/rejected_sum"], m["logps/chosen_sum"], m["logps/rejected_sum"], m["count/chosen"], m["count/rejected"], n]
            sums = sums + torch.stack([torch.as_tensor(v, dtype=torch.float, device=sums.device) for v in values])
        if self.loop.accelerator.num_processes > 1:
            sums = self.loop.accelerator.reduce(sums, reduction="sum")
        s = dict(zip(_EVAL_SUMS, sums.tolist()))
        n_all, n_c, n_r = max(s["count/all"], 1), max(s["count/chosen"], 1), max(s["count/rejected"], 1)
        out = {"loss": s["loss"] / n_all, "kl": s["kl"] / n_all}
        out.update({"rewards/chosen": s["rewards/chosen"] / n_c, "logps/chosen": s["logps/chosen"] / n_c})
        out.update({"rewards/rejected": s["rewards/rejected"] / n_r, "logps/rejected": s["logps/rejected"] / n_r})
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out
