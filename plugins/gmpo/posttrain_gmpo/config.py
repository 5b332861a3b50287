"""Config of GMPO (light: imports only posttrain).

Copied from posttrain_grpo.config (posttrain-grpo 3.1.0), with: the class name, ``epsilon``'s default and meaning, and the
help of the GRPO loss fields GMPO ignores (kept aligned by hand: tests/test_copied_blocks.py checks marked functions, not
config fields).

TRL 1.16's ``trl.experimental.gmpo.GMPOConfig`` is ``GRPOConfig`` with one change: ``epsilon``
defaults to 0.4 and, with ``epsilon_high``, is a LOG-space clipping range (the token ratio is
clipped to ``(exp(-epsilon), exp(epsilon_high))``). Every field of TRL's class is here with its
name and default. GMPO's loss replaces GRPO's, so the GRPO loss variants (``loss_type``,
``importance_sampling_level``, ``delta``, SAPO / VESPO temperatures, ``use_bias_correction_kl``,
``off_policy_mask_threshold``, the entropy bonus and the sampler importance-sampling correction)
are accepted and have no effect, as in TRL (their help says so; setting one warns once).

Batch semantics are GRPO's: ``per_device_train_batch_size`` counts COMPLETIONS, not prompts; one
optimizer step trains on ``per_device_train_batch_size * gradient_accumulation_steps /
num_generations`` prompts per process, each sampled ``num_generations`` times.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["GMPOConfig", "LOSS_TYPES", "IS_MODES"]

#: Supported ``loss_type`` values.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
#: Supported ``vllm_importance_sampling_mode`` values.
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _help(text: str) -> dict:
    return {"help": text}


def _accept_positional_output_dir(cls):
    """Let ``cls(output_dir, **fields)`` work as with TRL's configs (transformers' ``TrainingArguments`` takes
    ``output_dir`` as its first positional argument); every other field stays keyword-only."""
    import functools
    import inspect

    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if len(args) > 1:
            raise TypeError(f"{cls.__name__}() takes output_dir as its only positional argument; pass the other {len(args) - 1} by name.")
        if args:
            if "output_dir" in kwargs:
                raise TypeError(f"{cls.__name__}() got multiple values for argument 'output_dir'")
            kwargs["output_dir"] = args[0]
        init(self, **kwargs)

    params = list(inspect.signature(init).parameters.values())
    output_dir = next(p for p in params if p.name == "output_dir").replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
    __init__.__signature__ = inspect.Signature([params[0], output_dir, *(p for p in params[1:] if p.name != "output_dir")])
    cls.__init__ = __init__
    return cls


@_accept_positional_output_dir
@dataclass(kw_only=True)
class GMPOConfig(TrainingConfig):
    """Settings of GMPO; field names and defaults follow TRL 1.16's ``trl.experimental.gmpo.GMPOConfig`` (GRPOConfig, epsilon 0.4 in log space)."""

    # > TRL's GRPO defaults for TrainingArguments fields (GMPOConfig inherits them)
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's GRPO default, which GMPO inherits)."))
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's GRPO default, which GMPO inherits: on; generation turns it off while sampling)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: every dataset column is kept and passed to the reward functions (TRL's GRPO default, which GMPO inherits, is False too)."))

    # > Parameters that control the model
    router_aux_loss_coef: float | None = field(default=None, metadata=_help("Weight of a Mixture-of-Experts model's load-balancing loss added to the loss (None: the model config's router_aux_loss_coef; 0 disables it). An error on a non-MoE model."))
    disable_dropout: bool = field(default=False, metadata=_help("Set every dropout probability of the policy (and reference) to 0."))
    cast_lm_head_to_fp32: bool = field(default=False, metadata=_help("Run the LM head of the policy and reference in float32 (ScaleRL), also under bf16 mixed precision."))

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
    num_generations: int = field(default=8, metadata=_help("Completions sampled per prompt (the group size G). Must be >= 2 and divide per_device_train_batch_size * gradient_accumulation_steps."))
    num_generations_eval: int | None = field(default=None, metadata=_help("Completions sampled per eval prompt (default: num_generations); 1 gives zero advantages (eval loss 0)."))
    max_completion_length: int = field(default=512, metadata=_help("Maximum number of tokens generated per completion (TRL's default; 256 before posttrain-grpo 3.0.0)."))
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
    max_tool_calling_iterations: int | None = field(default=None, metadata=_help("Accepted, no effect: multi-turn tool calling during rollouts is not offered (tools= is refused)."))

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
    loss_type: str = field(default="dapo", metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: One of " + ", ".join(LOSS_TYPES) + " (see docs/methods/grpo.md)."))
    beta: float = field(default=0.0, metadata=_help("Coefficient of the k3 KL penalty to the reference model (0 = no reference model is loaded)."))
    num_iterations: int = field(default=1, metadata=_help("Optimizer steps per generated batch (mu in the paper); rollouts are reused and old log-probs kept."))
    epsilon: float = field(default=0.4, metadata=_help("Lower clipping range in LOG space: each token log-ratio log(pi/pi_old) is clipped at -epsilon, i.e. the ratio at exp(-epsilon) (GMPO: 0.4)."))
    epsilon_high: float | None = field(default=None, metadata=_help("Upper clipping range in LOG space (default: epsilon): the token ratio is clipped at exp(epsilon_high)."))
    delta: float | None = field(default=None, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Two-sided clipping: also cap the unclipped ratio at delta (INTELLECT-2); should exceed 1 + epsilon_high."))
    sapo_temperature_pos: float = field(default=1.0, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: SAPO gate temperature for positive advantages."))
    sapo_temperature_neg: float = field(default=1.05, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: SAPO gate temperature for non-positive advantages."))
    vespo_k_pos: float = field(default=2.0, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: VESPO power k for non-negative advantages."))
    vespo_lambda_pos: float = field(default=3.0, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: VESPO decay lambda for non-negative advantages."))
    vespo_k_neg: float = field(default=3.0, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: VESPO power k for negative advantages."))
    vespo_lambda_neg: float = field(default=2.0, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: VESPO decay lambda for negative advantages."))
    importance_sampling_level: str = field(default="token", metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: 'token' (per-token ratio) or 'sequence' (GSPO: length-normalized sequence ratio)."))
    scale_rewards: str = field(default="group", metadata=_help("Advantage scaling: 'group' (std within the group), 'batch' (std over the batch) or 'none' (True/False = group/none)."))
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata=_help("'sum_then_normalize' or 'normalize_then_sum' (GDPO: normalize each reward within its group first)."))
    mask_truncated_completions: bool = field(default=False, metadata=_help("Exclude completions that hit max_completion_length from the loss (DAPO overlong filtering)."))
    top_entropy_quantile: float = field(default=1.0, metadata=_help("Train only on the top rho fraction of tokens by entropy (1.0 = all tokens; the paper uses 0.2)."))
    use_bias_correction_kl: bool = field(default=True, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Multiply the per-token KL by the importance ratio (DeepSeek-V3.2's unbiased estimate)."))
    off_policy_mask_threshold: float | None = field(default=None, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Off-policy sequence masking (DeepSeek-V3.2, eq. 9): drop sequences with a negative advantage whose mean sampler-to-policy KL exceeds this (e.g. 0.5); None = off."))
    entropy_coef: float = field(default=0.0, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Entropy bonus: loss -= entropy_coef * mean per-token entropy (the same meaning for every loss_type); the initial value under use_adaptive_entropy."))
    use_adaptive_entropy: bool = field(default=False, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Skywork-OR1's adaptive entropy control: after each step entropy_coef moves by entropy_coef_delta towards keeping the entropy at entropy_target; the bonus applies only while the entropy is at or below the target."))
    entropy_coef_min: float = field(default=0.0, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Lower bound of the adaptive entropy coefficient."))
    entropy_coef_max: float = field(default=1.0, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Upper bound of the adaptive entropy coefficient."))
    entropy_coef_delta: float = field(default=0.005, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Step of the adaptive entropy coefficient per optimizer step."))
    entropy_target: float = field(default=0.2, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Target mean per-token entropy (nats) of adaptive entropy control."))

    # > Parameters that control the reference model
    sync_ref_model: bool = field(default=False, metadata=_help("TR-DPO: every ref_model_sync_steps steps set ref = alpha * policy + (1 - alpha) * ref (needs beta > 0, not with PEFT)."))
    ref_model_mixup_alpha: float = field(default=0.6, metadata=_help("alpha of the reference update (sync_ref_model)."))
    ref_model_sync_steps: int = field(default=512, metadata=_help("Steps between reference updates (sync_ref_model)."))

    # > Parameters that control the importance-sampling correction (only when the rollout engine is not the trained model)
    vllm_importance_sampling_correction: bool = field(default=True, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Correct for the sampler/trainer log-prob mismatch when generating with another engine (vLLM)."))
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: One of " + ", ".join(IS_MODES) + ": per-token or per-sequence ratio, truncated (clamped) or masked (zeroed) outside the bounds."))
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Upper bound of the IS ratio."))
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata=_help("Accepted, no effect: GMPO's loss replaces GRPO's (as in TRL's GMPOTrainer). GRPO's meaning: Lower bound of the IS ratio (None = none)."))
    vllm_importance_sampling_cap: float | None = field(default=None, metadata=_help("Deprecated in TRL: sets vllm_importance_sampling_clip_max."))

    # > Parameters that control logging
    log_completions: bool = field(default=False, metadata=_help("At each logging step print a sample of (prompt, completion, rewards, advantage) (with rich, when installed) and write them to <output_dir>/completions/completions_<step>.parquet."))
    num_completions_to_print: int | None = field(default=None, metadata=_help("Rows printed by log_completions (None: all of the latest rollout)."))
    log_unique_prompts: bool = field(default=False, metadata=_help("log_completions keeps one row per distinct prompt."))
    log_multimodal: bool = field(default=True, metadata=_help("Accepted, no effect: GMPO here trains text-only models."))
    log_completions_hub_repo: str | None = field(default=None, metadata=_help("Accepted, no effect: completion tables stay in output_dir (upload them with push_to_hub); requires log_completions as in TRL."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_liger_kernel and (self.liger_kernel_config or {}).get("fused_linear_cross_entropy"):
            raise ConfigError(
                'liger_kernel_config={"fused_linear_cross_entropy": True} cannot be used with GMPO: the loss needs the '
                "log-probs of every completion token, which the fused loss never builds. Drop that key (as TRL requires)."
            )
        if isinstance(self.scale_rewards, bool):  # TRL accepts True/False
            self.scale_rewards = "group" if self.scale_rewards else "none"
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
        if self.vllm_importance_sampling_cap is not None:
            warnings.warn("vllm_importance_sampling_cap is deprecated (as in TRL); use vllm_importance_sampling_clip_max.", FutureWarning, stacklevel=3)
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        choices = {
            "loss_type": LOSS_TYPES,
            "importance_sampling_level": ("token", "sequence"),
            "scale_rewards": ("group", "batch", "none"),
            "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
            "vllm_importance_sampling_mode": IS_MODES,
            "vllm_mode": ("colocate", "server"),
            "vllm_model_impl": ("vllm", "transformers"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(allowed)}.")
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations={self.num_generations} is invalid: group-relative advantages need at least 2 completions "
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
                "auto_find_batch_size=True is not supported by GMPO (as in TRL): a rollout must hold whole groups of "
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
        if self.delta is not None and self.delta <= 1.0:
            raise ConfigError(f"delta={self.delta} is invalid: the two-sided cap must be > 1 (recommended > 1 + epsilon_high), or None.")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ConfigError(f"top_entropy_quantile={self.top_entropy_quantile} is invalid: use a fraction in [0, 1] (1.0 keeps every token).")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (the log-probs are computed at this temperature).")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            raise ConfigError(f"off_policy_mask_threshold={self.off_policy_mask_threshold} is invalid: use a KL threshold >= 0 (e.g. 0.5) or None.")
        if self.entropy_coef_min > self.entropy_coef_max:
            raise ConfigError(f"entropy_coef_min={self.entropy_coef_min} > entropy_coef_max={self.entropy_coef_max}: the adaptive entropy bounds must be ordered.")
        if self.entropy_coef_delta < 0:
            raise ConfigError(f"entropy_coef_delta={self.entropy_coef_delta} is invalid: the adaptive step must be >= 0.")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ConfigError(f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} is invalid: use a fraction in [0, 1].")
        if self.ref_model_sync_steps < 1:
            raise ConfigError(f"ref_model_sync_steps={self.ref_model_sync_steps} is invalid: it must be >= 1.")
        if self.log_completions_hub_repo is not None and not self.log_completions:
            raise ConfigError(
                f"log_completions_hub_repo={self.log_completions_hub_repo!r} is set but log_completions=False: enable "
                "log_completions, or unset log_completions_hub_repo (as in TRL)."
            )
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ConfigError(
                f"vllm_importance_sampling_clip_min={lo} must be < vllm_importance_sampling_clip_max={hi}; lower the min or raise the max."
            )
        if self.vllm_importance_sampling_mode.endswith("_truncate") and lo is None and hi is None:
            raise ConfigError(
                f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} needs a bound: set "
                "vllm_importance_sampling_clip_max (e.g. 3.0) or vllm_importance_sampling_clip_min."
            )
        if self.reward_funcs is not None and isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has {len(self.reward_funcs)} "
                f"({self.reward_funcs}); give one weight per reward function."
            )
        for name in ("shuffle_dataset", "ds3_gather_for_generation", "log_multimodal"):  # no-effect flags whose default is True
            if getattr(self, name) is False:
                warnings.warn(f"posttrain: {name}=False is accepted but changes nothing in GMPO (see `posttrain info gmpo`).", UserWarning, stacklevel=3)
