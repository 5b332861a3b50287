"""Config of the BCO method (light: imports only posttrain).

Every field of TRL 1.13's ``BCOConfig`` (the last TRL release with BCO) is here with TRL's name and
default; a field posttrain cannot honour says so in its help ("Accepted, no effect: ...").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from posttrain import ConfigError, TrainingConfig

__all__ = ["BCOConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class BCOConfig(TrainingConfig):
    """Settings of BCO training (Jung et al. 2024, arXiv:2404.04656); names and defaults follow TRL 1.13's ``BCOConfig``."""

    # > Parameters whose defaults differ from TrainingConfig (TRL's BCO defaults)
    learning_rate: float = field(default=5e-7, metadata=_help("Peak learning rate of AdamW (TRL's BCO default 5e-7)."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default: on; set False for tiny models)."))
    logging_first_step: bool = field(default=False, metadata=_help("Also log after the first step (transformers' and TRL's default: off)."))

    train_sampling_strategy: str = field(
        default="sequential",
        metadata=_help("Accepted, no effect: TRL's BCO reads the data in order; posttrain's loop shuffles with the seed (data_seed), which the running reward mean does not need."),
    )

    # > Parameters that control the data preprocessing
    max_length: int | None = field(
        default=1024,
        metadata=_help("Maximum tokens of prompt + completion (incl. BOS/EOS): completions are truncated from the right to fit; the prompt is never "
                       "truncated (as TRL). None: no truncation (TRL: 512 with a warning)."),
    )
    max_completion_length: int | None = field(default=None, metadata=_help("Accepted, no effect: TRL uses it for encoder-decoder models only, which posttrain's BCO does not train."))
    dataset_num_proc: int | None = field(default=None, metadata=_help("Accepted, no effect: rows are tokenized in the training process, once, at construction."))

    # > Parameters that control the training
    beta: float = field(default=0.1, metadata=_help("Temperature of the implicit reward beta*log(pi/pi_ref); higher keeps the policy closer to the reference."))
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability in the policy and reference model to 0."))
    generate_during_eval: bool = field(
        default=False,
        metadata=_help("Accepted, no effect: TRL logs sampled completions to W&B/Comet during evaluation; posttrain does not. "
                       "Refused, as by TRL, when neither wandb nor comet_ml is installed."),
    )
    is_encoder_decoder: bool | None = field(
        default=None,
        metadata=_help("Accepted, no effect: the model's config decides (as TRL when a model is given). posttrain's BCO trains "
                       "decoder-only causal LMs; an encoder-decoder model is refused when the trainer is built."),
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata=_help("Score the whole dataset with the reference model before training so it need not stay in memory.")
    )

    # > Underlying distribution matching (UDM): density-ratio weights of the undesirable examples
    prompt_sample_size: int = field(default=1024, metadata=_help("Number of prompts per class sampled (with replacement) to fit the density-ratio classifier."))
    min_density_ratio: float = field(default=0.5, metadata=_help("Minimum value of the density ratio. The estimated density ratio is clamped to this value."))
    max_density_ratio: float = field(default=10.0, metadata=_help("Maximum value of the density ratio. The estimated density ratio is clamped to this value."))
    udm_embedding_model: str | None = field(
        default=None,
        metadata=_help("posttrain addition (no TRL equivalent): a model name/path whose mean-pooled last hidden state embeds the prompts for UDM, "
                       "so the CLI can turn UDM on. The trainer's embedding_func/embedding_tokenizer arguments (TRL's) do the same from Python."),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta} is invalid: use a positive value (the BCO paper and TRL use 0.1).")
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is invalid: use at least 2 tokens, or None for no truncation.")
        if self.prompt_sample_size < 1:
            raise ConfigError(f"prompt_sample_size={self.prompt_sample_size} is invalid: use a positive number of prompts per class (TRL: 1024).")
        if not 0 < self.min_density_ratio <= self.max_density_ratio:
            raise ConfigError(
                f"min_density_ratio={self.min_density_ratio}, max_density_ratio={self.max_density_ratio} are invalid: use "
                "0 < min_density_ratio <= max_density_ratio (TRL: 0.5 and 10.0)."
            )
