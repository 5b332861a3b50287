"""Config of the reward method (light: imports only posttrain).

Every field of TRL 1.16's ``RewardConfig`` is here with TRL's name and default; a field posttrain
cannot honour says so in its help ("Accepted, no effect: ..."), and setting it warns once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["RewardConfig"]


@dataclass(kw_only=True)
class RewardConfig(TrainingConfig):
    """Settings of reward-model training (field names and defaults follow TRL 1.16's ``RewardConfig``)."""

    # > Parameters whose defaults differ from TrainingConfig (TRL's reward defaults)
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate of AdamW (TRL's reward default)."})
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute activations in backward to save memory (TRL's default for reward models: on)."},
    )
    logging_first_step: bool = field(default=False, metadata={"help": "Also log after the first step (transformers' and TRL's default: off)."})

    # > Parameters that control the model
    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "Chat template to use: a .jinja/.j2 file (its tokens must already be in the tokenizer), or a tokenizer "
            "(Hub id or directory) whose template, added tokens and EOS are copied; the embeddings grow to fit new tokens."
        },
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability in the model to 0."})

    # > Parameters that control the data preprocessing
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Accepted, no effect: rows are tokenized in the training process (the datasets are tokenized once, at construction)."},
    )
    eos_token: str | None = field(
        default=None,
        metadata={"help": "Token appended to standard (non-conversational) chosen/rejected texts; None = the tokenizer's eos_token."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Pairs whose chosen or rejected sequence is longer than this many tokens are dropped (not truncated). None keeps all."},
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad batches to a multiple of this length. 'auto' (TRL: 128 on AWS Neuron, else none) means none: posttrain does not run on Neuron."},
    )

    # > Parameters that control the training
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={"help": "Weight of the auxiliary (r_chosen + r_rejected)^2 loss that keeps rewards mean-zero (Eisenstein et al. 2023, Eq. 2); recommended 0.01."},
    )
    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Accepted, no effect: activations stay on the accelerator; use gradient_checkpointing to save activation memory."},
    )

    # > Deprecated parameters
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Deprecated (TRL too): the padding token; set tokenizer.pad_token and pass the tokenizer as processing_class instead."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.pad_to_multiple_of, str):  # the CLI passes a string; 'auto' pads only on Neuron in TRL
            text = self.pad_to_multiple_of.strip().lower()
            if text in ("auto", "none", "null"):
                self.pad_to_multiple_of = None
            elif text.isdigit():
                self.pad_to_multiple_of = int(text)
            else:
                raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} is invalid: use a positive integer, 'auto' or None.")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length={self.max_length} is invalid: use a positive token count, or None to keep every pair.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of} is invalid: use a positive integer or None.")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError(
                f"center_rewards_coefficient={self.center_rewards_coefficient} is invalid: use a value >= 0 (0.01 is "
                "recommended), or None to disable reward centering."
            )
        if self.pad_token is not None:
            warnings.warn(
                "pad_token is deprecated (as in TRL, removed in its v2.0.0): set tokenizer.pad_token and pass the tokenizer as processing_class instead.",
                FutureWarning,
                stacklevel=3,
            )
