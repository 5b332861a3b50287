"""The loop's model I/O: loading the policy, placing frozen models, saving and loading weights, the Hub upload.

:class:`_ModelIO` is a mixin of :class:`posttrain.TrainingLoop`: ``load_model`` (by name, PEFT,
gradient checkpointing, Liger, NEFTune), ``prepare_frozen`` (sharded like the policy),
``save_model`` / ``load_model_weights`` (full weights under FSDP2 and ZeRO-3 too, with the trainable
auxiliaries beside them) and ``push_to_hub``. The module functions need no loop.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch

from posttrain._accelerator_setup import _backend_is_plain, _nothing_to_unwrap
from posttrain._errors import CheckpointError, CheckpointNotFoundError
from posttrain.config import ConfigError, TrainingConfig


class _ModelIO:
    """Model loading, placement, saving and loading of a :class:`posttrain.TrainingLoop` (reads ``self.args``, ``self.accelerator``, ``self.model``)."""

    def load_model(self, model, *, processing_class=None, peft_config=None, auto_class=None, before_peft=None, quantization_config=None):
        """Return ``(model, processing_class)``: load by name if needed, apply PEFT and gradient checkpointing.

        Loading follows :func:`posttrain.load_pretrained` (``role="policy"``): its dtype, revision,
        ``trust_remote_code`` (``args.trust_remote_code``) and pad-token rules.

        Args:
            model: A model object, or a Hub id / local directory (then ``args.model_init_kwargs``
                are passed to ``from_pretrained``; ``None`` falls back to ``args.model_name_or_path``).
            processing_class: Tokenizer; loaded from the model's path when None (at the
                ``revision`` of ``args.model_init_kwargs``, if it names one).
            peft_config: A ``peft.PeftConfig``; when None and ``args.use_peft``, a LoRA config is
                built from the ``lora_*`` fields.
            auto_class: The transformers auto class (default ``AutoModelForCausalLM``).
            before_peft: ``(model, tokenizer) -> (model, tokenizer)`` run before PEFT wraps the model
                (e.g. to add tokens of a new chat template and resize the embeddings).
            quantization_config: A transformers quantization config (TRL trainers' argument of that
                name) passed to ``from_pretrained`` for a model given by name (plugin API 1.3).

        Raises:
            ConfigError: no model; ``quantization_config`` with a model object, or also in
                ``args.model_init_kwargs``; a bad dtype; a model or tokenizer that cannot be loaded;
                a tokenizer without pad and eos tokens.
        """
        import transformers

        from posttrain._models import load_pretrained

        args = self.args
        model = model if model is not None else args.model_name_or_path  # auto_class None: load_pretrained's rule (causal LM, or image-text-to-text)
        if model is None:
            raise ConfigError("no model given: pass model=... to the trainer or set model_name_or_path.")
        model, processing_class = load_pretrained(
            model, role="policy", auto_class=auto_class, model_init_kwargs=args.model_init_kwargs, trust_remote_code=args.trust_remote_code,
            quantization_config=quantization_config, tokenizer=processing_class,
        )
        if before_peft is not None:  # e.g. a chat template that adds tokens: resize embeddings before adapters wrap the model
            model, processing_class = before_peft(model, processing_class)
        if peft_config is None and args.use_peft:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules=args.lora_target_modules or "all-linear",
                task_type="SEQ_CLS" if auto_class is transformers.AutoModelForSequenceClassification
                else "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM",
            )
        if peft_config is not None:
            from peft import PeftConfig, get_peft_model

            if not isinstance(peft_config, PeftConfig):  # TRL raises TypeError too
                raise TypeError(f"peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig(r=16, target_modules='all-linear')), "
                                f"got {type(peft_config).__name__}.")
            model = get_peft_model(model, peft_config)
        if args.gradient_checkpointing:
            kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 renamed it (the old name warns)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if peft_config is not None:
                model.enable_input_require_grads()
            model.config.use_cache = False
        if hasattr(model, "add_model_tags"):  # shown on the Hub model card; "trl" because TRL users filter by it
            model.add_model_tags(["posttrain", self.method_name, "trl"])
        if args.use_liger_kernel:
            _apply_liger_kernel(model, args)
        if args.neftune_noise_alpha:
            _attach_neftune(model, args.neftune_noise_alpha)
        self.processing_class = processing_class
        return model, processing_class

    def prepare_frozen(self, model):
        """Return ``model`` frozen (eval mode, no gradients) and placed by the distributed backend.

        A frozen model (reference, reward model, teacher, judge) is sharded the way the policy is, so a
        large teacher is not copied whole onto every process:

        * DeepSpeed ZeRO-3: wrapped in its own inference engine (``deepspeed.initialize`` without an
          optimizer, the run's ZeRO-3 settings): each process keeps 1/world of every partitioned
          parameter and gathers a layer's parameters only inside its forward;
        * FSDP2: ``fully_shard`` on each decoder layer and the root (the run's ``reshard_after_forward``);
        * otherwise (one process, DDP, ZeRO-1/2, which replicate parameters too): moved to the device.

        Under a sharding backend, call the returned object (its forward gathers what it needs); reading
        its parameters directly gives the local shards only.
        """
        model.eval()
        model.requires_grad_(False)
        stage = self._zero_stage()
        if stage == 3:
            return _shard_frozen_with_deepspeed(model, self.accelerator)
        if self._is_fsdp2():
            return _shard_frozen_with_fsdp2(model, self.accelerator)
        return model.to(self.device)

    # ------------------------------------------------------------------ model I/O
    def _model_is_plain(self) -> bool:
        """True when the model has no DDP/FSDP/DeepSpeed/compile wrapper to remove (see :func:`_install_fast_unwrap`)."""
        return _nothing_to_unwrap(self.accelerator, self.model)

    def unwrapped_model(self):
        return self.model if self._model_is_plain() else self.accelerator.unwrap_model(self.model)

    def save_model(self, directory: str) -> None:
        """Save the model (``save_pretrained``, safetensors) and tokenizer to ``directory`` (all processes call).

        The FULL weights are written, also when FSDP or DeepSpeed ZeRO-3 shard the parameters: every
        process takes part in gathering them and the main process writes them, so
        ``from_pretrained(directory)`` loads the model (a PEFT model: its adapter).
        """
        state_dict = None
        if not self._model_is_plain():
            if self.is_deepspeed and self.model.zero_optimization_partition_weights():
                # ZeRO-3: accelerate's get_state_dict refuses unless the DeepSpeed config sets
                # stage3_gather_16bit_weights_on_model_save; the engine's consolidation (what
                # accelerate would call) works regardless and keeps the training dtype.
                state_dict = self.model._zero3_consolidated_16bit_state_dict()
            else:
                # FSDP2: get_model_state_dict(full_state_dict, cpu_offload) -> full tensors on rank 0
                # ({} elsewhere); handing save_pretrained the sharded DTensors instead makes rank 0
                # wait in a collective the other ranks never join.
                state_dict = self.accelerator.get_state_dict(self.model)
        if self.is_main_process:
            if state_dict:  # a gathered state dict holds tied weights twice; save_pretrained of the plain model writes them once
                tied = getattr(self.unwrapped_model(), "all_tied_weights_keys", None) or {}
                state_dict = {k: v for k, v in state_dict.items() if not (k in tied and tied[k] in state_dict)}
            module_states = {}
            for name, module in self._policy_modules.items():  # add_policy_module: beside the policy, not in its files
                prefix = name + "."
                if state_dict is not None:
                    module_states[name] = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
                    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
                else:
                    module_states[name] = module.state_dict()
            with self._policy_modules_detached():
                self.unwrapped_model().save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
            if module_states:
                from safetensors.torch import save_file

                for name, tensors in module_states.items():
                    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(directory, f"{name}.safetensors"))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(directory)
        for aux in self._auxiliaries.values():  # trainable auxiliaries beside it, each in <directory>/<name>/
            self._save_auxiliary(aux, os.path.join(directory, aux.name))

    @contextlib.contextmanager
    def _policy_modules_detached(self):
        """Take the policy modules (add_policy_module) off the unwrapped policy for the duration (its save_pretrained)."""
        model, taken = self.unwrapped_model(), {}
        try:
            for name in self._policy_modules:
                taken[name] = model._modules.pop(name)
            yield
        finally:
            for name, module in taken.items():
                model._modules[name] = module

    def _policy_module_states(self, directory: str) -> dict:
        """``{name: state_dict}`` of the policy modules saved beside the policy in ``directory``."""
        from safetensors.torch import load_file

        states = {}
        for name in self._policy_modules:
            path = os.path.join(directory, f"{name}.safetensors")
            if not os.path.isfile(path):
                raise CheckpointNotFoundError(f"{directory!r} has no {name}.safetensors: the policy module {name!r} (add_policy_module) was not saved with it.")
            states[name] = load_file(path)
        return states

    def _save_auxiliary(self, aux: "_Auxiliary", directory: str) -> None:
        """Write an auxiliary's full weights to ``directory`` (``save_pretrained`` when it has it, else ``model.safetensors``)."""
        from safetensors.torch import save_file

        model = aux.model
        state_dict = None
        if self.is_deepspeed and getattr(model, "zero_optimization_partition_weights", lambda: False)():
            state_dict = model._zero3_consolidated_16bit_state_dict()
        elif self._is_fsdp2():
            state_dict = self.accelerator.get_state_dict(model)
        if not self.is_main_process:
            return
        plain = self.accelerator.unwrap_model(model)
        os.makedirs(directory, exist_ok=True)
        if hasattr(plain, "save_pretrained"):
            plain.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        else:
            tensors = state_dict if state_dict is not None else plain.state_dict()
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(directory, "model.safetensors"))

    def _load_auxiliary_weights(self, aux: "_Auxiliary", directory: str) -> None:
        """Load what :meth:`_save_auxiliary` wrote into the (unwrapped, unsharded) auxiliary, strictly."""
        from safetensors.torch import load_file

        files = sorted(f for f in os.listdir(directory) if f.startswith("model") and f.endswith(".safetensors")) if os.path.isdir(directory) else []
        if not files:
            raise CheckpointNotFoundError(f"{directory!r} holds no weights of the trainable model {aux.name!r}: was the checkpoint saved with it?")
        state_dict = {}
        for fname in files:
            state_dict.update(load_file(os.path.join(directory, fname)))
        model = self.accelerator.unwrap_model(aux.model)
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise CheckpointError(f"{directory!r} does not match the trainable model {aux.name!r}: missing={missing[:5]} unexpected={unexpected[:5]}")

    def load_model_weights(self, directory: str) -> None:
        """Load weights saved by :meth:`save_model` into the (unwrapped) model, strictly but for tied weights.

        All processes call. Sharded parameters are handled: under FSDP2 every process loads the
        full state dict into its own shards; under DeepSpeed ZeRO-3 the main process loads it into
        the gathered parameters, which are then re-partitioned. Only the model changes (DeepSpeed's
        fp32 master copies in the optimizer do not): resume goes through ``load_checkpoint``.
        """
        from safetensors.torch import load_file

        model = self.unwrapped_model()
        adapter = os.path.join(directory, "adapter_model.safetensors")
        is_adapter = os.path.isfile(adapter)
        if is_adapter:
            state_dict = load_file(adapter)
        else:
            files = sorted(f for f in os.listdir(directory) if f.startswith("model") and f.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no model*.safetensors in checkpoint {directory!r}")
            state_dict = {}
            for fname in files:
                state_dict.update(load_file(os.path.join(directory, fname)))
        if not is_adapter:
            state_dict = _as_model_keys(model, state_dict)
        module_states = self._policy_module_states(directory)
        if not is_adapter:  # the policy modules' weights, under their submodule names
            for name, tensors in module_states.items():
                state_dict.update({f"{name}.{k}": v for k, v in tensors.items()})

        def check(missing, unexpected) -> None:
            tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | set(getattr(model, "_tied_weights_keys", None) or [])
            missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
            if missing or unexpected:
                raise RuntimeError(f"checkpoint {directory!r} does not match the model: missing={missing[:5]} unexpected={unexpected[:5]}")

        def load_unsharded() -> None:
            if is_adapter:
                from peft import set_peft_model_state_dict

                set_peft_model_state_dict(model, state_dict)
                for name, tensors in module_states.items():
                    self._policy_modules[name].load_state_dict(tensors, strict=True)
                return
            check(*model.load_state_dict(state_dict, strict=False))
            if hasattr(model, "tie_weights"):
                model.tie_weights()

        if getattr(self.accelerator, "is_fsdp2", False):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            from torch.distributed.fsdp import FSDPModule

            # the root module keeps its parameters unsharded after a forward without backward (an
            # evaluation: reshard_after_forward is off for the root); copying full tensors then
            # fails with "got mixed torch.Tensor and DTensor", so shard everything first.
            for module in model.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
            if is_adapter:  # PEFT files name the weights without the adapter name: map them back
                suffix = f".{model.active_adapter}"
                names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
                by_saved_name = {n.replace(suffix, ""): n for n in names if suffix in n}
                unknown = [k for k in state_dict if k not in by_saved_name]
                if unknown:
                    raise RuntimeError(f"adapter in {directory!r} does not match the model: unexpected={unknown[:5]}")
                state_dict = {by_saved_name[k]: v for k, v in state_dict.items()}
            result = set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True, strict=False))
            if not is_adapter:
                check(result.missing_keys, result.unexpected_keys)
        elif self.is_deepspeed and self.model.zero_optimization_partition_weights():
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                if self.is_main_process:
                    load_unsharded()
        else:
            load_unsharded()
        if _backend_is_plain(self.accelerator):  # DeepSpeed / FSDP restore the auxiliaries with their engines' own state
            for aux in self._auxiliaries.values():
                self._load_auxiliary_weights(aux, os.path.join(directory, aux.name))

    def push_to_hub(self, commit_message: str = "End of training", blocking: bool = True, **kwargs) -> Any:
        """Upload ``output_dir`` (without checkpoints, unless ``hub_strategy`` says so) to ``hub_model_id`` on the Hub."""
        from huggingface_hub import HfApi

        args = self.args
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        api = HfApi(token=args.hub_token)
        api.create_repo(repo_id, exist_ok=True, private=args.hub_private_repo)
        ignore = [] if args.hub_strategy == "all_checkpoints" else ["checkpoint-*", "tmp-*"]
        return api.upload_folder(folder_path=args.output_dir, repo_id=repo_id, revision=args.hub_revision, commit_message=commit_message, ignore_patterns=ignore)


