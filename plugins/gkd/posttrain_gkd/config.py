"""Config of GKD (light: imports only posttrain). Field names, defaults and help follow TRL 1.16's ``GKDConfig``.

TRL's ``GKDConfig`` is an ``SFTConfig``: its SFT fields are here too, with TRL's defaults. The ones GKD's
conversational collator never reads (in TRL too: GKD skips the SFT dataset preparation) are accepted and
say "Accepted, no effect"; setting one of them to a non-default value warns once, and ``packing`` /
``padding_free`` / ``completion_only_loss=False`` / ``assistant_only_loss`` are refused in one line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from posttrain import ConfigError, TrainingConfig

__all__ = ["GKDConfig"]


def _help(text: str) -> dict:
    return {"help": text}


#: SFT fields the GKD collator ignores (as in TRL, whose GKDTrainer skips the SFT dataset preparation), with their defaults
_NO_EFFECT = {
    "dataset_text_field": "text", "dataset_kwargs": None, "dataset_num_proc": None, "eos_token": None, "packing_strategy": "bfd",
    "eval_packing": None, "loss_type": "nll", "activation_offloading": False, "chat_template_path": None, "shuffle_dataset": False,
    "truncation_mode": "keep_start", "router_aux_loss_coef": None, "pad_to_multiple_of": "auto",
}


@dataclass(kw_only=True)
class GKDConfig(TrainingConfig):
    """Settings of GKD (Agarwal et al., ICLR 2024, arXiv:2306.13649); every field of TRL 1.16's ``GKDConfig`` with its default.

    With probability ``lmbda`` a micro-batch's completions are replaced by the student's own samples
    (on-policy); otherwise the dataset's completions are used, or the teacher's samples with ``seq_kd``.
    The loss is the generalized Jensen-Shannon divergence ``beta`` between the student's and the
    teacher's next-token distributions on the completion tokens (temperature 1, as TRL's trainer),
    averaged over the tokens of the optimizer step.
    """

    # > Defaults overridden from TrainingConfig (as TRL 1.16's SFTConfig / GKDConfig)
    learning_rate: float = field(default=2e-5, metadata=_help("Peak learning rate of AdamW (TRL's SFT/GKD default)."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default; set False for tiny models)."))

    # > Parameters that control the model (SFTConfig)
    router_aux_loss_coef: float | None = field(default=None, metadata=_help("Accepted, no effect: GKD's loss has no MoE load-balancing term here (TRL's GKD compute_loss adds none either)."))
    chat_template_path: str | None = field(default=None, metadata=_help("Accepted, no effect: GKD renders conversations with the tokenizer's own chat template (set tokenizer.chat_template)."))

    # > Parameters that control the data preprocessing (SFTConfig; GKD reads only max_length and pad_token)
    dataset_text_field: str = field(default="text", metadata=_help("Accepted, no effect: GKD trains on conversational 'messages' rows."))
    dataset_kwargs: dict[str, Any] | str | None = field(default=None, metadata=_help("Accepted, no effect: TRL's GKD sets skip_prepare_dataset=True itself; rows are tokenized by the GKD collator."))
    dataset_num_proc: int | None = field(default=None, metadata=_help("Accepted, no effect: rows are tokenized in the training process."))
    eos_token: str | None = field(default=None, metadata=_help("Accepted, no effect: completions end where the chat template ends the assistant turn."))
    max_length: int | None = field(default=1024, metadata=_help("Maximum tokens of prompt + completion; longer rows keep their LAST max_length tokens (the oldest prompt context is dropped, as TRL's ChatML collator). None: no truncation."))
    truncation_mode: str = field(default="keep_start", metadata=_help("Accepted, no effect: the GKD collator always keeps the end of a too-long row (TRL's DataCollatorForChatML)."))
    shuffle_dataset: bool = field(default=False, metadata=_help("Accepted, no effect: posttrain's loop draws rows in a seeded random order per epoch (set data_seed to change it)."))
    packing: bool = field(default=False, metadata=_help("Not supported (as TRL's GKD): each row is one sequence; True is refused."))
    packing_strategy: str = field(default="bfd", metadata=_help("Accepted, no effect: packing is not supported."))
    padding_free: bool = field(default=False, metadata=_help("Not supported: batches are padded (left, as TRL's ChatML collator); True is refused."))
    pad_to_multiple_of: int | str | None = field(default="auto", metadata=_help("Accepted, no effect: batches are padded to their longest row."))
    eval_packing: bool | None = field(default=None, metadata=_help("Accepted, no effect: packing is not supported."))
    completion_only_loss: bool | None = field(default=None, metadata=_help("The divergence is computed on the completion (last assistant message) only; None or True. False is refused."))
    assistant_only_loss: bool = field(default=False, metadata=_help("Not supported: the completion is the last message; True is refused."))
    loss_type: str = field(default="nll", metadata=_help("Accepted, no effect: GKD's loss is the generalized JSD (beta), not SFT's loss_type."))
    activation_offloading: bool = field(default=False, metadata=_help("Accepted, no effect in GKD."))
    pad_token: str | None = field(default=None, metadata=_help("Token used for padding (default: the tokenizer's pad token, else its EOS token)."))

    # > Parameters of GKD (GKDConfig)
    temperature: float = field(default=0.9, metadata=_help("Temperature for sampling. The higher the temperature, the more random the completions. (The loss is computed at temperature 1, as TRL's trainer.)"))
    lmbda: float = field(default=0.5, metadata=_help("Lambda parameter that controls the student data fraction (i.e., the proportion of on-policy student-generated outputs). Drawn per micro-batch with a seeded generator (seed, step, micro-batch, process)."))
    beta: float = field(default=0.5, metadata=_help("Interpolation coefficient between `0.0` and `1.0` of the Generalized Jensen-Shannon Divergence loss. When beta is `0.0`, the loss is the KL divergence. When beta is `1.0`, the loss is the Inverse KL Divergence."))
    max_new_tokens: int = field(default=128, metadata=_help("Maximum number of tokens to generate per completion."))
    teacher_model_name_or_path: str | None = field(default=None, metadata=_help("Model name or path of the teacher model (used when the trainer gets no teacher_model). GKD needs a teacher: none at all is an error."))
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata=_help("Keyword arguments to pass to `AutoModelForCausalLM.from_pretrained` when instantiating the teacher model from a string (a JSON string on the command line)."))
    disable_dropout: bool = field(default=True, metadata=_help("Whether to disable dropouts in `model`."))
    seq_kd: bool = field(default=False, metadata=_help("Seq_kd parameter that controls whether to perform Sequence-Level KD (can be viewed as supervised FT on teacher-generated output): a micro-batch not sampled by the student gets the teacher's samples."))

    # > posttrain's own (generation)
    generation_batch_size: int | None = field(default=None, metadata=_help("Sequences generated at once by the rollout engine (default: the whole micro-batch); bounds generation memory."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.teacher_model_init_kwargs, str):  # the CLI passes JSON
            import json

            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except ValueError as exc:
                raise ConfigError(f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is not a JSON object: give e.g. '{{\"dtype\": \"bfloat16\"}}' ({exc}).") from None
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ConfigError(f"teacher_model_init_kwargs must be a dict of from_pretrained arguments (e.g. {{'dtype': 'bfloat16'}}), got {type(self.teacher_model_init_kwargs).__name__}.")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda={self.lmbda} is invalid: the student data fraction must be in [0, 1] (0: dataset or teacher completions, 1: fully on-policy).")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta={self.beta} is invalid: the generalized JSD interpolation must be in [0, 1] (0: forward KL, 1: reverse KL).")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: the sampling temperature must be > 0 (TRL's default is 0.9).")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens!r} is invalid: generate at least 1 token per completion.")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2):
            raise ConfigError(f"max_length={self.max_length!r} is invalid: use an integer >= 2 (prompt + completion tokens) or None.")
        if self.generation_batch_size is not None and (isinstance(self.generation_batch_size, bool) or self.generation_batch_size < 1):
            raise ConfigError(f"generation_batch_size={self.generation_batch_size!r} is invalid: use a positive integer or None.")
        for name, bad, why in (("packing", True, "each row is one conversation"), ("padding_free", True, "batches are padded"),
                               ("assistant_only_loss", True, "the completion is the last message of each row"),
                               ("completion_only_loss", False, "GKD's divergence covers the completion only")):
            if getattr(self, name) is bad:
                raise ConfigError(f"{name}={bad} is not supported by GKD ({why}, as TRL's GKD collator): remove it.")
        for name, default in _NO_EFFECT.items():
            if getattr(self, name) != default:
                warnings.warn(f"posttrain: {name}={getattr(self, name)!r} is accepted but changes nothing in GKD (see `posttrain info gkd`).", UserWarning, stacklevel=3)
