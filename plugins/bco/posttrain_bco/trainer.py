"""BCO trainer: Binary Classifier Optimization (Jung et al. 2024, arXiv:2404.04656) on unpaired data.

Each example is a (prompt x, completion y, label) triple; the implied reward is
``r = beta * (log pi(y|x) - log pi_ref(y|x))`` (summed over completion tokens). BCO trains the
binary classifier ``sigmoid(r - delta)`` (desirable = 1) with the binary cross-entropy::

    desirable:    -log sigmoid(r - delta)
    undesirable:  -w(x) * log sigmoid(-(r - delta))

``delta`` is the reward shift: the running mean of every implied reward seen in training so far,
updated with each micro-batch's rewards before its loss (across processes: global statistics), as
TRL 1.13's ``RunningMoments``. ``w(x) = 1`` unless underlying distribution matching (UDM) is on:
then ``w(x) = clamp(p(x) / (1 - p(x) + 1e-8), min_density_ratio, max_density_ratio)``, where ``p``
is a balanced L2 logistic regression on prompt embeddings (desirable prompts = 1), fitted once at
construction on ``prompt_sample_size`` prompts per class. The example losses are summed and divided
by the number of examples in the optimizer step (TRL: the mean over each micro-batch, divided by
the accumulation steps; equal for equal micro-batches).

``delta`` couples the micro-batches of a step: accumulating 8 x 1 or 1 x 8 examples gives
different deltas (TRL updates the running moments per micro-batch too). What holds exactly: the
running moments after the step do not depend on the split (the update is an exact parallel merge
of means and variances), and the accumulated loss is the mean of the per-micro-batch losses, each
with its own delta.
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
)
from posttrain_bco.config import BCOConfig

__all__ = ["BCOTrainer", "DensityRatioClassifier", "RunningMoments", "bco_losses", "fit_density_ratio_classifier", "tokenize_example"]

logger = logging.getLogger(__name__)

#: Rows per chunk when unpairing chosen/rejected data; TRL unpairs with ``datasets.map(batched=True)``,
#: whose default batch is 1000 rows, giving [chosen x1000, rejected x1000, ...]. Same order here.
_UNPAIR_CHUNK = 1000

#: Per-batch sums behind the metrics (train: reduced across processes per micro-batch; eval: over the whole set).
_STATS = ("count/chosen", "count/rejected", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
_FORMATS = (
    "unpaired 'prompt'/'completion'/'label' (label: bool, desirable or not) as strings or {'role', 'content'} message lists, "
    "or paired 'prompt'/'chosen'/'rejected' (or 'chosen'/'rejected' with an implicit prompt), unpaired automatically"
)


# ---------------------------------------------------------------------------- data helpers
# Copied from posttrain_kto.trainer._is_conversational
def _is_conversational(example: dict) -> bool:
    for key in ("prompt", "completion", "chosen", "rejected"):
        value = example.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
            return True
    return False


# Copied from posttrain_kto.trainer._extract_prompt
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


# Copied from posttrain_kto.trainer._unpair
def _unpair(rows: list[dict], chosen: str = "chosen", rejected: str = "rejected", completion: str = "completion") -> list[dict]:
    """Turn each (prompt, chosen, rejected) row into a desirable and an undesirable row, in TRL's order."""
    out = []
    for start in range(0, len(rows), _UNPAIR_CHUNK):
        chunk = rows[start : start + _UNPAIR_CHUNK]
        extra = lambda r: {k: v for k, v in r.items() if k not in (chosen, rejected)}  # noqa: E731
        out += [{**extra(r), completion: r[chosen], "label": True} for r in chunk]
        out += [{**extra(r), completion: r[rejected], "label": False} for r in chunk]
    return out


# Copied from posttrain_kto.trainer._materialize
def _materialize(dataset, name: str) -> list[dict]:
    """Return the rows of a ``Dataset``, ``IterableDataset`` (read once, to the end) or list of dicts."""
    if isinstance(dataset, dict):
        raise ConfigError(f"{name} is a dict of datasets: pass one dataset here (only eval_dataset may be a dict of named datasets).")
    return [dict(example) for example in dataset]


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


# Copied from posttrain_kto.trainer._to_numpy
def _to_numpy(values: list) -> Any:
    import numpy as np

    return np.asarray(values)


