"""Config of GRPO (light: imports only posttrain).

Batch semantics (read this once; TRL changed it silently in 0.14, trl#2776):
``per_device_train_batch_size`` counts COMPLETIONS, not prompts. One optimizer step trains on
``per_device_train_batch_size * gradient_accumulation_steps`` completions per process, i.e.
``per_device_train_batch_size * gradient_accumulation_steps / num_generations`` prompts, each
sampled ``num_generations`` times. So ``num_generations`` must divide
``per_device_train_batch_size * gradient_accumulation_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["GRPOConfig", "LOSS_TYPES", "IS_MODES"]

#: Supported ``loss_type`` values.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
#: Supported ``vllm_importance_sampling_mode`` values.
IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class GRPOConfig(TrainingConfig):
    """Settings of GRPO and its variants; field names and defaults follow TRL 1.16's ``GRPOConfig``."""

    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's GRPO default)."))
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))

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

    # > Parameters that control generation
    num_generations: int = field(default=8, metadata=_help("Completions sampled per prompt (the group size G). Must be >= 2 and divide per_device_train_batch_size * gradient_accumulation_steps."))
    max_completion_length: int = field(default=256, metadata=_help("Maximum number of tokens generated per completion."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature; the trained log-probs use the same temperature."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass (1.0 = off)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling (0 = off)."))
    min_p: float | None = field(default=None, metadata=_help("Min-p sampling (None = off)."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty during sampling (1.0 = off)."))
    rollout_backend: str = field(default="transformers", metadata=_help("Rollout engine backend: 'transformers' (the training model itself, CPU/GPU) or 'vllm' (GPU)."))
    use_vllm: bool = field(default=False, metadata=_help("TRL-compatible switch: True sets rollout_backend='vllm'."))
    generation_batch_size: int | None = field(default=None, metadata=_help("Sequences generated at once by the transformers backend (default: all of a step); bounds memory."))

    # > Parameters that control the loss
    loss_type: str = field(default="dapo", metadata=_help("One of " + ", ".join(LOSS_TYPES) + " (see docs/methods/grpo.md)."))
    beta: float = field(default=0.0, metadata=_help("Coefficient of the k3 KL penalty to the reference model (0 = no reference model is loaded)."))
    num_iterations: int = field(default=1, metadata=_help("Optimizer steps per generated batch (mu in the paper); rollouts are reused and old log-probs kept."))
    epsilon: float = field(default=0.2, metadata=_help("Lower clipping range: the ratio is clipped at 1 - epsilon."))
    epsilon_high: float | None = field(default=None, metadata=_help("Upper clipping range (default: epsilon). DAPO uses 0.28; for cispo it is the cap eps_max (ScaleRL: 5.0)."))
    delta: float | None = field(default=None, metadata=_help("Two-sided clipping: also cap the unclipped ratio at delta (INTELLECT-2); should exceed 1 + epsilon_high."))
    sapo_temperature_pos: float = field(default=1.0, metadata=_help("SAPO gate temperature for positive advantages."))
    sapo_temperature_neg: float = field(default=1.05, metadata=_help("SAPO gate temperature for non-positive advantages."))
    vespo_k_pos: float = field(default=2.0, metadata=_help("VESPO power k for non-negative advantages."))
    vespo_lambda_pos: float = field(default=3.0, metadata=_help("VESPO decay lambda for non-negative advantages."))
    vespo_k_neg: float = field(default=3.0, metadata=_help("VESPO power k for negative advantages."))
    vespo_lambda_neg: float = field(default=2.0, metadata=_help("VESPO decay lambda for negative advantages."))
    importance_sampling_level: str = field(default="token", metadata=_help("'token' (per-token ratio) or 'sequence' (GSPO: length-normalized sequence ratio)."))
    scale_rewards: str = field(default="group", metadata=_help("Advantage scaling: 'group' (std within the group), 'batch' (std over the batch) or 'none'."))
    multi_objective_aggregation: str = field(default="sum_then_normalize", metadata=_help("'sum_then_normalize' or 'normalize_then_sum' (GDPO: normalize each reward within its group first)."))
    mask_truncated_completions: bool = field(default=False, metadata=_help("Exclude completions that hit max_completion_length from the loss (DAPO overlong filtering)."))
    top_entropy_quantile: float = field(default=1.0, metadata=_help("Train only on the top rho fraction of tokens by entropy (1.0 = all tokens; the paper uses 0.2)."))
    use_bias_correction_kl: bool = field(default=True, metadata=_help("Multiply the per-token KL by the importance ratio (DeepSeek-V3.2's unbiased estimate)."))

    # > Parameters that control the importance-sampling correction (only when the rollout engine is not the trained model)
    vllm_importance_sampling_correction: bool = field(default=True, metadata=_help("Correct for the sampler/trainer log-prob mismatch when generating with another engine (vLLM)."))
    vllm_importance_sampling_mode: str = field(default="sequence_mask", metadata=_help("One of " + ", ".join(IS_MODES) + ": per-token or per-sequence ratio, truncated (clamped) or masked (zeroed) outside the bounds."))
    vllm_importance_sampling_clip_max: float | None = field(default=3.0, metadata=_help("Upper bound of the IS ratio."))
    vllm_importance_sampling_clip_min: float | None = field(default=None, metadata=_help("Lower bound of the IS ratio (None = none)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.scale_rewards, bool):  # TRL accepts True/False
            self.scale_rewards = "group" if self.scale_rewards else "none"
        if self.use_vllm:
            self.rollout_backend = "vllm"
        choices = {
            "loss_type": LOSS_TYPES,
            "importance_sampling_level": ("token", "sequence"),
            "scale_rewards": ("group", "batch", "none"),
            "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
            "vllm_importance_sampling_mode": IS_MODES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(allowed)}.")
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations={self.num_generations} is invalid: group-relative advantages need at least 2 completions "
                "per prompt; set num_generations >= 2."
            )
        completions_per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if completions_per_step % self.num_generations != 0:
            raise ConfigError(
                f"num_generations={self.num_generations} does not divide the completions of one optimizer step: "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) = {completions_per_step}. per_device_train_batch_size counts "
                "completions, not prompts. Fix: make per_device_train_batch_size * gradient_accumulation_steps a multiple "
                f"of num_generations (e.g. per_device_train_batch_size={self.num_generations}), or change num_generations."
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
