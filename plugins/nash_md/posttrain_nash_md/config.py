"""Config of Nash-MD (light: imports only posttrain).

Batch semantics (as TRL's online DPO family): ``per_device_train_batch_size`` counts PROMPTS. Each
prompt gives one pair: a completion sampled from the policy and one sampled from the geometric
mixture of the policy and the frozen reference, so one optimizer step trains on ``per_device_train_batch_size * gradient_accumulation_steps``
pairs per process.

Every field of ``NashMDConfig`` in TRL 1.13.0 (the last TRL release that shipped Nash-MD; it subclassed
``OnlineDPOConfig``) exists here with its name and default; the ones that cannot mean anything on
posttrain's loop say so in a help text starting with "Accepted, no effect" (setting one to a
non-default value warns once). ``reward_funcs`` is posttrain's addition (reward functions by name,
for the CLI).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["NashMDConfig"]


# Copied from posttrain_xpo.config._help
def _help(text: str) -> dict:
    return {"help": text}


# Copied from posttrain_xpo.config._scalar_or_schedule
def _scalar_or_schedule(name: str, value, *, low: float, high: float | None = None):
    """Return ``value`` as TRL keeps it: a float, or a list of floats (one per epoch) when it has several entries."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ConfigError(f"{name}=[] is invalid: give a float or a non-empty list of floats (one per epoch).")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is invalid: give a float or a list of floats (one per epoch).") from None
    for v in values:
        if v < low or (high is not None and v > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"{name}={value!r} is invalid: every value must be {bound}.")
    return values[0] if len(values) == 1 else values