def _render(row: dict, index: int, name: str, tokenizer) -> tuple[str, str]:
    """Return ``(prompt, completion)`` text; conversations go through the chat template as TRL's ``maybe_apply_chat_template``."""
    if not _is_conversational(row):
        for key in ("prompt", "completion"):
            if not isinstance(row[key], str):
                raise ConfigError(f"{name} row {index}, column {key!r}: expected a string, got {type(row[key]).__name__} {str(row[key])[:80]!r}; BCO needs {_FORMATS}.")
        return row["prompt"], row["completion"]
    for key in ("prompt", "completion"):
        value = row[key]
        if not (isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value)):
            raise ConfigError(f"{name} row {index}, column {key!r}: expected a non-empty list of {{'role', 'content'}} messages, got {str(value)[:80]!r}; BCO needs {_FORMATS}.")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the dataset is conversational but the tokenizer has no chat template: set tokenizer.chat_template, or give the rows as strings.")
    tools = row.get("tools")
    kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools, **(row.get("chat_template_kwargs") or {})}
    last_role = row["prompt"][-1]["role"]
    if last_role not in ("user", "tool", "assistant"):
        raise ConfigError(f"{name} row {index}, column 'prompt': the last message has role {last_role!r}; it must be 'user', 'tool' or 'assistant' (as TRL).")
    continues = last_role == "assistant"
    prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=not continues, continue_final_message=continues, **kwargs)
    full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=False, **kwargs)
    common = 0  # the shared prefix is the prompt (TRL: templates that add tokens with the generation prompt)
    for a, b in zip(prompt, full):
        if a != b:
            break
        common += 1
    return prompt[:common], full[common:]


def tokenize_example(tokenizer, prompt: str, completion: str, max_length: int | None) -> tuple[list[int], int]:
    """Return ``(input_ids, prompt_len)`` of one example, as TRL 1.13's BCO ``_tokenize`` + ``_process_tokens``.

    ``prompt + completion`` is tokenized as one text (no special tokens); when the last prompt token
    merges with the completion, the boundary moves one token left. BOS is prepended when the
    tokenizer has one and the prompt lacks it, EOS appended when the completion lacks it. With
    ``max_length``, the completion is cut so that prompt + completion fit ``max_length`` minus one
    token for each of BOS/EOS that is missing (TRL counts a missing BOS even for a tokenizer without
    one); the prompt is never cut (TRL's negative slice for a prompt longer than the budget is
    clamped to an empty completion here).
    """
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(prompt + completion, add_special_tokens=False)["input_ids"])
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    prompt_ids, answer = full[:start], full[start:]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if max_length is not None:
        budget = max_length
        if not prompt_ids or bos != prompt_ids[0]:
            budget -= 1
        if not answer or eos != answer[-1]:
            budget -= 1
        if len(prompt_ids) + len(answer) > budget:
            answer = answer[: max(0, budget - len(prompt_ids))]
    if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
        prompt_ids = [bos] + prompt_ids
    if not answer or answer[-1] != eos:
        answer = answer + [eos]
    return prompt_ids + answer, len(prompt_ids)


# ---------------------------------------------------------------------------- the method's pieces
class RunningMoments:
    """Running mean and variance of the implied rewards (TRL 1.13's ``RunningMoments``, same float32 arithmetic).

    ``update(xs)`` merges a batch's mean and (population) variance into the totals; with several
    processes the batch statistics are global (``accelerator.reduce``), so every process holds the
    same moments. ``count`` starts at 1e-24 (TRL's), which makes the first update take the batch's
    moments exactly. As TRL, the batch statistics are taken in the rewards' precision and rounded to
    float32 before the merge.
    """

    def __init__(self) -> None:
        self.mean, self.var, self.std, self.count = 0.0, 1.0, 1.0, 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor, accelerator: Any = None) -> None:
        xs = xs.detach()
        if not xs.is_floating_point() or xs.element_size() < 4:
            xs = xs.float()  # bf16/fp16 rewards: the statistics in float32 at least
        if accelerator is not None and accelerator.num_processes > 1:
            sum_and_count = accelerator.reduce(torch.stack([xs.sum(), torch.tensor(float(xs.numel()), dtype=xs.dtype, device=xs.device)]), reduction="sum")
            xs_count = sum_and_count[1].item()
            xs_mean = sum_and_count[0] / sum_and_count[1]
            xs_var = accelerator.reduce(((xs - xs_mean) ** 2).sum(), reduction="sum") / sum_and_count[1]
        else:
            xs_count = xs.numel()
            xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        tot_sum = old_sum + xs_var * xs_count
        self.mean += (delta * xs_count / tot_count).item()
        new_var = tot_sum / tot_count
        self.std = (new_var * tot_count / (tot_count - 1)).float().sqrt().item()
        self.var = new_var.item()
        self.count = float(tot_count)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "std": self.std, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.std, self.count = (float(state[k]) for k in ("mean", "var", "std", "count"))


