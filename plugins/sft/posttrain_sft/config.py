"""Configuration of the ``sft`` method (light: imports only ``posttrain``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["SFTConfig"]

LOSS_TYPES = ("nll", "dft")
PACKING_STRATEGIES = ("bfd",)


@dataclass(kw_only=True)
class SFTConfig(TrainingConfig):
    """Settings of supervised fine-tuning; field names and defaults follow ``trl.SFTConfig``."""

    # > Overridden defaults
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of AdamW (TRL's SFT default)."})

    # > Parameters that control the data
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the raw text of language-modeling data."})
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Truncate every tokenized sequence to this many tokens (keeping the start); with packing, the row length. None: no truncation."},
    )
    eos_token: str | None = field(
        default=None,
        metadata={"help": "Appended to text/completion strings that do not already end with it; None = the tokenizer's eos_token. Chat data relies on its template."},
    )
    packing: bool = field(default=False, metadata={"help": "Pack several sequences into rows of max_length tokens (attention never crosses sequences)."})
    packing_strategy: str = field(default="bfd", metadata={"help": "How to pack: 'bfd' (best-fit decreasing; sequences are never split)."})
    padding_free: bool = field(
        default=False,
        metadata={"help": "Concatenate each micro-batch into one row with restarting position_ids instead of padding (always on with packing)."},
    )

    # > Parameters that control the loss
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss on completion tokens only. None = on for prompt/completion data; True requires prompt/completion data."},
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={"help": "Loss on assistant turns only (chat data; the chat template needs {% generation %} markers)."},
    )
    loss_type: str = field(default="nll", metadata={"help": "'nll' (token cross-entropy) or 'dft' (NLL scaled by the detached token probability, arXiv:2508.05629)."})

    # > Logging
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N optimizer steps."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type!r} is invalid: use one of {', '.join(map(repr, LOSS_TYPES))}.")
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ConfigError(
                f"packing_strategy={self.packing_strategy!r} is not supported: use 'bfd' (best-fit decreasing; TRL's "
                "'wrapped' cuts sequences mid-way and 'bfd_split' is not implemented)."
            )
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ConfigError(f"max_length={self.max_length!r} is invalid: use an integer >= 2, or None for no truncation.")
        if self.packing and self.max_length is None:
            raise ConfigError("packing=True needs max_length (the packed row length): set max_length, e.g. 1024, or packing=False.")
        if not self.dataset_text_field:
            raise ConfigError("dataset_text_field is empty: name the column that holds the text (default 'text').")
