"""Config of ORPO (light: imports only posttrain). Field names and defaults follow TRL 1.16's ``ORPOConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["ORPOConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class ORPOConfig(TrainingConfig):
    """Settings of ORPO (Hong et al. 2024, arXiv:2403.07691).

    The loss of a pair (chosen y_w, rejected y_l) is ``nll(chosen) - beta * log sigmoid(log odds(y_w) -
    log odds(y_l))`` with ``odds(y) = p(y) / (1 - p(y))`` and ``p(y)`` the per-token mean probability
    of the response. Defaults that differ from ``TrainingConfig`` are TRL 1.16's.
    """

    # > Defaults overridden from TrainingConfig (as TRL 1.16)
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's ORPO default 1e-6; the paper used 8e-6, preset 'orpo')."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default; set False for tiny models)."))

    # > Parameters that control the method
    beta: float = field(default=0.1, metadata=_help("Weight of the odds-ratio term (the paper's lambda; 'alpha' in the authors' code)."))
    max_length: int | None = field(default=1024, metadata=_help("Maximum tokens of prompt + response; responses are truncated to fit (None: no limit)."))
    max_completion_length: int | None = field(
        default=None,
        metadata=_help("Encoder-decoder models only (as TRL): maximum tokens of each response (the decoder's labels); None = 128. No effect on decoder-only models."),
    )
    dataset_num_proc: int | None = field(default=None, metadata=_help("Accepted, no effect: rows are tokenized in the training process (one pass, before training)."))
    disable_dropout: bool = field(default=True, metadata=_help("Disable dropout in the model (as TRL)."))
    padding_value: int | None = field(default=None, metadata=_help("Token id used to pad input_ids; None: the tokenizer's pad token (else EOS)."))
    generate_during_eval: bool = field(
        default=False,
        metadata=_help("Accepted, no effect: TRL logs sampled completions to W&B/Comet; posttrain does not. Refused, as by TRL, when neither wandb nor comet_ml is installed."),
    )
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata=_help("Whether the model is an encoder-decoder (T5, BART); None = read from the model's config.is_encoder_decoder. A value the model contradicts is refused when the trainer is built."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta < 0:
            raise ConfigError(f"beta={self.beta} is invalid: the odds-ratio weight must be >= 0 (the paper uses 0.1).")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is invalid: a next-token loss needs at least 2 tokens (or None).")
        if self.max_completion_length is not None and self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: use at least 1 token, or None (128 for encoder-decoder models).")
