"""Config of A*-PO (light: imports only posttrain).

Every field of TRL 1.16's ``trl.experimental.a2po.A2POConfig`` is here with its name and default
(``gradient_checkpointing=True``, ``remove_unused_columns=False``, ``max_prompt_length=512``,
``max_completion_length=256``, ``num_value_samples=8``, ``beta1=0.5``, ``beta2=1e-3``, ...).
``per_device_train_batch_size`` counts PROMPTS, each sampled once per step (A*-PO's single
generation per prompt); Stage 1 samples ``num_value_samples`` per prompt from the reference.
Fields only posttrain has: ``reward_funcs`` (by name, for the CLI), ``chat_template_kwargs``,
``disable_dropout``, ``min_p`` / ``repetition_penalty`` / ``generation_kwargs`` and
``generation_batch_size`` (the rollout engine's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["A2POConfig"]


def _help(text: str) -> dict:
    return {"help": text}


# Copied from posttrain_gmpo.config._accept_positional_output_dir
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
class A2POConfig(TrainingConfig):
    """Settings of A*-PO; field names and defaults follow TRL 1.16's ``A2POConfig``."""

    # > TRL's defaults for TrainingArguments fields
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default: on)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: every dataset column is kept and passed to the reward functions (TRL's default is False too)."))

    # > rewards and data
    reward_funcs: list[str] | None = field(default=None, metadata=_help(
        "Reward functions by name: built-ins ('accuracy', 'format', ...), 'module:function' import paths, or a reward-model directory. "
        "Used when the trainer gets no reward_funcs argument; CLI: --reward_funcs accuracy. A*-PO assumes the weighted reward is binary (0/1)."))
    reward_weights: list[float] | None = field(default=None, metadata=_help("One weight per reward function (default: all 1.0); the reward r is their weighted sum."))
    chat_template_kwargs: dict | None = field(default=None, metadata=_help("Extra keyword arguments of apply_chat_template for conversational prompts."))
    disable_dropout: bool = field(default=False, metadata=_help("Set every dropout probability of the policy (and reference) to 0."))

    # > generation (Stage 1 and Stage 2)
    max_prompt_length: int | None = field(default=512, metadata=_help("Maximum prompt length in tokens; longer prompts are left-truncated (None: no limit)."))
    max_completion_length: int = field(default=256, metadata=_help("Maximum number of tokens generated per completion."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature of Stage 1 and Stage 2. The log-probs of the loss are those of the model itself (temperature 1), as in TRL."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass in (0, 1] (1.0 = off)."))
    top_k: int | None = field(default=None, metadata=_help("Top-k sampling (None = off)."))
    min_p: float | None = field(default=None, metadata=_help("Min-p sampling (None = off)."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty during sampling (1.0 = off)."))
    generation_kwargs: dict | None = field(default=None, metadata=_help("Overrides of the sampling fields: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, do_sample (False = greedy)."))
    generation_batch_size: int | None = field(default=None, metadata=_help("Sequences generated at once by the rollout engine (default: all of a call); bounds generation memory."))

    # > Stage 1: offline optimal value estimation
    num_value_samples: int = field(default=8, metadata=_help("Completions sampled from the reference policy per prompt to estimate V*(x)."))
    beta1: float = field(default=0.5, metadata=_help("KL temperature of Stage 1: V*(x) = beta1 * log(mean_i exp(r_i / beta1))."))
    filter_all_incorrect: bool = field(default=True, metadata=_help("Drop the training prompts whose reference samples all scored 0 (no learning signal)."))

    # > Stage 2: on-policy regression
    beta2: float = field(default=1e-3, metadata=_help("KL temperature of Stage 2: the loss is (beta2 * log(pi(y|x) / pi_ref(y|x)) - (r - V*(x)))^2."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.top_k is None:
            self.top_k = 0  # the rollout engine's "off"
        if self.reward_funcs is not None and isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has {len(self.reward_funcs)} "
                              f"({self.reward_funcs}); give one weight per reward function.")
        if self.num_value_samples < 1:
            raise ConfigError(f"num_value_samples={self.num_value_samples} is invalid: Stage 1 needs >= 1 reference sample per prompt (the paper uses 8).")
        if not self.beta1 > 0:
            raise ConfigError(f"beta1={self.beta1} is invalid: the Stage 1 temperature must be > 0 (default 0.5).")
        if not self.beta2 > 0:
            raise ConfigError(f"beta2={self.beta2} is invalid: the Stage 2 KL temperature must be > 0 (default 1e-3).")
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: it must be >= 1.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"max_prompt_length={self.max_prompt_length} is invalid: use None (no limit) or >= 1.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (greedy: generation_kwargs={{'do_sample': False}}).")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} is invalid: use a value in (0, 1] (1.0 = off).")
