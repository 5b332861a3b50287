"""Config of RLOO (light: imports only posttrain).

Batch semantics (as GRPO's, and TRL's): ``per_device_train_batch_size`` counts COMPLETIONS, not
prompts. One optimizer step trains on ``per_device_train_batch_size * gradient_accumulation_steps``
completions per process: ``per_device_train_batch_size * gradient_accumulation_steps /
num_generations`` prompts, each sampled ``num_generations`` times.

Every field of TRL 1.16's ``RLOOConfig`` exists here with its name and default; the ones that
cannot mean anything on posttrain's loop say so in a help text starting with "Accepted, no effect"
(setting one to a non-default value warns once).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["RLOOConfig", "IS_MODES"]

#: Supported ``vllm_importance_sampling_mode`` values (GRPO's).
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class RLOOConfig(TrainingConfig):
    """Settings of RLOO / REINFORCE++; field names and defaults follow TRL 1.16's ``RLOOConfig``."""

    # > TRL's RLOO defaults for TrainingArguments fields
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's RLOO default)."))
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's RLOO default: on; generation turns it off while sampling)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: every dataset column is kept and passed to the reward functions (TRL's RLOO default is False too)."))

    # > Parameters that control the model
    router_aux_loss_coef: float | None = field(default=None, metadata=_help("Weight of a Mixture-of-Experts model's load-balancing loss added to the loss (None: the model config's router_aux_loss_coef; 0 disables it). An error on a non-MoE model."))
    disable_dropout: bool = field(default=False, metadata=_help("Set every dropout probability of the policy (and reference) to 0."))

    # > Parameters that control the data and the rewards
    reward_funcs: list[str] | None = field(
        default=None,
        metadata=_help(
            "Reward functions by name: built-ins ('accuracy', 'format', 'overlong_penalty'), 'module:function' import "
            "paths, or a reward-model directory / Hub id (loaded as a 1-label sequence classifier). Used when the "
            "trainer gets no reward_funcs argument; CLI: --reward_funcs accuracy my_mod:fn."
        ),
    )
    reward_weights: list[float] | None = field(default=None, metadata=_help("One weight per reward function (default: all 1.0)."))
    chat_template_kwargs: dict | None = field(default=None, metadata=_help("Extra keyword arguments for apply_chat_template on conversational prompts."))
    shuffle_dataset: bool = field(default=True, metadata=_help("Accepted, no effect: posttrain's loop always draws prompts in a seeded random order per epoch (set data_seed to change it)."))

    # > Parameters that control generation
    num_generations: int = field(default=2, metadata=_help("Completions sampled per prompt (k in the paper). Must be >= 2 and divide per_device_train_batch_size * gradient_accumulation_steps."))
    num_generations_eval: int | None = field(default=None, metadata=_help("Completions sampled per eval prompt (default: num_generations); 1 gives zero advantages."))
    max_completion_length: int = field(default=512, metadata=_help("Maximum number of tokens generated per completion (TRL's default; 256 before posttrain-rloo 3.0.0)."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature; the trained log-probs use the same temperature."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass (1.0 = off)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling (0 = off)."))
    min_p: float | None = field(default=None, metadata=_help("Min-p sampling (None = off)."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty during sampling (1.0 = off)."))
    generation_kwargs: dict | None = field(default=None, metadata=_help("Overrides of the sampling settings: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, do_sample (False = greedy). Other keys (num_beams, ...) are ignored with a warning: the rollout engine samples one sequence per draw with its exact log-probs."))
    pad_to_multiple_of: int | str | None = field(default="auto", metadata=_help("Pad prompt and completion tensors to a multiple of this length ('auto' or None: no extra padding; 128 on AWS Neuron in TRL)."))
    steps_per_generation: int | None = field(default=None, metadata=_help("Optimizer micro-batches per generation (TRL). Only gradient_accumulation_steps (the default) is offered: one rollout per optimizer step; reuse a rollout with num_iterations."))
    rollout_backend: str = field(default="transformers", metadata=_help("Rollout engine backend: 'transformers' (the training model itself, CPU/GPU) or 'vllm' (GPU)."))
    generation_batch_size: int | None = field(default=None, metadata=_help("Sequences generated at once by the transformers backend (default: all of a step); bounds memory. NOT TRL's meaning (its generation batch spanning several steps, see steps_per_generation)."))
    cache_implementation: str | None = field(default=None, metadata=_help("Accepted, no effect: the transformers rollout backend uses transformers' default dynamic KV cache."))
    use_transformers_continuous_batching: bool = field(default=False, metadata=_help("Accepted, no effect: the transformers rollout backend generates with model.generate (use rollout_backend='vllm' for a batching engine)."))
    transformers_continuous_batching_config: dict | None = field(default=None, metadata=_help("Accepted, no effect: see use_transformers_continuous_batching."))
    use_transformers_paged: bool = field(default=False, metadata=_help("Accepted, no effect: deprecated in TRL (use_transformers_continuous_batching)."))
    ds3_gather_for_generation: bool = field(default=True, metadata=_help("Accepted, no effect: under DeepSpeed ZeRO-3 the transformers backend generates with the engine's own per-layer parameter gathering."))

    # > Parameters that control vLLM (rollout_backend='vllm')
    use_vllm: bool = field(default=False, metadata=_help("TRL-compatible switch: True sets rollout_backend='vllm'."))
    vllm_mode: str = field(default="colocate", metadata=_help("'colocate' (vLLM in the training process). 'server' (an HTTP `vllm serve`) is refused for training: posttrain cannot push updated weights to a server yet."))
    vllm_model_impl: str = field(default="vllm", metadata=_help("vLLM model implementation: 'vllm' or 'transformers' (colocate mode)."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("Let colocated vLLM release its memory between generations."))
    vllm_structured_outputs_regex: str | None = field(default=None, metadata=_help("Accepted, no effect: posttrain's vLLM backend does not constrain decoding."))
    vllm_server_base_url: str | None = field(default=None, metadata=_help("Base URL of the vLLM server (server mode); overrides vllm_server_host/port."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help("Host of the vLLM server (server mode; used when vllm_server_base_url is None)."))
    vllm_server_port: int = field(default=8000, metadata=_help("Port of the vLLM server (server mode)."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Seconds to wait for one request to the vLLM server."))
    vllm_group_port: int = field(default=51216, metadata=_help("Accepted, no effect: posttrain does not push weights to a vLLM server (vllm_mode='server' is refused for training)."))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_help("Fraction of GPU memory colocated vLLM may take."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help("vLLM context window (prompt + completion); default: the model's."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Tensor parallelism of colocated vLLM."))

    # > Parameters that control the loss
    beta: float = field(default=0.05, metadata=_help("KL penalty coefficient: reward -= beta * sum_t (log pi_old - log pi_ref) (0 = no reference model)."))
    num_iterations: int = field(default=1, metadata=_help("Optimizer steps per generated batch; rollouts are reused and old log-probs kept."))
    epsilon: float = field(default=0.2, metadata=_help("Lower clipping range of the sequence-level ratio."))
    epsilon_high: float | None = field(default=None, metadata=_help("Upper clipping range (default: epsilon)."))
    normalize_advantages: bool = field(default=False, metadata=_help("Standardize advantages over the batch (REINFORCE++)."))
    reward_clip_range: list[float] | None = field(default=None, metadata=_help("Clamp the weighted reward to [low, high] before the KL penalty, e.g. [-10, 10] (a (low, high) tuple as in TRL works too)."))
    mask_truncated_completions: bool = field(default=False, metadata=_help("Exclude completions that hit max_completion_length from the loss."))

    # > Beyond TRL (posttrain-rloo 3.2; every default leaves the behaviour of 3.1 unchanged)
    dynamic_sampling: bool = field(default=False, metadata=_help("DAPO dynamic sampling: drop groups whose weighted rewards are all equal (no learning signal) and generate more groups from the next prompts of the prompt source until the step's prompts are all informative groups."))
    max_num_gen_batches: int = field(default=0, metadata=_help("Cap on the generation rounds of one step under dynamic_sampling (DAPO's max_num_gen_batches; 0 = up to one epoch of prompts). When the cap is hit the step is filled with the first dropped groups, so every step keeps its size; logged as dynamic_sampling/filled_groups."))
    vllm_importance_sampling_correction: bool = field(default=False, metadata=_help("Correct for the sampler/trainer log-prob mismatch when another engine (vLLM, a custom engine) samples (GRPO's option; off by default here, as RLOO 3.1 had none)."))
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata=_help("One of " + ", ".join(IS_MODES) + ": per-token or per-sequence ratio pi_old / pi_sampler, truncated (clamped) or masked (zeroed) outside the bounds. Sequence modes weight the sequence loss; token modes weight each token's gradient (the loss value is unchanged)."))
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata=_help("Upper bound of the IS ratio."))
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata=_help("Lower bound of the IS ratio (None = none)."))

    # > Tools and environments (posttrain-rloo 3.2; TRL's RLOOConfig has none: GRPOConfig's fields, same defaults)
    max_tool_calling_iterations: int | None = field(default=None, metadata=_help("With tools= / environment_factory=: the most tool-calling rounds per episode (None: until max_completion_length, which counts model-written and tool tokens over all turns)."))
    tool_call_timeout: float | None = field(default=60.0, metadata=_help("posttrain: seconds one tool call may run; a call that runs longer is abandoned and ends its episode with stop reason 'tool_timeout' (None: no limit, as in TRL)."))

    # > Parameters that control the reference model
    sync_ref_model: bool = field(default=False, metadata=_help("TR-DPO: every ref_model_sync_steps steps set ref = alpha * policy + (1 - alpha) * ref (needs beta > 0, not with PEFT)."))
    ref_model_mixup_alpha: float = field(default=0.6, metadata=_help("alpha of the reference update (sync_ref_model)."))
    ref_model_sync_steps: int = field(default=512, metadata=_help("Steps between reference updates (sync_ref_model)."))

    # > Parameters that control logging
    log_completions: bool = field(default=False, metadata=_help("At each logging step print a sample of (prompt, completion, rewards, advantage) (with rich, when installed) and write them to <output_dir>/completions/completions_<step>.parquet."))
    num_completions_to_print: int | None = field(default=None, metadata=_help("Rows printed by log_completions (None: all of the latest rollout)."))
    log_unique_prompts: bool = field(default=False, metadata=_help("log_completions keeps one row per distinct prompt."))
    log_multimodal: bool = field(default=True, metadata=_help("Accepted, no effect: RLOO here trains text-only models."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_liger_kernel and (self.liger_kernel_config or {}).get("fused_linear_cross_entropy"):
            raise ConfigError(
                'liger_kernel_config={"fused_linear_cross_entropy": True} cannot be used with RLOO: the loss needs the '
                "log-probs of every completion token, which the fused loss never builds. Drop that key (as TRL requires)."
            )
        if self.use_vllm:
            self.rollout_backend = "vllm"
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of != "auto":  # the CLI passes a string
            text = self.pad_to_multiple_of.strip().lower()
            if text in ("none", "null", ""):
                self.pad_to_multiple_of = None
            elif text.isdigit():
                self.pad_to_multiple_of = int(text)
            else:
                raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} is invalid: use a positive integer, 'auto' or None.")
        if self.pad_to_multiple_of == "auto":
            self.pad_to_multiple_of = None  # TRL pads only on AWS Neuron, which posttrain does not run on
        if self.pad_to_multiple_of is not None and (isinstance(self.pad_to_multiple_of, bool) or self.pad_to_multiple_of < 1):
            raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} is invalid: use a positive integer, 'auto' or None.")
        for name, allowed in {"vllm_mode": ("colocate", "server"), "vllm_model_impl": ("vllm", "transformers")}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(allowed)}.")
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations={self.num_generations} is invalid: the leave-one-out baseline needs at least 2 completions "
                "per prompt; set num_generations >= 2."
            )
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise ConfigError(f"num_generations_eval={self.num_generations_eval} is invalid: use None (= num_generations) or >= 1.")
        completions_per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if completions_per_step % self.num_generations != 0:
            raise ConfigError(
                f"num_generations={self.num_generations} does not divide the completions of one optimizer step: "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) = {completions_per_step}. per_device_train_batch_size counts "
                "completions, not prompts. Fix: make per_device_train_batch_size * gradient_accumulation_steps a multiple "
                f"of num_generations (e.g. per_device_train_batch_size={self.num_generations}), or change num_generations."
            )
        if self.steps_per_generation is not None and self.steps_per_generation != self.gradient_accumulation_steps:
            raise ConfigError(
                f"steps_per_generation={self.steps_per_generation} is not offered: posttrain generates one rollout per optimizer "
                f"step (steps_per_generation = gradient_accumulation_steps = {self.gradient_accumulation_steps}). Leave it None, "
                "raise gradient_accumulation_steps for a larger rollout, or reuse a rollout for several steps with num_iterations."
            )
        if self.auto_find_batch_size:
            raise ConfigError(
                "auto_find_batch_size=True is not supported by RLOO (as in TRL): a rollout must hold whole groups of "
                "num_generations completions; lower per_device_train_batch_size instead."
            )
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: it must be >= 1.")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations={self.num_iterations} is invalid: it must be >= 1 (1 = fully on-policy).")
        if self.beta < 0:
            raise ConfigError(f"beta={self.beta} is invalid: the KL coefficient must be >= 0.")
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ConfigError(f"epsilon={self.epsilon}, epsilon_high={self.epsilon_high} are invalid: clipping ranges must be > 0.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (the log-probs are computed at this temperature).")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ConfigError(f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} is invalid: use a fraction in [0, 1].")
        if self.ref_model_sync_steps < 1:
            raise ConfigError(f"ref_model_sync_steps={self.ref_model_sync_steps} is invalid: it must be >= 1.")
        if self.vllm_importance_sampling_mode not in IS_MODES:
            raise ConfigError(f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} is invalid: use one of {', '.join(IS_MODES)}.")
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(f"vllm_importance_sampling_clip_min={lo} must be < vllm_importance_sampling_clip_max={hi}; lower the min or raise the max.")
        if self.vllm_importance_sampling_mode.endswith("_truncate") and lo is None and hi is None:
            raise ConfigError(f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} needs a bound: set vllm_importance_sampling_clip_max (e.g. 3.0) or vllm_importance_sampling_clip_min.")
        if self.max_tool_calling_iterations is not None and (isinstance(self.max_tool_calling_iterations, bool) or self.max_tool_calling_iterations < 0):
            raise ConfigError(f"max_tool_calling_iterations={self.max_tool_calling_iterations!r} is invalid: use None (until max_completion_length) or an integer >= 0 (0: tools are never run).")
        if self.tool_call_timeout is not None and not self.tool_call_timeout > 0:
            raise ConfigError(f"tool_call_timeout={self.tool_call_timeout!r} is invalid: use seconds > 0 (e.g. 60), or None for no limit.")
        if self.max_num_gen_batches < 0:
            raise ConfigError(f"max_num_gen_batches={self.max_num_gen_batches} is invalid: use 0 (up to one epoch of prompts) or a positive cap on the generation rounds per step.")
        if self.reward_clip_range is not None:
            if len(self.reward_clip_range) != 2 or not self.reward_clip_range[0] < self.reward_clip_range[1]:
                raise ConfigError(f"reward_clip_range={self.reward_clip_range} is invalid: give [low, high] with low < high, e.g. [-10, 10].")
            self.reward_clip_range = [float(v) for v in self.reward_clip_range]
        if self.reward_funcs is not None and isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has {len(self.reward_funcs)} "
                f"({self.reward_funcs}); give one weight per reward function."
            )
        for name in ("shuffle_dataset", "ds3_gather_for_generation", "log_multimodal"):  # no-effect flags whose default is True
            if getattr(self, name) is False:
                warnings.warn(f"posttrain: {name}=False is accepted but changes nothing in RLOO (see `posttrain info rloo`).", UserWarning, stacklevel=3)