def bco_losses(rewards: torch.Tensor, labels: torch.Tensor, delta: float, rejected_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example BCO losses (B,) from implied rewards (B,), boolean labels (B,) and the reward shift ``delta``.

    Desirable: ``-log sigmoid(r - delta)``; undesirable: ``-w * log sigmoid(-(r - delta))`` with the
    UDM weights ``w`` (B,) (only the undesirable entries are read; None: 1). ``delta`` enters as a
    float32 value, as TRL's ``torch.as_tensor(running.mean)``.
    """
    shifted = rewards - float(torch.tensor(delta, dtype=torch.float32))  # rounded on the CPU: no device copy
    rejected = -F.logsigmoid(-shifted)
    if rejected_weight is not None:
        rejected = rejected_weight * rejected
    return torch.where(labels, -F.logsigmoid(shifted), rejected)


def fit_density_ratio_classifier(chosen: torch.Tensor, rejected: torch.Tensor, C: float = 1.0, max_iter: int = 100, tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``p(desirable | e) = sigmoid(e . coef + intercept)`` to prompt embeddings; return ``(coef (H,), intercept ())`` float64.

    The objective is scikit-learn's ``LogisticRegression(class_weight="balanced", C=C)`` (what TRL
    1.13 fits): ``0.5 |coef|^2 + C * sum_i s_i * log(1 + exp(-y_i (e_i . coef + b)))`` with balanced
    sample weights ``s_i = n / (2 n_class(i))``, the intercept not penalized. It is strictly convex,
    so its optimum is unique; Newton's method with a backtracking line search (float64) reaches it to
    ``tol`` (gradient max-norm), where scikit-learn's L-BFGS stops at its default ``tol=1e-4``.
    """
    x = torch.cat([chosen, rejected]).double()  # (n, H)
    y = torch.cat([torch.ones(len(chosen)), -torch.ones(len(rejected))]).double().to(x.device)  # (n,) in {+1, -1}
    n = x.shape[0]
    s = torch.where(y > 0, n / (2.0 * len(chosen)), n / (2.0 * len(rejected)))  # (n,) balanced weights
    xb = torch.cat([x, torch.ones(n, 1, dtype=x.dtype, device=x.device)], dim=1)  # (n, H+1): intercept column
    reg = torch.ones(xb.shape[1], dtype=x.dtype, device=x.device)
    reg[-1] = 0.0  # the intercept is not penalized

    def objective(w):
        return 0.5 * (reg * w * w).sum() + C * (s * F.softplus(-y * (xb @ w))).sum()

    w = torch.zeros(xb.shape[1], dtype=x.dtype, device=x.device)
    for _ in range(max_iter):
        margin = y * (xb @ w)
        sig = torch.sigmoid(-margin)  # d softplus(-m)/dm = -sigmoid(-m)
        grad = reg * w - C * (xb * (s * y * sig)[:, None]).sum(0)
        if grad.abs().max() <= tol:
            break
        hess = torch.diag(reg) + C * (xb * (s * sig * (1 - sig))[:, None]).T @ xb
        step = torch.linalg.solve(hess, grad)
        f0, t = objective(w), 1.0
        while objective(w - t * step) > f0 - 1e-4 * t * (grad @ step) and t > 1e-10:
            t *= 0.5
        w = w - t * step
    return w[:-1].clone(), w[-1].clone()


class DensityRatioClassifier:
    """The UDM classifier: ``p(desirable | prompt embedding)``, its coefficients float64 (method state, checkpointed)."""

    def __init__(self, coef: torch.Tensor, intercept: torch.Tensor) -> None:
        self.coef, self.intercept = coef.detach().double().cpu(), intercept.detach().double().cpu().reshape(())

    def predict_proba(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``p(desirable)`` (N,) float64 of embeddings (N, H) (scikit-learn's ``predict_proba(...)[:, 1]``)."""
        e = embeddings.double()
        return torch.sigmoid(e @ self.coef.to(e.device) + self.intercept.to(e.device))

    def density_ratio(self, embeddings: torch.Tensor, min_ratio: float, max_ratio: float) -> torch.Tensor:
        """``clamp(p / (1 - p + 1e-8), min_ratio, max_ratio)`` (N,) float32 (TRL 1.13's ``_get_udm_weight``)."""
        p = self.predict_proba(embeddings).float()
        return (p / (1 - p + 1e-8)).clamp(min=min_ratio, max=max_ratio)

    def state_dict(self) -> dict:
        return {"coef": self.coef.clone(), "intercept": self.intercept.clone()}


def mean_pooled_embedding_func(model):
    """``embedding_func(input_ids, attention_mask)`` of ``udm_embedding_model``: its last hidden state averaged over the mask (B, H)."""

    @torch.no_grad()
    def embedding_func(input_ids, attention_mask):
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1].float()  # (B, T, H)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    return embedding_func


def _check_trl_refusals(args: BCOConfig, model, peft_config) -> None:
    """Refuse, as TRL 1.13's ``BCOTrainer.__init__`` does with a ``ValueError``, what cannot work together."""
    if args.model_init_kwargs is not None and model is not None and not isinstance(model, str):
        raise ConfigError(
            f"model_init_kwargs={args.model_init_kwargs!r} is set but the model is already built ({type(model).__name__}): they apply to a model "
            "given by name (TRL 1.13 refuses this too); drop model_init_kwargs, or pass the model's name or path."
        )
    dtype = (args.model_init_kwargs or {}).get("dtype", "auto")
    if dtype is not None and dtype != "auto" and not isinstance(dtype, torch.dtype) and not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
        raise ConfigError(f"model_init_kwargs['dtype']={dtype!r} is invalid: use 'auto' or a torch dtype name such as 'float32' or 'bfloat16'.")
    if peft_config is not None and is_peft_model(model):
        raise ConfigError(
            "model is already a PeftModel and peft_config is given: merge and unload the existing adapter (or pass the base model) "
            "with peft_config, or pass the PeftModel without peft_config to train its adapter."
        )
    if args.generate_during_eval:
        import importlib.util

        if importlib.util.find_spec("wandb") is None and importlib.util.find_spec("comet_ml") is None:
            raise ConfigError(
                "`generate_during_eval=True` requires Weights and Biases or Comet to be installed. Please install `wandb` or `comet-ml` "
                "to resolve (as TRL 1.13), or set generate_during_eval=False: posttrain samples no completions during evaluation."
            )


def _refuse_encoder_decoder(model, args: BCOConfig) -> bool:
    """Return False (TRL's ``is_encoder_decoder``) for a decoder-only model; refuse an encoder-decoder one, whatever the flag says.

    As TRL 1.13, a model's own ``config.is_encoder_decoder`` decides; ``args.is_encoder_decoder`` is read
    here, when the trainer is built (TRL's tests set it after constructing the config).
    """
    base = model.get_base_model() if is_peft_model(model) else model
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        raise ConfigError(
            f"{type(base).__name__} is an encoder-decoder model; posttrain's BCO trains decoder-only causal LMs "
            "(TRL <= 1.13's BCOTrainer also trains encoder-decoder models)."
        )
    if args.is_encoder_decoder:
        warnings.warn(
            f"is_encoder_decoder=True is ignored: {type(base).__name__} is a decoder-only model (its config says so; TRL reads the model's config too).",
            stacklevel=3,
        )
    return False


# ---------------------------------------------------------------------------- the trainer
class BCOTrainer(TrainerSurface):
    """Train a causal LM with BCO against a frozen reference model (TRL 1.13's ``BCOTrainer`` API).

    Features (flags in :class:`BCOConfig`):
        - Unpaired ``prompt``/``completion``/``label`` data, standard or conversational (with a
          ``tools`` column and per-row ``chat_template_kwargs``); paired ``prompt``/``chosen``/
          ``rejected`` data (explicit or implicit prompt) is unpaired into one desirable and one
          undesirable row per pair, as TRL does. Tokenized as TRL 1.13 (see :func:`tokenize_example`).
        - Reference model: ``ref_model`` (a model or a path), else a frozen copy of the policy; with
          PEFT the policy with its adapter disabled; ``precompute_ref_log_probs`` scores the data once
          before training so no reference stays in memory.
        - The running reward shift ``delta`` (method state: checkpointed, exact on resume).
        - UDM: ``embedding_func`` + ``embedding_tokenizer`` (TRL's arguments), or the config's
          ``udm_embedding_model``; the fitted classifier is method state too.

    Metrics (TRL 1.13's names): ``delta``, ``rewards/chosen``, ``rewards/rejected``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``, ``logits/chosen``, ``logits/rejected``
    (``logits/*``: TRL's definition, the sum of every logit of the class's sequences, padding
    included, per example). A class mean is logged for the micro-batches that hold the class.
    Evaluation reports exact means over the whole eval set with an ``eval_`` prefix, plus what
    ``compute_metrics(EvalPrediction(predictions=<implied reward per example>, label_ids=<labels>))``
    returns.

    Raises:
        posttrain.ConfigError: no ``train_dataset``, data in none of the accepted formats, an
            argument posttrain cannot honour (``optimizers``, ``model_init``, ``data_collator``,
            ``preprocess_logits_for_metrics``, adapter names), only one of
            ``embedding_func``/``embedding_tokenizer``, an encoder-decoder model, or what TRL 1.13
            refuses too (``model_init_kwargs`` with a built model, ``ref_model is model``, a
            ``PeftModel`` with ``peft_config``, ``generate_during_eval`` without wandb/comet_ml).
    """

    _tag_names = ["trl", "bco"]

    def __init__(
        self,
        model=None,
        ref_model=None,
        args: BCOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        model_init=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        compute_metrics=None,
        model_adapter_name: str | None = None,
        ref_adapter_name: str | None = None,
        embedding_func=None,
        embedding_tokenizer=None,
        *,
        allow_experimental: bool = False,
    ) -> None:
        args = as_config(args, BCOConfig, default_output_dir=_default_output_dir(model, "BCO"))
        self.args = args
        # The maturity gate runs first: TrainingLoop refuses an experimental method without an opt-in.
        self.loop = TrainingLoop(args, method="bco", allow_experimental=allow_experimental, callbacks=callbacks)
        if train_dataset is None:
            raise ConfigError("BCOTrainer: `train_dataset` is required: pass train_dataset=... (a datasets.Dataset, IterableDataset or list of dicts).")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError(
                "optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config "
                "(optim, optim_args, learning_rate, weight_decay, lr_scheduler_type, lr_scheduler_kwargs); set those instead."
            )
        unsupported = {"model_init": model_init, "data_collator": data_collator, "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
                       "model_adapter_name": model_adapter_name, "ref_adapter_name": ref_adapter_name}
        for what, value in unsupported.items():
            if value is not None:
                raise ConfigError(
                    f"{what}= is not supported by posttrain's BCO: pass model=... (not model_init), let BCO collate its rows, pass "
                    "compute_metrics= for extra eval metrics, and use one adapter (the reference is the adapter-disabled policy)."
                )
        if (embedding_func is None) != (embedding_tokenizer is None) and args.udm_embedding_model is None:
            raise ConfigError("UDM needs both embedding_func= and embedding_tokenizer= (TRL's arguments), or udm_embedding_model in the config: pass both, or neither.")
        if args.udm_embedding_model is not None and (embedding_func is not None or embedding_tokenizer is not None):
            raise ConfigError("udm_embedding_model is set and embedding_func=/embedding_tokenizer= are given: UDM uses one embedding; drop one of them.")
        _check_trl_refusals(args, model, peft_config)
        self.compute_metrics = compute_metrics
        self.model, self.processing_class = self._load_policy(model, processing_class, peft_config, None)
        self.is_encoder_decoder = _refuse_encoder_decoder(self.model, args)
        if args.disable_dropout:
            disable_dropout(self.model)
        if getattr(getattr(self.model, "config", None), "output_router_logits", False):
            warnings.warn("the model's config has output_router_logits=True: posttrain's BCO does not add the MoE router auxiliary loss (TRL does).", stacklevel=2)
        self.is_peft = is_peft_model(self.model)
        self.ref_model = build_reference_model(
            self.model, ref_model, loop=self.loop, model_init_kwargs=self._init_kwargs(), disable_dropout_in_ref=args.disable_dropout,
            needed=not args.precompute_ref_log_probs,
        )
        self.max_length = args.max_length  # TRL's attribute (None: no truncation here, TRL's 512)
        self.pad_token_id = self.processing_class.pad_token_id if self.processing_class.pad_token_id is not None else self.processing_class.eos_token_id
        if self.pad_token_id is None or self.processing_class.eos_token_id is None:
            raise ConfigError("the tokenizer needs an EOS token (BCO appends it to every completion) and a pad token (else EOS pads): set tokenizer.eos_token.")
        self.running = RunningMoments()
        self.classifier: DensityRatioClassifier | None = None
        self.embedding_func, self.embedding_tokenizer = embedding_func, embedding_tokenizer
        if args.udm_embedding_model is not None:
            self.embedding_func, self.embedding_tokenizer = self._load_embedding_model(args.udm_embedding_model)
        self.match_underlying_distribution = self.embedding_func is not None
        _add_model_tags(self.model, self._tag_names)
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        if self.match_underlying_distribution:
            self._fit_classifier(self.train_dataset)
        self.loop.setup(self.model, method=self)

    # ------------------------------------------------------------------ setup
    # Copied from posttrain_kto.trainer.KTOTrainer._init_kwargs
    def _init_kwargs(self) -> dict:
        """``from_pretrained`` keyword arguments for models given by name: the config's, plus ``trust_remote_code``."""
        return {"trust_remote_code": self.args.trust_remote_code, **(self.args.model_init_kwargs or {})}

    def _load_policy(self, model, processing_class, peft_config, quantization_config):
        """Return ``(model, tokenizer)``, loaded by the core (by name: ``model_init_kwargs``, ``trust_remote_code``, ``quantization_config``)."""
        args = self.args
        model, processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config, quantization_config=quantization_config)
        if is_peft_model(model) and peft_config is None:
            if args.gradient_checkpointing:
                model.enable_input_require_grads()  # reentrant checkpointing of an adapter needs grad-requiring inputs
            warnings.warn(
                "model is already a PeftModel: the BCO reference is this model with its adapter disabled, i.e. the base "
                "model, which equals the initial policy only for a freshly initialized adapter. Pass ref_model= otherwise.",
                stacklevel=3,
            )
        return model, processing_class

    def _load_embedding_model(self, name: str):
        """``(embedding_func, tokenizer)`` of ``udm_embedding_model``: a frozen model on the training device, mean-pooled."""
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=self.args.trust_remote_code)
        model = AutoModel.from_pretrained(name, trust_remote_code=self.args.trust_remote_code).to(self.loop.device).eval()
        model.requires_grad_(False)
        self._embedding_model = model
        return mean_pooled_embedding_func(model), tokenizer

    # ------------------------------------------------------------------ data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` processed like the trainer's own: a ``datasets.Dataset`` with TRL 1.13's columns.

        Columns: ``prompt``, ``completion`` (the text, conversations rendered), ``label``,
        ``prompt_input_ids``/``prompt_attention_mask`` (BOS included), ``completion_input_ids``/
        ``completion_attention_mask`` (prompt + completion + EOS) and ``completion_labels`` (-100 on
        the prompt). Paired data is unpaired first; with UDM the rows also hold
        ``embedding_input_ids``/``embedding_attention_mask``; with ``precompute_ref_log_probs``,
        ``reference_logps``.

        Raises:
            posttrain.ConfigError: the data is in none of the accepted formats (the row and column are named).
        """
        from datasets import Dataset

        args = self.args
        rows = _materialize(dataset, name)
        if not rows:
            raise ConfigError(f"{name} is empty: give the trainer at least one example.")
        columns = set(rows[0])
        if "chosen" in columns and "rejected" in columns:
            rows = _unpair([r if r.get("prompt") is not None else _extract_prompt(r) for r in rows])
        out = []
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"{name} row {index} is a {type(row).__name__}, not a dict of columns; BCO needs {_FORMATS}.")
            for key in ("prompt", "completion", "label"):
                if row.get(key) is None:
                    raise ConfigError(f"{name} row {index}, column {key!r}: missing value (columns: {sorted(row)}); BCO needs {_FORMATS}.")
            if not isinstance(row["label"], bool) and row["label"] not in (0, 1):
                raise ConfigError(f"{name} row {index}, column 'label': expected a bool (True = desirable), got {row['label']!r}.")
            prompt, completion = _render(row, index, name, self.processing_class)
            input_ids, prompt_len = tokenize_example(self.processing_class, prompt, completion, args.max_length)
            item = {
                "prompt": prompt,
                "completion": completion,
                "label": bool(row["label"]),
                "prompt_input_ids": input_ids[:prompt_len],
                "prompt_attention_mask": [1] * prompt_len,
                "completion_input_ids": input_ids,
                "completion_attention_mask": [1] * len(input_ids),
                "completion_labels": [-100] * prompt_len + input_ids[prompt_len:],
            }
            if self.match_underlying_distribution:
                embedding_ids = list(self.embedding_tokenizer(prompt, add_special_tokens=False)["input_ids"])
                item["embedding_input_ids"], item["embedding_attention_mask"] = embedding_ids, [1] * len(embedding_ids)
            out.append(item)
        if args.precompute_ref_log_probs:
            if name != "train_dataset" and self.ref_model is None and not self.is_peft and self.loop.state.global_step > 0:
                raise ConfigError(
                    f"Cannot compute reference log-probs for a dataset passed to evaluate() after training has started ({name}): "
                    "with precompute_ref_log_probs=True and no ref_model the reference is the initial policy, which is gone. "
                    "Give this dataset as eval_dataset= at construction, pass ref_model=..., or set precompute_ref_log_probs=False."
                )
            batch_size = args.per_device_train_batch_size if name == "train_dataset" else args.per_device_eval_batch_size
            self._precompute_reference(out, batch_size)
        return Dataset.from_list(out)

    def _precompute_reference(self, rows: list[dict], batch_size: int) -> None:
        """Score every row with the reference once; store ``reference_logps`` per row (TRL's column, float32 in the batch)."""
        if self.ref_model is None:  # the policy (adapter disabled under PEFT) is the reference before training
            self.model.to(self.loop.device).eval()
        for start in range(0, len(rows), batch_size):
            block = rows[start : start + batch_size]
            ref_logps = self._reference_logps(self.loop.to_device(self.collate(block)))
            for i, row in enumerate(block):
                row["reference_logps"] = float(ref_logps[i])

    def _embed(self, rows: list[dict]) -> torch.Tensor:
        """Prompt embeddings (N, H) of ``rows`` (``embedding_input_ids``), in batches of ``per_device_train_batch_size``."""
        pad_id = self.embedding_tokenizer.pad_token_id if self.embedding_tokenizer.pad_token_id is not None else 0
        out = []
        for start in range(0, len(rows), self.args.per_device_train_batch_size):
            block = [torch.tensor(r["embedding_input_ids"], dtype=torch.long) for r in rows[start : start + self.args.per_device_train_batch_size]]
            ids = pad(block, padding_value=pad_id).to(self.loop.device)
            mask = pad([torch.ones_like(b) for b in block], padding_value=0).to(self.loop.device)
            with torch.no_grad():
                out.append(self.embedding_func(input_ids=ids, attention_mask=mask).detach().float().cpu())
        return torch.cat(out)

    def _fit_classifier(self, dataset) -> None:
        """Fit the UDM classifier on ``prompt_sample_size`` prompts per class, drawn with replacement by a generator seeded with ``data_seed``/``seed``."""
        rows = [dataset[i] for i in range(len(dataset))]
        desirable, undesirable = [r for r in rows if r["label"]], [r for r in rows if not r["label"]]
        if not desirable or not undesirable:
            raise ConfigError("UDM needs desirable and undesirable examples in train_dataset to fit the density-ratio classifier: this one has only one class.")
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        generator = torch.Generator().manual_seed(seed)
        samples = []
        for part in (desirable, undesirable):
            idx = torch.randint(len(part), (min(len(part), self.args.prompt_sample_size),), generator=generator).tolist()
            samples.append(self._embed([part[i] for i in idx]))
        self.set_classifier(*fit_density_ratio_classifier(*samples))
        accuracy = [float(((self.classifier.predict_proba(e) > 0.5) == want).double().mean()) for e, want in zip(samples, (True, False))]
        logger.info("UDM classifier training accuracy: desirable %.3f, undesirable %.3f", *accuracy)

    def set_classifier(self, coef: torch.Tensor, intercept: torch.Tensor) -> None:
        """Use the density-ratio classifier ``sigmoid(e . coef + intercept)`` (e.g. one fitted elsewhere) from now on."""
        self.classifier = DensityRatioClassifier(torch.as_tensor(coef).reshape(-1), torch.as_tensor(intercept).reshape(()))

    # ------------------------------------------------------------------ the method protocol
    def collate(self, examples: list[dict]) -> dict:
        """Pad rows into (B, T) ``input_ids``/``attention_mask``/``completion_mask`` (right padding), plus ``label`` (B,)."""
        rows = list(examples)
        ids = [torch.tensor(r["completion_input_ids"], dtype=torch.long) for r in rows]
        masks = [torch.tensor([0] * len(r["prompt_input_ids"]) + [1] * (len(r["completion_input_ids"]) - len(r["prompt_input_ids"])), dtype=torch.long) for r in rows]
        batch: dict[str, Any] = {
            "input_ids": pad(ids, padding_value=self.pad_token_id),  # (B, T)
            "attention_mask": pad([torch.ones_like(x) for x in ids], padding_value=0),  # (B, T)
            "completion_mask": pad(masks, padding_value=0),  # (B, T)
            "label": torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool),  # (B,)
        }
        if "reference_logps" in rows[0]:
            batch["reference_logps"] = torch.tensor([r["reference_logps"] for r in rows], dtype=torch.float)  # (B,): float32, as TRL's column
        if "embedding_input_ids" in rows[0]:
            pad_id = self.embedding_tokenizer.pad_token_id if self.embedding_tokenizer.pad_token_id is not None else 0
            emb = [torch.tensor(r["embedding_input_ids"], dtype=torch.long) for r in rows]
            batch["embedding_input_ids"] = pad(emb, padding_value=pad_id)  # (B, Te)
            batch["embedding_attention_mask"] = pad([torch.ones_like(x) for x in emb], padding_value=0)  # (B, Te)
        batch["num_tokens"] = int(batch["attention_mask"].sum())
        batch["num_chosen"] = int(sum(bool(r["label"]) for r in rows))  # on the CPU: which class means to log, without a sync
        return batch

    def count_items(self, batch: dict) -> int:
        return batch["input_ids"].shape[0]  # examples

    def _sequence_logps(self, model, batch: dict, with_stats: bool = False):
        """Summed completion log-probs (B,) and, with ``with_stats``, the per-example sum of every logit (B,) (TRL's ``logits/*_sum``).

        Log-probs come from the hidden states and the LM head, ``logprob_chunk_size`` tokens at a
        time (``posttrain.causal_lm_states``): no (B, T, V) logits are materialized.
        """
        input_ids = batch["input_ids"]
        _, states = causal_lm_states(model, chunk_size=self.args.logprob_chunk_size, input_ids=input_ids, attention_mask=batch["attention_mask"], use_cache=False)
        mask = batch["completion_mask"][:, 1:].float()  # (B, T-1)
        if not with_stats:
            scores = states[:, :-1].score(input_ids[:, 1:])  # (B, T-1)
            return (scores.logps * mask).sum(-1), None
        targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)  # (B, T): every position is scored for the logit sums; the last has no target
        scores = states.score(targets, stats=("mean_logit",))
        vocab = states.weight.shape[0] if states.is_chunked else states.tensor.shape[-1]
        mean_logits = scores.stats["mean_logit"]  # (B, T)
        logit_sums = mean_logits.sum(-1).to(torch.promote_types(mean_logits.dtype, torch.float32)) * vocab  # (B,)
        return (scores.logps[:, :-1] * mask).sum(-1), logit_sums

    def _reference_context(self):
        if self.ref_model is None and self.is_peft:
            return adapter_disabled(self.model, self.loop.accelerator)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _reference_logps(self, batch: dict) -> torch.Tensor:
        ref = self.ref_model if self.ref_model is not None else self.loop.accelerator.unwrap_model(self.model)
        with self._reference_context():
            return self._sequence_logps(ref, batch)[0]  # (B,)

    def _udm_weights(self, batch: dict) -> torch.Tensor | None:
        """Density-ratio weights (B,) of the batch's prompts (read for the undesirable rows only), or None without UDM."""
        if self.classifier is None:
            return None
        with torch.no_grad():
            embeddings = self.embedding_func(input_ids=batch["embedding_input_ids"], attention_mask=batch["embedding_attention_mask"])
        return self.classifier.density_ratio(embeddings, self.args.min_density_ratio, self.args.max_density_ratio).to(batch["input_ids"].device)

    def _losses(self, model, batch: dict, update: bool):
        """Per-example losses (B,), the implied rewards (B,) and the batch sums of :data:`_STATS`; ``update``: move the running moments first."""
        logps, logit_sums = self._sequence_logps(model, batch, with_stats=True)  # (B,), (B,)
        ref_logps = batch["reference_logps"] if "reference_logps" in batch else self._reference_logps(batch)  # (B,)
        rewards = self.args.beta * (logps - ref_logps)  # (B,)
        accelerator = self.loop.accelerator
        if update:
            self.running.update(rewards, accelerator)
        losses = bco_losses(rewards, batch["label"], self.running.mean, self._udm_weights(batch))
        with torch.no_grad():
            chosen = batch["label"].float()
            rejected = 1.0 - chosen
            r, lp = rewards.detach(), logps.detach()
            sums = torch.stack([chosen.sum(), rejected.sum(), (r * chosen).sum(), (r * rejected).sum(), (lp * chosen).sum(), (lp * rejected).sum(),
                                (logit_sums * chosen).sum(), (logit_sums * rejected).sum()])
            if model.training and accelerator.num_processes > 1:
                sums = accelerator.reduce(sums, reduction="sum")  # TRL gathers the class sums across processes
        return losses, rewards, dict(zip(_STATS, sums))

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        losses, _, s = self._losses(model, batch, update=model.training)
        loss = losses.sum() / num_items_in_batch
        metrics = {"delta": torch.tensor(self.running.mean, device=loss.device)}
        # A class mean is logged for micro-batches that hold the class (TRL stores its sums only then). With
        # several processes the sums are global; a class absent everywhere then counts as 0.
        single = self.loop.accelerator.num_processes == 1 or not model.training
        has = {"chosen": batch["num_chosen"] > 0, "rejected": batch["num_chosen"] < losses.shape[0]}
        for side in ("chosen", "rejected"):
            if has[side] or not single:
                count = s[f"count/{side}"].clamp(min=1)
                for key in ("rewards", "logps", "logits"):
                    metrics[f"{key}/{side}"] = s[f"{key}/{side}"] / count
        if (has["chosen"] and has["rejected"]) or not single:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return loss, metrics

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Score the eval set (no running-moment update): exact class means over the whole set (all processes), as TRL's ``log``.

        With ``compute_metrics`` it also receives ``EvalPrediction(predictions=<implied rewards
        beta * log(pi/pi_ref), one per example>, label_ids=<labels>)`` and its results are added.
        """
        totals = torch.zeros(len(_STATS) + 2, device=self.loop.device)  # + loss sum, example count
        rewards_all: list[float] = []
        labels_all: list[bool] = []
        for batch in batches:
            losses, rewards, s = self._losses(model, batch, update=False)
            totals = totals + torch.stack([*(s[k].to(totals.device) for k in _STATS), losses.sum().detach().to(totals.device),
                                           torch.tensor(float(losses.shape[0]), device=totals.device)])
            if self.compute_metrics is not None:
                rewards_all += rewards.tolist()
                labels_all += batch["label"].tolist()
        if self.loop.accelerator.num_processes > 1:
            totals = self.loop.accelerator.reduce(totals, reduction="sum")
        s = dict(zip([*_STATS, "loss", "count/all"], totals.tolist()))
        out = {"loss": s["loss"] / max(s["count/all"], 1), "delta": self.running.mean}
        for side in ("chosen", "rejected"):
            if s[f"count/{side}"] > 0:
                for key in ("rewards", "logps", "logits"):
                    out[f"{key}/{side}"] = s[f"{key}/{side}"] / s[f"count/{side}"]
        if "rewards/chosen" in out and "rewards/rejected" in out:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if self.compute_metrics is not None:
            out.update(self._user_metrics(rewards_all, labels_all))
        return out

    # Copied from posttrain_kto.trainer.KTOTrainer._user_metrics
    def _user_metrics(self, rewards: list[float], labels: list[bool]) -> dict[str, float]:
        from transformers import EvalPrediction

        if self.loop.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            rewards, labels = gather_object(rewards), gather_object(labels)
        result = self.compute_metrics(EvalPrediction(predictions=_to_numpy(rewards), label_ids=_to_numpy(labels)))
        return {k.removeprefix("eval_"): float(v) for k, v in (result or {}).items()}

    def state_dict(self) -> dict:
        """Return the method state for checkpoints: the running reward moments and the UDM classifier."""
        state: dict[str, Any] = {"running": self.running.state_dict()}
        if self.classifier is not None:
            state["classifier"] = self.classifier.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "running" in state:
            self.running.load_state_dict(state["running"])
        if "classifier" in state:
            self.set_classifier(state["classifier"]["coef"], state["classifier"]["intercept"])
