"""RLOO on the posttrain loop (heavy: imports torch).

An aligned copy of ``posttrain_grpo.trainer``: blocks marked ``# Copied from posttrain_grpo.trainer.<name>``
are word-for-word GRPO's (with GRPO -> RLOO names) and tests/test_copied_blocks.py diffs them; the
rest is where RLOO's meaning differs. One optimizer step, in order (the producer's ``_produce`` then
``compute_loss`` per micro-batch)::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps / num_generations)
      -> rollout: num_generations completions per prompt (RolloutEngine, seeded by the step)
      -> reward: every reward function on every completion            (N, F), N = P * G
      -> old / reference log-probs (no-grad forwards, only when needed)
      -> reward - beta * sum_t (log pi_old - log pi_ref)   (k1 KL penalty in the reward, per sequence)
      -> advantage: leave-one-out baseline A_i = r_i - mean_{j != i} r_j  (N,)
      -> gradient_accumulation_steps micro-batches of per_device_train_batch_size completions
      -> loss per micro-batch: sequence-level clipped ratio, normalized over the whole step

Features and their flags (field names follow TRL 1.16's RLOOConfig): ``num_generations`` (default
2), ``beta`` (KL penalty in the reward, default 0.05; reference = frozen copy of the initial policy
or the adapter-disabled PEFT model; ``sync_ref_model`` moves it towards the policy), ``epsilon`` /
``epsilon_high`` (clipping of the sequence ratio exp(sum_t log pi - log pi_old)), ``num_iterations``
(rollout reuse with old log-probs from generation time), ``normalize_advantages`` (REINFORCE++),
``reward_clip_range``, ``reward_weights``, ``mask_truncated_completions``, a MoE model's router
load-balancing loss (``router_aux_loss_coef``). Departures from TRL: docs/methods/rloo.md.
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

from posttrain_rloo.config import RLOOConfig

__all__ = ["RLOOTrainer", "compute_rloo_advantages", "nanstd"]

logger = logging.getLogger(__name__)

#: generation_kwargs keys that map onto the rollout engine's SamplingParams (as GRPO's)
_SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens", "max_tokens": "max_tokens"}


# ----------------------------------------------------------------------------- math (pure functions)
# Copied from posttrain_grpo.trainer.nanstd
def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Return the Bessel-corrected standard deviation of ``x`` ignoring NaNs (NaN where fewer than 2 values)."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def compute_rloo_advantages(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int, normalize_advantages: bool,
    reward_clip_range: tuple[float, float] | None = None, kl: torch.Tensor | None = None, beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(advantages (N,), is_std_zero (N/G,))`` with a leave-one-out baseline per group.

    Args:
        rewards_per_func: ``(N, F)`` rewards, NaN where a function returned None.
        reward_weights: ``(F,)`` weights.
        num_generations: Group size G (groups are consecutive rows).
        normalize_advantages: Standardize the advantages over the batch (REINFORCE++).
        reward_clip_range: ``(low, high)`` clamp of the weighted reward, or None.
        kl: ``(N,)`` per-sequence KL estimate sum_t (log pi_old - log pi_ref), or None.
        beta: KL penalty coefficient (reward -= beta * kl).

    Returns:
        Advantages (0 for unscorable completions and for groups with a single scorable one) and,
        per group, whether the rewards' std is zero (for ``frac_reward_zero_std``).
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
    rewards[unscorable] = torch.nan  # keep unscorable rows out of the baseline
    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if kl is not None and beta != 0.0:
        rewards = rewards - beta * kl
    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    std = nanstd(grouped, dim=1)  # (N/G,)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (N/G, 1)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)  # (N/G, G): mean of the others
    advantages = rewards - baselines.view(-1)  # (N,)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


# Copied from posttrain_grpo.trainer._forward
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


# Copied from posttrain_grpo.trainer.per_token_logps_and_entropies
def per_token_logps_and_entropies(model, batch: dict, temperature: float, compute_entropy: bool = True, chunk_size: int | None = None):
    """Return ``(logps (B, C), entropies (B, C) or None)`` of the completion tokens at ``temperature`` (``chunk_size``: see ``_forward``)."""
    logps, entropies, _ = _forward(model, batch, temperature, compute_entropy=compute_entropy, chunk_size=chunk_size)
    return logps, entropies


# Copied from posttrain_grpo.trainer.masked_mean
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; a ``(B, 1)`` per-sequence ``x`` is averaged over sequences."""
    if x.shape[1] == 1:
        return x.float().mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- model and data helpers
