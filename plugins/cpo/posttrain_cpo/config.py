"""Config of the CPO family (CPO, SimPO, AlphaPO; light: imports only posttrain).

Field names, defaults and choices follow TRL 1.16's ``trl.experimental.cpo.CPOConfig``; where
posttrain departs it is said in the field's help and in docs/methods/cpo.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["CPOConfig", "LOSS_TYPES"]

#: Every accepted ``loss_type`` (TRL 1.16's list); ``"alphapo"`` is rewritten to ``"simpo"`` with ``cpo_alpha=0``.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo", "alphapo")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class CPOConfig(TrainingConfig):
    """Settings of CPO / SimPO / AlphaPO training (field names and defaults follow TRL 1.16's ``CPOConfig``)."""

    # > Parameters whose defaults differ from TrainingConfig (TRL 1.16's CPOConfig values)
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's CPO default)."))
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default for CPO: on).")
    )

    # > Parameters that control the data preprocessing
    max_length: int | None = field(
        default=1024,
        metadata=_help(
            "Maximum tokens of prompt + completion: each completion is cut to max_length - prompt length (the prompt is "
            "kept whole, as in TRL 1.16); pairs whose prompt alone fills max_length are dropped. None disables truncation."
        ),
    )
    max_completion_length: int | None = field(
        default=None,
        metadata=_help(
            "Encoder-decoder models only (as TRL 1.16): maximum tokens of each completion (the decoder's labels); None = 128. "
            "No effect on a decoder-only model (a warning when set), whose completions are cut by max_length."
        ),
    )
    dataset_num_proc: int | None = field(
        default=None, metadata=_help("Accepted, no effect: rows are tokenized in the training process (one pass, before training).")
    )
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability in the model to 0."))
    generate_during_eval: bool = field(
        default=False,
        metadata=_help(
            "Accepted, no effect (a warning when True): TRL logs sampled completions to W&B/Comet tables during "
            "evaluation; generate from the saved model (or a TrainerCallback) instead. Refused, as by TRL, when neither "
            "wandb nor comet_ml is installed."
        ),
    )
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata=_help(
            "Whether the model is an encoder-decoder (T5, BART); None = read from the model's config.is_encoder_decoder. "
            "A value the model contradicts is refused when the trainer is built."
        ),
    )

    # > Parameters that control the training
    loss_type: str = field(
        default="sigmoid",
        metadata=_help(
            "Preference loss: 'sigmoid' (CPO, summed log-probs), 'hinge' (SLiC), 'ipo' (IPO on averaged log-probs), 'simpo' "
            "(SimPO: averaged log-probs, margin simpo_gamma), or 'alphapo' (shorthand: sets loss_type='simpo' and "
            "cpo_alpha=0.0, as TRL; also set alpha != 0)."
        ),
    )
    beta: float = field(
        default=0.1,
        metadata=_help("Scale of the reward difference inside the loss (CPO: 0.1; SimPO: 2.0-2.5). For 'ipo' it is the paper's tau."),
    )
    label_smoothing: float = field(
        default=0.0,
        metadata=_help("Conservative label smoothing of the 'sigmoid'/'simpo' losses (probability that a label is flipped); ignored by 'hinge'/'ipo'."),
    )
    cpo_alpha: float = field(
        default=1.0,
        metadata=_help("Weight of the behaviour-cloning NLL of the chosen completions (CPO's L_NLL); 0.0 = off (SimPO, AlphaPO)."),
    )
    simpo_gamma: float = field(
        default=0.5,
        metadata=_help("SimPO target reward margin gamma, subtracted from beta * (r_chosen - r_rejected); used only with loss_type='simpo'."),
    )
    alpha: float = field(
        default=0.0,
        metadata=_help(
            "AlphaPO reward shape: the reward r = log p becomes r = (1 - p^(-alpha)) / alpha (p: the completion's probability, "
            "length-normalized for 'ipo'/'simpo'); 0.0 = the log reward. Applies to every loss_type."
        ),
    )

    def __post_init__(self) -> None:
        if self.loss_type == "alphapo":  # TRL 1.16's shorthand, rewritten before validation as there
            self.loss_type, self.cpo_alpha = "simpo", 0.0
            if self.alpha == 0.0:
                warnings.warn(
                    "loss_type='alphapo' with alpha=0.0 is plain SimPO: set alpha (the AlphaPO paper tunes it, e.g. 0.25) "
                    "or use the 'alphapo' preset.",
                    stacklevel=3,
                )
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type!r} is invalid: use one of {', '.join(LOSS_TYPES)}.")
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta} is invalid: use beta > 0 (TRL's CPO default is 0.1; SimPO uses 2.0-2.5).")
        if not 0.0 <= self.label_smoothing <= 0.5:
            raise ConfigError(f"label_smoothing={self.label_smoothing} is invalid: use a label-flip probability in [0, 0.5] (0 = off).")
        if self.label_smoothing > 0 and self.loss_type in ("hinge", "ipo"):
            warnings.warn(
                f"label_smoothing={self.label_smoothing} has no effect with loss_type={self.loss_type!r} (as in TRL 1.16): "
                "set label_smoothing=0.0, or use 'sigmoid' or 'simpo'.",
                stacklevel=3,
            )
        if not self.cpo_alpha >= 0:
            raise ConfigError(f"cpo_alpha={self.cpo_alpha} is invalid: use a weight >= 0 (CPO: 1.0; 0.0 turns the NLL term off).")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is invalid: use at least 2 tokens (a prompt token and a completion token), or None.")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: use at least 1 token, or None (128 for encoder-decoder models).")
        if self.generate_during_eval:
            warnings.warn(
                "generate_during_eval=True has no effect in posttrain: no completions are sampled during evaluation; generate "
                "from the saved model or in a TrainerCallback.",
                stacklevel=3,
            )
