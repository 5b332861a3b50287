"""Config of PPO (light: imports only posttrain).

Field names and defaults are those of ``trl.experimental.ppo.PPOConfig`` of TRL 1.12.0, the last
release that shipped ``PPOTrainer``. Batch semantics (TRL's): one rollout per process is
``per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches`` prompts, one
completion each (``local_batch_size``); it is trained ``num_ppo_epochs`` times, each time shuffled
and cut into ``num_mini_batches`` mini-batches of ``per_device_train_batch_size *
gradient_accumulation_steps`` completions, one optimizer step per mini-batch. So one rollout gives
``num_ppo_epochs * num_mini_batches`` optimizer steps, and ``max_steps`` counts optimizer steps.

Fields posttrain adds (TRL's PPOTrainer had none of them): ``reward_funcs`` / ``reward_weights``
(reward functions instead of, or beside, a reward model), ``value_model_path`` and
``critic_learning_rate`` (the separate critic), ``value_head`` and ``value_head_init_std`` (a value
head on the policy instead of a critic, the design of TRL <= 0.11's ``AutoModelForCausalLMWithValueHead``),
``chat_template_kwargs``, and (0.2) ``max_tool_calling_iterations`` / ``tool_call_timeout`` (tool calling and
environments during rollouts, GRPOConfig's fields; the trainer's ``tools=`` / ``environment_factory=``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from posttrain import ConfigError, TrainingConfig

__all__ = ["PPOConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class PPOConfig(TrainingConfig):
    """Settings of PPO (TRL 1.12's ``PPOConfig`` names and defaults; every field has help text)."""

    # > Defaults TRL overrides from TrainingArguments
    learning_rate: float = field(default=3e-6, metadata=_help("Peak learning rate of AdamW for the policy (TRL's PPO default 3e-6); the critic uses critic_learning_rate."))
    logging_steps: float = field(default=10, metadata=_help("Log every this many optimizer steps (TRL's PPO default 10)."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's PPO default: on)."))

    # > TRL's PPOConfig
    dataset_num_proc: int | None = field(default=None, metadata=_help("Accepted for TRL compatibility: prompts are tokenized when a rollout needs them."))
    num_mini_batches: int = field(default=1, metadata=_help("Mini-batches (= optimizer steps) each rollout is cut into per PPO epoch."))
    total_episodes: int | None = field(default=None, metadata=_help("Total completions to train on (TRL's episodes); sets max_steps = ceil(total_episodes / batch_size) * num_ppo_epochs * num_mini_batches when max_steps is not set. Default: num_train_epochs passes over the prompts."))
    local_rollout_forward_batch_size: int = field(default=64, metadata=_help("Sequences per no-grad forward (generation, reference, critic values) in the rollout phase, per process."))
    num_sample_generations: int = field(default=10, metadata=_help("Accepted, no effect: posttrain logs sample completions with log_completions of other methods, not TRL's debugging tables."))
    response_length: int = field(default=53, metadata=_help("Maximum number of tokens generated per completion."))
    stop_token: Literal["eos"] | None = field(default=None, metadata=_help("'eos': completions stop at the tokenizer's EOS (and are truncated after it); None: stop_token_id, else the model's EOS. Exclusive with stop_token_id."))
    stop_token_id: int | None = field(default=None, metadata=_help("Token id that ends a completion (exclusive with stop_token)."))
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature; the trained, old and reference log-probs use the same temperature (> 0)."))
    missing_eos_penalty: float | None = field(default=None, metadata=_help("Subtracted from the score of a completion without the EOS token (>= 0; None = off)."))
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata=_help("The policy (and reference) when neither the model argument nor model_name_or_path gives one (TRL's default)."))
    world_size: int | None = field(default=None, metadata=_help("Computed: number of processes."))
    num_total_batches: int | None = field(default=None, metadata=_help("Computed: number of rollouts of the run."))
    micro_batch_size: int | None = field(default=None, metadata=_help("Computed: per_device_train_batch_size * world_size."))
    local_batch_size: int | None = field(default=None, metadata=_help("Computed: completions per rollout per process = per_device_train_batch_size * gradient_accumulation_steps * num_mini_batches."))
    batch_size: int | None = field(default=None, metadata=_help("Computed: local_batch_size * world_size."))
    local_mini_batch_size: int | None = field(default=None, metadata=_help("Computed: completions per optimizer step per process = local_batch_size / num_mini_batches."))
    mini_batch_size: int | None = field(default=None, metadata=_help("Computed: local_mini_batch_size * world_size."))
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata=_help("The reward model (a one-label sequence classifier) when the trainer gets neither reward_model nor reward_funcs and the config no reward_funcs (TRL's default)."))
    model_adapter_name: str | None = field(default=None, metadata=_help("Accepted, no effect: posttrain trains one PEFT adapter (peft_config)."))
    ref_adapter_name: str | None = field(default=None, metadata=_help("Accepted, no effect: with PEFT the reference is the adapter-disabled policy."))
    num_ppo_epochs: int = field(default=4, metadata=_help("Passes over each rollout (each shuffled into num_mini_batches mini-batches)."))
    whiten_rewards: bool = field(default=False, metadata=_help("Whiten the per-token rewards (KL penalty + score) over the rollout, keeping their mean."))
    kl_coef: float = field(default=0.05, metadata=_help("Per-token KL penalty in the reward: r_t = -kl_coef * KL_t (+ score at the end)."))
    kl_estimator: Literal["k1", "k3"] = field(default="k1", metadata=_help("Per-token KL estimator (http://joschu.net/blog/kl-approx.html): 'k1' = log pi_old - log pi_ref, 'k3' = (r - 1) - log r with r = pi_ref / pi_old."))
    cliprange: float = field(default=0.2, metadata=_help("Clip range of the policy ratio."))
    vf_coef: float = field(default=0.1, metadata=_help("Weight of the value loss (the critic's loss is vf_coef * 0.5 * clipped squared error)."))
    cliprange_value: float = field(default=0.2, metadata=_help("Clip range of the value predictions around the rollout's values."))
    gamma: float = field(default=1.0, metadata=_help("Discount factor of GAE."))
    lam: float = field(default=0.95, metadata=_help("Lambda of GAE."))
    ds3_gather_for_generation: bool = field(default=True, metadata=_help("DeepSpeed ZeRO-3: gather the policy's weights for generation (the rollout engine decides)."))

    # > posttrain's additions
    reward_funcs: list[str] | None = field(default=None, metadata=_help(
        "Reward functions by name instead of a reward model: built-ins ('accuracy', 'format', ...), 'module:function' paths, or a "
        "reward-model directory. The score is their weighted sum; CLI: --reward_funcs accuracy my_mod:fn."))
    reward_weights: list[float] | None = field(default=None, metadata=_help("One weight per reward function (default all 1.0)."))
    value_model_path: str | None = field(default=None, metadata=_help("The critic when the trainer gets no value_model: a directory / Hub id loaded as a one-label sequence classifier (default: the reward model's path when it is one, else the policy's)."))
    critic_learning_rate: float | None = field(default=None, metadata=_help("Learning rate of the critic's own optimizer (default: learning_rate, as TRL's single optimizer)."))
    value_head: bool = field(default=False, metadata=_help(
        "Instead of a separate critic, a value head Linear(hidden, 1) on the policy's last hidden states, trained with the policy "
        "(one optimizer; loss = policy loss + vf_coef * value loss) and saved as value_head.safetensors beside the policy's weights. "
        "Continues from <policy dir>/value_head.safetensors when the policy directory has one."))
    value_head_init_std: float = field(default=0.02, metadata=_help(
        "With value_head: std of the normal init of the head's weight (seeded by seed; bias 0) when the policy directory has no value_head.safetensors."))
    chat_template_kwargs: dict | None = field(default=None, metadata=_help("Extra keyword arguments of apply_chat_template for conversational prompts."))
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability of the policy, reference and critic to 0 (TRL's PPOTrainer always does)."))

    # > Tools and environments (posttrain-ppo 0.2; TRL's PPOTrainer had none: GRPOConfig's fields, same defaults)
    max_tool_calling_iterations: int | None = field(default=None, metadata=_help("With tools= / environment_factory=: the most tool-calling rounds per episode (None: until response_length, which then counts model-written and tool tokens over all turns)."))
    tool_call_timeout: float | None = field(default=60.0, metadata=_help("posttrain: seconds one tool call may run; a call that runs longer is abandoned and ends its episode with stop reason 'tool_timeout' (None: no limit, as in TRL)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stop_token is not None and self.stop_token_id is not None:
            raise ConfigError(f"stop_token={self.stop_token!r} and stop_token_id={self.stop_token_id} are both set: give one of them (as TRL requires).")
        if self.stop_token not in (None, "eos"):
            raise ConfigError(f"stop_token={self.stop_token!r} is invalid: use 'eos' or None (then stop_token_id).")
        if self.stop_token_id is not None and (isinstance(self.stop_token_id, bool) or self.stop_token_id < 0):
            raise ConfigError(f"stop_token_id={self.stop_token_id!r} is invalid: give a token id >= 0 or None.")
        if self.kl_estimator not in ("k1", "k3"):
            raise ConfigError(f"kl_estimator={self.kl_estimator!r} is invalid: use 'k1' (log pi_old - log pi_ref) or 'k3' (lower variance).")
        for name in ("num_ppo_epochs", "num_mini_batches", "response_length", "local_rollout_forward_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r} is invalid: it must be an integer >= 1.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: the log-probs divide the logits by it; use a value > 0.")
        for name in ("cliprange", "cliprange_value"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: a clip range must be > 0 (e.g. 0.2).")
        if self.vf_coef < 0 or self.kl_coef < 0:
            raise ConfigError(f"vf_coef={self.vf_coef}, kl_coef={self.kl_coef} are invalid: coefficients must be >= 0.")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"gamma={self.gamma}, lam={self.lam} are invalid: both must be in [0, 1].")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty={self.missing_eos_penalty} is invalid: the penalty is subtracted, give a value >= 0.")
        if self.critic_learning_rate is not None and self.critic_learning_rate < 0:
            raise ConfigError(f"critic_learning_rate={self.critic_learning_rate} is invalid: it must be >= 0 (None = learning_rate).")
        if self.value_head and self.value_model_path is not None:
            raise ConfigError(f"value_head=True and value_model_path={self.value_model_path!r} are both set: the value head replaces the separate "
                              "critic; drop value_model_path (or set value_head=False to train that critic).")
        if self.value_head and self.critic_learning_rate is not None:
            raise ConfigError(f"critic_learning_rate={self.critic_learning_rate} has no effect with value_head=True: the head trains with the policy's "
                              "optimizer at learning_rate; drop critic_learning_rate (or raise vf_coef).")
        if not self.value_head_init_std >= 0:
            raise ConfigError(f"value_head_init_std={self.value_head_init_std} is invalid: give a standard deviation >= 0.")
        if self.max_tool_calling_iterations is not None and (isinstance(self.max_tool_calling_iterations, bool) or self.max_tool_calling_iterations < 0):
            raise ConfigError(f"max_tool_calling_iterations={self.max_tool_calling_iterations!r} is invalid: use None (until response_length) or an integer >= 0 (0: tools are never run).")
        if self.tool_call_timeout is not None and not self.tool_call_timeout > 0:
            raise ConfigError(f"tool_call_timeout={self.tool_call_timeout!r} is invalid: use seconds > 0 (e.g. 60), or None for no limit.")
        if self.total_episodes is not None and (isinstance(self.total_episodes, bool) or self.total_episodes < 1):
            raise ConfigError(f"total_episodes={self.total_episodes!r} is invalid: give a number of completions >= 1, or None.")
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has {len(self.reward_funcs)}; give one weight per reward function.")
        if self.auto_find_batch_size:
            raise ConfigError("auto_find_batch_size=True is not supported by PPO: lower per_device_train_batch_size instead.")
        # TRL's derived sizes (per process; the trainer fills in the world-size ones)
        self.local_mini_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self.local_batch_size = self.local_mini_batch_size * self.num_mini_batches
        self.max_completion_length = self.response_length  # the name posttrain's online steps read

    @property
    def updates_per_rollout(self) -> int:
        """Optimizer steps trained on one rollout: ``num_ppo_epochs * num_mini_batches``."""
        return self.num_ppo_epochs * self.num_mini_batches

    def steps_for_episodes(self, world_size: int) -> int:
        """``max_steps`` of ``total_episodes`` completions (TRL's ``num_total_batches`` rollouts)."""
        return math.ceil(self.total_episodes / (self.local_batch_size * world_size)) * self.updates_per_rollout
