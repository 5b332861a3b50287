"""The loop's optimizers and schedules: the policy's, and those of trainable models beside it (a PPO critic).

:class:`_Optimization` is a mixin of :class:`posttrain.TrainingLoop`: ``_build_optimizer`` (weight-decay
groups, ``optim`` / ``optim_args``, fused AdamW), ``_build_scheduler``, and the trainable auxiliary
models (``add_trainable_model``, ``trainable_model``, ``_prepare_auxiliaries``), each an
:class:`_Auxiliary` with its own optimizer and schedule. Their backward and step are parts of
``train()`` (``posttrain/_loop.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from posttrain.config import ConfigError


class _Optimization:
    """Optimizers and schedules of a :class:`posttrain.TrainingLoop` (reads ``self.args``, ``self.accelerator``, ``self._auxiliaries``)."""

    # ------------------------------------------------------------------ optimizer
    def _build_optimizer(self, model):
        args = self.args
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            shape = getattr(param, "ds_shape", param.shape)  # under ZeRO-3 zero.Init a parameter is a 1-D placeholder
            (no_decay if len(shape) < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(param)
        # an empty group would be dropped by ZeRO-3 while the schedule was built on two groups
        groups = [g for g in ({"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if not decay and not no_decay:
            raise ConfigError("the model has no trainable parameters: check peft_config / requires_grad.")
        # The fused kernel updates every parameter in one call (what transformers' Trainer uses by
        # default). torch's default for CPU tensors is a Python loop of ~10 small ops per parameter,
        # which dominates the step of small models (bench: 0.3 ms fused vs 1.8 ms looped for a 50-tensor
        # 0.2M-param model on 2 idle cores; 100x worse when the cores are shared). DeepSpeed brings its own.
        params = [p for g in groups for p in g["params"]]
        if self._optimizer_cls_and_kwargs is not None:
            cls, kwargs = self._optimizer_cls_and_kwargs
            return cls(groups, **{"lr": args.learning_rate, **kwargs})
        extra = _parse_optim_args(args.optim_args)
        if args.optim == "sgd":
            return torch.optim.SGD(groups, lr=args.learning_rate, **extra)
        if args.optim == "adagrad":
            return torch.optim.Adagrad(groups, lr=args.learning_rate, **extra)
        fused = args.optim == "adamw_torch_fused" and not self.is_deepspeed
        fused = fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon, fused=fused or None, **extra)

    def _build_scheduler(self, optimizer, max_steps: int):
        from transformers import get_scheduler

        warmup = self.args.warmup_steps or math.ceil(self.args.warmup_ratio * max_steps)
        return get_scheduler(self.args.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps,
                             scheduler_specific_kwargs=self.args.lr_scheduler_kwargs or None)

    def add_trainable_model(self, name: str, model, *, learning_rate: float | None = None, weight_decay: float | None = None) -> None:
        """Train ``model`` beside the policy with its own optimizer and learning-rate schedule (a PPO critic, ...).

        Call before ``train()``. The model gets the run's optimizer settings (``optim``, betas, epsilon,
        ``lr_scheduler_type``, warm-up, ``max_grad_norm``) with its own ``learning_rate`` /
        ``weight_decay`` when given; it is prepared by the run's backend (DDP, DeepSpeed, FSDP2) like the
        policy, checkpointed with its optimizer and schedule (``checkpoint-N/<name>/`` holds its weights,
        loadable with ``from_pretrained``; the final weights go to ``output_dir/<name>/``) and resumed exactly.

        The method's ``compute_loss`` then returns its loss as a dict, one entry per trained model:
        ``{"model": policy_loss, name: auxiliary_loss, ...}`` (each normalized like the policy's loss), and
        reaches the prepared model with :meth:`trainable_model`. Each loss must depend only on its own
        model's parameters (each is back-propagated through its own backend engine); the logged ``loss`` is
        the policy's.

        Args:
            name: A name for files and metrics (letters, digits, ``_``; not ``"model"``).
            model: The module to train (e.g. ``load_pretrained(..., role="critic")``).
            learning_rate: Its learning rate (default ``args.learning_rate``).
            weight_decay: Its weight decay (default ``args.weight_decay``).

        Raises:
            ConfigError: a bad or repeated name, a call after training started, or a model without trainable parameters.
        """
        import re

        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name) or name == "model":
            raise ConfigError(f"add_trainable_model: name {name!r} is invalid: use letters, digits and '_' (not 'model', the policy's name).")
        if name in self._auxiliaries:
            raise ConfigError(f"add_trainable_model: a model named {name!r} is already trained beside the policy; pick another name.")
        if self.optimizer is not None:
            raise ConfigError(f"add_trainable_model({name!r}) after training started: add trainable models before calling train().")
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"add_trainable_model({name!r}): the model has no trainable parameters (requires_grad is False everywhere).")
        self._auxiliaries[name] = _Auxiliary(name=name, model=model, learning_rate=learning_rate, weight_decay=weight_decay)

    def add_policy_module(self, name: str, module) -> None:
        """Train ``module`` as part of the policy (a PPO value head on the policy's hidden states, ...).

        Call before ``train()``. The module becomes a submodule ``name`` of the policy, so it shares the
        policy's optimizer, learning-rate schedule, gradient clipping and backend wrapping (DDP,
        DeepSpeed ZeRO-1/2), and its loss may flow into the policy's trunk (unlike
        :meth:`add_trainable_model`, whose model has its own optimizer). It is **saved beside** the policy:
        ``<directory>/<name>.safetensors`` next to the policy's own ``model.safetensors`` (which keeps
        only the policy's weights, so ``from_pretrained`` loads it without unexpected keys), in every
        checkpoint and in ``output_dir``, and restored on resume. Reach it with :meth:`policy_module`.

        Args:
            name: A name for the file and the submodule (letters, digits, ``_``).
            module: A ``torch.nn.Module`` with trainable parameters, on the policy's device and dtype.

        Raises:
            ConfigError: a bad or repeated name, a call after training started, a module without
                trainable parameters, or a backend that shards parameters (FSDP, DeepSpeed ZeRO-3:
                their forward gathers only the policy's own parameters).
        """
        import re

        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
            raise ConfigError(f"add_policy_module: name {name!r} is invalid: use letters, digits and '_'.")
        if name in self._policy_modules or hasattr(self.unwrapped_model(), name):
            raise ConfigError(f"add_policy_module: the policy already has an attribute {name!r}; pick another name.")
        if self.optimizer is not None:
            raise ConfigError(f"add_policy_module({name!r}) after training started: add policy modules before calling train().")
        if not any(p.requires_grad for p in module.parameters()):
            raise ConfigError(f"add_policy_module({name!r}): the module has no trainable parameters (requires_grad is False everywhere).")
        if self._is_fsdp2() or getattr(self.accelerator, "is_fsdp2", False) or self._zero_stage() == 3 or getattr(self.accelerator, "distributed_type", None) == "FSDP":
            raise ConfigError(f"add_policy_module({name!r}) under FSDP / DeepSpeed ZeRO-3 is not supported: their forward gathers only the "
                              "policy's own parameters; train the module as its own model (add_trainable_model), or use DDP / ZeRO-1/2.")
        self.unwrapped_model().add_module(name, module)
        self._policy_modules[name] = module

    def policy_module(self, name: str):
        """The module ``name`` added with :meth:`add_policy_module` (call it on the policy's hidden states).

        Raises:
            KeyError: no policy module has that name (the message lists them).
        """
        if name not in self._policy_modules:
            raise KeyError(f"no policy module named {name!r}; added: {sorted(self._policy_modules) or 'none'} (see add_policy_module).")
        return self._policy_modules[name]

    def trainable_model(self, name: str):
        """The prepared (possibly wrapped) trainable model ``name`` added with :meth:`add_trainable_model`; call it for forwards.

        Raises:
            KeyError: no trainable model has that name (the message lists them).
        """
        if name not in self._auxiliaries:
            raise KeyError(f"no trainable model named {name!r}; added: {sorted(self._auxiliaries) or 'none'} (see add_trainable_model).")
        return self._auxiliaries[name].model

    @property
    def trainable_model_names(self) -> list[str]:
        """Names of the trainable models beside the policy, in the order they were added."""
        return list(self._auxiliaries)

    def _prepare_auxiliaries(self, max_steps: int) -> None:
        """Build each auxiliary's optimizer and schedule and prepare both with the run's backend (after the policy)."""
        args = self.args
        for aux in self._auxiliaries.values():
            saved = (args.learning_rate, args.weight_decay)
            try:  # the run's optimizer recipe with this model's own rates
                args.learning_rate = aux.learning_rate if aux.learning_rate is not None else saved[0]
                args.weight_decay = aux.weight_decay if aux.weight_decay is not None else saved[1]
                optimizer = self._build_optimizer(aux.model)
                aux.scheduler = self._build_scheduler(optimizer, max_steps)
            finally:
                args.learning_rate, args.weight_decay = saved
            aux.model, aux.optimizer = self.accelerator.prepare(aux.model, optimizer)
            aux.model.train()


@dataclass
class _Auxiliary:
    """A trainable model beside the policy (:meth:`TrainingLoop.add_trainable_model`)."""

    name: str
    model: Any
    learning_rate: float | None = None
    weight_decay: float | None = None
    optimizer: Any = None
    scheduler: Any = None
    window_losses: list = field(default_factory=list)


def _parse_optim_args(text: str | None) -> dict:
    """Parse ``optim_args`` ('momentum=0.9,nesterov=True') into keyword arguments."""
    out: dict = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, _, value = item.partition("=")
        try:
            out[key.strip()] = json.loads(value.strip().lower() if value.strip() in ("True", "False") else value.strip())
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out
