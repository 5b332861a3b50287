"""Config of GOLD (light: imports only posttrain).

Every field of TRL 1.16's ``trl.experimental.gold.GOLDConfig`` exists here with its name and default (its own
fields, and the ``SFTConfig`` fields it inherits). Fields posttrain cannot honour say so: a help text starting
"Accepted, no effect" (a non-default value warns once), or a one-line ``ConfigError`` for a value that would change
what is trained (vLLM generation, packing, padding-free batches).

Batch semantics (TRL's): one optimizer step trains on ``per_device_train_batch_size * gradient_accumulation_steps``
sequences per process, ``generation_batch_size`` distinct rows each repeated ``num_generations`` times; each of the
``gradient_accumulation_steps`` micro-batches is on-policy (the student samples the completions) with probability
``lmbda``, else it uses the dataset's completions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain import ConfigError, TrainingConfig

__all__ = ["GOLDConfig"]


def _help(text: str) -> dict:
    return {"help": text}


_VLLM = "Accepted, no effect: posttrain's GOLD samples with the transformers rollout engine (use_vllm=True is refused)."


@dataclass(kw_only=True)
class GOLDConfig(TrainingConfig):
    """Settings of GOLD (general on-policy logit distillation); field names and defaults follow TRL 1.16's ``GOLDConfig``."""

    # > TRL's GOLD default for a TrainingArguments field
    learning_rate: float = field(default=1e-7, metadata=_help("Peak learning rate of AdamW (TRL's GOLD default: 1e-7)."))

    # > SFTConfig fields GOLDConfig inherits
    max_length: int | None = field(default=1024, metadata=_help("Maximum tokens of prompt + completion; longer prompts lose their start (the completion is kept). None: no limit."))
    dataset_text_field: str = field(default="text", metadata=_help("Accepted, no effect: GOLD needs prompts (a 'prompt' or 'messages' column); plain-text rows are refused."))
    dataset_kwargs: dict | None = field(default=None, metadata=_help("Accepted, no effect (TRL: arguments of dataset preparation)."))
    dataset_num_proc: int | None = field(default=None, metadata=_help("Accepted, no effect: rows are tokenized per step."))
    chat_template_path: str | None = field(default=None, metadata=_help("Accepted, no effect: the tokenizer's own chat template renders conversational rows."))
    eos_token: str | None = field(default=None, metadata=_help("Accepted, no effect: the tokenizer's EOS token ends completions."))
    pad_token: str | None = field(default=None, metadata=_help("Accepted, no effect: the tokenizer's pad token (its EOS when it has none) pads batches."))
    truncation_mode: str = field(default="keep_start", metadata=_help("Accepted, no effect: a sequence over max_length loses the start of its prompt (TRL's GOLD collator does the same)."))
    shuffle_dataset: bool = field(default=True, metadata=_help("Accepted, no effect: the loop always draws rows in a seeded random order per epoch."))
    packing: bool = field(default=False, metadata=_help("Pack sequences: refused (GOLD aligns each prompt/completion on its own, as TRL requires for ULD)."))
    packing_strategy: str = field(default="bfd", metadata=_help("Accepted, no effect: packing is refused."))
    padding_free: bool = field(default=False, metadata=_help("Padding-free batches: refused (GOLD pads each micro-batch)."))
    pad_to_multiple_of: int | None = field(default=None, metadata=_help("Accepted, no effect: micro-batches are padded to their longest sequence."))
    eval_packing: bool | None = field(default=None, metadata=_help("Accepted, no effect: packing is refused."))
    completion_only_loss: bool | None = field(default=None, metadata=_help("Accepted, no effect: GOLD's loss covers the completion tokens only."))
    assistant_only_loss: bool = field(default=False, metadata=_help("Accepted, no effect: the completion is the last assistant turn."))
    loss_type: str = field(default="nll", metadata=_help("Accepted, no effect: GOLD's loss is the distillation loss (SFT's loss_type does not apply)."))
    activation_offloading: bool = field(default=False, metadata=_help("Accepted, no effect: activations stay on the device."))
    router_aux_loss_coef: float = field(default=0.001, metadata=_help("Accepted, no effect: GOLD adds no router load-balancing loss (neither does TRL's GOLD)."))

    # > Parameters that control generation and the training loop
    temperature: float = field(default=0.9, metadata=_help("Sampling temperature of the student's completions, and the softmax temperature of the generalized JSD loss (> 0)."))
    top_p: float = field(default=0.95, metadata=_help("Nucleus sampling mass of the student's completions (1.0 = off)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling of the student's completions (0 = off)."))
    lmbda: float = field(default=0.5, metadata=_help("Probability that a micro-batch is on-policy (the student samples its completions); otherwise the dataset's completions are used. In [0, 1]."))
    beta: float = field(default=0.5, metadata=_help("Interpolation of the generalized JSD in [0, 1]: 0 = forward KL(teacher || student), 1 = reverse KL(student || teacher). Also the JSD of the hybrid ULD loss's matched tokens."))
    max_completion_length: int = field(default=128, metadata=_help("Maximum tokens the student generates per completion."))
    teacher_model_name_or_path: str | None = field(default=None, metadata=_help("Hub id or local directory of the teacher (when the trainer gets no teacher_model)."))
    teacher_model_revision: str | None = field(default=None, metadata=_help("Revision (branch, tag, commit) of a teacher loaded by name."))
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(default=None, metadata=_help("from_pretrained keyword arguments of a teacher loaded by name (dtype, revision, ...); an error with a teacher model object."))
    teacher_tokenizer_name_or_path: str | None = field(default=None, metadata=_help("The teacher's tokenizer (use_uld_loss): default the teacher's own directory / Hub id."))
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability of the student to 0."))
    seq_kd: bool = field(default=False, metadata=_help("Accepted, no effect: TRL 1.16's GOLD stores this flag and never reads it (off-policy micro-batches use the dataset's completions)."))
    num_generations: int = field(default=1, metadata=_help("Copies of each row in a step (each on-policy copy gets its own sample). >= 1."))
    generation_batch_size: int | None = field(default=None, metadata=_help("Distinct rows per process per optimizer step; None: per_device_train_batch_size * gradient_accumulation_steps // num_generations. Times num_generations it must equal that product."))

    # > Parameters that control the ULD loss
    use_uld_loss: bool = field(default=False, metadata=_help("Universal logit distillation across tokenizers (the teacher re-tokenizes the text) instead of the generalized JSD on a shared vocabulary."))
    uld_token_merge_strategy: str = field(default="observed", metadata=_help("'observed': the logits at the completion tokens' own positions, a split token merged from its first position's distribution; 'bayesian': the logits one position earlier (each predicts its token), merged from the last position's."))
    use_extended_uld: bool = field(default=True, metadata=_help("Align student and teacher tokens by byte spans and merge split tokens (needs byte-level BPE tokenizers); False: truncate both to the shorter length (the ULD paper's positional pairing)."))
    uld_use_hybrid_loss: bool = field(default=False, metadata=_help("Generalized JSD on the tokens both vocabularies spell the same, sorted L1 on the others."))
    uld_hybrid_matched_weight: float | None = field(default=None, metadata=_help("Weight of the hybrid loss's matched part (None with uld_hybrid_unmatched_weight None: the matched share of the teacher's vocabulary)."))
    uld_hybrid_unmatched_weight: float | None = field(default=None, metadata=_help("Weight of the hybrid loss's unmatched part (set both weights or neither)."))
    uld_crossentropy_weight: float = field(default=0.0, metadata=_help("Weight of the student's cross-entropy on the completion tokens added to the ULD loss (>= 0)."))
    uld_distillation_weight: float = field(default=1.0, metadata=_help("Weight of the ULD distillation term (>= 0)."))
    uld_student_temperature: float = field(default=1.0, metadata=_help("Softmax temperature of the student's logits in the ULD loss (> 0)."))
    uld_teacher_temperature: float = field(default=1.0, metadata=_help("Softmax temperature of the teacher's logits in the ULD loss (> 0)."))
    uld_skip_student_eos: bool = field(default=True, metadata=_help("Leave the student's last completion token out of the ULD loss."))
    uld_skip_teacher_eos: bool = field(default=True, metadata=_help("Leave the teacher's last completion token (its appended EOS) out of the ULD loss."))

    # > Parameters that control vLLM (refused: posttrain's GOLD samples with the transformers engine)
    use_vllm: bool = field(default=False, metadata=_help("Sample with vLLM: refused (posttrain's GOLD samples with the transformers rollout engine)."))
    vllm_mode: str = field(default="colocate", metadata=_help(_VLLM))
    vllm_server_base_url: str | None = field(default=None, metadata=_help(_VLLM))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help(_VLLM))
    vllm_server_port: int = field(default=8001, metadata=_help(_VLLM))
    vllm_server_timeout: float = field(default=240.0, metadata=_help(_VLLM))
    vllm_group_port: int = field(default=51216, metadata=_help(_VLLM))
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata=_help(_VLLM))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help(_VLLM))
    vllm_max_model_length: int | None = field(default=None, metadata=_help(_VLLM))
    vllm_model_impl: str = field(default="vllm", metadata=_help(_VLLM))
    vllm_structured_outputs_regex: str | None = field(default=None, metadata=_help(_VLLM))
    vllm_sync_frequency: int = field(default=1, metadata=_help(_VLLM))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help(_VLLM))

    # > Parameters that control logging
    log_completions: bool = field(default=False, metadata=_help("Accepted, no effect: GOLD logs no completion table yet."))
    log_completions_steps: int = field(default=100, metadata=_help("Accepted, no effect: see log_completions."))
    num_completions_to_print: int | None = field(default=None, metadata=_help("Accepted, no effect: see log_completions."))
    wandb_log_unique_prompts: bool = field(default=True, metadata=_help("Accepted, no effect: see log_completions."))
    callbacks: list[str] = field(default_factory=list, metadata=_help("Accepted, no effect: pass callback objects to the trainer's callbacks argument."))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lmbda", "beta"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}={getattr(self, name)} is invalid: use a value in [0, 1].")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: the loss divides the logits by it; use a positive value.")
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: generate at least 1 token.")
        if self.max_length is not None and self.max_completion_length >= self.max_length:
            raise ConfigError(f"max_completion_length ({self.max_completion_length}) must be smaller than max_length ({self.max_length}) to leave room "
                              "for the prompt: raise max_length or lower max_completion_length.")
        if self.num_generations < 1:
            raise ConfigError(f"num_generations={self.num_generations} is invalid: use an integer >= 1.")
        sequences = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.generation_batch_size is None:
            self.generation_batch_size = sequences // self.num_generations
        if self.generation_batch_size < 1 or self.generation_batch_size * self.num_generations != sequences:
            raise ConfigError(
                f"generation_batch_size ({self.generation_batch_size}) x num_generations ({self.num_generations}) must equal "
                f"per_device_train_batch_size x gradient_accumulation_steps = {sequences}: make num_generations divide it (or leave generation_batch_size None)."
            )
        if self.use_vllm:
            raise ConfigError("use_vllm=True is not offered by posttrain's GOLD: the student samples with the transformers rollout engine; set use_vllm=False.")
        if self.packing or self.padding_free:
            raise ConfigError("packing / padding_free are refused by GOLD: each prompt/completion is aligned with the teacher on its own; set both to False.")
        if self.use_uld_loss:
            for name in ("uld_crossentropy_weight", "uld_distillation_weight"):
                if getattr(self, name) < 0:
                    raise ConfigError(f"{name}={getattr(self, name)} is invalid: use a value >= 0.")
            for name in ("uld_student_temperature", "uld_teacher_temperature"):
                if getattr(self, name) <= 0:
                    raise ConfigError(f"{name}={getattr(self, name)} is invalid: use a positive value.")
            if self.uld_token_merge_strategy not in ("observed", "bayesian"):
                raise ConfigError(f"uld_token_merge_strategy={self.uld_token_merge_strategy!r} is invalid: use 'observed' or 'bayesian'.")
            if self.uld_use_hybrid_loss:
                if (self.uld_hybrid_matched_weight is None) != (self.uld_hybrid_unmatched_weight is None):
                    raise ConfigError("uld_hybrid_matched_weight and uld_hybrid_unmatched_weight must both be None (weights from the vocabulary overlap) "
                                      f"or both numbers; got {self.uld_hybrid_matched_weight} and {self.uld_hybrid_unmatched_weight}.")
                for name in ("uld_hybrid_matched_weight", "uld_hybrid_unmatched_weight"):
                    if getattr(self, name) is not None and getattr(self, name) < 0:
                        raise ConfigError(f"{name}={getattr(self, name)} is invalid: use a value >= 0.")
