"""Config of the PRM method (light: imports only posttrain).

Every field of TRL 1.13's ``PRMConfig`` (the last TRL release with a PRM trainer; 1.14 removed it) is
here with TRL's name and default; a field posttrain cannot honour says so in its help.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["PRMConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class PRMConfig(TrainingConfig):
    """Settings of process-reward-model training (field names and defaults follow TRL 1.13's ``PRMConfig``).

    Each row is stepwise supervision: a ``prompt``, ``completions`` (the list of reasoning steps) and
    ``labels`` (one bool per step: is the step correct). The model is a token classifier with two
    labels; each step is followed by ``step_separator`` and only the separator's last token carries
    the step's label (every other token is ignored by the loss).
    """

    # > Defaults overridden from TrainingConfig (as TRL 1.13)
    learning_rate: float = field(default=1e-5, metadata=_help("The initial learning rate for AdamW (TRL's PRM default 1e-5)."))
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default; set False for tiny models).")
    )

    # > Parameters that control the data preprocessing
    max_length: int | None = field(
        default=1024,
        metadata=_help("Maximum length of the sequences (prompt + completion), truncated on the right (labels too). None: no truncation."),
    )
    max_completion_length: int | None = field(
        default=None,
        metadata=_help(
            "Maximum length of the completion (the steps joined, each followed by the separator), truncated on the right "
            "before the prompt is prepended. None: no truncation."
        ),
    )
    disable_dropout: bool = field(default=True, metadata=_help("Whether to disable dropout in the model."))
    step_separator: str = field(
        default="\n",
        metadata=_help("Separator appended to every step; the step's label sits on the separator's last token."),
    )
    train_on_last_step_only: bool = field(
        default=False,
        metadata=_help("Train only on the last step's label (the others become -100); evaluation still scores every step, as TRL."),
    )
    dataset_num_proc: int | None = field(
        default=None, metadata=_help("Accepted, no effect: posttrain tokenizes in the training process (TRL: processes for dataset.map).")
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} is invalid: use a positive token count, or None for no truncation.")
        if not isinstance(self.step_separator, str) or not self.step_separator:
            raise ConfigError(f"step_separator={self.step_separator!r} is invalid: use a non-empty string such as '\\n' (TRL's default).")
