"""Config of server distillation (light: imports only posttrain).

Batch semantics (TRL's): one completion per prompt, so ``per_device_train_batch_size`` counts prompts and
completions alike; one optimizer step trains on ``per_device_train_batch_size * gradient_accumulation_steps``
completions per process, generated once per step.

Every field of TRL 1.16's ``ServerDistillationConfig`` (its ``DistillationConfig`` fields and the four of the
server) exists here with its name and default; the ones that cannot mean anything here say so in a help text
starting with "Accepted, no effect" (setting one to a non-default value warns once). Not in TRL:
``teacher_server_timeout`` / ``teacher_server_max_retries`` (the client's), ``rollout_backend``,
``generation_batch_size``; ``teacher_model_server_url`` falls back to ``$POSTTRAIN_TEACHER_SERVER_URL``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["ServerDistillationConfig"]

#: Environment variable read when ``teacher_model_server_url`` is not set.
URL_ENV = "POSTTRAIN_TEACHER_SERVER_URL"


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class ServerDistillationConfig(TrainingConfig):
    """Settings of distillation from a served teacher; field names and defaults follow TRL 1.16's ``ServerDistillationConfig``."""

    # > TRL's defaults for TrainingArguments fields
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's distillation default)."))
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps (TRL's distillation default)."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default: on; generation turns it off while sampling)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: the trainer reads the raw 'prompt' column and keeps every column (TRL's default is False too)."))

    # > Parameters that control the model and the teacher model
    model_init_kwargs: dict | str | None = field(default=None, metadata=_help("from_pretrained keyword arguments for a student given by name (dtype, revision, attn_implementation, ...); a JSON string works too."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow the student's own code (and tokenizer) from the Hub."))
    teacher_model_name_or_path: str | None = field(default=None, metadata=_help("Accepted, no effect: the teacher is the model the server at teacher_model_server_url serves (inherited from TRL's DistillationConfig)."))
    teacher_model_revision: str | None = field(default=None, metadata=_help("Accepted, no effect: the teacher is served (see teacher_model_server_url)."))
    teacher_model_init_kwargs: dict | str | None = field(default=None, metadata=_help("Accepted, no effect: the server loads the teacher (`posttrain serve-teacher MODEL_DIR --dtype ...`)."))
    disable_dropout: bool = field(default=False, metadata=_help("Set every dropout probability of the student to 0."))

    # > Parameters that control the data preprocessing
    max_completion_length: int = field(default=512, metadata=_help("Maximum number of tokens generated per completion."))
    ds3_gather_for_generation: bool = field(default=True, metadata=_help("Accepted, no effect: under DeepSpeed ZeRO-3 the transformers backend generates with the engine's own per-layer parameter gathering."))
    shuffle_dataset: bool = field(default=True, metadata=_help("Accepted, no effect: posttrain's loop always draws prompts in a seeded random order per epoch (set data_seed to change it)."))
    pad_to_multiple_of: int | str | None = field(default="auto", metadata=_help("Pad prompt and completion tensors to a multiple of this length ('auto' or None: no extra padding; 128 on AWS Neuron in TRL)."))

    # > Parameters that control generation
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature, and the temperature of both distributions in the loss."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass (1.0 = off)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling (0 = off)."))
    min_p: float | None = field(default=None, metadata=_help("Min-p sampling (None = off)."))
    generation_kwargs: dict | str | None = field(default=None, metadata=_help("Overrides of the sampling settings: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, do_sample (False = greedy). Other keys are ignored with a warning."))
    chat_template_kwargs: dict | str | None = field(default=None, metadata=_help("Extra keyword arguments for apply_chat_template on conversational prompts."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty during sampling (1.0 = off)."))
    cache_implementation: str | None = field(default=None, metadata=_help("Accepted, no effect: the transformers rollout backend uses transformers' default dynamic KV cache."))
    rollout_backend: str = field(default="transformers", metadata=_help("Rollout engine backend: 'transformers' (the student itself, CPU/GPU) or 'vllm' (GPU). Not in TRL (use_vllm=True sets 'vllm')."))
    generation_batch_size: int | None = field(default=None, metadata=_help("Sequences generated at once by the transformers backend (default: all of a step); bounds memory."))

    # > Parameters that control vLLM (rollout_backend='vllm')
    use_vllm: bool = field(default=False, metadata=_help("TRL-compatible switch: True sets rollout_backend='vllm'."))
    vllm_mode: str = field(default="colocate", metadata=_help("'colocate' (vLLM in the training process). 'server' is refused for training: posttrain cannot push updated weights to a server yet."))
    vllm_model_impl: str = field(default="vllm", metadata=_help("vLLM model implementation: 'vllm' or 'transformers' (colocate mode)."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("Let colocated vLLM release its memory between generations."))
    vllm_structured_outputs_regex: str | None = field(default=None, metadata=_help("Accepted, no effect: posttrain's vLLM backend does not constrain decoding."))
    vllm_server_base_url: str | None = field(default=None, metadata=_help("Base URL of the student's vLLM server (server mode); overrides vllm_server_host/port."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help("Host of the student's vLLM server (server mode)."))
    vllm_server_port: int = field(default=8001, metadata=_help("Port of the student's vLLM server (server mode); 8001 (TRL's server-distillation default) stays clear of a teacher on 8000."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Seconds to wait for one request to the vLLM server."))
    vllm_group_port: int = field(default=51216, metadata=_help("Accepted, no effect: posttrain does not push weights to a vLLM server."))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_help("Fraction of GPU memory colocated vLLM may take."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help("vLLM context window (prompt + completion); default: the model's."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Tensor parallelism of colocated vLLM."))

    # > Parameters that control the training
    beta: float = field(default=1.0, metadata=_help("Interpolation of the generalized JSD on the served support: 0.0 = forward KL(teacher || student) on the teacher's top loss_top_k tokens; > 0 (0.5 JSD, 1.0 reverse KL) on the top-1 support (loss_top_k must be 1)."))
    max_tool_calling_iterations: int | None = field(default=None, metadata=_help("Accepted, no effect: TRL's ServerDistillationTrainer takes no tools (inherited from DistillationConfig)."))

    # > Parameters that control logging
    log_completions: bool = field(default=False, metadata=_help("At each logging step print a sample of (prompt, completion) (with rich, when installed) and write them to <output_dir>/completions/completions_<step>.parquet."))
    num_completions_to_print: int | None = field(default=None, metadata=_help("Rows printed by log_completions (None: all of the latest rollout)."))
    log_unique_prompts: bool = field(default=False, metadata=_help("log_completions keeps one row per distinct prompt."))


    # > Parameters of the teacher server (TRL's ServerDistillationConfig)
    teacher_model_server_url: str | None = field(default=None, metadata=_help("Base URL of the teacher server, e.g. http://127.0.0.1:8000: vLLM (`vllm serve TEACHER --logprobs-mode processed_logprobs`) or `posttrain serve-teacher TEACHER_DIR`. Required; None reads $POSTTRAIN_TEACHER_SERVER_URL."))
    loss_top_k: int = field(default=1, metadata=_help("Teacher tokens the server returns per position and the loss's support: >= 1 with beta=0 (forward KL on the teacher's top-k); exactly 1 with beta > 0. 0 (full vocabulary) is impossible with a served teacher."))
    loss_add_tail: bool = field(default=True, metadata=_help("Add a tail entry holding the probability mass outside the support (log(1 - sum p)) to both distributions; False renormalizes them over the support."))
    reverse_kl_top_1_mode: str = field(default="sampled", metadata=_help("Reverse-KL token of the top-1 support (beta > 0): 'sampled' (the completion's token; the only mode a server can score). 'argmax' is refused, as in TRL."))
    teacher_server_timeout: float = field(default=60.0, metadata=_help("Seconds to wait for one teacher-server answer (TRL's client: 60). Not in TRL."))
    teacher_server_max_retries: int = field(default=2, metadata=_help("Extra tries after a refused connection or HTTP 502/503 (not after a timeout). Not in TRL."))

    def __post_init__(self) -> None:
        for name in ("model_init_kwargs", "teacher_model_init_kwargs", "generation_kwargs", "chat_template_kwargs"):
            value = getattr(self, name)
            if isinstance(value, str):  # the CLI passes dicts as JSON strings (TRL's _VALID_DICT_FIELDS)
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{name}={value!r} is not a JSON object: give a dict, e.g. {name}='{{\"key\": \"value\"}}' ({exc.msg}).") from None
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be a dict (or a JSON object string), got {type(getattr(self, name)).__name__}.")
        super().__post_init__()
        if self.use_vllm:
            self.rollout_backend = "vllm"
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of != "auto":  # the CLI passes a string
            text = self.pad_to_multiple_of.strip().lower()
            if text in ("none", "null", ""):
                self.pad_to_multiple_of = None
            elif text.isdigit():
                self.pad_to_multiple_of = int(text)
            else:
                raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} is invalid: use a positive integer, 'auto' or None.")
        if self.pad_to_multiple_of == "auto":
            self.pad_to_multiple_of = None  # TRL pads only on AWS Neuron, which posttrain does not run on
        if self.pad_to_multiple_of is not None and (isinstance(self.pad_to_multiple_of, bool) or self.pad_to_multiple_of < 1):
            raise ConfigError(f"pad_to_multiple_of={self.pad_to_multiple_of!r} is invalid: use a positive integer, 'auto' or None.")
        for name, allowed in {"vllm_mode": ("colocate", "server"), "vllm_model_impl": ("vllm", "transformers")}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(allowed)}.")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta={self.beta} is invalid: it must be in [0.0, 1.0] (0 forward KL, 0.5 JSD, 1 reverse KL).")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (sampling, the teacher server and the loss use it).")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: it must be >= 1.")
        if self.auto_find_batch_size:
            raise ConfigError("auto_find_batch_size=True is not supported by server_distill: lower per_device_train_batch_size instead.")
        # the server's four fields, checked as TRL checks them
        if self.reverse_kl_top_1_mode not in ("sampled", "argmax"):
            raise ConfigError(f"reverse_kl_top_1_mode={self.reverse_kl_top_1_mode!r} is invalid: reverse_kl_top_1_mode must be one of: "
                              "'sampled', 'argmax' (and a server cannot score 'argmax'): use 'sampled'.")
        if self.teacher_model_server_url is None or not str(self.teacher_model_server_url).strip():
            self.teacher_model_server_url = os.environ.get(URL_ENV) or None
        if self.teacher_model_server_url is None:
            raise ConfigError(
                "teacher_model_server_url is not set (teacher_model_server_url must be set for ServerDistillationTrainer): give the teacher "
                "server's base URL, e.g. teacher_model_server_url=http://127.0.0.1:8000 "
                f"(start one with `posttrain serve-teacher TEACHER_DIR --port 8000` or `vllm serve`), or set ${URL_ENV}."
            )
        if not str(self.teacher_model_server_url).startswith(("http://", "https://")):
            raise ConfigError(f"teacher_model_server_url={self.teacher_model_server_url!r} is invalid: give an http(s) URL such as http://127.0.0.1:8000.")
        if self.beta == 0 and self.loss_top_k < 1:
            raise ConfigError(
                f"loss_top_k={self.loss_top_k} is invalid with beta=0: a served teacher returns only its top-k log-probs, so the full-vocabulary "
                "loss (loss_top_k=0) cannot be computed; set loss_top_k >= 1 (or use the distill method with a local teacher)."
            )
        if self.reverse_kl_top_1_mode == "argmax":
            raise ConfigError(
                "reverse_kl_top_1_mode='argmax' is not supported with a served teacher: the server cannot score the student's own top "
                "token; use reverse_kl_top_1_mode='sampled'."
            )
        if self.beta > 0 and self.loss_top_k != 1:
            raise ConfigError(
                f"loss_top_k={self.loss_top_k} is invalid with beta={self.beta}: loss_top_k must be 1 with beta>0, as mixed forward/reverse "
                "distillation from a served teacher is only defined on the top-1 support; set loss_top_k=1, or beta=0 for a forward KL on the top-k."
            )
        if not self.teacher_server_timeout > 0 or self.teacher_server_max_retries < 0:
            raise ConfigError(f"teacher_server_timeout={self.teacher_server_timeout} must be > 0 and teacher_server_max_retries="
                              f"{self.teacher_server_max_retries} >= 0.")
        for name in ("shuffle_dataset", "ds3_gather_for_generation"):  # no-effect flags whose default is True
            if getattr(self, name) is False:
                warnings.warn(f"posttrain: {name}=False is accepted but changes nothing in server_distill (see `posttrain info server_distill`).", UserWarning, stacklevel=3)
        for name in ("teacher_model_name_or_path", "teacher_model_revision", "teacher_model_init_kwargs", "max_tool_calling_iterations"):
            if getattr(self, name) is not None:
                warnings.warn(f"posttrain: {name} is accepted but changes nothing in server_distill: the teacher is the server's model.", UserWarning, stacklevel=3)
