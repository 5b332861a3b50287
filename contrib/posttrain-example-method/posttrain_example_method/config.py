"""Config of the example method (light: imports only posttrain)."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["TokenDropoutSFTConfig"]


@dataclass(kw_only=True)
class TokenDropoutSFTConfig(TrainingConfig):
    """Settings of SFT with input token dropout."""

    # > Parameters that control the method
    token_dropout: float = field(default=0.1, metadata={"help": "Probability of replacing each input token (not the labels) with the unknown/pad token."})
    max_length: int = field(default=512, metadata={"help": "Truncate tokenized texts to this many tokens."})
    dataset_text_field: str = field(default="text", metadata={"help": "Dataset column holding the text."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.token_dropout < 1.0:
            raise ConfigError(f"token_dropout={self.token_dropout} is invalid: use a probability in [0, 1).")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is invalid: a next-token loss needs at least 2 tokens.")
