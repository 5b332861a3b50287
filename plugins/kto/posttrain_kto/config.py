"""Config of the KTO method (light: imports only posttrain).

Every field of TRL 1.16's ``KTOConfig`` is here with TRL's name and default; a field posttrain
cannot honour says so in its help ("Accepted, no effect: ..."), and setting it warns once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["KTOConfig"]

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass(kw_only=True)
class KTOConfig(TrainingConfig):
    """Settings of KTO training (field names and defaults follow TRL 1.16's ``KTOConfig``)."""

    # > Parameters whose defaults differ from TrainingConfig (TRL's KTO defaults)
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate of AdamW (TRL's KTO default)."})
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute activations in backward to save memory (TRL's default for KTO: on)."},
    )
    logging_first_step: bool = field(default=False, metadata={"help": "Also log after the first step (transformers' and TRL's default: off)."})
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={
            "help": "Accepted, no effect: TRL needs 'sequential' because it fixes the KL pairs in the dataset; posttrain "
            "pairs them inside each micro-batch at collate time, so the seeded shuffle keeps them valid."
        },
    )

    # > Parameters that control the model
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the Mixture-of-Experts load-balancing loss added to the KTO loss; None = the model config's "
            "router_aux_loss_coef, 0.0 = off. Refused for a model without router logits."
        },
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability in the policy and reference model to 0."})

    # > Parameters that control the data preprocessing
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Accepted, no effect: rows are tokenized in the training process (the datasets are tokenized once, at construction)."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Truncate prompt+completion to this many tokens (from the right); examples whose prompt alone fills it are dropped. None = no truncation."},
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad batches to a multiple of this length. 'auto' (TRL: 128 on AWS Neuron, else none) means none: posttrain does not run on Neuron."},
    )
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
    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Accepted, no effect: activations stay on the accelerator; use gradient_checkpointing to save activation memory."},
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "TR-DPO-style reference update (arXiv:2404.09656): every ref_model_sync_steps steps, reference = alpha * policy + (1 - alpha) * reference."},
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "alpha of the reference update (sync_ref_model), in (0, 1]."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "tau: optimizer steps between reference updates (sync_ref_model)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_liger_kernel and (self.liger_kernel_config or {}).get("fused_linear_cross_entropy"):
            raise ConfigError(
                'liger_kernel_config={"fused_linear_cross_entropy": True} cannot be used with KTO: the loss needs the '
                "log-probs of every completion token, which the fused loss never builds. Drop that key (as TRL requires)."
            )
        if isinstance(self.pad_to_multiple_of, str):  # the CLI passes a string; 'auto' pads only on Neuron in TRL
            text = self.pad_to_multiple_of.strip().lower()
            if text in ("auto", "none", "null"):
                self.pad_to_multiple_of = None
            elif text.isdigit():
                self.pad_to_multiple_of = int(text)
            else:
                raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} is invalid: use a positive integer, 'auto' or None.")
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
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ConfigError(f"router_aux_loss_coef={self.router_aux_loss_coef} is invalid: use a value >= 0 (0.0 turns the MoE auxiliary loss off), or None for the model's own.")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ConfigError(f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} is invalid: use a value in (0, 1] (TR-DPO: 0.6).")
        if self.ref_model_sync_steps < 1:
            raise ConfigError(f"ref_model_sync_steps={self.ref_model_sync_steps} is invalid: use a positive number of steps.")
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ConfigError(
                "sync_ref_model=True and precompute_ref_log_probs=True conflict: the reference changes during training, so "
                "log-probs precomputed before it would go stale. Set one of them to False."
            )