# Copied from posttrain_grpo.trainer._default_output_dir
def _default_output_dir(model, method: str) -> str | None:
    """TRL's default ``output_dir`` when no args are given: ``<model name>-<METHOD>``."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    return f"{str(name).rstrip('/').split('/')[-1]}-{method}" if name else None


# Copied from posttrain_grpo.trainer._pad_to_multiple
def _pad_to_multiple(batch: dict, multiple: int, pad_token_id: int) -> None:
    """Pad (in place) the prompt tensors on the left and the completion tensors on the right to a multiple of ``multiple``."""
    for key, value, side in (("prompt_ids", pad_token_id, "left"), ("prompt_mask", 0, "left"), ("completion_ids", pad_token_id, "right"),
                             ("completion_mask", 0, "right"), ("sampling_logprobs", 0.0, "right")):
        tensor = batch[key]
        extra = -tensor.shape[1] % multiple
        if extra:
            filler = torch.full((tensor.shape[0], extra), value, dtype=tensor.dtype)
            batch[key] = torch.cat([filler, tensor] if side == "left" else [tensor, filler], dim=1)


# Copied from posttrain_grpo.trainer._LogRows
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
class RLOOTrainer(TrainerSurface):
    """Train a causal LM with RLOO (REINFORCE Leave-One-Out) or REINFORCE++ (``normalize_advantages``); TRL 1.16's ``RLOOTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path), a
            ``PreTrainedModel`` reward model, or a list of these (default ``args.reward_funcs``).
        args: A :class:`RLOOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
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
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Unused for a stable method; kept for a uniform signature.

    Raises:
        posttrain.ConfigError: no reward functions or dataset, mismatched ``reward_weights`` /
            ``reward_processing_classes``, a dataset without ``prompt``, or an argument that cannot be honoured.
    """

    _tag_names = ["trl", "rloo"]

    def __init__(self, model=None, reward_funcs=None, args: RLOOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, RLOOConfig, default_output_dir=_default_output_dir(model, "RLOO"))
        self._check_common_arguments(reward_funcs, train_dataset, optimizers)
        self.loop = TrainingLoop(args, method="rloo", allow_experimental=allow_experimental, callbacks=callbacks)
        self._setup_model(model, processing_class, peft_config, quantization_config)
        self._setup_rewards(reward_funcs, reward_processing_classes)
        self.ref_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout, needed=args.beta != 0.0)
        self._check_sync_ref_model()
        self._setup_datasets(train_dataset, eval_dataset)
        self.loop.setup(self.model, method=self)
        self.rollout_func = None  # TRL's RLOOTrainer takes no rollout_func: the engine generates
        self.engine = rollout_engine or self._build_engine()
        # the transformers backend samples from the trained model itself: old log-probs equal the current ones
        self.engine_is_policy = self.engine.samples_from_policy
        # the prompts and rollouts of every step: the loop consumes the producer's steps; its state is checkpointed per process
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset,
                                        self._produce, reuse=self.args.num_iterations)
        self._setup_logging()

    # -------------------------------------------------------------------------- setup helpers
    # Copied from posttrain_grpo.trainer.GRPOTrainer._check_common_arguments
    def _check_common_arguments(self, reward_funcs, train_dataset, optimizers) -> None:
        """Refuse, before any model is loaded, what TRL refuses and what posttrain cannot honour."""
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (prompt-only rows with a 'prompt' column).")
        if not reward_funcs and not self.args.reward_funcs:
            raise ConfigError("No reward source provided: RLOO needs reward functions: pass reward_funcs=[...] to the trainer or set reward_funcs in the config (CLI: --reward_funcs accuracy my_module:my_fn).")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config; set optim, optim_args, learning_rate, lr_scheduler_type and lr_scheduler_kwargs instead.")

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_model
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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_rewards
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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._check_sync_ref_model
    def _check_sync_ref_model(self) -> None:
        if not self.args.sync_ref_model:
            return
        if self.args.beta == 0.0:
            raise ConfigError("sync_ref_model=True but beta=0.0: no reference model is used, so there is nothing to synchronize; set beta > 0 or sync_ref_model=False.")
        if self.ref_model is None:
            raise ConfigError("sync_ref_model=True is not supported with PEFT: the reference is the adapter-disabled model, not a separate copy; set sync_ref_model=False or train all weights.")

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_datasets
    def _setup_datasets(self, train_dataset, eval_dataset) -> None:
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None

    # Copied from posttrain_grpo.trainer.GRPOTrainer._build_engine
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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_logging
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

    # -------------------------------------------------------------------------- data
    # Copied from posttrain_grpo.trainer.GRPOTrainer.process_dataset
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
                raise ConfigError(f"{name} row {i} has no 'prompt' column (columns: {sorted(row)}); RLOO needs prompt-only data: a 'prompt' string or message list (or pre-tokenized 'prompt_ids').")
        if len(dataset):
            self._prompt_ids(dataset[0])  # a prompt the tokenizer cannot render fails here, not mid-run
        return dataset

    # Copied from posttrain_grpo.trainer.GRPOTrainer._prompt_ids
    def _prompt_ids(self, row: dict) -> list[int]:
        """Token ids of a row's prompt: its ``prompt_ids`` as given, or the tokenized ``prompt`` (messages via the chat template)."""
        if row.get("prompt_ids") is not None:
            return [int(t) for t in row["prompt_ids"]]
        return tokenize_prompt(self.processing_class, row["prompt"], chat_template_kwargs=self.args.chat_template_kwargs, tools=row.get("tools"))

    # Copied from posttrain_grpo.trainer.GRPOTrainer._prompts_per_step
    def _prompts_per_step(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's attribute; TRL's is the identity): :meth:`collate`, which keeps them raw."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    # Copied from posttrain_grpo.trainer.GRPOTrainer.collate
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]  # RLOO's loss is a mean over sequences

    # Copied from posttrain_grpo.trainer.GRPOTrainer._produce
    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: generate, score and split one step's rollouts (the producer reuses them ``num_iterations`` times)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_score(request.rows, seed)

    # Copied from posttrain_grpo.trainer.GRPOTrainer._generate
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

        # 4. advantage: (N,) from the global batch (this process's in eval), sliced into the micro-batches; the k1 KL penalty goes into the reward
        kl = None
        if args.beta != 0.0:  # sum_t (log pi_old - log pi_ref) per sequence; may be negative (k1, Ahmadian et al. 2024)
            kl = torch.cat([((b["old_per_token_logps"] - b["ref_per_token_logps"]) * b["completion_mask"]).sum(-1) for b in micro_batches])  # (N,)
        kl_or_zeros = kl if kl is not None else torch.zeros(len(rollout))
        if mode == "train":
            (all_rewards, all_kl), local = gather_across_processes(self.loop.accelerator, rewards_per_func, kl_or_zeros)
        else:
            all_rewards, all_kl, local = rewards_per_func, kl_or_zeros, slice(0, len(rollout))
        advantages, is_std_zero = compute_rloo_advantages(
            all_rewards, self.reward_weights, num_generations, args.normalize_advantages, args.reward_clip_range,
            all_kl if kl is not None else None, args.beta,
        )
        advantages, is_std_zero = advantages[local], is_std_zero[local.start // num_generations : local.stop // num_generations]  # (N,), (N/G,)
        world = self.loop.accelerator.num_processes if mode == "train" else 1
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch["advantages"] = advantages[start : start + size]  # (b,)
            # a micro-batch's share of a per-step mean is its mean / (micro-batches x processes): the loop sums the shares
            batch["share_divisor"] = torch.tensor(float(len(micro_batches) * world))

        metrics = self._rollout_metrics(rollout, rewards_per_func, is_std_zero, micro_batches, num_generations)
        names, values = list(metrics), torch.tensor(list(metrics.values()), dtype=torch.float32)
        for batch in micro_batches:
            batch["rollout_metric_names"], batch["rollout_metric_values"] = names, values
        if mode == "train":
            self._record_completions(prompts, rollout, rewards_per_func, advantages)
        else:
            self._pending_extra_logs.clear()  # the completion log shows training rollouts only
        return micro_batches

    # Copied from posttrain_grpo.trainer.GRPOTrainer._score
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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._log_completion_extra
    def _log_completion_extra(self, column: str, values: list) -> None:
        """``log_extra(column, values)`` of a reward function: one value per completion, shown with ``log_completions``."""
        self._pending_extra_logs[column].extend(values)

    # Copied from posttrain_grpo.trainer.GRPOTrainer._log_metric
    def _log_metric(self, name: str, value: float) -> None:
        """``log_metric(name, value)`` of a reward function: a scalar averaged into this step's logged metrics."""
        self._pending_metrics[name].append(float(value))

    # Copied from posttrain_grpo.trainer.GRPOTrainer._record_completions
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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._log_completions_table
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
        sampling_logps = batch.pop("sampling_logprobs")  # (b, C); RLOO (like TRL's) has no importance-sampling correction
        if args.mask_truncated_completions:
            kept = ~torch.tensor(sub.truncated, dtype=torch.bool)  # (b,)
            batch["completion_mask"] = batch["completion_mask"] * kept.unsqueeze(1).long()
        batch["num_completion_tokens"] = int(batch["completion_mask"].sum())
        batch["num_tokens"] = int(batch["prompt_mask"].sum()) + batch["num_completion_tokens"]
        batch["truncated"] = torch.tensor(sub.truncated, dtype=torch.bool)
        need_old = (mode == "train" and args.num_iterations > 1) or not self.engine_is_policy or args.beta != 0.0  # the KL penalty needs pi_old
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
        return batch

    # Copied from posttrain_grpo.trainer.GRPOTrainer._ref_logps
    def _ref_logps(self, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return per_token_logps_and_entropies(self.ref_model, batch, self.args.temperature, compute_entropy=False, chunk_size=self.args.logprob_chunk_size)[0]
        with adapter_disabled(self.model, self.loop.accelerator):  # PEFT: the base model is the reference
            return per_token_logps_and_entropies(self.model, batch, self.args.temperature, compute_entropy=False, chunk_size=self.args.logprob_chunk_size)[0]

    def _rollout_metrics(self, rollout: RolloutBatch, rewards_per_func: torch.Tensor, is_std_zero: torch.Tensor, micro_batches: list[dict], num_generations: int) -> dict:
        metrics = self._reward_and_length_metrics(rollout, rewards_per_func, is_std_zero, num_generations)
        if self.args.beta != 0.0:  # mean per-token k1 KL of the rollout (the penalty's estimate)
            kl_sum = sum(((b["old_per_token_logps"] - b["ref_per_token_logps"]) * b["completion_mask"]).sum() for b in micro_batches)
            metrics["kl"] = float(kl_sum) / max(1, sum(b["num_completion_tokens"] for b in micro_batches))
        return {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}

    # Copied from posttrain_grpo.trainer.GRPOTrainer._reward_and_length_metrics
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

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        args = self.args
        mask = batch["completion_mask"].float()  # (B, C)
        per_token_logps, entropies, aux_loss = _forward(model, batch, args.temperature, router_aux_loss=self.aux_loss_enabled, chunk_size=args.logprob_chunk_size)  # (B, C), (B, C)
        advantages = batch["advantages"]  # (B,)
        # with one iteration on the trained model's own samples, old == current (detached): no extra forward
        old_per_token_logps = batch.get("old_per_token_logps", per_token_logps.detach())  # (B, C)

        logps = (per_token_logps * mask).sum(-1)  # (B,) sequence log-prob
        old_logps = (old_per_token_logps * mask).sum(-1)  # (B,)
        coef_1 = torch.exp(logps - old_logps)  # (B,) sequence-level ratio
        eps_low, eps_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)  # (B,)

        # aggregate: the micro-batch's SUM of per-sequence losses / sequences in the whole step
        loss = per_sequence_loss.sum() / num_items_in_batch

        is_low = (coef_1 < 1 - eps_low) & (advantages < 0)
        is_high = (coef_1 > 1 + eps_high) & (advantages > 0)
        metrics = {
            "entropy": masked_mean(entropies, mask),
            "clip_ratio/low_mean": is_low.float().mean(),
            "clip_ratio/high_mean": is_high.float().mean(),
            "clip_ratio/region_mean": (is_low | is_high).float().mean(),
        }
        if self.aux_loss_enabled and aux_loss is not None:
            share = batch.get("share_divisor", torch.ones(()))
            loss = loss + self.router_aux_loss_coef * aux_loss / share.to(aux_loss.device)
            metrics["aux_loss"] = aux_loss.detach().float()
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy
        self._sync_ref_model(model, state)

    # Copied from posttrain_grpo.trainer.GRPOTrainer._sync_ref_model
    @torch.no_grad()
    def _sync_ref_model(self, model, state) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` steps, ref = alpha * policy + (1 - alpha) * ref."""
        args = self.args
        if not args.sync_ref_model or self.ref_model is None or state.global_step % args.ref_model_sync_steps != 0:
            return
        sync_reference_model(self.ref_model, model, args.ref_model_mixup_alpha, accelerator=self.loop.accelerator)

    # Copied from posttrain_grpo.trainer.GRPOTrainer.evaluate_batches
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
        state = {"policy_version": self.engine.policy_version}
        if self.args.sync_ref_model and self.ref_model is not None:  # the reference moves: resume needs it
            state["ref_model"] = {k: v.detach().cpu() for k, v in self.ref_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])