def _as_model_keys(model, state_dict: dict) -> dict:
    """``state_dict`` (read from files ``save_pretrained`` wrote) under the model's own parameter names.

    transformers 5 saves some architectures under their checkpoint names, not their module names
    (Gemma 3: ``language_model.model.*`` for the module ``model.language_model.*``); its own
    ``revert_weight_conversion`` gives the saved name of each of the model's tensors, which is
    inverted here. Keys already the model's, or a conversion that is more than a renaming, are
    left as they are (the strict check that follows reports a mismatch).
    """
    own = model.state_dict()
    if set(state_dict) <= set(own):
        return state_dict
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(model, dict(own))
    except Exception:  # an older transformers, or a model without a conversion
        return state_dict
    by_id = {id(tensor): key for key, tensor in own.items()}
    saved_to_model = {saved: by_id.get(id(tensor)) for saved, tensor in reverted.items()}
    if any(key is None for key in saved_to_model.values()):  # a conversion that builds new tensors: not a renaming
        return state_dict
    return {saved_to_model.get(key, key): value for key, value in state_dict.items()}


def _shard_frozen_with_deepspeed(model, accelerator):
    """A frozen model in its own ZeRO-3 inference engine: the run's ZeRO settings, no optimizer, no scheduler."""
    import copy as _copy

    import deepspeed

    config = _copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    for key in ("offload_optimizer",):
        zero.pop(key, None)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if isinstance(hidden, int):  # the buckets DeepSpeed sizes from the model when "auto" (as the training engine's)
        for key, value in (("reduce_bucket_size", hidden * hidden), ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()  # puts the module in eval mode; the engine's own flag too, so `was_training = m.training ... m.train(was_training)` keeps it frozen
    engine.training = False
    return engine


def _shard_frozen_with_fsdp2(model, accelerator):
    """A frozen model sharded with FSDP2: ``fully_shard`` on each decoder layer (the model's ``_no_split_modules``) and the root."""
    from torch.distributed.fsdp import fully_shard

    model = model.to(accelerator.device)
    plugin = accelerator.state.fsdp_plugin
    reshard = getattr(plugin, "reshard_after_forward", True)
    reshard = reshard if isinstance(reshard, bool) else True
    layer_names = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in layer_names:
            fully_shard(module, reshard_after_forward=reshard)
    fully_shard(model, reshard_after_forward=reshard)
    model.eval()
    return model


def _apply_liger_kernel(model, args: TrainingConfig) -> None:
    """Patch ``model`` with Liger kernels when liger-kernel is installed and a CUDA GPU trains; otherwise say so once."""
    import importlib.util
    import warnings

    if not torch.cuda.is_available() or args.use_cpu or importlib.util.find_spec("liger_kernel") is None:
        why = "liger-kernel is not installed" if importlib.util.find_spec("liger_kernel") is None else "Liger's Triton kernels need a CUDA GPU"
        warnings.warn(f"use_liger_kernel=True: {why}; training uses the PyTorch path (same numerics).", UserWarning, stacklevel=3)
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # methods compute their losses from logits, so Liger's fused linear cross-entropy (no logits) stays off unless asked
    _apply_liger_kernel_to_instance(model=base, **{"fused_linear_cross_entropy": False, **(args.liger_kernel_config or {})})


def _attach_neftune(model, alpha: float) -> None:
    """NEFTune (Jain et al. 2023, arXiv:2310.05914): add uniform noise of scale alpha / sqrt(L * d) to input embeddings while training."""
    embeddings = model.get_input_embeddings()

    def hook(module, inputs, output):
        if module.training:
            scale = alpha / math.sqrt(output.size(-2) * output.size(-1))
            output = output + torch.zeros_like(output).uniform_(-scale, scale)
        return output

    embeddings.register_forward_hook(hook)