@dataclass(kw_only=True)
class NashMDConfig(TrainingConfig):
    """Settings of Nash-MD; field names and defaults follow TRL 1.13.0's ``NashMDConfig`` (an ``OnlineDPOConfig``)."""

    # > TRL's online DPO defaults for TrainingArguments fields
    learning_rate: float = field(default=5e-7, metadata=_help("Peak learning rate of AdamW (TRL's online DPO default)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: every dataset column is kept and passed to the reward functions."))

    # > Reward
    reward_model_path: str | None = field(default=None, metadata=_help("A reward model (directory or Hub id, a 1-label sequence classifier) used when neither the trainer's reward_funcs nor the config's reward_funcs is given."))
    reward_funcs: list[str] | None = field(
        default=None,
        metadata=_help(
            "posttrain addition: reward functions by name (built-ins, 'module:function', or a reward-model directory), "
            "used when the trainer gets no reward_funcs / judge argument; CLI: --reward_funcs my_mod:fn."
        ),
    )
    reward_weights: list[float] | None = field(default=None, metadata=_help("One weight per reward function (default: all 1.0); the pair's scores are the weighted sums."))
    missing_eos_penalty: float | None = field(default=None, metadata=_help("Subtracted from the score of a completion that does not end with EOS (encourages finishing within max_new_tokens)."))

    # > Generation
    max_new_tokens: int = field(default=64, metadata=_help("Maximum number of tokens generated per completion (policy and mixture samples)."))
    max_length: int = field(default=512, metadata=_help("Maximum prompt + completion length; a longer prompt is cut from the left to max_length - max_new_tokens tokens."))
    temperature: float = field(default=0.9, metadata=_help("Sampling temperature of both samples (the loss scores the policy's completions at temperature 1, as TRL's NashMD did)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass (1.0 = off)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling (0 = off)."))
    min_p: float | None = field(default=None, metadata=_help("Min-p sampling (None = off)."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty during sampling (1.0 = off)."))
    generation_kwargs: dict | None = field(default=None, metadata=_help("Overrides of the sampling settings: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, do_sample (False = greedy). Other keys are ignored with a warning."))
    cache_implementation: str | None = field(default=None, metadata=_help("Accepted, no effect: the transformers rollout backend uses transformers' default dynamic KV cache."))
    chat_template_kwargs: dict | None = field(default=None, metadata=_help("posttrain addition: extra keyword arguments for apply_chat_template on conversational prompts."))

    # > Loss
    beta: float | list[float] = field(default_factory=lambda: [0.1], metadata=_help("KL regularization strength (tau in the paper). A list gives one value per epoch, the last one for the remaining epochs."))
    loss_type: str = field(default="sigmoid", metadata=_help("Accepted, no effect: Nash-MD's loss is its own policy gradient (TRL's field, inherited from OnlineDPOConfig); only 'sigmoid' and 'ipo' are valid values."))
    mixture_coef: float | list[float] = field(default_factory=lambda: [0.5], metadata=_help("Weight of the reference in the geometric mixture the opponent samples from: logits = mixture_coef * ref + (1 - mixture_coef) * policy. A list gives one value per epoch, the last one for the remaining epochs."))
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability of the policy (and reference) to 0."))

    # > vLLM (TRL's fields; TRL's NashMDTrainer generated with transformers and never used them)
    use_vllm: bool = field(default=False, metadata=_help("Refused when True: Nash-MD samples the policy and the mixture with the transformers rollout backend (as TRL's NashMDTrainer did)."))
    vllm_model_impl: str = field(default="vllm", metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_structured_outputs_regex: str | None = field(default=None, metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_gpu_memory_utilization: float | None = field(default=0.55, metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_mode: str = field(default="colocate", metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_server_base_url: str | None = field(default=None, metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_server_port: int = field(default=8000, metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_group_port: int = field(default=51216, metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("Accepted, no effect: Nash-MD does not generate with vLLM."))
    ds3_gather_for_generation: bool = field(default=True, metadata=_help("Accepted, no effect: posttrain generates from the unwrapped model."))

    def __post_init__(self) -> None:
        super().__post_init__()
        self.beta = _scalar_or_schedule("beta", self.beta, low=0.0)
        self.mixture_coef = _scalar_or_schedule("mixture_coef", self.mixture_coef, low=0.0, high=1.0)
        if self.loss_type not in ("sigmoid", "ipo"):
            raise ConfigError(f"loss_type={self.loss_type!r} is invalid: use 'sigmoid' (DPO) or 'ipo'.")
        if self.use_vllm:
            raise ConfigError("use_vllm=True is not supported by Nash-MD: it samples the policy and the mixture with transformers (as TRL's NashMDTrainer); set use_vllm=False.")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} is invalid: it must be >= 1.")
        if self.max_new_tokens >= self.max_length:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} >= max_length={self.max_length} leaves no room for the prompt; raise max_length (e.g. max_new_tokens + 512).")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be >= 0 (0 = greedy).")
        if self.reward_funcs is not None and isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has {len(self.reward_funcs)}; give one weight per reward function.")
        if self.auto_find_batch_size:
            raise ConfigError("auto_find_batch_size=True is not supported by Nash-MD; lower per_device_train_batch_size instead.")
        defaults = {"loss_type": "sigmoid", "cache_implementation": None, "vllm_model_impl": "vllm", "vllm_structured_outputs_regex": None, "vllm_gpu_memory_utilization": 0.55,
                    "vllm_mode": "colocate", "vllm_server_base_url": None, "vllm_server_host": "0.0.0.0", "vllm_server_port": 8000,
                    "vllm_server_timeout": 240.0, "vllm_group_port": 51216, "vllm_tensor_parallel_size": 1, "vllm_enable_sleep_mode": False,
                    "ds3_gather_for_generation": True}
        for name, default in defaults.items():
            if getattr(self, name) != default:
                warnings.warn(f"posttrain: {name}={getattr(self, name)!r} is accepted but changes nothing in Nash-MD (see `posttrain info nash_md`).", UserWarning, stacklevel=3)

    @property
    def max_completion_length(self) -> int:
        """The sampled completion length (TRL's online DPO calls it ``max_new_tokens``); the core's sampling helpers read this name."""
        return self.max_new_tokens
