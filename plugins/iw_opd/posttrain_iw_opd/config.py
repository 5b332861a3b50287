"""Config of IW-OPD (light: imports only posttrain).

Batch semantics (as TRL's ``IWOPDConfig``): ``per_device_train_batch_size`` counts COMPLETIONS. One
optimizer step trains on ``per_device_train_batch_size * gradient_accumulation_steps`` completions
per process: ``generation_batch_size`` prompts (default: that number / ``num_generations``), each
sampled ``num_generations`` times by the student.

Every field of TRL 1.16's ``trl.experimental.iw_opd.IWOPDConfig`` exists here with its name and
default. What posttrain-iw-opd 0.1.0 does not implement is refused in one line when set (off-policy
mixing ``lmbda < 1``, the external teacher server); fields that cannot mean anything on posttrain's
loop say so in a help text starting with "Accepted, no effect".
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["IWOPDConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class IWOPDConfig(TrainingConfig):
    """Settings of IW-OPD (and of the generalized JSD objective it keeps); names and defaults follow TRL 1.16's ``IWOPDConfig``."""

    # > TRL's defaults for TrainingArguments fields
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's IW-OPD default)."))
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default: on; generation turns it off while sampling)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: the prompt rows are kept whole (TRL sets it to False too)."))

    # > Parameters that control the model
    max_length: int | None = field(default=1024, metadata=_help("Maximum prompt + completion length: prompts are cut to max_length - max_completion_length tokens (see max_prompt_length)."))

    # > Parameters that control the distillation
    temperature: float = field(default=1.0, metadata=_help("Temperature of the student's sampling and of the student and teacher distributions in the loss."))
    lmbda: float = field(default=1.0, metadata=_help("Fraction of on-policy (student-generated) micro-batches. Only 1.0 (fully on-policy) is offered: IW-OPD requires it, and the on/off-policy mix of the JSD objective is the gkd plugin's."))
    beta: float = field(default=1.0, metadata=_help("distillation_objective='jsd' only: generalized JSD interpolation (0.0 forward KL, 0.5 JSD, 1.0 reverse KL)."))
    distillation_objective: str = field(default="iw_opd", metadata=_help("'iw_opd': sampled-token importance-weighted on-policy distillation (the paper); 'jsd': the generalized JSD/KL objective on the student's samples."))
    iw_opd_gamma: float = field(default=0.5, metadata=_help("Importance-weight amplification gamma: w_t = 1 + gamma * (1 - prefix |A| / total |A|), in [1, 1 + gamma]."))
    iw_opd_epsilon: float = field(default=1e-8, metadata=_help("Stabilizer of the total |A| of a sequence when normalizing the IW-OPD prefix weights (> 0)."))
    reverse_kl_top_1_mode: str = field(default="sampled", metadata=_help("jsd with beta > 0 and loss_top_k == 1: the reverse-KL top-1 token is the sampled completion token ('sampled') or the student's argmax ('argmax'). IW-OPD requires 'sampled'."))
    max_completion_length: int = field(default=512, metadata=_help("Maximum number of tokens the student generates per completion."))
    max_prompt_length: int | None = field(default=None, metadata=_help("Maximum prompt tokens (cut on the tokenizer's truncation_side); None: max_length - max_completion_length, or no limit when max_length is None."))
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability of the student to 0."))

    # > Parameters that control the teacher model
    teacher_model_name_or_path: str | None = field(default=None, metadata=_help("Hub id or directory of the teacher (used when the trainer gets no teacher_model). It must share the student's tokenizer (else use the gold plugin)."))
    teacher_model_revision: str | None = field(default=None, metadata=_help("Revision (branch, tag, commit) of a teacher given by name."))
    teacher_model_init_kwargs: dict | None = field(default=None, metadata=_help("from_pretrained keyword arguments of a teacher given by name (a JSON string on the CLI); its 'dtype' is the teacher's dtype (default float32)."))
    use_teacher_server: bool = field(default=False, metadata=_help("Not offered in posttrain-iw-opd 0.1.0 (refused): use a local teacher; the server_distill plugin distills from a teacher server."))
    teacher_model_server_url: str | None = field(default=None, metadata=_help("Base URL of a vLLM teacher server (only with use_teacher_server, which is refused here)."))
    loss_top_k: int = field(default=1, metadata=_help("distillation_objective='jsd': tokens of the support the divergence is restricted to (0: full vocabulary). Forward KL uses the teacher's top-k, reverse KL the student's, JSD the union; with beta > 0 and 1, the teacher's top-1 and the reverse_kl_top_1_mode token."))
    loss_add_tail: bool = field(default=True, metadata=_help("distillation_objective='jsd' with loss_top_k > 0: append a tail bucket holding the probability mass outside the support."))

    # > Parameters that control on-policy generation
    num_generations: int = field(default=1, metadata=_help("Completions the student samples per prompt."))
    generation_batch_size: int | None = field(default=None, metadata=_help("Distinct prompts per process per optimizer step; None: per_device_train_batch_size * gradient_accumulation_steps / num_generations (the only value offered)."))
    top_p: float = field(default=0.95, metadata=_help("Nucleus sampling mass of the student's generation (TRL's default 0.95; the loss uses the unfiltered distributions)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling of the student's generation (0 = off)."))
    chat_template_kwargs: dict | None = field(default=None, metadata=_help("Extra keyword arguments for apply_chat_template on conversational prompts (posttrain addition)."))
    rollout_backend: str = field(default="transformers", metadata=_help("Rollout engine backend: 'transformers' (the student itself, CPU/GPU) or 'vllm' (GPU; use_vllm=True sets it). posttrain addition."))

    # > Parameters that control vLLM for student generation
    use_vllm: bool = field(default=False, metadata=_help("Generate the student's completions with vLLM (colocated, GPU): sets rollout_backend='vllm'."))
    vllm_mode: str = field(default="colocate", metadata=_help("'colocate' (vLLM in the training process). 'server' is refused for training: posttrain cannot push updated weights to a server yet."))
    vllm_server_base_url: str | None = field(default=None, metadata=_help("Base URL of the student vLLM server (server mode, refused for training)."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help("Host of the student vLLM server (server mode)."))
    vllm_server_port: int = field(default=8001, metadata=_help("Port of the student vLLM server (server mode)."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Seconds to wait for the student vLLM server."))
    vllm_group_port: int = field(default=51216, metadata=_help("Accepted, no effect: posttrain does not push weights to a vLLM server."))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_help("Fraction of GPU memory colocated vLLM may take."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Tensor parallelism of colocated vLLM."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help("vLLM context window (prompt + completion); default: the model's."))
    vllm_model_impl: str = field(default="vllm", metadata=_help("vLLM model implementation: 'vllm' or 'transformers'."))
    vllm_structured_outputs_regex: str | None = field(default=None, metadata=_help("Accepted, no effect: posttrain's vLLM backend does not constrain decoding."))
    vllm_sync_frequency: int = field(default=1, metadata=_help("Steps between weight syncs to vLLM. Only 1 is offered: the rollout engine samples every step from the current student (IW-OPD requires it)."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("Let colocated vLLM release its memory between generations."))

    # > Parameters that control logging
    log_completions: bool = field(default=False, metadata=_help("Every log_completions_steps steps, print a sample of (prompt, completion) pairs (with rich, when installed) and write them to <output_dir>/completions/completions_<step>.parquet."))
    log_completions_steps: int = field(default=100, metadata=_help("Steps between completion logs (log_completions)."))
    num_completions_to_print: int | None = field(default=None, metadata=_help("Rows printed by log_completions (None: all of the latest rollout)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.teacher_model_init_kwargs, str):  # the CLI passes JSON
            try:
                self.teacher_model_init_kwargs = json.loads(self.teacher_model_init_kwargs)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is not a JSON object ({exc.msg}): give e.g. '{{\"dtype\": \"bfloat16\"}}'.") from None
        if self.teacher_model_init_kwargs is not None and not isinstance(self.teacher_model_init_kwargs, dict):
            raise ConfigError(f"teacher_model_init_kwargs={self.teacher_model_init_kwargs!r} is invalid: give a dict of from_pretrained keyword arguments.")
        if self.use_vllm:
            self.rollout_backend = "vllm"
        for name, allowed in {"distillation_objective": ("iw_opd", "jsd"), "reverse_kl_top_1_mode": ("sampled", "argmax"),
                              "vllm_mode": ("colocate", "server"), "vllm_model_impl": ("vllm", "transformers"),
                              "rollout_backend": ("transformers", "vllm")}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(repr(a) for a in allowed)} "
                                  f"({name} must be one of these).")
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"lmbda={self.lmbda} is invalid: it must be in [0.0, 1.0] (and only 1.0 is offered here).")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta={self.beta} is invalid: it must be in [0.0, 1.0] (0.0 forward KL, 0.5 JSD, 1.0 reverse KL).")
        if self.iw_opd_gamma < 0.0:
            raise ConfigError(f"iw_opd_gamma={self.iw_opd_gamma} is invalid: iw_opd_gamma must be non-negative (0 = plain sampled-token on-policy distillation).")
        if not self.iw_opd_epsilon > 0.0:
            raise ConfigError(f"iw_opd_epsilon={self.iw_opd_epsilon} is invalid: iw_opd_epsilon must be positive (e.g. the default 1e-8).")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (the loss's distributions use it).")
        if isinstance(self.loss_top_k, bool) or not isinstance(self.loss_top_k, int) or self.loss_top_k < 0:
            raise ConfigError(f"loss_top_k={self.loss_top_k!r} is invalid: use 0 (full vocabulary) or a positive number of tokens.")
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: it must be >= 1.")
        if self.max_length is not None and self.max_completion_length >= self.max_length:
            raise ConfigError(
                f"max_completion_length ({self.max_completion_length}) must be smaller than max_length ({self.max_length}) to leave room for "
                "the prompt: raise max_length, lower max_completion_length, or set max_length=None."
            )
        if self.max_prompt_length is None and self.max_length is not None:
            self.max_prompt_length = self.max_length - self.max_completion_length
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"max_prompt_length={self.max_prompt_length} is invalid: it must be >= 1 (or None).")
        if self.num_generations < 1:
            raise ConfigError(f"num_generations={self.num_generations} is invalid: it must be >= 1.")
        completions_per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.generation_batch_size is None:
            self.generation_batch_size = completions_per_step // self.num_generations
        if self.generation_batch_size < 1 or self.generation_batch_size * self.num_generations != completions_per_step:
            raise ConfigError(
                f"generation_batch_size ({self.generation_batch_size}) * num_generations ({self.num_generations}) must equal "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) * gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) = {completions_per_step} completions per step: leave generation_batch_size=None "
                "and make that product a multiple of num_generations."
            )
        if self.lmbda < 1.0:
            why = ("IW-OPD is an on-policy objective: distillation_objective='iw_opd' requires lmbda=1.0 (as in TRL)"
                   if self.distillation_objective == "iw_opd"
                   else "posttrain-iw-opd 0.1.0 trains on the student's own samples only")
            raise ConfigError(f"lmbda={self.lmbda} is not offered: {why}. Use lmbda=1.0, or the gkd plugin for an on/off-policy mix of the JSD objective.")
        if self.distillation_objective == "iw_opd" and self.reverse_kl_top_1_mode != "sampled":
            raise ConfigError("distillation_objective='iw_opd' requires reverse_kl_top_1_mode='sampled': IW-OPD is defined on the sampled completion tokens.")
        if self.vllm_sync_frequency != 1:
            raise ConfigError(f"vllm_sync_frequency={self.vllm_sync_frequency} is not offered: the rollout engine samples every step from the current student (set 1).")
        if self.use_teacher_server or self.teacher_model_server_url:
            raise ConfigError(
                f"{self._teacher_server_problem()}use_teacher_server / teacher_model_server_url are not offered by posttrain-iw-opd 0.1.0: "
                "pass a local teacher (teacher_model= or teacher_model_name_or_path), or distill from a served teacher with the server_distill plugin."
            )
        if self.auto_find_batch_size:
            raise ConfigError("auto_find_batch_size=True is not supported by IW-OPD: lower per_device_train_batch_size instead.")
        if self.log_completions_steps < 1:
            raise ConfigError(f"log_completions_steps={self.log_completions_steps} is invalid: it must be >= 1.")
        if self.reverse_kl_top_1_mode != "sampled" and (self.beta == 0 or self.loss_top_k != 1):
            warnings.warn(f"reverse_kl_top_1_mode={self.reverse_kl_top_1_mode!r} has no effect with beta={self.beta} and loss_top_k={self.loss_top_k}: "
                          "it applies only when beta > 0 and loss_top_k == 1.", UserWarning, stacklevel=3)
        if self.distillation_objective == "iw_opd" and (self.beta != 1.0 or self.loss_top_k != 1 or not self.loss_add_tail):
            warnings.warn("beta / loss_top_k / loss_add_tail have no effect with distillation_objective='iw_opd' (they shape the 'jsd' objective).",
                          UserWarning, stacklevel=3)
        if self.vllm_group_port != 51216 or self.vllm_structured_outputs_regex is not None:
            warnings.warn("posttrain: vllm_group_port / vllm_structured_outputs_regex are accepted but change nothing in IW-OPD.", UserWarning, stacklevel=3)

    def _teacher_server_problem(self) -> str:
        """TRL's validation of a teacher-server setting, as a sentence prefix ('' when TRL would accept it); the server stays refused here."""
        if self.use_teacher_server and not (self.teacher_model_server_url or "").strip():
            return "teacher_model_server_url must be set when use_teacher_server=True; besides, "
        if self.use_teacher_server and self.beta == 0 and self.loss_top_k < 1:
            return (f"loss_top_k must be positive when using use_teacher_server=True with beta=0 (got loss_top_k={self.loss_top_k}): "
                    "a server gives only the teacher's top-k log-probs; besides, ")
        if self.use_teacher_server and self.reverse_kl_top_1_mode == "argmax":
            return ("reverse_kl_top_1_mode='argmax' is not supported with use_teacher_server=True (a server cannot score "
                    "student-selected tokens); besides, ")
        if self.use_teacher_server and self.beta > 0 and self.loss_top_k != 1:
            return (f"loss_top_k must be 1 when using use_teacher_server=True with beta>0 (got loss_top_k={self.loss_top_k}): "
                    "mixed forward/reverse distillation from a server is defined for top-1 support only; besides, ")
        return ""
