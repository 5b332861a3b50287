"""Plumbing every method needs, as plain public functions (*contract*, plugin API 1.1).

Method logic (losses, advantages, batch orchestration) stays in each plugin; these are the blocks
that were being re-written per plugin and had started to disagree:

* :func:`build_reference_model`: the frozen reference (one dtype rule, PEFT adapter-disabled
  reference, ``ref_model=`` passed in as an object or a path);
* :func:`disable_dropout`, :func:`is_peft_model`, :func:`adapter_disabled`;
* :func:`common_prefix_length` / :func:`prompt_completion_boundary`: the prompt/completion token
  boundary; :func:`tokenize_prompt`: prompt tokenization for online methods;
* :func:`load_reward_model` and :func:`build_reward_functions`: reward models and functions;
* :func:`gather_across_processes`: the cross-process gather of rollout statistics.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch
import torch.nn as nn

from posttrain._models import load_pretrained
from posttrain.config import ConfigError

__all__ = [
    "build_reference_model",
    "disable_dropout",
    "is_peft_model",
    "adapter_disabled",
    "common_prefix_length",
    "prompt_completion_boundary",
    "tokenize_prompt",
    "load_reward_model",
    "build_reward_functions",
    "gather_across_processes",
    "resolve_dtype",
    "sync_reference_model",
]


# ----------------------------------------------------------------------------------------- models
def is_peft_model(model: Any) -> bool:
    """Return whether ``model`` is a ``peft.PeftModel`` (False when peft is not installed)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a core dependency
        return False
    return isinstance(model, PeftModel)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability in ``model`` to 0 (in place) and return ``model``.

    That is each ``nn.Dropout`` module, and the functional dropout a module reads from a float
    attribute (``T5Attention.dropout``, ``Qwen2Attention.attention_dropout``), which no
    ``nn.Dropout`` module controls.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
            continue
        for name in ("dropout", "attention_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def adapter_disabled(model: Any, accelerator: Any = None) -> contextlib.AbstractContextManager:
    """Return a context in which the PEFT ``model`` (possibly wrapped) runs as its base model.

    Args:
        model: The policy (a ``PeftModel``, or one wrapped by DDP/DeepSpeed when ``accelerator`` is given).
        accelerator: Used to unwrap ``model``.

    Raises:
        ValueError: the model is not a PEFT model (there is no adapter to disable).
    """
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else model
    if not is_peft_model(unwrapped):
        raise ValueError(f"adapter_disabled: {type(unwrapped).__name__} is not a peft.PeftModel, so it has no adapter to disable.")
    return unwrapped.disable_adapter()


def resolve_dtype(value: Any, default: torch.dtype | None = None) -> torch.dtype | str | None:
    """Return a ``torch.dtype`` for ``value`` (a dtype, a name such as ``"bfloat16"``, ``"auto"`` or None -> ``default``)."""
    if value is None:
        return default
    if isinstance(value, torch.dtype) or value == "auto":
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise ConfigError(f"dtype={value!r} is not a torch dtype: use e.g. 'float32', 'bfloat16', 'float16' or 'auto'.")


def build_reference_model(
    model: nn.Module, ref_model: Any = None, *, loop: Any, model_init_kwargs: dict | None = None, disable_dropout_in_ref: bool = True,
    needed: bool = True, auto_class: Any = None,
) -> nn.Module | None:
    """Return the frozen reference model of ``model``, or None when the adapter-disabled policy serves.

    One rule for every method:

    * ``ref_model`` given as an object: used as it is (it must not be ``model`` itself);
    * ``ref_model`` given as a Hub id or directory: loaded by :func:`posttrain.load_pretrained`
      (``role="reference"``) with ``model_init_kwargs``, in their ``dtype`` when they name one,
      else in the policy's dtype;
    * no ``ref_model`` and a PEFT policy: None; score the reference inside :func:`adapter_disabled`;
    * no ``ref_model`` otherwise: a deep copy of the initial policy.

    The result is in eval mode, has ``requires_grad=False``, no dropout (``disable_dropout_in_ref``)
    and sits on the training device (``loop.prepare_frozen``).

    Args:
        model: The policy, after PEFT wrapping.
        ref_model: None, a model object, or a Hub id / local directory.
        loop: The :class:`posttrain.TrainingLoop` (device placement).
        model_init_kwargs: ``from_pretrained`` keyword arguments for a reference given by name.
        disable_dropout_in_ref: Set the reference's dropout probabilities to 0.
        needed: False when the method will not use a reference (``beta == 0``, precomputed
            log-probs): then no copy is made and None is returned, unless ``ref_model`` was given.
        auto_class: transformers auto class for a reference given by name (default ``AutoModelForCausalLM``).

    Raises:
        ConfigError: ``ref_model is model``; a reference given by name that cannot be loaded, or a bad
            dtype in ``model_init_kwargs`` (see :func:`posttrain.load_pretrained`).
    """
    if ref_model is not None and ref_model is model:
        raise ConfigError("model and ref_model are the same object: omit ref_model (a frozen copy of the policy is made) or pass a separate model.")
    if isinstance(ref_model, (str, os.PathLike)):
        ref_model, _ = load_pretrained(
            ref_model, role="reference", auto_class=auto_class, model_init_kwargs=model_init_kwargs,
            trust_remote_code=getattr(loop.args, "trust_remote_code", False), default_dtype=_floating_dtype(model), load_tokenizer=False,
        )
    if ref_model is None:
        if not needed or is_peft_model(model):
            return None
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            ref_model = _reload_partitioned(model, loop, model_init_kwargs, auto_class)
        else:
            ref_model = copy.deepcopy(model)  # eval mode below, so gradient checkpointing never runs in it
    if disable_dropout_in_ref:
        disable_dropout(ref_model)
    return loop.prepare_frozen(ref_model)


def _reload_partitioned(model: nn.Module, loop: Any, model_init_kwargs: dict | None, auto_class: Any) -> nn.Module:
    """The reference of a policy that DeepSpeed ZeRO-3 partitioned while loading (``zero.Init``): a copy would hold
    empty shards, so the reference is loaded again from the policy's path (partitioned the same way)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise ConfigError(
            "under DeepSpeed ZeRO-3 the policy's parameters are partitioned, so no copy of it can serve as the reference, and it "
            "has no _name_or_path to load one from: pass ref_model=<Hub id or directory> (the initial policy's weights)."
        )
    reference, _ = load_pretrained(
        name, role="reference", auto_class=auto_class, model_init_kwargs=model_init_kwargs,
        trust_remote_code=getattr(loop.args, "trust_remote_code", False), default_dtype=_floating_dtype(model), load_tokenizer=False,
    )
    return reference


def _floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter (float32 when it has none)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def sync_reference_model(ref_model: nn.Module, model: nn.Module, alpha: float, *, accelerator: Any = None) -> None:
    """Move the reference toward the policy: ``ref <- alpha * policy + (1 - alpha) * ref`` (TR-DPO, Gorbatovski et al. 2024, arXiv:2404.09656).

    Parameters are matched by name; ``model`` may be wrapped (``accelerator`` unwraps it).

    Raises:
        ValueError: the two models do not have the same parameter names.
    """
    policy = dict((accelerator.unwrap_model(model) if accelerator is not None else model).named_parameters())
    reference = getattr(ref_model, "module", ref_model)  # a frozen model in its own DeepSpeed engine
    pairs = []
    for name, ref_param in reference.named_parameters():
        if name not in policy:
            raise ValueError(f"sync_reference_model: the policy has no parameter {name!r}: the reference must be a copy of the policy.")
        pairs.append((ref_param, policy[name]))
    partitioned = [p for pair in pairs for p in pair if hasattr(p, "ds_id")]
    gathered = contextlib.nullcontext()
    if partitioned:  # ZeRO-3: gather both models' shards, update, and let rank 0's result be re-partitioned
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0)
    with gathered:
        for ref_param, param in pairs:
            ref_param.mul_(1.0 - alpha).add_(param.detach().to(ref_param.device, ref_param.dtype), alpha=alpha)


# ----------------------------------------------------------------------------------------- tokens
def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Return the length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompt_completion_boundary(prompt_ids: list[int], full_ids: list[int]) -> int:
    """Return where the completion starts in ``full_ids`` (prompt + completion tokenized together).

    The boundary is the end of the prompt's tokens when they are a prefix of ``full_ids``, else
    where the two first differ (a BPE merge across the boundary, or a chat template that renders
    the prompt alone differently): never inside a token.
    """
    if full_ids[: len(prompt_ids)] == prompt_ids:
        return len(prompt_ids)
    return common_prefix_length(prompt_ids, full_ids)


def tokenize_prompt(tokenizer: Any, prompt: Any, *, chat_template_kwargs: dict | None = None, tools: Any = None) -> list[int]:
    """Return the token ids of a prompt for generation: a string as is, messages with the chat template's generation prompt.

    Raises:
        ConfigError: the prompt is neither a string nor a list of ``{"role", "content"}`` messages,
            or messages are given to a tokenizer without a chat template.
    """
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(
                "the prompt is a list of messages but the tokenizer has no chat template: set tokenizer.chat_template "
                "(or chat_template_path in the config), or give the prompt as a string."
            )
        text = tokenizer.apply_chat_template(prompt, tools=tools, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {}))
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    raise ConfigError(f"a prompt must be a string or a list of {{'role', 'content'}} messages; got {type(prompt).__name__} {str(prompt)[:80]!r}.")


# ----------------------------------------------------------------------------------------- rewards
def load_reward_model(spec: Any, tokenizer: Any = None, *, loop: Any, model_init_kwargs: dict | None = None):
    """Return a :class:`posttrain.rewards.RewardModelFunction` for a reward model given as an object or a path.

    The model and its tokenizer are loaded by :func:`posttrain.load_pretrained` with
    ``role="reward"`` (``AutoModelForSequenceClassification``, ``num_labels=1``, float32 unless
    ``model_init_kwargs`` names a dtype, the tokenizer at the model's revision).

    Args:
        spec: A sequence-classification ``PreTrainedModel``, or a Hub id / local directory of one.
        tokenizer: Its tokenizer (default: loaded from the model's path; a missing pad token is set to EOS).
        loop: The :class:`posttrain.TrainingLoop` (the model is frozen and placed on its device;
            ``loop.args.trust_remote_code`` applies).
        model_init_kwargs: ``from_pretrained`` keyword arguments for a model given by name.

    Returns:
        A :class:`posttrain.rewards.RewardModelFunction` (the model's ``config.pad_token_id`` set
        from the tokenizer when it had none).

    Raises:
        ConfigError: the model or its tokenizer cannot be loaded, or a bad dtype (see
            :func:`posttrain.load_pretrained`).
    """
    from posttrain.rewards import RewardModelFunction

    model, tokenizer = load_pretrained(
        spec, role="reward", model_init_kwargs=model_init_kwargs, trust_remote_code=getattr(loop.args, "trust_remote_code", False), tokenizer=tokenizer,
    )
    return RewardModelFunction(loop.prepare_frozen(model), tokenizer)


def _looks_like_model_path(spec: Any) -> bool:
    return isinstance(spec, str) and (os.path.isdir(spec) or ("/" in spec and ":" not in spec and not spec.endswith(".py")))


def build_reward_functions(reward_funcs: Any, reward_processing_classes: Any = None, *, loop: Any, model_init_kwargs: dict | None = None) -> list[tuple[str, Any]]:
    """Return ``[(name, callable)]`` for a reward spec or a list of them, loading reward models.

    Each entry may be a callable (TRL's convention), a registered name (``"accuracy"``), a
    ``"module:function"`` path, a reward-model object, or a reward model's Hub id / directory.
    ``reward_processing_classes`` gives the tokenizers of reward models (one per entry, or one for all).

    Raises:
        ConfigError: no reward functions were given, or the tokenizer list has the wrong length.
    """
    from posttrain.rewards import resolve_reward_functions

    if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
        raise ConfigError("this method needs reward functions: pass reward_funcs=[...] to the trainer or set reward_funcs in the config (CLI: --reward_funcs accuracy my_module:my_fn).")
    specs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if isinstance(reward_processing_classes, (list, tuple)):
        tokenizers = list(reward_processing_classes)
        if len(tokenizers) != len(specs):
            raise ConfigError(f"reward_processing_classes has {len(tokenizers)} entries for {len(specs)} reward functions: give one per reward function (None for non-models).")
    else:
        tokenizers = [reward_processing_classes] * len(specs)
    resolved = []
    for spec, tokenizer in zip(specs, tokenizers):
        if _looks_like_model_path(spec) or isinstance(spec, nn.Module):
            spec = load_reward_model(spec, tokenizer, loop=loop, model_init_kwargs=model_init_kwargs)
        resolved.append(spec)
    return resolve_reward_functions(resolved)


# ----------------------------------------------------------------------------------------- processes
def gather_across_processes(accelerator: Any, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], slice]:
    """Return every process's rows of ``tensors`` (concatenated in rank order, on the CPU) and this process's slice of them.

    Every process must call it with the same number of rows. Batch-level statistics (e.g.
    ``scale_rewards="batch"``) are then taken over the global batch; a group that never straddles
    processes keeps its per-group statistics.
    """
    n = tensors[0].shape[0]
    if accelerator.num_processes == 1:
        return list(tensors), slice(0, n)
    gathered = [accelerator.gather(t.to(accelerator.device)).cpu() for t in tensors]  # (world * n, ...)
    start = accelerator.process_index * n
    return gathered, slice(start, start + n)

