"""Config of the KTO method (light: imports only posttrain)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["KTOConfig"]

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(kw_only=True)
class KTOConfig(TrainingConfig):
    """Settings of KTO training (field names and defaults follow TRL 1.16's ``KTOConfig``)."""

    # > Parameters whose defaults differ from TrainingConfig
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of AdamW (TRL's KTO default)."})

    # > Parameters that control the model
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability in the policy and reference model to 0."})

    # > Parameters that control the data preprocessing
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Truncate prompt+completion to this many tokens (from the right); examples whose prompt alone fills it are dropped. None = no truncation."},
    )
    pad_to_multiple_of: int | None = field(default=None, metadata={"help": "Pad batches to a multiple of this length."})
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Score the whole dataset with the reference model before training so it need not stay in memory. The KL pairing is then fixed per example (see docs)."},
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of the reference pre-pass; None = per_device_train_batch_size (train) / per_device_eval_batch_size (eval)."},
    )

    # > Parameters that control the training
    loss_type: str = field(default="kto", metadata={"help": "Loss: 'kto' (Ethayarajh et al. 2024, Eq. 7) or 'apo_zero_unpaired' (D'Oosterlinck et al. 2024, no KL term)."})
    beta: float = field(default=0.1, metadata={"help": "Temperature of the implicit reward beta*log(pi/pi_ref); higher keeps the policy closer to the reference."})
    desirable_weight: float = field(default=1.0, metadata={"help": "Weight of the desirable (label=True) losses, to counter class imbalance."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "Weight of the undesirable (label=False) losses, to counter class imbalance."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type!r} is invalid: use one of {', '.join(repr(t) for t in LOSS_TYPES)}.")
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta} is invalid: use a positive value (the KTO paper uses 0.1).")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: use a positive weight (1.0 for balanced data).")
        if self.loss_type == "kto" and self.per_device_train_batch_size <= 1:
            raise ConfigError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} is invalid with loss_type='kto': the KL "
                "estimate pairs each prompt with another example's completion in the same micro-batch, so with one example "
                "it equals the implied reward. Use per_device_train_batch_size >= 2 (raise gradient_accumulation_steps "
                "instead of lowering it), or loss_type='apo_zero_unpaired', which has no KL term."
            )
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is invalid: use at least 2 tokens, or None for no truncation.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of} is invalid: use a positive integer or None.")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ConfigError(f"precompute_ref_batch_size={self.precompute_ref_batch_size} is invalid: use a positive integer or None.")
