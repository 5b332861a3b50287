"""GRPO on the posttrain loop (heavy: imports torch).

One optimizer step, in order (the producer's ``_produce`` then ``compute_loss`` per micro-batch)::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps / num_generations)
      -> rollout: num_generations completions per prompt (RolloutEngine, seeded by the step)
      -> reward: every reward function on every completion            (N, F), N = P * G
      -> advantage: group-normalized, NaN-aware                        (N,)
      -> old / reference log-probs (no-grad forwards, only when needed)
      -> gradient_accumulation_steps micro-batches of per_device_train_batch_size completions
      -> loss per micro-batch, normalized over the whole step (the loop's contract)

Features and their flags (field names follow TRL 1.16's GRPOConfig):

* losses ``loss_type``: grpo, dr_grpo, dapo (default), bnpo, cispo, sapo, luspo, vespo;
  ``importance_sampling_level`` token / sequence (GSPO); ``epsilon`` / ``epsilon_high`` /
  ``delta`` (two-sided clipping); ``beta`` k3 KL to a frozen reference (a copy of the initial
  policy, or the adapter-disabled policy under PEFT) with ``use_bias_correction_kl`` and
  ``sync_ref_model`` (TR-DPO); ``top_entropy_quantile``; ``mask_truncated_completions``;
  ``off_policy_mask_threshold`` (DeepSeek-V3.2); ``entropy_coef`` / ``use_adaptive_entropy``
  (Skywork-OR1); a MoE model's router load-balancing loss (``router_aux_loss_coef``).
* advantages: ``scale_rewards`` group / batch / none, ``multi_objective_aggregation``
  sum_then_normalize / normalize_then_sum (GDPO); completions for which every reward function
  returned None get advantage 0 and are excluded from the group baseline.
* ``num_iterations`` > 1 reuses a rollout for several optimizer steps; its old log-probs come from
  a no-grad forward at generation time. With one iteration and the transformers backend (the
  sampler IS the trained model) ``old = logps.detach()`` and no extra forward runs.
* importance-sampling correction against the engine's sampling log-probs
  (``vllm_importance_sampling_*``), applied only when the rollout engine is not the trained model.
* rollouts from the engine, or from a user ``rollout_func(prompts, trainer)`` (TRL's hook).

Assumptions: prompt-only data (a ``prompt`` column, string or messages, or pre-tokenized
``prompt_ids``); every other column is passed to the reward functions. Departures from TRL are
listed in docs/methods/grpo.md.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import warnings
from collections import defaultdict, deque
from typing import Any

import torch
from transformers import TrainerCallback

from posttrain import (
    ConfigError,
    ProduceRequest,
    RewardModelFunction,
    RolloutBatch,
    RolloutEngine,
    RolloutProducer,
    SamplingParams,
    TrainerSurface,
    TrainingLoop,
    adapter_disabled,
    as_config,
    build_reference_model,
    build_reward_functions,
    causal_lm_states,
    compute_rewards,
    disable_dropout,
    gather_across_processes,
    is_peft_model,
    resolve_dtype,
    sync_reference_model,
    tokenize_prompt,
)

from posttrain_grpo.config import GRPOConfig

__all__ = ["GRPOTrainer", "compute_group_advantages", "nanstd", "gamma_weights", "importance_sampling_ratio"]

logger = logging.getLogger(__name__)

_TOKEN_LEVEL_LOSSES = ("dapo", "cispo", "vespo", "bnpo")  # normalized by completion tokens
_CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
#: generation_kwargs keys that map onto the rollout engine's SamplingParams
_SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens", "max_tokens": "max_tokens"}


# ----------------------------------------------------------------------------- math (pure functions)
def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Return the Bessel-corrected standard deviation of ``x`` ignoring NaNs (NaN where fewer than 2 values)."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def compute_group_advantages(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int, scale_rewards: str, multi_objective_aggregation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(advantages (N,), is_std_zero (N,))`` from rewards grouped ``num_generations`` at a time.

    Args:
        rewards_per_func: ``(N, F)`` rewards, NaN where a function returned None.
        reward_weights: ``(F,)`` weights.
        num_generations: Group size G (N is a multiple of G; groups are consecutive rows).
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        multi_objective_aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"`` (GDPO).

    Returns:
        Advantages (0 where every reward function returned None, or where a std is undefined) and
        whether the std used for each row is zero (for ``frac_reward_zero_std``).
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[unscorable] = torch.nan  # keep unscorable rows out of the group baseline
        grouped = rewards.view(-1, num_generations)  # (N/G, G)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
        if scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:  # "group", or "none" (then only logged)
            std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    else:  # GDPO: normalize each reward within its group, sum, then normalize over the batch
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])  # (N/G, G, F)
        normalized = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        rewards = (normalized.view_as(rewards_per_func) * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[unscorable] = torch.nan
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def importance_sampling_ratio(
    old_per_token_logps: torch.Tensor, sampling_per_token_logps: torch.Tensor, mask: torch.Tensor, mode: str, clip_min: float | None, clip_max: float | None
) -> torch.Tensor:
    """Return the trainer/sampler IS weight: ``(B, C)`` for token modes, ``(B, 1)`` for sequence modes.

    ``*_truncate`` clamps the ratio to ``[clip_min, clip_max]``; ``*_mask`` zeroes it outside.
    """
    diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * mask, nan=0.0)  # (B, C)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)  # (B, 1)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@torch.no_grad()
def gamma_weights(advantages, log_ratio, mask, is_ratio, k_pos, lambda_pos, k_neg, lambda_neg) -> torch.Tensor:
    """Return VESPO's detached sequence weight ``phi(w) = e^lambda * w^k * e^(-lambda w)`` (B, 1), computed in log space."""
    lower = math.log(1e-8)
    seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(dim=-1, keepdim=True)  # (B, 1) sum, not mean
    if is_ratio is not None:
        seq_log_ratio = seq_log_ratio + torch.clamp(torch.log(is_ratio), lower, 20.0).sum(dim=-1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def off_policy_mask(advantages: torch.Tensor, per_token_logps: torch.Tensor, sampling_per_token_logps: torch.Tensor,
                    mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return DeepSeek-V3.2's off-policy sequence mask ``(B, 1)``: 0 where A < 0 and the mean sampler-to-policy KL > threshold.

    The KL of a sequence is the mean over its completion tokens of ``log pi_sampler - log pi`` (NaN
    log-probs, which an engine could not score, count as 0).
    """
    kl = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)  # (B, C)
    mean_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def _forward(model, batch: dict, temperature: float, *, compute_entropy: bool = True, entropy_grad: bool = False, router_aux_loss: bool = False,
             chunk_size: int | None = None):
    """Return ``(logps (B, C), entropies (B, C) or None, router aux loss or None)`` of the completion tokens at ``temperature``.

    ``entropy_grad`` keeps the entropies in the graph (an entropy bonus trains them); otherwise they
    are detached (a metric, or a mask). With ``chunk_size`` (``logprob_chunk_size``) they come from the
    hidden states and the LM head, ``chunk_size`` tokens at a time, never the (B, C, V) logits.
    """
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P+C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (B, P+C)
    num_completion = batch["completion_ids"].shape[1]
    extra = {"output_router_logits": True} if router_aux_loss else {}
    outputs, states = causal_lm_states(model, chunk_size=chunk_size, input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=num_completion + 1, **extra)
    # position t of states[:, :-1] predicts completion token t
    scores = states[:, :-1].score(batch["completion_ids"], temperature=temperature, return_entropy=compute_entropy, entropy_grad=entropy_grad)
    return scores.logps, scores.entropy, (getattr(outputs, "aux_loss", None) if router_aux_loss else None)  # (B, C), (B, C) or None


def per_token_logps_and_entropies(model, batch: dict, temperature: float, compute_entropy: bool = True, chunk_size: int | None = None):
    """Return ``(logps (B, C), entropies (B, C) or None)`` of the completion tokens at ``temperature`` (``chunk_size``: see ``_forward``)."""
    logps, entropies, _ = _forward(model, batch, temperature, compute_entropy=compute_entropy, chunk_size=chunk_size)
    return logps, entropies


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; a ``(B, 1)`` per-sequence ``x`` is averaged over sequences."""
    if x.shape[1] == 1:
        return x.float().mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- model and data helpers
def _fp32_head_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Forward of an LM head cast by ``cast_lm_head_to_fp32``: float32 logits, also inside a bf16 autocast region."""
    with torch.autocast(device_type=hidden_states.device.type, enabled=False):
        return torch.nn.functional.linear(hidden_states.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def _cast_lm_head_to_fp32(model) -> None:
    """Cast ``model``'s LM head to float32 and compute the logits in float32 (tied input embeddings keep their output dtype)."""
    import types

    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ConfigError(f"cast_lm_head_to_fp32=True but {type(model).__name__} has no LM head (get_output_embeddings() is None); set it to False.")
    if hasattr(head, "base_layer"):
        raise ConfigError("cast_lm_head_to_fp32=True is not supported when the LM head carries a PEFT adapter: remove 'lm_head' from the adapter's target modules, or set cast_lm_head_to_fp32=False.")
    original_dtype = head.weight.dtype
    head.float()
    head.forward = types.MethodType(_fp32_head_forward, head)  # rebinds to the copy when the model is deep-copied
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and original_dtype != torch.float32:
        model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.to(original_dtype))


def _default_output_dir(model, method: str) -> str | None:
    """TRL's default ``output_dir`` when no args are given: ``<model name>-<METHOD>``."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    return f"{str(name).rstrip('/').split('/')[-1]}-{method}" if name else None


def _pad_to_multiple(batch: dict, multiple: int, pad_token_id: int) -> None:
    """Pad (in place) the prompt tensors on the left and the completion tensors on the right to a multiple of ``multiple``."""
    for key, value, side in (("prompt_ids", pad_token_id, "left"), ("prompt_mask", 0, "left"), ("completion_ids", pad_token_id, "right"),
                             ("completion_mask", 0, "right"), ("sampling_logprobs", 0.0, "right")):
        tensor = batch[key]
        extra = -tensor.shape[1] % multiple
        if extra:
            filler = torch.full((tensor.shape[0], extra), value, dtype=tensor.dtype)
            batch[key] = torch.cat([filler, tensor] if side == "left" else [tensor, filler], dim=1)


class _LogRows(TrainerCallback):
    """With ``log_completions``, each training log writes the latest rollout's completions (TRL does it in its ``log()``).

    (The run summary row carrying the last window's method metrics is the core loop's job.)
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs if logs is not None else {}
        if "loss" in logs and "train_runtime" not in logs and not any(k.startswith("eval_") for k in logs):
            if self.trainer.args.log_completions:
                self.trainer._log_completions_table(state.global_step)


# ----------------------------------------------------------------------------- trainer
class GRPOTrainer(TrainerSurface):
    """Train a causal LM with GRPO (and the variants selected by ``loss_type`` / presets); TRL 1.16's ``GRPOTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path), a
            ``PreTrainedModel`` reward model, or a list of these (default ``args.reward_funcs``).
        args: A :class:`GRPOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows (``datasets.Dataset`` / ``IterableDataset`` / list of dicts): a
            ``prompt`` column (or pre-tokenized ``prompt_ids``) plus any columns for the rewards. An
            ``IterableDataset`` is materialized once (``max_steps`` steps' worth when ``max_steps > 0``).
        eval_dataset: Same format, or a dict of them (metrics ``eval_<name>_<metric>``).
        processing_class: The tokenizer (default: loaded with the model).
        reward_processing_classes: Tokenizers of the reward models (one per reward function, None for
            plain functions; a single one for a single reward function).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name.
        peft_config: A ``peft.PeftConfig``; with ``beta > 0`` the reference is the adapter-disabled model.
        tools: Only None: multi-turn tool calling during rollouts is not offered.
        rollout_func: ``rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", ...}``
            generating the completions instead of the engine (one entry per completion; extra keys are
            passed to the reward functions), as in TRL.
        environment_factory: Only None (environments are not offered).
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Unused for a stable method; kept for a uniform signature.

    Raises:
        posttrain.ConfigError: no reward functions or dataset, mismatched ``reward_weights`` /
            ``reward_processing_classes``, a dataset without ``prompt``, or an argument that cannot be honoured.
    """

    _tag_names = ["trl", "grpo"]

    def __init__(self, model=None, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None, tools=None, rollout_func=None, environment_factory=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, GRPOConfig, default_output_dir=_default_output_dir(model, "GRPO"))
        if tools:
            raise ConfigError("tools= (multi-turn tool calling during rollouts) is not offered by posttrain's GRPO: give tool schemas in the prompt (a 'tools' column is rendered by the chat template) and score tool calls with a reward function, or use TRL for tool execution.")
        if environment_factory is not None:
            raise ConfigError("environment_factory= is not offered by posttrain's GRPO: keep the data in train_dataset and score completions with reward_funcs (or generate with rollout_func).")
        self._check_common_arguments(reward_funcs, train_dataset, optimizers)
        self.loop = TrainingLoop(args, method="grpo", allow_experimental=allow_experimental, callbacks=callbacks)
        self._setup_model(model, processing_class, peft_config, quantization_config)
        if args.cast_lm_head_to_fp32:  # before the reference copy, which inherits it
            _cast_lm_head_to_fp32(self.model)
        self._setup_rewards(reward_funcs, reward_processing_classes)
        self.ref_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout, needed=args.beta != 0.0)
        self._check_sync_ref_model()
        self._setup_datasets(train_dataset, eval_dataset)
        self.loop.setup(self.model, method=self)
        self.rollout_func = rollout_func
        self.engine = rollout_engine or self._build_engine()
        # the transformers backend samples from the trained model itself: no sampler/trainer mismatch to correct
        self.engine_is_policy = self.engine.samples_from_policy and rollout_func is None
        # the prompts and rollouts of every step: the loop consumes the producer's steps; its state is checkpointed per process
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset,
                                        self._produce, reuse=self.args.num_iterations)
        self._setup_logging()
        # entropy bonus (TRL's attribute names); the coefficient moves per step under use_adaptive_entropy
        self.entropy_coef = args.entropy_coef
        self.use_adaptive_entropy = args.use_adaptive_entropy
        self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        self._last_world_entropy = float("inf")  # no bonus until a first step has measured the entropy
        self._entropy_window_stats: torch.Tensor | None = None  # [entropy sum, token count] of the current step
        self._warn_about_loss_settings()

    # -------------------------------------------------------------------------- setup helpers
    def _check_common_arguments(self, reward_funcs, train_dataset, optimizers) -> None:
        """Refuse, before any model is loaded, what TRL refuses and what posttrain cannot honour."""
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (prompt-only rows with a 'prompt' column).")
        if not reward_funcs and not self.args.reward_funcs:
            raise ConfigError("No reward source provided: GRPO needs reward functions: pass reward_funcs=[...] to the trainer or set reward_funcs in the config (CLI: --reward_funcs accuracy my_module:my_fn).")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config; set optim, optim_args, learning_rate, lr_scheduler_type and lr_scheduler_kwargs instead.")

    def _setup_model(self, model, processing_class, peft_config, quantization_config) -> None:
        """Load the policy (``trust_remote_code`` / ``quantization_config`` for a model given by name), then the loop's PEFT and checkpointing."""
        args = self.args
        model = model if model is not None else args.model_name_or_path
        if peft_config is not None and is_peft_model(model):
            raise ConfigError("model is already a PeftModel and peft_config was given: merge and unload its adapter first (model.merge_and_unload()), or omit peft_config to train the existing adapter.")
        if isinstance(model, str) and (args.trust_remote_code or quantization_config is not None):
            import transformers

            kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                if "quantization_config" in kwargs:
                    raise ConfigError("quantization_config is given both to the trainer and in model_init_kwargs: set it in one place (the trainer argument).")
                kwargs["quantization_config"] = quantization_config
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            dtype = resolve_dtype(kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None), torch.float32)
            name, model = model, transformers.AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kwargs)
            if processing_class is None:
                processing_class = transformers.AutoTokenizer.from_pretrained(name, trust_remote_code=args.trust_remote_code)
        elif quantization_config is not None:
            logger.warning("quantization_config is ignored: the model is already instantiated (quantize it when loading it).")
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        self.pad_token_id = self.processing_class.pad_token_id
        if args.disable_dropout:
            disable_dropout(self.model)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)
        config = getattr(self.model, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        is_moe = hasattr(text_config, "output_router_logits")
        if args.router_aux_loss_coef and not is_moe:
            raise ConfigError(f"router_aux_loss_coef={args.router_aux_loss_coef} but {type(self.model).__name__} is not a Mixture-of-Experts model returning router logits: there is no auxiliary loss to weight; leave it None.")
        coef = args.router_aux_loss_coef if args.router_aux_loss_coef is not None else getattr(text_config, "router_aux_loss_coef", 0.0)
        self.router_aux_loss_coef = float(coef or 0.0)
        self.aux_loss_enabled = is_moe and self.router_aux_loss_coef != 0.0

    def _setup_rewards(self, reward_funcs, reward_processing_classes) -> None:
        """Resolve the reward functions (TRL's ``reward_funcs`` / ``reward_func_names`` / ``reward_weights`` / ``reward_processing_classes``)."""
        args = self.args
        specs = reward_funcs if reward_funcs is not None else args.reward_funcs
        specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
        if reward_processing_classes is not None:
            if not isinstance(reward_processing_classes, (list, tuple)):
                reward_processing_classes = [reward_processing_classes]
            if len(reward_processing_classes) != len(specs):
                raise ConfigError(
                    f"The number of reward processing classes ({len(reward_processing_classes)}) must match the number of reward "
                    f"functions ({len(specs)}): give one tokenizer per reward function (None for plain functions)."
                )
            for tokenizer in reward_processing_classes:  # a pad token outside the vocabulary has no id: use EOS, as TRL does
                if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None):
                    tokenizer.pad_token = tokenizer.eos_token
        init_kwargs = dict(args.model_init_kwargs or {}, **({"trust_remote_code": True} if args.trust_remote_code else {}))
        pairs = build_reward_functions(specs, reward_processing_classes, loop=self.loop, model_init_kwargs=init_kwargs)
        names: list[str] = []
        for name, func in pairs:  # TRL names a reward model by its model id
            if isinstance(func, RewardModelFunction):
                path = getattr(func.model.config, "_name_or_path", "") or ""
                name = path.rstrip("/").split("/")[-1] or name
            base, k = name, 2
            while name in names:
                name, k = f"{base}_{k}", k + 1
            names.append(name)
        self.reward_func_names = names
        self.reward_funcs = [func for _, func in pairs]
        given = list(reward_processing_classes) if reward_processing_classes is not None else [None] * len(pairs)
        self.reward_processing_classes = [f.tokenizer if isinstance(f, RewardModelFunction) else t for f, t in zip(self.reward_funcs, given)]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions {self.reward_func_names}; give one weight each.")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)  # (F,)

    def _check_sync_ref_model(self) -> None:
        if not self.args.sync_ref_model:
            return
        if self.args.beta == 0.0:
            raise ConfigError("sync_ref_model=True but beta=0.0: no reference model is used, so there is nothing to synchronize; set beta > 0 or sync_ref_model=False.")
        if self.ref_model is None:
            raise ConfigError("sync_ref_model=True is not supported with PEFT: the reference is the adapter-disabled model, not a separate copy; set sync_ref_model=False or train all weights.")

    def _setup_datasets(self, train_dataset, eval_dataset) -> None:
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None

    def _build_engine(self) -> RolloutEngine:
        args = self.args
        kwargs: dict[str, Any] = dict(model=self.model, tokenizer=self.processing_class, accelerator=self.loop.accelerator)
        if args.rollout_backend == "vllm":
            llm_kwargs = {"trust_remote_code": True} if args.trust_remote_code else {}
            if args.vllm_model_impl != "vllm":
                llm_kwargs["model_impl"] = args.vllm_model_impl
            kwargs.update(
                mode=args.vllm_mode, gpu_memory_utilization=args.vllm_gpu_memory_utilization, enable_sleep_mode=args.vllm_enable_sleep_mode,
                max_model_len=args.vllm_max_model_length, tensor_parallel_size=args.vllm_tensor_parallel_size, seed=args.seed,
                server_url=args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}",
                request_timeout=args.vllm_server_timeout, llm_kwargs=llm_kwargs,
            )
        else:
            kwargs["generation_batch_size"] = args.generation_batch_size
        return RolloutEngine(args.rollout_backend, **kwargs)

    def _setup_logging(self) -> None:
        """Sampling overrides (generation_kwargs), TRL's completion log (``_logs``) and the summary-row callback."""
        args = self.args
        overrides, ignored = {}, []
        for key, value in (args.generation_kwargs or {}).items():
            if key in _SAMPLING_KEYS:
                overrides[_SAMPLING_KEYS[key]] = 0.0 if key == "min_p" and value is None else value
            elif key == "do_sample":
                if not value:
                    overrides["temperature"] = 0.0  # greedy
            else:
                ignored.append(key)
        if ignored:
            warnings.warn(
                f"generation_kwargs {sorted(ignored)} are ignored: posttrain's rollout engine samples one sequence per draw with its "
                f"exact log-probs and takes only {sorted(set(_SAMPLING_KEYS) | {'do_sample'})}.", UserWarning, stacklevel=3,
            )
        self._sampling = dict(max_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              min_p=args.min_p or 0.0, repetition_penalty=args.repetition_penalty)
        self._sampling.update(overrides)
        size = args.per_device_train_batch_size * args.gradient_accumulation_steps  # completions of one rollout
        self._logs = {
            "images": deque(maxlen=size), "prompt": deque(maxlen=size), "completion": deque(maxlen=size),
            "rewards": defaultdict(lambda: deque(maxlen=size)), "advantages": deque(maxlen=size),
            "extra": defaultdict(lambda: deque(maxlen=size)),
        }
        self._pending_extra_logs: dict[str, list] = defaultdict(list)
        self._pending_metrics: dict[str, list] = defaultdict(list)
        self.add_callback(_LogRows(self))

    def _warn_about_loss_settings(self) -> None:
        args = self.args
        if args.loss_type == "luspo" and args.importance_sampling_level != "sequence":
            logger.warning("loss_type='luspo' is meant for importance_sampling_level='sequence' (the paper's setup).")
        if args.loss_type == "vespo" and args.importance_sampling_level != "token":
            logger.warning("VESPO computes its sequence-level weight itself: set importance_sampling_level='token' (the default).")
        if args.importance_sampling_level == "sequence" and args.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            logger.warning(
                f"importance_sampling_level='sequence' with loss_type={args.loss_type!r}: the loss sums per-token contributions, which "
                "weights each sequence by its completion length instead of optimizing the per-sequence objective; use loss_type='grpo' "
                "for the GSPO paper's setup."
            )
        if (args.loss_type == "vespo" and not self.engine_is_policy and args.vllm_importance_sampling_correction
                and args.vllm_importance_sampling_mode not in ("token_truncate", "token_mask")):
            raise ConfigError(f"loss_type='vespo' with an external sampler needs vllm_importance_sampling_mode 'token_truncate' or 'token_mask' (got {args.vllm_importance_sampling_mode!r}).")

    # -------------------------------------------------------------------------- data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as a ``datasets.Dataset`` of prompt rows, checked for a ``prompt`` (or ``prompt_ids``) column.

        A ``datasets.Dataset`` is returned as is (prompts are tokenized per step, as TRL does); a list
        of dicts becomes a ``Dataset`` (kept a list when Arrow cannot hold its values); an
        ``IterableDataset`` is materialized once: for ``train_dataset`` with ``max_steps > 0`` only the
        rows those steps draw, otherwise the whole stream.
        """
        from datasets import Dataset, IterableDataset

        if isinstance(dataset, dict):
            raise ConfigError(f"{name} is a dict of datasets: pass one split (e.g. dataset['train']); only eval_dataset takes a dict.")
        if isinstance(dataset, IterableDataset):
            limit = None
            if name == "train_dataset" and self.args.max_steps > 0:
                limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
            dataset = Dataset.from_list(list(itertools.islice(dataset, limit)))
        elif not isinstance(dataset, Dataset):
            rows = [dict(row) for row in dataset]
            try:
                dataset = Dataset.from_list(rows)
            except (TypeError, ValueError, NotImplementedError):  # pyarrow cannot hold the values: keep the list
                dataset = rows
        columns = dataset.column_names if isinstance(dataset, Dataset) else None
        for i in range(len(dataset)) if columns is None else range(min(1, len(dataset))):
            row = dataset[i]
            if "prompt" not in row and "prompt_ids" not in row:
                raise ConfigError(f"{name} row {i} has no 'prompt' column (columns: {sorted(row)}); GRPO needs prompt-only data: a 'prompt' string or message list (or pre-tokenized 'prompt_ids').")
        if len(dataset):
            self._prompt_ids(dataset[0])  # a prompt the tokenizer cannot render fails here, not mid-run
        return dataset

    def _prompt_ids(self, row: dict) -> list[int]:
        """Token ids of a row's prompt: its ``prompt_ids`` as given, or the tokenized ``prompt`` (messages via the chat template)."""
        if row.get("prompt_ids") is not None:
            return [int(t) for t in row["prompt_ids"]]
        return tokenize_prompt(self.processing_class, row["prompt"], chat_template_kwargs=self.args.chat_template_kwargs, tools=row.get("tools"))

    def _prompts_per_step(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's attribute; TRL's is the identity): :meth:`collate`, which keeps them raw."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    def count_items(self, batch: dict) -> int:
        return batch["num_completion_tokens"] if self.args.loss_type in _TOKEN_LEVEL_LOSSES else batch["completion_ids"].shape[0]

    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: generate, score and split one step's rollouts (the producer reuses them ``num_iterations`` times)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_score(request.rows, seed)

    def _generate(self, prompts: list, prompt_ids: list[list[int]] | None = None, num_generations: int = 1, seed: int | None = None) -> RolloutBatch:
        """Return the rollout of ``prompts``: one entry per completion, each prompt repeated ``num_generations`` times in a row.

        A ``rollout_func`` gets ``prompts`` as they are (TRL's convention) and returns
        ``prompt_ids``, ``completion_ids`` and ``logprobs`` (one list per completion) plus optional
        extra keys for the reward functions (kept in ``RolloutBatch.extras["reward_kwargs"]``).
        Otherwise the engine samples ``num_generations`` completions of each distinct prompt.
        """
        if self.rollout_func is not None:
            output = self.rollout_func(prompts, self)
            missing = sorted({"prompt_ids", "completion_ids", "logprobs"} - set(output))
            if missing:
                raise ValueError(f"rollout_func must return keys {missing} in its output dict (one list per completion): it returned {sorted(output)}.")
            completion_ids = [list(c) for c in output["completion_ids"]]
            stop = {self.processing_class.eos_token_id, self.pad_token_id} - {None}
            truncated = [len(c) >= self.args.max_completion_length and (not c or c[-1] not in stop) for c in completion_ids]
            extras = {k: list(v) for k, v in output.items() if k not in ("prompt_ids", "completion_ids", "logprobs")}
            return RolloutBatch([list(p) for p in output["prompt_ids"]], completion_ids, [list(lp) for lp in output["logprobs"]], truncated,
                                policy_version=self.engine.policy_version, extras={"reward_kwargs": extras})
        distinct = prompt_ids[::num_generations] if prompt_ids is not None else [self._prompt_ids({"prompt": p}) for p in prompts[::num_generations]]
        return self.engine.generate(distinct, SamplingParams(n=num_generations, seed=seed, **self._sampling))

    def _generate_and_score(self, rows: list[dict], seed: int, mode: str = "train") -> list[dict]:
        args = self.args
        num_generations = args.num_generations if mode == "train" else (args.num_generations_eval or args.num_generations)
        # 1. rollout: G completions per prompt, grouped prompt0 x G, prompt1 x G, ...
        expanded = [row for row in rows for _ in range(num_generations)]  # (N,) one row per completion
        prompt_ids = [ids for ids in map(self._prompt_ids, rows) for _ in range(num_generations)]
        prompts = [r["prompt"] if "prompt" in r else self.processing_class.decode(ids, skip_special_tokens=True) for r, ids in zip(expanded, prompt_ids)]
        rollout = self._generate(prompts, prompt_ids, num_generations, seed)  # N = P * G completions

        # 2. reward: (N, F), NaN where a function returned None
        rewards_per_func = self._score(rows, prompts, rollout, num_generations)  # (N, F)

        # 3. micro-batches of per_device_train_batch_size completions (one in eval), with old / reference log-probs
        size = args.per_device_train_batch_size if mode == "train" else len(rollout)
        micro_batches = [self._to_batch(rollout, slice(start, start + size), mode) for start in range(0, len(rollout), size)]

        # 4. advantage: (N,) from the global batch's rewards (this process's in eval), sliced into the micro-batches
        if mode == "train":
            (all_rewards,), local = gather_across_processes(self.loop.accelerator, rewards_per_func)  # (world * N, F)
        else:
            all_rewards, local = rewards_per_func, slice(0, len(rollout))
        advantages, is_std_zero = compute_group_advantages(
            all_rewards, self.reward_weights, num_generations, args.scale_rewards, args.multi_objective_aggregation
        )
        advantages, is_std_zero = advantages[local], is_std_zero[local]  # both per row (N,)
        world = self.loop.accelerator.num_processes if mode == "train" else 1
        step_tokens = max(1, sum(b["num_completion_tokens"] for b in micro_batches))
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch["advantages"] = advantages[start : start + size]  # (b,)
            # a micro-batch's share of a per-step mean is its mean / (micro-batches x processes): the loop sums the shares
            batch["share_divisor"] = torch.tensor(float(len(micro_batches) * world))
            if args.loss_type == "bnpo":  # BNPO normalizes by this process's step tokens, then averages over processes
                batch["bnpo_normalizer"] = torch.tensor(float(step_tokens * world))

        metrics = self._rollout_metrics(rollout, rewards_per_func, is_std_zero, micro_batches, num_generations)
        names, values = list(metrics), torch.tensor(list(metrics.values()), dtype=torch.float32)
        for batch in micro_batches:
            batch["rollout_metric_names"], batch["rollout_metric_values"] = names, values
        if mode == "train":
            self._record_completions(prompts, rollout, rewards_per_func, advantages)
        else:
            self._pending_extra_logs.clear()  # the completion log shows training rollouts only
        return micro_batches

    def _score(self, rows: list[dict], prompts: list, rollout: RolloutBatch, num_generations: int) -> torch.Tensor:
        texts = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        conversational = isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        expanded = [r for r in rows for _ in range(num_generations)]  # (N,) one row per completion
        columns = {key: [row.get(key) for row in expanded] for key in expanded[0] if key not in ("prompt", "completion")}
        extra = dict(rollout.extras.get("reward_kwargs", {}))
        result = compute_rewards(
            list(zip(self.reward_func_names, self.reward_funcs)), prompts=prompts, completions=completions,
            completion_ids=rollout.completion_ids, columns=columns, trainer_state=self.loop.state,
            log_extra=self._log_completion_extra, log_metric=self._log_metric, **extra,
        )
        unscorable = result.all_none.nonzero().flatten()
        if len(unscorable):
            i = int(unscorable[0])
            sample = {key: values[i] for key, values in columns.items()}
            logger.warning(
                f"All reward functions returned None for the following kwargs:\n{ {**sample, 'prompt': prompts[i], 'completion': completions[i]} }\n"
                f"({len(unscorable)} of {len(completions)} completions are unscorable: their advantage is 0.) Make sure at least one "
                "reward function returns a reward for every completion."
            )
        return result.per_function  # (N, F)

    def _log_completion_extra(self, column: str, values: list) -> None:
        """``log_extra(column, values)`` of a reward function: one value per completion, shown with ``log_completions``."""
        self._pending_extra_logs[column].extend(values)

    def _log_metric(self, name: str, value: float) -> None:
        """``log_metric(name, value)`` of a reward function: a scalar averaged into this step's logged metrics."""
        self._pending_metrics[name].append(float(value))

    def _record_completions(self, prompts: list, rollout: RolloutBatch, rewards_per_func: torch.Tensor, advantages: torch.Tensor) -> None:
        texts = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        self._logs["prompt"].extend(prompts)
        self._logs["completion"].extend(texts)
        for j, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, j].tolist())
        self._logs["advantages"].extend(advantages.tolist())
        for column, values in self._pending_extra_logs.items():
            self._logs["extra"][column].extend(values)
        self._pending_extra_logs.clear()

    def _log_completions_table(self, step: int) -> None:
        """Write the latest rollout's completions to ``<output_dir>/completions/completions_<step>.parquet`` and print a sample."""
        if not self.loop.is_main_process or not self._logs["prompt"]:
            return
        import pandas as pd

        n = len(self._logs["prompt"])
        table = {"step": [step] * n, "prompt": [str(p) for p in self._logs["prompt"]], "completion": list(self._logs["completion"])}
        table.update({name: list(values) for name, values in self._logs["rewards"].items()})
        table.update({name: list(values)[-n:] + [None] * (n - len(values)) for name, values in self._logs["extra"].items()})
        table["advantage"] = list(self._logs["advantages"])
        frame = pd.DataFrame(table)
        if self.args.log_unique_prompts:
            frame = frame[~frame["prompt"].duplicated()]
        directory = os.path.join(self.args.output_dir, "completions")
        os.makedirs(directory, exist_ok=True)
        frame.to_parquet(os.path.join(directory, f"completions_{step:05d}.parquet"))
        shown = frame if self.args.num_completions_to_print is None else frame.head(self.args.num_completions_to_print)
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # rich is optional: the parquet file is the record
            return
        view = Table(title=f"step {step}", show_lines=True)
        for column in shown.columns[1:]:
            view.add_column(str(column))
        for _, row in shown.iterrows():
            view.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in list(row)[1:]])
        Console().print(view)

    def _to_batch(self, rollout: RolloutBatch, part: slice, mode: str = "train") -> dict:
        """Pad one micro-batch of the rollout and add the no-grad log-probs it needs."""
        args, device = self.args, self.loop.device
        sub = RolloutBatch(rollout.prompt_ids[part], rollout.completion_ids[part], rollout.logprobs[part], rollout.truncated[part], rollout.policy_version)
        batch = sub.to_tensors(self.pad_token_id)  # CPU tensors, (b, P) / (b, C)
        if args.pad_to_multiple_of:
            _pad_to_multiple(batch, args.pad_to_multiple_of, self.pad_token_id)
        sampling_logps = batch.pop("sampling_logprobs")  # (b, C)
        if args.mask_truncated_completions:
            kept = ~torch.tensor(sub.truncated, dtype=torch.bool)  # (b,)
            batch["completion_mask"] = batch["completion_mask"] * kept.unsqueeze(1).long()
        batch["num_completion_tokens"] = int(batch["completion_mask"].sum())
        batch["num_tokens"] = int(batch["prompt_mask"].sum()) + batch["num_completion_tokens"]
        batch["truncated"] = torch.tensor(sub.truncated, dtype=torch.bool)
        apply_is = not self.engine_is_policy and args.vllm_importance_sampling_correction
        need_old = (mode == "train" and args.num_iterations > 1) or not self.engine_is_policy
        # When the sampler is the policy itself and samples unfiltered (no top-k/top-p/min-p/repetition
        # penalty, the trained temperature), its sampling log-probs ARE pi_old at generation time (equal
        # to a forward pass to ~1e-6, tests/test_rollout.py): take them instead of another no-grad forward.
        s = self._sampling
        sampler_is_old_policy = (
            self.engine_is_policy and s["temperature"] == args.temperature and not s["top_k"] and s["top_p"] == 1.0
            and not s["min_p"] and s["repetition_penalty"] == 1.0
        )
        on_device = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            if need_old and sampler_is_old_policy:
                batch["old_per_token_logps"] = sampling_logps.float()  # (b, C)
            elif need_old:  # policy log-probs at generation time (ratio denominator)
                old, _ = per_token_logps_and_entropies(self.model, on_device, args.temperature, compute_entropy=False, chunk_size=args.logprob_chunk_size)
                batch["old_per_token_logps"] = old.float().cpu()
            if args.beta != 0.0:
                batch["ref_per_token_logps"] = self._ref_logps(on_device).float().cpu()
        if apply_is:
            mask = batch["completion_mask"].float()
            batch["importance_sampling_ratio"] = importance_sampling_ratio(
                batch["old_per_token_logps"], sampling_logps, mask, args.vllm_importance_sampling_mode,
                args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max,
            )
        if args.off_policy_mask_threshold is not None and not self.engine_is_policy:
            batch["sampling_per_token_logps"] = sampling_logps.float()  # the sampler's own view of the rollout
        return batch

    def _ref_logps(self, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return per_token_logps_and_entropies(self.ref_model, batch, self.args.temperature, compute_entropy=False, chunk_size=self.args.logprob_chunk_size)[0]
        with adapter_disabled(self.model, self.loop.accelerator):  # PEFT: the base model is the reference
            return per_token_logps_and_entropies(self.model, batch, self.args.temperature, compute_entropy=False, chunk_size=self.args.logprob_chunk_size)[0]

    def _rollout_metrics(self, rollout: RolloutBatch, rewards_per_func: torch.Tensor, is_std_zero: torch.Tensor, micro_batches: list[dict], num_generations: int) -> dict:
        metrics = self._reward_and_length_metrics(rollout, rewards_per_func, is_std_zero, num_generations)
        if "importance_sampling_ratio" in micro_batches[0]:
            ratios = []
            for b in micro_batches:
                r = b["importance_sampling_ratio"]
                ratios.append(r.flatten() if r.shape[1] == 1 else r[b["completion_mask"].bool()])
            flat = torch.cat(ratios)
            if flat.numel():
                metrics.update({f"sampling/importance_sampling_ratio/{k}": getattr(flat, k)().item() for k in ("mean", "min", "max")})
        return {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}

    def _reward_and_length_metrics(self, rollout: RolloutBatch, rewards_per_func: torch.Tensor, is_std_zero: torch.Tensor, num_generations: int) -> dict:
        """TRL's reward and completion-length metrics of one rollout (this process's rows), plus the reward functions' log_metric values."""
        rewards = (rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable rows are not logged
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)  # (N,)
        terminated = lengths[~torch.tensor(rollout.truncated, dtype=torch.bool)]
        terminated = terminated if terminated.numel() else torch.zeros(1)
        metrics = {
            "reward": torch.nanmean(rewards).item(),
            "reward_std": torch.nanmean(nanstd(rewards.view(-1, num_generations), dim=1)).item(),  # within groups
            "frac_reward_zero_std": is_std_zero.float().mean().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": sum(rollout.truncated) / len(rollout),
            "completions/mean_terminated_length": terminated.mean().item(),
            "completions/min_terminated_length": terminated.min().item(),
            "completions/max_terminated_length": terminated.max().item(),
        }
        for j, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, j]).item()
            metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, j]).item()
        for name, values in self._pending_metrics.items():
            metrics[name] = sum(values) / len(values)
        self._pending_metrics.clear()
        return metrics

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Return the tokens whose entropy is at or above the ``threshold`` quantile of the unmasked entropies (TRL's signature).

        The quantile is taken over this micro-batch's completion tokens (TRL gathers them across
        processes); padding is never selected, and nothing is when every token is masked.
        """
        valid = entropies[mask.bool()].float()
        if valid.numel() == 0:
            return torch.zeros_like(entropies, dtype=torch.bool)
        return ((entropies * mask) >= torch.quantile(valid, threshold)) & mask.bool()

    @staticmethod
    def get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold) -> torch.Tensor:
        """TRL's name for :func:`off_policy_mask`: ``(B, 1)`` 1.0 = keep, 0.0 = drop."""
        return off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold)

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        args = self.args
        training = model.training
        mask = batch["completion_mask"].float()  # (B, C)
        per_token_logps, entropies, aux_loss = _forward(model, batch, args.temperature, entropy_grad=self._entropy_bonus_enabled,
                                                        router_aux_loss=self.aux_loss_enabled, chunk_size=args.logprob_chunk_size)  # (B, C), (B, C)
        advantages = batch["advantages"].unsqueeze(1)  # (B, 1)
        # with one iteration on the trained model's own samples, old == current (detached): no extra forward
        old_per_token_logps = batch.get("old_per_token_logps", per_token_logps.detach())  # (B, C)
        is_ratio = batch.get("importance_sampling_ratio")  # (B, C) / (B, 1) / None

        entropy_mask = None
        if args.top_entropy_quantile < 1.0:  # keep the top-rho tokens by entropy (this micro-batch's quantile)
            entropy_mask = self.get_high_entropy_mask(entropies.detach(), mask, 1 - args.top_entropy_quantile)  # (B, C)
        keep = None
        if args.off_policy_mask_threshold is not None:  # sampler log-probs when another engine sampled, else pi_old
            sampling = batch.get("sampling_per_token_logps", old_per_token_logps)
            keep = off_policy_mask(advantages, per_token_logps, sampling, mask, args.off_policy_mask_threshold)  # (B, 1)

        log_ratio = per_token_logps - old_per_token_logps  # (B, C)
        if args.importance_sampling_level == "token":
            log_importance_weights = log_ratio  # (B, C)
        else:  # GSPO: length-normalized sequence log-ratio
            log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
        coef_1 = torch.exp(log_importance_weights)  # (B, C) or (B, 1)

        if args.beta != 0.0:  # k3 estimate of KL(pi || pi_ref), per token
            ref = batch["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1  # (B, C)
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1

        eps_low, eps_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
        if args.loss_type == "cispo":
            per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * advantages * per_token_logps
        elif args.loss_type in _CLIPPED_LOSSES:
            coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
            if args.delta is not None:  # two-sided clipping
                coef_1 = torch.clamp(coef_1, max=args.delta)
            per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
        elif args.loss_type == "sapo":
            tau = torch.where(advantages > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
            per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * advantages
        else:  # vespo
            phi_seq = gamma_weights(advantages, log_ratio, mask, is_ratio, args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg)
            per_token_loss = -phi_seq * advantages * per_token_logps
        if keep is not None:
            per_token_loss = per_token_loss * keep
        if entropy_mask is not None:
            per_token_loss = per_token_loss * entropy_mask
        if is_ratio is not None and args.loss_type != "vespo":
            per_token_loss = per_token_loss * is_ratio
        if args.beta != 0.0:
            per_token_loss = per_token_loss + args.beta * per_token_kl
        per_token_loss = per_token_loss.expand_as(mask)  # (B, C) also for sequence-level ratios

        # aggregate: the micro-batch's SUM of per-item losses / items in the whole step (see count_items)
        if args.loss_type in ("grpo", "sapo"):  # items = sequences, each a token mean
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_items_in_batch
        elif args.loss_type == "dr_grpo":  # items = sequences, each a sum / max_completion_length
            loss = (per_token_loss * mask).sum() / args.max_completion_length / num_items_in_batch
        elif args.loss_type == "luspo":  # items = sequences, each a token sum
            loss = (per_token_loss * mask).sum() / num_items_in_batch
        elif args.loss_type == "bnpo":  # this process's step tokens (local batch), averaged over processes
            loss = (per_token_loss * mask).sum() / batch["bnpo_normalizer"]
        else:  # dapo, cispo, vespo: items = completion tokens of the whole step, every process
            loss = (per_token_loss * mask).sum() / num_items_in_batch

        metrics = {"entropy": masked_mean(entropies.detach(), mask)}
        share = batch.get("share_divisor", torch.ones(()))
        if self._entropy_bonus_enabled:
            # the bonus is the mean per-token entropy H over the trained tokens (L = L_policy - coef * H), the
            # same for every loss_type; each micro-batch contributes its mean divided by its share
            trained = mask if entropy_mask is None else mask * entropy_mask
            mean_entropy = (entropies * trained).sum() / trained.sum().clamp(min=1.0)
            applied = self.entropy_coef
            if self.use_adaptive_entropy and self._last_world_entropy > args.entropy_target:
                applied = 0.0  # adaptive control applies the bonus only at or below the target entropy
            metrics["policy_loss"] = loss.detach() * share
            loss = loss - applied * mean_entropy / share
            if training:
                metrics["entropy_coef"] = torch.tensor(float(self.entropy_coef), device=mask.device)
                if self.use_adaptive_entropy:
                    stats = torch.stack([(entropies.detach() * trained).sum(), trained.sum()]).float()
                    self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if self.aux_loss_enabled and aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / share.to(aux_loss.device)
            metrics["aux_loss"] = aux_loss.detach().float()
        if args.beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl.detach(), mask)
        if args.loss_type in _CLIPPED_LOSSES:
            is_low = (coef_1 < 1 - eps_low) & (advantages < 0)
            is_high = (coef_1 > 1 + eps_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"] = masked_mean(is_low.float(), mask)
            metrics["clip_ratio/high_mean"] = masked_mean(is_high.float(), mask)
            metrics["clip_ratio/region_mean"] = masked_mean((is_low | is_high).float(), mask)
        elif args.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = masked_mean(((coef_1 > eps_high) & (advantages > 0)).float(), mask)
        elif args.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = phi_seq.mean()
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy
        self._sync_ref_model(model, state)
        if self.use_adaptive_entropy:
            self._update_entropy_coef()

    def _update_entropy_coef(self) -> None:
        """Skywork-OR1's controller: raise the coefficient when the step's entropy is at or below the target, else lower it."""
        args, accelerator = self.args, self.loop.accelerator
        stats = self._entropy_window_stats if self._entropy_window_stats is not None else torch.zeros(2)
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu()
        entropy = float(stats[0] / stats[1].clamp(min=1.0))
        if entropy <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
        self._last_world_entropy = entropy
        self._entropy_window_stats = None

    @torch.no_grad()
    def _sync_ref_model(self, model, state) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` steps, ref = alpha * policy + (1 - alpha) * ref."""
        args = self.args
        if not args.sync_ref_model or self.ref_model is None or state.global_step % args.ref_model_sync_steps != 0:
            return
        sync_reference_model(self.ref_model, model, args.ref_model_mixup_alpha, accelerator=self.loop.accelerator)

    @torch.no_grad()
    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss and the rollout metrics of ``num_generations_eval`` samples per eval prompt (seeded by ``seed``).

        Each eval batch is rolled out, scored and given advantages within its groups (no
        cross-process statistics), then its loss is computed as in training; every number is a
        completion-weighted mean over the batches of all processes.
        """
        sums: dict[str, float] = defaultdict(float)
        weight = 0.0
        for i, batch in enumerate(batches):
            for micro in self._generate_and_score(batch["rows"], self.args.seed + i, mode="eval"):
                n = micro["completion_ids"].shape[0]
                on_device = self.loop.to_device(micro)
                items = torch.tensor(float(max(1, self.count_items(micro))), device=self.loop.device)
                loss, metrics = self.compute_loss(model, on_device, items)
                for key, value in {"loss": loss, **metrics}.items():
                    value = float(value)
                    if math.isfinite(value):
                        sums[key] += value * n
                        sums[f"{key}\0weight"] += n
                weight += n
        parts = [(dict(sums), weight)]
        if self.loop.accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object(parts)
        totals: dict[str, float] = defaultdict(float)
        for part, _ in parts:
            for key, value in part.items():
                totals[key] += value
        return {key: totals[key] / totals[f"{key}\0weight"] for key in totals if not key.endswith("\0weight") and totals[f"{key}\0weight"]}

    def state_dict(self) -> dict:
        state = {"policy_version": self.engine.policy_version,
                 "entropy_coef": float(self.entropy_coef), "last_world_entropy": float(self._last_world_entropy)}
        if self.args.sync_ref_model and self.ref_model is not None:  # the reference moves: resume needs it
            state["ref_model"] = {k: v.detach().cpu() for k, v in self.ref_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        self.entropy_coef = float(state.get("entropy_coef", self.args.entropy_coef))
        self._last_world_entropy = float(state.get("last_world_entropy", float("inf")))
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])
