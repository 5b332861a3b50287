"""Config of TPO (light: imports only posttrain). Field names, defaults and help follow TRL 1.16's ``TPOConfig``."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["TPOConfig", "LOSS_TYPES"]

#: TRL 1.16's ``TPOConfig.loss_type`` choices.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "tpo-l")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class TPOConfig(TrainingConfig):
    """Settings of TPO / TPO-L (Saeidi et al., arXiv:2405.16681).

    Each row holds a prompt, a ``chosen``, a ``rejected`` and a gold ``reference`` response. The loss is
    a reference-model-free preference loss on chosen vs rejected (``loss_type``) plus ``tpo_alpha``
    times the NLL of the gold response. Defaults that differ from ``TrainingConfig`` are TRL 1.16's.
    """

    # > Defaults overridden from TrainingConfig (as TRL 1.16)
    learning_rate: float = field(default=5e-7, metadata=_help("The initial learning rate for AdamW (TRL's TPO default 5e-7)."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default; set False for tiny models)."))

    # > Parameters that control the model
    disable_dropout: bool = field(default=True, metadata=_help("Whether to disable dropout in the model."))

    # > Parameters that control the data preprocessing
    dataset_num_proc: int | None = field(
        default=None, metadata=_help("Accepted, no effect: posttrain tokenizes in the training process (TRL: processes for dataset.map).")
    )
    max_length: int | None = field(
        default=1024,
        metadata=_help(
            "Maximum length of the tokenized sequence. Sequences longer than `max_length` are truncated from the left or "
            "right depending on the `truncation_mode`. If `None`, no truncation is applied."
        ),
    )
    truncation_mode: str = field(default="keep_start", metadata=_help("Truncation mode to use when the sequence exceeds `max_length`: 'keep_start' or 'keep_end'."))
    pad_to_multiple_of: int | None = field(default=None, metadata=_help("If set, the sequences will be padded to a multiple of this value."))

    # > Parameters that control the training
    loss_type: str = field(
        default="sigmoid",
        metadata=_help(
            "Type of loss to use: 'sigmoid' (TPO), 'hinge' (SLiC, on the summed log-likelihood), 'ipo' (IPO, on "
            "length-normalized log-probs) or 'tpo-l' (length-normalized TPO with the target margin tpo_l_gamma)."
        ),
    )
    beta: float = field(
        default=0.01,
        metadata=_help(
            "Parameter controlling the temperature of the TPO loss. For the IPO loss (`loss_type='ipo'`), this value is "
            "the regularization parameter denoted by tau in the IPO paper."
        ),
    )
    label_smoothing: float = field(default=0.0, metadata=_help("Label smoothing factor (conservative sigmoid; 'sigmoid' and 'tpo-l' only, ignored with a warning otherwise)."))
    tpo_alpha: float = field(
        default=1.0,
        metadata=_help(
            "Weight of the supervised NLL term computed on the gold (`reference`) response in TPO training. Setting "
            "`tpo_alpha=0.0` disables the NLL term and skips the corresponding forward pass (rows then need no 'reference')."
        ),
    )
    tpo_l_gamma: float = field(default=0.5, metadata=_help("Target reward margin gamma for the TPO-L loss, used only when `loss_type='tpo-l'`."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type!r} is invalid: use one of {', '.join(repr(t) for t in LOSS_TYPES)}.")
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta} is invalid: the temperature must be > 0 (TRL's default is 0.01).")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} is invalid: use a value in [0, 0.5] (0 disables it).")
        if self.tpo_alpha < 0:
            raise ConfigError(f"tpo_alpha={self.tpo_alpha} is invalid: the NLL weight must be >= 0 (0 disables the NLL term).")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ConfigError(f"truncation_mode={self.truncation_mode!r} is invalid: use 'keep_start' or 'keep_end'.")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is invalid: a next-token loss needs at least 2 tokens (or None).")
        if self.pad_to_multiple_of is not None and (not isinstance(self.pad_to_multiple_of, int) or self.pad_to_multiple_of < 1):
            raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} is invalid: use a positive integer or None.")
        if self.loss_type in ("hinge", "ipo") and self.label_smoothing > 0:
            warnings.warn(
                f"loss_type={self.loss_type!r} does not support label smoothing: label_smoothing={self.label_smoothing} is ignored "
                "(as TRL). Set label_smoothing=0.0 to remove this warning.",
                stacklevel=3,
            )
