"""DPO trainer: contrast the policy's and a frozen reference's log-probs of chosen and rejected completions.

Per pair ``i`` (sums over completion tokens only, ``selective_log_softmax``)::

    lr_c = log pi(y_c | x) - log pi_ref(y_c | x)        lr_r = log pi(y_r | x) - log pi_ref(y_r | x)
    s_c, s_r = f'(lr_c), f'(lr_r)                       # f-DPO scores; identity for reverse_kl
    delta = s_c - s_r
    loss_i = sum_k loss_weights[k] * L_k(...)           # L_k per loss_type, formulas in _pair_losses
    (WPO: each L_k is multiplied by w_c * w_r, the policy's length-normalized probabilities)

The micro-batch returns ``sum_i loss_i / num_items_in_batch`` with ``count_items`` = pairs, so for
every per-pair loss per-device batch 8 x accumulation 1 equals 1 x 8 exactly. The batch-coupled
losses cannot be split that way: ``aot``/``aot_unpaired`` sort the pairs of the micro-batch and
``sft`` is a token mean over the micro-batch (both as in TRL 1.16), so under gradient
accumulation they are computed per micro-batch and averaged over micro-batches, like TRL does.
Formulas match TRL 1.16 ``DPOTrainer._compute_loss`` (the tests check every loss type).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from posttrain import ConfigError, TrainingLoop, pad, selective_log_softmax
from posttrain_dpo.config import DPOConfig

__all__ = ["DPOTrainer", "dpo_pair_losses"]

_FORMATS = (
    "accepted formats: standard {'prompt': str, 'chosen': str, 'rejected': str}; conversational "
    "{'prompt': [messages], 'chosen': [messages], 'rejected': [messages]}; implicit prompt {'chosen', 'rejected'} holding "
    "full texts or conversations (the shared prefix becomes the prompt); or pre-tokenized {'prompt_ids', 'chosen_ids', "
    "'rejected_ids'}"
)


# ---------------------------------------------------------------------------------------------- data
def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value) and len(value) > 0


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


def _chat_kwargs(row: dict) -> dict:
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools, **(row.get("chat_template_kwargs") or {})}


def _tokenize_conversation(tokenizer, prompt: list, completion: list, kwargs: dict) -> tuple[list[int], list[int]]:
    """Return ``(prompt_ids, completion_ids)``: prompt rendered with the generation prompt, completion appended in token space."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False, **kwargs)
    if full_text.startswith(prompt_text):
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        return list(prompt_ids), list(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
    # The template renders the prompt alone differently (e.g. an empty thought block): split where the tokens diverge.
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    n = _common_prefix(prompt_ids, full_ids)
    warnings.warn("the chat template renders the prompt alone differently from prompt + completion; the completion starts where they diverge.", stacklevel=3)
    return list(full_ids[:n]), list(full_ids[n:])


def tokenize_row(row: dict, tokenizer, conversational: bool) -> dict:
    """Return ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` for one validated row with an explicit prompt."""
    if conversational:
        kwargs = _chat_kwargs(row)
        prompt_ids, chosen_ids = _tokenize_conversation(tokenizer, row["prompt"], row["chosen"], kwargs)
        prompt_ids_r, rejected_ids = _tokenize_conversation(tokenizer, row["prompt"], row["rejected"], kwargs)
        n = min(len(prompt_ids), len(prompt_ids_r))  # both equal unless the template misbehaves
        return {"prompt_ids": prompt_ids[:n], "chosen_ids": prompt_ids[n:] + chosen_ids, "rejected_ids": prompt_ids_r[n:] + rejected_ids}
    # Text: tokenize prompt + completion jointly and split where the tokenized prompt stops being a prefix, so a
    # token merging across the boundary (e.g. an implicit prompt split inside a number) is tokenized naturally (TRL 1.16).
    eos = tokenizer.eos_token
    chosen = row["chosen"] if row["chosen"].endswith(eos) else row["chosen"] + eos
    rejected = row["rejected"] if row["rejected"].endswith(eos) else row["rejected"] + eos
    prompt_ids = list(tokenizer(row["prompt"])["input_ids"])
    prompt_chosen = list(tokenizer(row["prompt"] + chosen)["input_ids"])
    prompt_rejected = list(tokenizer(row["prompt"] + rejected)["input_ids"])
    n = min(_common_prefix(prompt_ids, prompt_chosen), _common_prefix(prompt_ids, prompt_rejected))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": prompt_chosen[n:], "rejected_ids": prompt_rejected[n:]}


def _common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


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


def dpo_pair_losses(args: DPOConfig, lp: dict[str, torch.Tensor], ref_chosen: torch.Tensor, ref_rejected: torch.Tensor) -> torch.Tensor:
    """Return the ``(B,)`` per-pair loss, summed over ``args.loss_type`` with ``args.loss_weights``.

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
    for loss_type, weight in zip(args.loss_type, args.loss_weights or [1.0] * len(args.loss_type)):
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
class DPOTrainer:
    """Train a causal LM with Direct Preference Optimization or one of its variants.

    Features (flags in :class:`DPOConfig`):
        - Data: ``prompt``/``chosen``/``rejected`` as strings (an EOS is appended to completions)
          or message lists (the prompt goes through the chat template with the generation prompt,
          completions are appended in token space); implicit prompts (only ``chosen``/``rejected``:
          the shared prefix becomes the prompt); pre-tokenized ``prompt_ids``/``chosen_ids``/
          ``rejected_ids``. ``max_length``/``truncation_mode`` as TRL 1.16, ``max_prompt_length``.
        - Chosen and rejected go through the model in one forward pass (batch 2B).
        - Reference: ``ref_model`` (a model or path), else a frozen copy of the initial policy; with a
          PEFT policy, the policy with its adapter disabled (no copy); ``precompute_ref_log_probs``
          computes reference log-probs once before training (train and eval rows) and frees the copy.
        - 15 loss types combinable with ``loss_weights``; ``f_divergence_type`` (f-DPO),
          ``use_weighting`` (WPO), ``ld_alpha`` (LD-DPO), ``sync_ref_model`` (TR-DPO).

    Metrics (TRL names, means over the micro-batch): ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
    ``logits/chosen``, ``logits/rejected``.

    Raises:
        posttrain.ConfigError: invalid data (row and column named), ``ref_model is model``,
            ``sync_ref_model`` with a PEFT reference, or no pair left after truncation.
    """

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: DPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        *,
        allow_experimental: bool = False,
    ) -> None:
        self.args = args or DPOConfig()
        if ref_model is not None and ref_model is model:
            raise ConfigError("model and ref_model are the same object: omit ref_model (a frozen copy of the policy is made) or pass a separate model.")
        self.loop = TrainingLoop(self.args, method="dpo", allow_experimental=allow_experimental)
        self.model, self.processing_class = self._setup_model(model, processing_class, peft_config)
        self.pad_token_id = self.processing_class.pad_token_id
        self.ref_model = self._setup_ref_model(ref_model)
        self.train_dataset = self._prepare_dataset(train_dataset, "train_dataset") if train_dataset is not None else None
        self.eval_dataset = self._prepare_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        if self.args.precompute_ref_log_probs:
            self._setup_precomputed_reference()
        self.loop.setup(self.model)

    # ------------------------------------------------------------------ setup
    def _setup_model(self, model, processing_class, peft_config):
        self._was_peft = _is_peft_model(model)
        model, processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        if self._was_peft and self.args.precompute_ref_log_probs is False:
            warnings.warn(
                "model is already a PeftModel: the reference is this model with its adapter disabled, i.e. the base model, "
                "which equals the initial policy only for a freshly initialized adapter. Pass ref_model= otherwise.",
                stacklevel=3,
            )
        if self.args.disable_dropout:
            _disable_dropout(model)
        return model, processing_class

    def _setup_ref_model(self, ref_model):
        """Return the frozen reference model, or None when the adapter-disabled policy or precomputed log-probs serve."""
        args = self.args
        if isinstance(ref_model, str):
            import transformers

            kwargs = dict(args.model_init_kwargs or {})
            dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None) or torch.float32
            ref_model = transformers.AutoModelForCausalLM.from_pretrained(ref_model, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype, **kwargs)
        if ref_model is None and _is_peft_model(self.model):
            if args.sync_ref_model:
                raise ConfigError(
                    "sync_ref_model=True needs a separate reference model, but with a PEFT policy the reference is the policy "
                    "with its adapter disabled: pass ref_model=..., or set sync_ref_model=False."
                )
            return None
        if ref_model is None and args.precompute_ref_log_probs:
            return None  # the initial policy itself scores the dataset before training (no copy)
        if ref_model is None:
            ref_model = copy.deepcopy(self.model)  # eval mode below, so gradient checkpointing never runs in it
        if args.disable_dropout:
            _disable_dropout(ref_model)
        return self.loop.prepare_frozen(ref_model)

    def _prepare_dataset(self, dataset, name: str) -> list[dict]:
        """Return rows ``{"prompt_ids", "chosen_ids", "rejected_ids"}`` after validation, tokenization and truncation."""
        rows = [dict(example) for example in dataset]
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one preference pair.")
        columns = sorted(rows[0])
        pretokenized = {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns)
        if not pretokenized and not {"chosen", "rejected"} <= set(columns):
            hint = " Unpaired prompt/completion/label rows belong to the 'kto' method." if "label" in columns else ""
            raise ConfigError(f"{name} has columns {columns}, but DPO needs 'chosen' and 'rejected'; {_FORMATS}.{hint}")
        out = []
        for index, row in enumerate(rows):
            if pretokenized:
                item = {k: list(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
            else:
                for key in ("chosen", "rejected"):
                    if key not in row or row[key] is None:
                        raise ConfigError(f"{name} row {index}, column {key!r}: missing value; {_FORMATS}.")
                if "prompt" not in row or row["prompt"] is None:
                    conversational = _check_row(row, index, name)
                    row["prompt"], row["chosen"], row["rejected"] = extract_prompt(row["chosen"], row["rejected"])
                    if conversational and (not row["chosen"] or not row["rejected"]):
                        raise ConfigError(f"{name} row {index}: 'chosen' and 'rejected' are identical conversations or one contains the other; there is nothing to prefer.")
                conversational = _check_row(row, index, name)
                item = tokenize_row(row, self.processing_class, conversational)
            if self.args.max_prompt_length is not None:
                item["prompt_ids"] = item["prompt_ids"][-self.args.max_prompt_length :]
            if self.args.max_length is not None and self.args.truncation_mode == "keep_start" and len(item["prompt_ids"]) >= self.args.max_length:
                continue  # every completion token would be truncated away (TRL drops these pairs too)
            out.append(item)
        if not out:
            raise ConfigError(f"every prompt of {name} has >= max_length={self.args.max_length} tokens, so no pair is left: raise max_length, set max_prompt_length, or use truncation_mode='keep_end'.")
        return out

    def _setup_precomputed_reference(self) -> None:
        """Store ``ref_chosen_logps``/``ref_rejected_logps`` in every train/eval row, scored by the reference before any step."""
        args = self.args
        self._precomputing = True
        for dataset, default_bs in ((self.train_dataset, args.per_device_train_batch_size), (self.eval_dataset, args.per_device_eval_batch_size)):
            if not dataset:
                continue
            bs = args.precompute_ref_batch_size or default_bs
            for start in range(0, len(dataset), bs):
                rows = dataset[start : start + bs]
                batch = self.loop.to_device(self.collate(rows))
                ref_chosen, ref_rejected = self.reference_logps(self.model.to(self.loop.device), batch)
                for row, c, r in zip(rows, ref_chosen.tolist(), ref_rejected.tolist()):
                    row["ref_chosen_logps"], row["ref_rejected_logps"] = c, r
        self._precomputing = False
        if self.ref_model is not None and not args.sync_ref_model:
            self.ref_model = None  # the precomputed values replace it; free the memory

    # ------------------------------------------------------------------ the method protocol
    def collate(self, rows: list[dict]) -> dict:
        """Return ``input_ids``/``attention_mask``/``completion_mask`` (2B, T): chosen rows first, then rejected."""
        seqs, masks = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for r in rows:
                seqs.append(r["prompt_ids"] + r[key])
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
        if "ref_chosen_logps" in rows[0]:
            batch["ref_chosen_logps"] = torch.tensor([r["ref_chosen_logps"] for r in rows], dtype=torch.float)  # (B,)
            batch["ref_rejected_logps"] = torch.tensor([r["ref_rejected_logps"] for r in rows], dtype=torch.float)  # (B,)
        return batch

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # pairs

    def _sum_logps(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Return ``(2B,)`` sums of ``per_token`` over completion tokens (LD-DPO: tail tokens scaled by ld_alpha)."""
        if self.args.ld_alpha is None:
            return (per_token * mask).sum(1)
        position = mask.cumsum(1)  # (2B, T-1): 1-based index of each completion token
        shared = torch.minimum(*mask.sum(1).chunk(2)).repeat(2).unsqueeze(1)  # (2B, 1): the shorter completion's length
        shared_mask, tail_mask = (position > 0) & (position <= shared) & (mask > 0), (position > shared) & (mask > 0)
        return (per_token * shared_mask).sum(1) + self.args.ld_alpha * (per_token * tail_mask).sum(1)

    def _forward(self, model, batch: dict, with_stats: bool) -> dict[str, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, :-1]  # (2B, T-1, V)
        mask = batch["completion_mask"][:, 1:].to(logits.dtype)  # (2B, T-1)
        per_token = selective_log_softmax(logits, batch["input_ids"][:, 1:]) * mask  # (2B, T-1)
        out = {"per_token": per_token, "mask": mask, "logps": self._sum_logps(per_token, mask)}
        if with_stats:
            with torch.no_grad():
                logits = logits.detach()
                out["mean_logits"] = logits.mean(-1)  # (2B, T-1)
                if self.args.use_weighting:  # WPO Eq. 2: log p(y_t) - log sum_v p(v)^2, averaged over the completion
                    log_sum_sq = torch.logsumexp(2 * logits.float(), -1) - 2 * torch.logsumexp(logits.float(), -1)  # (2B, T-1)
                    aligned = ((per_token.detach() - log_sum_sq) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (2B,)
                    out["wpo_weights"] = torch.prod(torch.stack(torch.exp(aligned).chunk(2)), 0)  # (B,): w_c * w_r
        return out

    def policy_logps(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Return the policy's summed completion log-probs ``chosen``/``rejected`` (B,) and per-token tensors."""
        out = self._forward(model, batch, with_stats=True)
        out["chosen"], out["rejected"] = out["logps"].chunk(2)
        return out

    @torch.no_grad()
    def reference_logps(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the reference's ``(chosen, rejected)`` summed completion log-probs, each (B,)."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if self.args.precompute_ref_log_probs and not getattr(self, "_precomputing", False):
            # Never silently score with the trained policy (trl#6443).
            raise ConfigError("precompute_ref_log_probs=True but this batch has no precomputed reference log-probs: pass the dataset to the trainer at construction.")
        if self.ref_model is not None:
            logps = self._forward(self.ref_model, batch, with_stats=False)["logps"]
        elif _is_peft_model(self.loop.accelerator.unwrap_model(model)):
            with self.loop.accelerator.unwrap_model(model).disable_adapter():
                logps = self._forward(model, batch, with_stats=False)["logps"]
        else:  # before training, when precomputing: the initial policy is the reference
            logps = self._forward(model, batch, with_stats=False)["logps"]
        return logps.detach().chunk(2)

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        lp = self.policy_logps(model, batch)  # chosen/rejected: (B,)
        ref_chosen, ref_rejected = self.reference_logps(model, batch)  # (B,), (B,)
        losses = dpo_pair_losses(self.args, lp, ref_chosen, ref_rejected)  # (B,)
        loss = losses.sum() / num_items_in_batch
        with torch.no_grad():
            chosen_rewards = self.args.beta * (lp["chosen"] - ref_chosen).detach()  # (B,)
            rejected_rewards = self.args.beta * (lp["rejected"] - ref_rejected).detach()  # (B,)
            chosen_mask, rejected_mask = lp["mask"].chunk(2)
            chosen_logits, rejected_logits = lp["mean_logits"].chunk(2)
            metrics = {
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
                "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
                "logps/chosen": lp["chosen"].detach().mean(),
                "logps/rejected": lp["rejected"].detach().mean(),
                "logits/chosen": (chosen_logits * chosen_mask).sum() / chosen_mask.sum().clamp(min=1),
                "logits/rejected": (rejected_logits * rejected_mask).sum() / rejected_mask.sum().clamp(min=1),
            }
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` steps, reference <- alpha * policy + (1 - alpha) * reference."""
        args = self.args
        if not args.sync_ref_model or state.global_step % args.ref_model_sync_steps != 0:
            return
        policy = dict(self.loop.accelerator.unwrap_model(model).named_parameters())
        with torch.no_grad():
            for name, ref_param in self.ref_model.named_parameters():
                ref_param.mul_(1 - args.ref_model_mixup_alpha).add_(policy[name].detach().to(ref_param.dtype), alpha=args.ref_model_mixup_alpha)

    def state_dict(self) -> dict:
        """Return the method state for checkpoints: the TR-DPO reference weights (they change during training)."""
        if not self.args.sync_ref_model:
            return {}
        return {"ref_model": {k: v.detach().cpu().clone() for k, v in self.ref_model.state_dict().items()}}

    def load_state_dict(self, state: dict) -> None:
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])

    # ------------------------------------------------------------------ entry points
    def train(self):
        """Train and return a :class:`posttrain.TrainOutput`; the final model is saved to ``output_dir``."""
        return self.loop.train(self)
