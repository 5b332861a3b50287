"""The online scaffold's steps: plain functions from a config and prompt rows to scored, padded micro-batches.

An online method (GRPO, RLOO, on-policy distillation, PPO, online DPO, ...) trains on what its
policy does with prompts. Everything it needs besides its own method logic (advantages, loss,
their metrics) is a step below, a plain function called in this order (no base class, no hidden
state; :class:`CompletionLog` is the one class, because TRL users read its state as ``_logs``)::

    setup   check_online_arguments, load_online_policy, router_aux_loss_settings,
            resolve_online_rewards, prepare_prompt_dataset, sampling_from_config, build_rollout_engine
    step    expand_prompts -> generate_rollout -> score_rollout (N, F)
            -> rollout_micro_batches (padded, masked, extras kept) -> add_old_and_ref_logps
            -> [the method: advantages]  -> reward_and_length_metrics, attach_rollout_metrics
    loss    completion_logps (the differentiable forward), masked means
    eval    evaluate_online
    log     CompletionLog (TRL's ``_logs``, ``completions/completions_<step>.parquet``, a rich table)

Field names follow TRL's online configs (``max_completion_length``, ``temperature``,
``generation_kwargs``, ``rollout_backend``/``vllm_*``, ``reward_weights``, ...): a function that takes
``args`` says which fields it reads. Every function is deterministic given its inputs, so two
methods built on them agree bit for bit where they share a step.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import warnings
from collections import defaultdict, deque
from typing import Any, Callable, NamedTuple, Sequence

import torch

from posttrain._chunked import causal_lm_states
from posttrain._online import nanstd
from posttrain._plumbing import adapter_disabled, build_reward_functions, disable_dropout, is_peft_model, resolve_dtype, tokenize_prompt
from posttrain._rollout import RolloutBatch, RolloutEngine, SamplingParams
from posttrain._vision import collate_model_inputs, sequence_model_inputs
from posttrain.config import ConfigError

__all__ = [
    "CompletionLog",
    "OnlineRewards",
    "add_old_and_ref_logps",
    "attach_rollout_metrics",
    "build_rollout_engine",
    "check_online_arguments",
    "check_sync_ref_model",
    "completion_logps",
    "default_output_dir",
    "evaluate_online",
    "expand_prompts",
    "generate_rollout",
    "load_online_policy",
    "nanstd",
    "prepare_prompt_dataset",
    "prompt_token_ids",
    "reference_logps",
    "resolve_online_rewards",
    "reward_and_length_metrics",
    "rollout_micro_batches",
    "router_aux_loss_settings",
    "sampler_is_old_policy",
    "sampling_from_config",
    "score_rollout",
    "slice_rollout",
]

logger = logging.getLogger(__name__)

#: generation_kwargs keys that map onto the rollout engine's SamplingParams
_SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens", "max_tokens": "max_tokens"}


# ----------------------------------------------------------------------------- setup
def check_online_arguments(method: str, *, train_dataset: Any, reward_funcs: Any, optimizers: Any = (None, None)) -> None:
    """Refuse, before any model is loaded, what TRL's online trainers refuse and what posttrain cannot honour.

    Args:
        method: The method's display name (``"GRPO"``), used in the messages.
        train_dataset: The trainer's ``train_dataset`` argument.
        reward_funcs: The reward functions given to the trainer, or else the config's ``reward_funcs``.
        optimizers: The trainer's ``optimizers`` argument; only ``(None, None)`` is accepted.

    Raises:
        posttrain.ConfigError: no dataset, no reward functions, or an ``optimizers`` pair.
    """
    if train_dataset is None:
        raise ConfigError("`train_dataset` is required: pass train_dataset=... (prompt-only rows with a 'prompt' column).")
    if not reward_funcs:
        raise ConfigError(f"No reward source provided: {method} needs reward functions: pass reward_funcs=[...] to the trainer or set reward_funcs in the config (CLI: --reward_funcs accuracy my_module:my_fn).")
    if tuple(optimizers or (None, None)) != (None, None):
        raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config; set optim, optim_args, learning_rate, lr_scheduler_type and lr_scheduler_kwargs instead.")


def check_sync_ref_model(args: Any, ref_model: Any) -> None:
    """Refuse ``sync_ref_model`` (TR-DPO) where there is no separate reference to move.

    Args:
        args: The config (reads ``sync_ref_model`` and ``beta``).
        ref_model: The reference model, or None (no KL term, or the adapter-disabled policy under PEFT).

    Raises:
        posttrain.ConfigError: ``sync_ref_model`` with ``beta == 0``, or with a PEFT policy.
    """
    if not args.sync_ref_model:
        return
    if args.beta == 0.0:
        raise ConfigError("sync_ref_model=True but beta=0.0: no reference model is used, so there is nothing to synchronize; set beta > 0 or sync_ref_model=False.")
    if ref_model is None:
        raise ConfigError("sync_ref_model=True is not supported with PEFT: the reference is the adapter-disabled model, not a separate copy; set sync_ref_model=False or train all weights.")


def default_output_dir(model: Any, method: str) -> str | None:
    """Return TRL's default ``output_dir`` when no config is given: ``<model name>-<METHOD>``.

    Args:
        model: A Hub id / directory, or a model object (its ``config._name_or_path`` is used).
        method: The method's display name (``"GRPO"``).

    Returns:
        The directory name, or None when the model has no name.
    """
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", None)
    return f"{str(name).rstrip('/').split('/')[-1]}-{method}" if name else None


def load_online_policy(model: Any, args: Any, *, loop: Any, processing_class: Any = None, peft_config: Any = None,
                       quantization_config: Any = None, tags: Sequence[str] | None = None, lm_head_fp32: bool = False) -> tuple[Any, Any]:
    """Load the policy of an online trainer, then apply the loop's PEFT and checkpointing.

    The model is loaded by :meth:`TrainingLoop.load_model` (:func:`posttrain.load_pretrained` with
    ``role="policy"``: ``dtype`` / ``torch_dtype`` of ``model_init_kwargs``, float32 by default, the
    tokenizer of the same ``revision``, ``trust_remote_code``, ``quantization_config``). Dropout is disabled when ``args.disable_dropout``; ``tags`` are
    added to the model card (TRL's ``_tag_names``); with ``lm_head_fp32`` the LM head is cast to
    float32 and computes float32 logits, also under a bf16 autocast (TRL's ``cast_lm_head_to_fp32``;
    a reference copied from the policy afterwards inherits it).

    Args:
        model: A model object, a Hub id / directory, or None (``args.model_name_or_path``).
        args: The config (reads ``model_name_or_path``, ``model_init_kwargs``, ``trust_remote_code``,
            ``disable_dropout``).
        loop: The method's :class:`~posttrain.TrainingLoop`.
        processing_class: The tokenizer (default: loaded with the model).
        peft_config: A ``peft.PeftConfig`` or None.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name (ignored, with a
            warning, for a model object).
        tags: Model-card tags.
        lm_head_fp32: Cast the LM head to float32 (see above).

    Returns:
        ``(model, processing_class)``.

    Raises:
        posttrain.ConfigError: ``model`` is already a ``PeftModel`` and ``peft_config`` is given;
            ``quantization_config`` is given both here and in ``model_init_kwargs``; ``lm_head_fp32``
            for a model without an LM head, or whose LM head carries a PEFT adapter.
    """
    model = model if model is not None else args.model_name_or_path
    if peft_config is not None and is_peft_model(model):
        raise ConfigError("model is already a PeftModel and peft_config was given: merge and unload its adapter first (model.merge_and_unload()), or omit peft_config to train the existing adapter.")
    if quantization_config is not None and not isinstance(model, str):
        logger.warning("quantization_config is ignored: the model is already instantiated (quantize it when loading it).")
        quantization_config = None
    # one loader for every role (posttrain.load_pretrained, through the loop): dtype, revision, trust_remote_code, quantization
    model, processing_class = loop.load_model(model, processing_class=processing_class, peft_config=peft_config, quantization_config=quantization_config)
    if args.disable_dropout:
        disable_dropout(model)
    if tags and hasattr(model, "add_model_tags"):
        model.add_model_tags(list(tags))
    if lm_head_fp32:
        _cast_lm_head_to_fp32(model)
    return model, processing_class


def _fp32_head_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Forward of an LM head cast by ``_cast_lm_head_to_fp32``: float32 logits, also inside a bf16 autocast region."""
    with torch.autocast(device_type=hidden_states.device.type, enabled=False):
        return torch.nn.functional.linear(hidden_states.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def _cast_lm_head_to_fp32(model: Any) -> None:
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


def router_aux_loss_settings(model: Any, router_aux_loss_coef: float | None) -> tuple[float, bool]:
    """Return ``(coefficient, enabled)`` of a Mixture-of-Experts model's router load-balancing loss.

    Args:
        model: The policy; a MoE model's (text) config has ``output_router_logits``.
        router_aux_loss_coef: The config's value; None takes the model config's ``router_aux_loss_coef``.

    Returns:
        The coefficient (0.0 when none applies) and whether the loss is added (a MoE model and a
        non-zero coefficient).

    Raises:
        posttrain.ConfigError: a non-zero coefficient for a model that is not a MoE model.
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    is_moe = hasattr(text_config, "output_router_logits")
    if router_aux_loss_coef and not is_moe:
        raise ConfigError(f"router_aux_loss_coef={router_aux_loss_coef} but {type(model).__name__} is not a Mixture-of-Experts model returning router logits: there is no auxiliary loss to weight; leave it None.")
    coef = router_aux_loss_coef if router_aux_loss_coef is not None else getattr(text_config, "router_aux_loss_coef", 0.0)
    coef = float(coef or 0.0)
    return coef, is_moe and coef != 0.0


class OnlineRewards(NamedTuple):
    """The resolved reward functions of an online trainer, in TRL's attribute shapes."""

    #: The callables (reward functions and ``RewardModelFunction`` wrappers of reward models).
    funcs: list
    #: One unique name each (a reward model is named by its model id; repeats get ``_2``, ``_3``, ...).
    names: list[str]
    #: ``(F,)`` float32 weights.
    weights: torch.Tensor
    #: One tokenizer each (a reward model's own; None for plain functions).
    processing_classes: list


def resolve_online_rewards(reward_funcs: Any, args: Any, *, loop: Any, reward_processing_classes: Any = None) -> OnlineRewards:
    """Resolve reward functions with TRL's naming, weights and ``reward_processing_classes``.

    Args:
        reward_funcs: A callable, a name (``"accuracy"``, ``"module:function"``, a reward-model path),
            a reward-model object, or a list of these; None takes ``args.reward_funcs``.
        args: The config (reads ``reward_funcs``, ``reward_weights``, ``model_init_kwargs``,
            ``trust_remote_code``).
        loop: The method's :class:`~posttrain.TrainingLoop` (reward models are prepared on its device).
        reward_processing_classes: One tokenizer per reward function (None for plain functions), or one
            for a single function; a tokenizer without a pad token gets its EOS as pad (as TRL).

    Returns:
        An :class:`OnlineRewards`.

    Raises:
        posttrain.ConfigError: the number of processing classes or of ``reward_weights`` does not
            match the number of reward functions.
    """
    from posttrain.rewards import RewardModelFunction

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
    pairs = build_reward_functions(specs, reward_processing_classes, loop=loop, model_init_kwargs=init_kwargs)
    names: list[str] = []
    for name, func in pairs:  # TRL names a reward model by its model id
        if isinstance(func, RewardModelFunction):
            path = getattr(func.model.config, "_name_or_path", "") or ""
            name = path.rstrip("/").split("/")[-1] or name
        base, k = name, 2
        while name in names:
            name, k = f"{base}_{k}", k + 1
        names.append(name)
    funcs = [func for _, func in pairs]
    given = list(reward_processing_classes) if reward_processing_classes is not None else [None] * len(pairs)
    processing_classes = [f.tokenizer if isinstance(f, RewardModelFunction) else t for f, t in zip(funcs, given)]
    weights = args.reward_weights or [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ConfigError(f"reward_weights has {len(weights)} entries for {len(funcs)} reward functions {names}; give one weight each.")
    return OnlineRewards(funcs, names, torch.tensor(weights, dtype=torch.float32), processing_classes)


def prompt_token_ids(row: dict, tokenizer: Any, *, chat_template_kwargs: dict | None = None) -> list[int]:
    """Return the token ids of a row's prompt: its ``prompt_ids`` as given, or the tokenized ``prompt``.

    Args:
        row: A prompt row (``prompt``: a string or a message list rendered by the chat template, with
            the row's ``tools``; or pre-tokenized ``prompt_ids``).
        tokenizer: The policy's tokenizer.
        chat_template_kwargs: Extra arguments of the chat template.

    Returns:
        The ids.
    """
    if row.get("prompt_ids") is not None:
        return [int(t) for t in row["prompt_ids"]]
    return tokenize_prompt(tokenizer, row["prompt"], chat_template_kwargs=chat_template_kwargs, tools=row.get("tools"))


def prepare_prompt_dataset(dataset: Any, name: str, *, method: str, prompt_ids: Callable[[dict], list[int]] | None = None, limit: int | None = None):
    """Return ``dataset`` as a ``datasets.Dataset`` of prompt rows, checked for a ``prompt`` (or ``prompt_ids``) column.

    A ``datasets.Dataset`` is returned as is (prompts are tokenized per step, as TRL does); a list of
    dicts becomes a ``Dataset`` (kept a list when Arrow cannot hold its values); an
    ``IterableDataset`` is materialized once (its first ``limit`` rows, or the whole stream).

    Args:
        dataset: The rows.
        name: The argument's name for messages (``"train_dataset"``, ``"eval_dataset['x']"``).
        method: The method's display name for messages.
        prompt_ids: ``row -> ids``: the first row is tokenized with it, so that a prompt the tokenizer
            cannot render fails here, not mid-run.
        limit: Rows to draw from an ``IterableDataset`` (None: all).

    Returns:
        The dataset (a ``datasets.Dataset``, or a list of dicts).

    Raises:
        posttrain.ConfigError: a dict of datasets, or a row without ``prompt`` / ``prompt_ids``.
    """
    from datasets import Dataset, IterableDataset

    if isinstance(dataset, dict):
        raise ConfigError(f"{name} is a dict of datasets: pass one split (e.g. dataset['train']); only eval_dataset takes a dict.")
    if isinstance(dataset, IterableDataset):
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
            raise ConfigError(f"{name} row {i} has no 'prompt' column (columns: {sorted(row)}); {method} needs prompt-only data: a 'prompt' string or message list (or pre-tokenized 'prompt_ids').")
    if len(dataset) and prompt_ids is not None:
        prompt_ids(dataset[0])  # a prompt the tokenizer cannot render fails here, not mid-run
    return dataset


def sampling_from_config(args: Any) -> dict:
    """Return the rollout engine's sampling parameters (``SamplingParams`` keywords but ``n`` / ``seed``) from a config.

    ``generation_kwargs`` override the config's fields: ``temperature``, ``top_p``, ``top_k``,
    ``min_p``, ``repetition_penalty``, ``max_new_tokens`` / ``max_tokens``, and ``do_sample=False``
    (greedy). Other keys are ignored with a ``UserWarning`` (the engine samples one sequence per draw
    with its exact log-probs).

    Args:
        args: The config (reads ``max_completion_length``, ``temperature``, ``top_p``, ``top_k``,
            ``min_p``, ``repetition_penalty``, ``generation_kwargs``).

    Returns:
        ``{"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty"}``.
    """
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
    sampling = dict(max_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    min_p=args.min_p or 0.0, repetition_penalty=args.repetition_penalty)
    sampling.update(overrides)
    return sampling


def build_rollout_engine(args: Any, *, model: Any, tokenizer: Any, accelerator: Any) -> RolloutEngine:
    """Return the rollout engine a config asks for (``rollout_backend``: transformers or vLLM).

    Args:
        args: The config (reads ``rollout_backend``, ``generation_batch_size``, ``seed``,
            ``trust_remote_code`` and the ``vllm_*`` fields).
        model: The policy (the transformers backend samples from it).
        tokenizer: The policy's tokenizer.
        accelerator: The loop's accelerator.

    Returns:
        A :class:`~posttrain.RolloutEngine`.

    Raises:
        posttrain.ConfigError: ``vllm_mode='server'`` (the policy's weights cannot be pushed to a server yet).
    """
    kwargs: dict[str, Any] = dict(model=model, tokenizer=tokenizer, accelerator=accelerator)
    if args.rollout_backend == "vllm" and args.vllm_mode == "server":
        raise ConfigError(
            "vllm_mode='server' cannot train a policy yet: posttrain does not push updated weights to a separate `vllm serve` "
            "(vLLM's native weight-transfer API is not wired in), so every rollout would come from the initial weights. Use "
            "vllm_mode='colocate' (vLLM in the training process) or rollout_backend='transformers'."
        )
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


# ----------------------------------------------------------------------------- one step: rollout and rewards
def expand_prompts(rows: list[dict], num_generations: int, prompt_ids: Callable[[dict], list[int]], tokenizer: Any) -> tuple[list, list[list[int]]]:
    """Return ``(prompts, prompt_ids)``, one entry per completion: each row repeated ``num_generations`` times in a row.

    Args:
        rows: The step's prompt rows.
        num_generations: Completions per prompt (G).
        prompt_ids: ``row -> ids`` (e.g. :func:`prompt_token_ids` bound to the tokenizer).
        tokenizer: Decodes a pre-tokenized row's ids into its text prompt.

    Returns:
        ``N = len(rows) * G`` prompts (the rows' ``prompt``, else the decoded ids) and their ids.
    """
    expanded = [row for row in rows for _ in range(num_generations)]  # (N,) one row per completion
    ids = [x for x in map(prompt_ids, rows) for _ in range(num_generations)]
    prompts = [r["prompt"] if "prompt" in r else tokenizer.decode(x, skip_special_tokens=True) for r, x in zip(expanded, ids)]
    return prompts, ids


def generate_rollout(prompts: list, prompt_ids: list[list[int]], *, engine: RolloutEngine, sampling: dict, num_generations: int = 1,
                     seed: int | None = None, rollout_func: Callable | None = None, trainer: Any = None,
                     max_completion_length: int | None = None, stop_token_ids: Sequence[int] = ()) -> RolloutBatch:
    """Return the rollout of ``prompts``: one entry per completion, each prompt repeated ``num_generations`` times in a row.

    A ``rollout_func`` (TRL's hook) gets ``prompts`` as they are and ``trainer``, and returns
    ``prompt_ids``, ``completion_ids`` and ``logprobs`` (one list per completion), optionally
    ``env_mask`` (1 at model-written tokens, 0 at environment feedback: kept as ``extras["tool_mask"]``,
    see :func:`rollout_micro_batches`) and extra keys for the reward functions (kept in
    ``RolloutBatch.extras["reward_kwargs"]``); a completion of
    ``max_completion_length`` tokens not ending in a stop token is truncated. Otherwise the engine
    samples ``num_generations`` completions of each distinct prompt.

    Args:
        prompts: ``N`` prompts (grouped: ``prompt0 x G, prompt1 x G, ...``).
        prompt_ids: Their ``N`` token-id lists.
        engine: The rollout engine (its ``policy_version`` labels a ``rollout_func``'s rollout).
        sampling: :func:`sampling_from_config`'s parameters.
        num_generations: G.
        seed: The sampling seed.
        rollout_func: ``rollout_func(prompts, trainer) -> dict``, or None.
        trainer: Passed to ``rollout_func``.
        max_completion_length: The truncation length of a ``rollout_func``'s completions.
        stop_token_ids: Tokens that end a completion (EOS, pad).

    Returns:
        A :class:`~posttrain.RolloutBatch`.

    Raises:
        ValueError: ``rollout_func`` returned no ``prompt_ids``, ``completion_ids`` or ``logprobs``.
    """
    if rollout_func is not None:
        output = rollout_func(prompts, trainer)
        missing = sorted({"prompt_ids", "completion_ids", "logprobs"} - set(output))
        if missing:
            raise ValueError(f"rollout_func must return keys {missing} in its output dict (one list per completion): it returned {sorted(output)}.")
        completion_ids = [list(c) for c in output["completion_ids"]]
        stop = set(stop_token_ids) - {None}
        truncated = [len(c) >= max_completion_length and (not c or c[-1] not in stop) for c in completion_ids]
        extras = {k: list(v) for k, v in output.items() if k not in ("prompt_ids", "completion_ids", "logprobs", "env_mask")}
        batch_extras: dict[str, Any] = {"reward_kwargs": extras}
        if output.get("env_mask") is not None:  # TRL's name: 1 at model-written tokens, 0 at environment feedback
            batch_extras["tool_mask"] = [list(m) for m in output["env_mask"]]
        return RolloutBatch([list(p) for p in output["prompt_ids"]], completion_ids, [list(lp) for lp in output["logprobs"]], truncated,
                            policy_version=engine.policy_version, extras=batch_extras)
    distinct = prompt_ids[::num_generations]
    return engine.generate(distinct, SamplingParams(n=num_generations, seed=seed, **sampling))


def score_rollout(rows: list[dict], prompts: list, rollout: RolloutBatch, num_generations: int, *, reward_funcs: Sequence[Any],
                  reward_func_names: Sequence[str], tokenizer: Any, trainer_state: Any = None, log: CompletionLog | None = None,
                  completions: list | None = None, reward_kwargs: dict | None = None) -> torch.Tensor:
    """Return every reward function's reward of every completion, ``(N, F)``, NaN where a function returned None.

    Reward functions get TRL's keywords: ``prompts``, ``completions`` (messages when the prompts are),
    ``completion_ids``, every other column of the rows, ``trainer_state``, ``log_extra`` /
    ``log_metric`` (into ``log``) and the rollout's ``extras["reward_kwargs"]``. When every function
    returned None for some completion, one warning shows the first such row.

    Args:
        rows: The step's prompt rows (one per group).
        prompts: ``N`` prompts, one per completion.
        rollout: The rollout.
        num_generations: G.
        reward_funcs: The reward callables.
        reward_func_names: Their names.
        tokenizer: Decodes the completions.
        trainer_state: Passed to the reward functions.
        log: Receives ``log_extra`` / ``log_metric`` calls (None: they are dropped).
        completions: What the reward functions receive as ``completions`` (e.g. a tool-calling
            episode's assistant and tool messages, :class:`~posttrain.ToolRolloutResult`); None: the
            decoded completions (one assistant message each when the prompts are conversational).
        reward_kwargs: More keywords for every reward function (e.g. ``environments``).

    Returns:
        ``(N, F)`` float32 rewards.
    """
    from posttrain.rewards import compute_rewards

    if completions is None:
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        conversational = isinstance(prompts[0], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
    expanded = [r for r in rows for _ in range(num_generations)]  # (N,) one row per completion
    columns = {key: [row.get(key) for row in expanded] for key in expanded[0] if key not in ("prompt", "completion")}
    extra = {**rollout.extras.get("reward_kwargs", {}), **(reward_kwargs or {})}
    log = log if log is not None else CompletionLog(0)
    result = compute_rewards(
        list(zip(reward_func_names, reward_funcs)), prompts=prompts, completions=completions,
        completion_ids=rollout.completion_ids, columns=columns, trainer_state=trainer_state,
        log_extra=log.log_extra, log_metric=log.log_metric, **extra,
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


# ----------------------------------------------------------------------------- one step: tensors
def _slice_extras(value: Any, n: int, part: slice) -> Any:
    """``part`` of a batch-level extras value: a list of ``n`` entries is sliced, a dict recurses, anything else is shared."""
    if isinstance(value, dict):
        return {k: _slice_extras(v, n, part) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and len(value) == n:
        return value[part]
    return value


def slice_rollout(rollout: RolloutBatch, part: slice) -> RolloutBatch:
    """Return completions ``part`` of ``rollout`` with their per-sample policy versions and extras.

    Extras follow :meth:`RolloutBatch.to_episodes`' rule: a list with one entry per completion is
    sliced, a dict is sliced key by key, anything else is shared by every slice.

    Args:
        rollout: The rollout.
        part: The completions to keep (a ``slice``).

    Returns:
        A new :class:`~posttrain.RolloutBatch`.
    """
    n = len(rollout)
    return RolloutBatch(rollout.prompt_ids[part], rollout.completion_ids[part], rollout.logprobs[part], rollout.truncated[part],
                        rollout.policy_version, extras={k: _slice_extras(v, n, part) for k, v in rollout.extras.items()},
                        policy_versions=rollout.policy_versions[part])


def _pad_to_multiple(batch: dict, multiple: int, pad_token_id: int) -> None:
    """Pad (in place) the prompt tensors on the left and the completion tensors on the right to a multiple of ``multiple``."""
    for key, value, side in (("prompt_ids", pad_token_id, "left"), ("prompt_mask", 0, "left"), ("completion_ids", pad_token_id, "right"),
                             ("completion_mask", 0, "right"), ("sampling_logprobs", 0.0, "right"), ("tool_mask", 0, "right")):
        if key not in batch:
            continue
        tensor = batch[key]
        extra = -tensor.shape[1] % multiple
        if extra:
            filler = torch.full((tensor.shape[0], extra), value, dtype=tensor.dtype)
            batch[key] = torch.cat([filler, tensor] if side == "left" else [tensor, filler], dim=1)


def _tool_mask(rollout: RolloutBatch, width: int) -> torch.Tensor | None:
    """The ``(b, width)`` tool mask of ``rollout.extras["tool_mask"]`` (or ``"env_mask"``), right-padded with 0; None when absent."""
    masks = rollout.extras.get("tool_mask", rollout.extras.get("env_mask"))
    if masks is None:
        return None
    out = torch.zeros(len(rollout), width, dtype=torch.long)
    for i, (mask, ids) in enumerate(zip(masks, rollout.completion_ids)):
        mask = list(mask)
        if len(mask) != len(ids):
            raise ValueError(f"tool_mask[{i}] has {len(mask)} entries but completion {i} has {len(ids)} tokens; give one 0/1 per completion token.")
        if mask:
            out[i, : len(mask)] = torch.tensor(mask, dtype=torch.long)
    return out


def rollout_micro_batches(rollout: RolloutBatch, size: int, pad_token_id: int, *, pad_to_multiple_of: int | None = None,
                          mask_truncated: bool = False) -> list[dict]:
    """Slice a rollout into padded micro-batches of ``size`` completions (CPU tensors).

    Args:
        rollout: The rollout (``N`` completions).
        size: Completions per micro-batch (the last one may be smaller).
        pad_token_id: The pad id of ``prompt_ids`` / ``completion_ids``.
        pad_to_multiple_of: Pad the prompt (left) and completion (right) widths to a multiple of it.
        mask_truncated: Zero the completion mask of truncated completions (``mask_truncated_completions``).

    Returns:
        One dict per micro-batch: ``prompt_ids`` / ``prompt_mask`` ``(b, P)``, ``completion_ids`` /
        ``completion_mask`` ``(b, C)``, ``sampling_logprobs`` ``(b, C)`` (the sampler's, 0 on padding),
        ``truncated`` ``(b,)`` bool, ``num_completion_tokens`` / ``num_tokens`` (ints, after masking)
        and, when the rollout has extras, ``extras`` sliced to the micro-batch (see :func:`slice_rollout`).
        A rollout whose ``extras`` has ``tool_mask`` (one 0/1 list per completion: 1 at model-written
        tokens, 0 at tool or environment tokens; ``rollout_func`` may return it as ``env_mask``, TRL's
        name) also gets ``tool_mask`` ``(b, C)`` long, and ``num_completion_tokens`` counts the
        model-written tokens only: losses, KL and importance ratios multiply ``completion_mask`` by it.
        A rollout whose ``extras`` has ``model_inputs`` (one dict of a vision-language model's extra
        inputs per completion, e.g. from :func:`~posttrain.vision_prompt_inputs`) gets them batched as
        ``model_inputs`` (:func:`~posttrain.collate_model_inputs`; token-aligned ones such as
        ``token_type_ids`` ``(b, P + C)``, 0 on padding and completion), which :func:`completion_logps`
        passes to the model; they are not repeated in ``extras``.

    Raises:
        ValueError: ``size < 1``, or the rollout is empty.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"rollout_micro_batches: size={size!r} must be an integer >= 1 (completions per micro-batch, per_device_train_batch_size).")
    batches = []
    for start in range(0, len(rollout), size):
        sub = slice_rollout(rollout, slice(start, start + size))
        batch = sub.to_tensors(pad_token_id)  # CPU tensors, (b, P) / (b, C)
        tool_mask = _tool_mask(sub, batch["completion_ids"].shape[1])
        if tool_mask is not None:
            batch["tool_mask"] = tool_mask
        if pad_to_multiple_of:
            _pad_to_multiple(batch, pad_to_multiple_of, pad_token_id)
        if mask_truncated:
            kept = ~torch.tensor(sub.truncated, dtype=torch.bool)  # (b,)
            batch["completion_mask"] = batch["completion_mask"] * kept.unsqueeze(1).long()
        trained = batch["completion_mask"] * batch["tool_mask"] if tool_mask is not None else batch["completion_mask"]
        batch["num_completion_tokens"] = int(trained.sum())
        batch["num_tokens"] = int(batch["prompt_mask"].sum()) + batch["num_completion_tokens"]
        batch["truncated"] = torch.tensor(sub.truncated, dtype=torch.bool)
        extras = dict(sub.extras or {})
        per_sample = extras.pop("model_inputs", None)
        if per_sample is not None and any(per_sample):  # images: the model's extra inputs, batched, token-aligned ones over P + C
            width, total = batch["prompt_ids"].shape[1], batch["prompt_ids"].shape[1] + batch["completion_ids"].shape[1]
            batch["model_inputs"] = {**collate_model_inputs(per_sample),
                                     **sequence_model_inputs(per_sample, [len(p) for p in sub.prompt_ids], width, total_width=total)}
        if extras:
            batch["extras"] = extras
        batches.append(batch)
    if not batches:
        raise ValueError("rollout_micro_batches: the rollout is empty; generate at least one completion.")
    return batches


def completion_logps(model: Any, batch: dict, temperature: float, *, compute_entropy: bool = True, entropy_grad: bool = False,
                     router_aux_loss: bool = False, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Return the log-probs of a micro-batch's completion tokens at ``temperature`` (differentiable).

    One forward of ``prompt_ids + completion_ids``; logits are kept for the completion positions only.
    With ``chunk_size`` (``logprob_chunk_size``) the log-probs come from the hidden states and the LM
    head, ``chunk_size`` tokens at a time, never the ``(B, C, V)`` logits.

    Args:
        model: The model (policy or reference).
        batch: A micro-batch (``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``,
            and for a vision-language model ``model_inputs``, passed to the forward) on the model's device.
        temperature: Logits are divided by it.
        compute_entropy: Also return the per-token entropies.
        entropy_grad: Keep the entropies in the graph (an entropy bonus trains them); else detached.
        router_aux_loss: Ask a MoE model for its router load-balancing loss.
        chunk_size: See above (None: full logits).

    Returns:
        ``(logps (B, C), entropies (B, C) or None, router aux loss or None)``.
    """
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P+C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (B, P+C)
    num_completion = batch["completion_ids"].shape[1]
    extra = {"output_router_logits": True} if router_aux_loss else {}
    extra.update(batch.get("model_inputs") or {})  # a vision-language model's pixel_values, image_grid_thw, token_type_ids, ...
    outputs, states = causal_lm_states(model, chunk_size=chunk_size, input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=num_completion + 1, **extra)
    # position t of states[:, :-1] predicts completion token t
    scores = states[:, :-1].score(batch["completion_ids"], temperature=temperature, return_entropy=compute_entropy, entropy_grad=entropy_grad)
    return scores.logps, scores.entropy, (getattr(outputs, "aux_loss", None) if router_aux_loss else None)  # (B, C), (B, C) or None


def reference_logps(model: Any, batch: dict, temperature: float, *, ref_model: Any = None, accelerator: Any = None, chunk_size: int | None = None) -> torch.Tensor:
    """Return the reference model's completion log-probs ``(B, C)`` (no grad is taken by the caller's context).

    Args:
        model: The policy: with ``ref_model=None`` (PEFT), its adapter-disabled base is the reference.
        batch: A micro-batch on the model's device.
        temperature: As in :func:`completion_logps`.
        ref_model: The frozen reference model, or None.
        accelerator: The loop's accelerator (unwraps the PEFT model).
        chunk_size: As in :func:`completion_logps`.

    Returns:
        ``(B, C)`` log-probs.
    """
    if ref_model is not None:
        return completion_logps(ref_model, batch, temperature, compute_entropy=False, chunk_size=chunk_size)[0]
    with adapter_disabled(model, accelerator):  # PEFT: the base model is the reference
        return completion_logps(model, batch, temperature, compute_entropy=False, chunk_size=chunk_size)[0]


def sampler_is_old_policy(sampling: dict, temperature: float, samples_from_policy: bool) -> bool:
    """Return whether the sampler's log-probs ARE the policy's at generation time (pi_old), so no forward is needed.

    True when the sampler is the trained model itself and samples unfiltered: the trained
    ``temperature``, no top-k / top-p / min-p / repetition penalty (its sampling log-probs then equal a
    forward pass to ~1e-6, tests/test_rollout.py).

    Args:
        sampling: :func:`sampling_from_config`'s parameters.
        temperature: The temperature the loss uses.
        samples_from_policy: The engine samples from the trained model (and no ``rollout_func`` does).
    """
    s = sampling
    return bool(
        samples_from_policy and s["temperature"] == temperature and not s["top_k"] and s["top_p"] == 1.0
        and not s["min_p"] and s["repetition_penalty"] == 1.0
    )


@torch.no_grad()
def add_old_and_ref_logps(batch: dict, sampling_logps: torch.Tensor, *, model: Any, temperature: float, need_old: bool, need_ref: bool = False,
                          ref_model: Any = None, old_from_sampler: bool = False, device: Any = None, accelerator: Any = None,
                          chunk_size: int | None = None) -> dict:
    """Add (in place) ``old_per_token_logps`` and ``ref_per_token_logps`` ``(b, C)`` float32 CPU tensors to a micro-batch.

    Args:
        batch: A :func:`rollout_micro_batches` micro-batch (CPU).
        sampling_logps: Its ``sampling_logprobs`` ``(b, C)``.
        model: The policy (pi_old is its no-grad forward at generation time).
        temperature: As in :func:`completion_logps`.
        need_old: Add pi_old (the ratio's denominator; or a KL penalty's sample).
        need_ref: Add the reference's log-probs (:func:`reference_logps`).
        ref_model: The reference model, or None (PEFT: the adapter-disabled policy).
        old_from_sampler: :func:`sampler_is_old_policy`: pi_old is ``sampling_logps``, no forward runs.
        device: Where the forwards run (default: the model's first parameter's device).
        accelerator: The loop's accelerator.
        chunk_size: As in :func:`completion_logps`.

    Returns:
        ``batch``.
    """
    device = device if device is not None else next(model.parameters()).device
    on_device = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if batch.get("model_inputs"):  # a vision-language model's pixel_values, ...: pi_old and the reference see the images too
        on_device["model_inputs"] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch["model_inputs"].items()}
    if need_old and old_from_sampler:
        batch["old_per_token_logps"] = sampling_logps.float()  # (b, C)
    elif need_old:  # policy log-probs at generation time (ratio denominator)
        old, _, _ = completion_logps(model, on_device, temperature, compute_entropy=False, chunk_size=chunk_size)
        batch["old_per_token_logps"] = old.float().cpu()
    if need_ref:
        batch["ref_per_token_logps"] = reference_logps(model, on_device, temperature, ref_model=ref_model, accelerator=accelerator, chunk_size=chunk_size).float().cpu()
    return batch


# ----------------------------------------------------------------------------- one step: metrics
def reward_and_length_metrics(rollout: RolloutBatch, rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, reward_func_names: Sequence[str],
                              is_std_zero: torch.Tensor, num_generations: int) -> dict[str, float]:
    """Return TRL's reward and completion-length metrics of one rollout (this process's rows).

    Args:
        rollout: The rollout.
        rewards_per_func: ``(N, F)`` rewards, NaN where a function returned None.
        reward_weights: ``(F,)``.
        reward_func_names: ``F`` names (``rewards/<name>/mean`` / ``std``).
        is_std_zero: Whether each row's (or group's) reward std is zero (``frac_reward_zero_std``).
        num_generations: G (``reward_std`` is the mean std within groups).

    Returns:
        ``reward``, ``reward_std``, ``frac_reward_zero_std``, ``completions/{mean,min,max}_length``,
        ``completions/clipped_ratio``, ``completions/{mean,min,max}_terminated_length`` and per function
        ``rewards/<name>/mean`` / ``std`` (unscorable rows are left out). With tool-calling episodes
        (:class:`~posttrain.ToolCallingRollout`) lengths count model-written tokens, and
        ``tools/call_frequency`` (calls per completion), ``tools/failure_frequency`` (failed / all
        calls), ``tools/mean_turns`` (model turns per episode) and ``tools/turn_limit_ratio``
        (episodes cut by ``max_tool_calling_iterations``) are added.
    """
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
    rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable rows are not logged
    tool_mask = rollout.extras.get("tool_mask")
    if tool_mask is not None:  # tool-calling episodes: the model-written tokens only, as TRL counts them
        lengths = torch.tensor([float(sum(m)) for m in tool_mask], dtype=torch.float32)  # (N,)
    else:
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
    for j, name in enumerate(reward_func_names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, j]).item()
        metrics[f"rewards/{name}/std"] = nanstd(rewards_per_func[:, j]).item()
    if "tool_call_count" in rollout.extras:  # ToolCallingRollout's episodes
        calls, failures = sum(rollout.extras["tool_call_count"]), sum(rollout.extras["tool_failure_count"])
        turns = rollout.extras["turns"]
        metrics["tools/call_frequency"] = calls / len(rollout)  # TRL's: tool calls per completion
        metrics["tools/failure_frequency"] = failures / calls if calls else 0.0
        metrics["tools/mean_turns"] = sum(turns) / len(turns)
        metrics["tools/turn_limit_ratio"] = sum(r == "max_turns" for r in rollout.extras["stop_reason"]) / len(rollout)
    return metrics


def attach_rollout_metrics(micro_batches: list[dict], metrics: dict[str, float]) -> None:
    """Attach a rollout's metrics to each of its micro-batches (the loss returns them; the loop averages them per step).

    Non-finite values become NaN (the loop's logging skips them).

    Args:
        micro_batches: The step's micro-batches (changed in place: ``rollout_metric_names`` / ``rollout_metric_values``).
        metrics: Name -> float.
    """
    metrics = {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}
    names, values = list(metrics), torch.tensor(list(metrics.values()), dtype=torch.float32)
    for batch in micro_batches:
        batch["rollout_metric_names"], batch["rollout_metric_values"] = names, values


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_online(model: Any, batches: Any, *, produce: Callable[[list, int], list[dict]], compute_loss: Callable, count_items: Callable[[dict], int],
                    loop: Any, seed: int) -> dict[str, float]:
    """Return the eval loss and metrics of an online method: each eval batch rolled out, scored and its loss computed.

    Every number is a completion-weighted mean over the batches of all processes.

    Args:
        model: The policy.
        batches: The loop's eval batches (``{"rows": [...]}``, the method's ``collate``).
        produce: ``produce(rows, seed) -> micro-batches`` in eval mode (batch ``i`` gets ``seed + i``).
        compute_loss: The method's ``compute_loss(model, batch, num_items) -> (loss, metrics)``.
        count_items: The method's ``count_items(batch)``.
        loop: The :class:`~posttrain.TrainingLoop` (device, processes).
        seed: The eval seed (``args.seed``).

    Returns:
        Metric name -> mean (names without a finite value anywhere are left out).
    """
    sums: dict[str, float] = defaultdict(float)
    weight = 0.0
    for i, batch in enumerate(batches):
        for micro in produce(batch["rows"], seed + i):
            n = micro["completion_ids"].shape[0]
            on_device = loop.to_device(micro)
            items = torch.tensor(float(max(1, count_items(micro))), device=loop.device)
            loss, metrics = compute_loss(model, on_device, items)
            for key, value in {"loss": loss, **metrics}.items():
                value = float(value)
                if math.isfinite(value):
                    sums[key] += value * n
                    sums[f"{key}\0weight"] += n
            weight += n
    parts = [(dict(sums), weight)]
    if loop.accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object(parts)
    totals: dict[str, float] = defaultdict(float)
    for part, _ in parts:
        for key, value in part.items():
            totals[key] += value
    return {key: totals[key] / totals[f"{key}\0weight"] for key in totals if not key.endswith("\0weight") and totals[f"{key}\0weight"]}


# ----------------------------------------------------------------------------- the completions log
class CompletionLog:
    """TRL's completions log of an online trainer: the latest rollout's prompts, completions, rewards and advantages.

    ``logs`` has TRL's ``_logs`` shape (a trainer exposes it as ``self._logs``): deques of the last
    ``size`` completions under ``prompt``, ``completion``, ``advantages``, ``images``, and dicts of
    deques under ``rewards`` (per reward function) and ``extra`` (per ``log_extra`` column). Reward
    functions write through :meth:`log_extra` / :meth:`log_metric`; :meth:`write` saves
    ``<output_dir>/completions/completions_<step>.parquet`` and prints a rich table.

    Args:
        size: Completions kept (one rollout: ``per_device_train_batch_size * gradient_accumulation_steps``).
    """

    def __init__(self, size: int):
        self.logs: dict[str, Any] = {
            "images": deque(maxlen=size), "prompt": deque(maxlen=size), "completion": deque(maxlen=size),
            "rewards": defaultdict(lambda: deque(maxlen=size)), "advantages": deque(maxlen=size),
            "extra": defaultdict(lambda: deque(maxlen=size)),
        }
        self.pending_extra: dict[str, list] = defaultdict(list)
        self.pending_metrics: dict[str, list] = defaultdict(list)

    def log_extra(self, column: str, values: list) -> None:
        """``log_extra(column, values)`` of a reward function: one value per completion, shown with ``log_completions``."""
        self.pending_extra[column].extend(values)

    def log_metric(self, name: str, value: float) -> None:
        """``log_metric(name, value)`` of a reward function: a scalar averaged into this step's logged metrics."""
        self.pending_metrics[name].append(float(value))

    def pop_metrics(self) -> dict[str, float]:
        """Return the mean of each metric logged since the last call, and forget them."""
        metrics = {name: sum(values) / len(values) for name, values in self.pending_metrics.items()}
        self.pending_metrics.clear()
        return metrics

    def discard_extra(self) -> None:
        """Forget the pending ``log_extra`` columns (an eval rollout's: the log shows training rollouts only)."""
        self.pending_extra.clear()

    def record(self, prompts: list, completions: list[str], rewards_per_func: torch.Tensor, reward_func_names: Sequence[str], advantages: torch.Tensor) -> None:
        """Append one training rollout (and the pending ``log_extra`` columns) to the log.

        Args:
            prompts: ``N`` prompts.
            completions: ``N`` decoded completions.
            rewards_per_func: ``(N, F)``.
            reward_func_names: ``F`` names.
            advantages: ``(N,)``.
        """
        self.logs["prompt"].extend(prompts)
        self.logs["completion"].extend(completions)
        for j, name in enumerate(reward_func_names):
            self.logs["rewards"][name].extend(rewards_per_func[:, j].tolist())
        self.logs["advantages"].extend(advantages.tolist())
        for column, values in self.pending_extra.items():
            self.logs["extra"][column].extend(values)
        self.pending_extra.clear()

    def write(self, step: int, output_dir: str, *, unique_prompts: bool = False, num_to_print: int | None = None, show: bool = True) -> str | None:
        """Write the log to ``<output_dir>/completions/completions_<step:05d>.parquet`` and print a sample with rich (if installed).

        Args:
            step: The global step (a column, and the file name).
            output_dir: The run directory.
            unique_prompts: Keep one row per distinct prompt (``log_unique_prompts``).
            num_to_print: Rows printed (None: all; ``num_completions_to_print``).
            show: Print the table.

        Returns:
            The parquet path, or None when the log is empty.
        """
        if not self.logs["prompt"]:
            return None
        import pandas as pd

        n = len(self.logs["prompt"])
        table = {"step": [step] * n, "prompt": [str(p) for p in self.logs["prompt"]], "completion": list(self.logs["completion"])}
        table.update({name: list(values) for name, values in self.logs["rewards"].items()})
        table.update({name: list(values)[-n:] + [None] * (n - len(values)) for name, values in self.logs["extra"].items()})
        table["advantage"] = list(self.logs["advantages"])
        frame = pd.DataFrame(table)
        if unique_prompts:
            frame = frame[~frame["prompt"].duplicated()]
        directory = os.path.join(output_dir, "completions")
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"completions_{step:05d}.parquet")
        frame.to_parquet(path)
        if show:
            _print_table(frame if num_to_print is None else frame.head(num_to_print), step)
        return path

    def callback(self, args: Any, loop: Any) -> Any:
        """Return a ``TrainerCallback`` writing the log at each training log when ``args.log_completions`` (TRL does it in ``log()``).

        Args:
            args: The config (reads ``log_completions``, ``output_dir``, ``log_unique_prompts``,
                ``num_completions_to_print`` at each log).
            loop: The training loop (only its main process writes).
        """
        from transformers import TrainerCallback

        log = self

        class _WriteCompletions(TrainerCallback):
            def on_log(self, _args, state, control, logs=None, **kwargs):
                logs = logs if logs is not None else {}
                if "loss" in logs and "train_runtime" not in logs and not any(k.startswith("eval_") for k in logs):
                    if args.log_completions and loop.is_main_process:
                        log.write(state.global_step, args.output_dir, unique_prompts=args.log_unique_prompts, num_to_print=args.num_completions_to_print)

        return _WriteCompletions()


def _print_table(frame: Any, step: int) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich is optional: the parquet file is the record
        return
    view = Table(title=f"step {step}", show_lines=True)
    for column in frame.columns[1:]:
        view.add_column(str(column))
    for _, row in frame.iterrows():
        view.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in list(row)[1:]])
    Console().print(view)
