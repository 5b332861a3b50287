"""Config of RLOO (light: imports only posttrain).

Batch semantics (as GRPO's, and TRL's): ``per_device_train_batch_size`` counts COMPLETIONS, not
prompts. One optimizer step trains on ``per_device_train_batch_size * gradient_accumulation_steps``
completions per process: ``per_device_train_batch_size * gradient_accumulation_steps /
num_generations`` prompts, each sampled ``num_generations`` times.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["RLOOConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class RLOOConfig(TrainingConfig):
    """Settings of RLOO / REINFORCE++; field names and defaults follow TRL 1.16's ``RLOOConfig``."""

    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's RLOO default)."))

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
    num_generations: int = field(default=2, metadata=_help("Completions sampled per prompt (k in the paper). Must be >= 2 and divide per_device_train_batch_size * gradient_accumulation_steps."))
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
    beta: float = field(default=0.05, metadata=_help("KL penalty coefficient: reward -= beta * sum_t (log pi_old - log pi_ref) (0 = no reference model)."))
    num_iterations: int = field(default=1, metadata=_help("Optimizer steps per generated batch; rollouts are reused and old log-probs kept."))
    epsilon: float = field(default=0.2, metadata=_help("Lower clipping range of the sequence-level ratio."))
    epsilon_high: float | None = field(default=None, metadata=_help("Upper clipping range (default: epsilon)."))
    normalize_advantages: bool = field(default=False, metadata=_help("Standardize advantages over the batch (REINFORCE++)."))
    reward_clip_range: list[float] | None = field(default=None, metadata=_help("Clamp the weighted reward to [low, high] before the KL penalty, e.g. [-10, 10]."))
    mask_truncated_completions: bool = field(default=False, metadata=_help("Exclude completions that hit max_completion_length from the loss."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_vllm:
            self.rollout_backend = "vllm"
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations={self.num_generations} is invalid: the leave-one-out baseline needs at least 2 completions "
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
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (the log-probs are computed at this temperature).")
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
