"""Config of the reward method (light: imports only posttrain)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["RewardConfig"]


@dataclass(kw_only=True)
class RewardConfig(TrainingConfig):
    """Settings of reward-model training (field names and defaults follow TRL's ``RewardConfig``)."""

    # > Parameters whose defaults differ from TrainingConfig
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW (TRL's reward default)."})

    # > Parameters that control the model
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability in the model to 0."})

    # > Parameters that control the data preprocessing
    eos_token: str | None = field(
        default=None,
        metadata={"help": "Token appended to standard (non-conversational) chosen/rejected texts; None = the tokenizer's eos_token."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Pairs whose chosen or rejected sequence is longer than this many tokens are dropped (not truncated). None keeps all."},
    )
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad batches to a multiple of this length."})

    # > Parameters that control the training
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "Weight of the auxiliary (r_chosen + r_rejected)^2 loss that keeps rewards mean-zero (Eisenstein et al. 2023, Eq. 2); recommended 0.01."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length={self.max_length} is invalid: use a positive token count, or None to keep every pair.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of} is invalid: use a positive integer or None.")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError(
                f"center_rewards_coefficient={self.center_rewards_coefficient} is invalid: use a value >= 0 (0.01 is "
                "recommended), or None to disable reward centering."
            )
