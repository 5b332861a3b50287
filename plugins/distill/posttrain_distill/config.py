"""Config of on-policy distillation (light: imports only posttrain).

Batch semantics (TRL's): one completion per prompt, so ``per_device_train_batch_size`` counts prompts and
completions alike; one optimizer step trains on ``per_device_train_batch_size * gradient_accumulation_steps``
completions per process, generated once per step.

Every field of TRL 1.16's ``DistillationConfig`` exists here with its name and default; the ones that
cannot mean anything on posttrain's loop say so in a help text starting with "Accepted, no effect"
(setting one to a non-default value warns once). Fields TRL lacks: ``teacher_models`` (several teachers,
chosen per row by a ``teacher`` column), ``teacher_model_server_url`` with ``loss_top_k`` and ``loss_add_tail``
(a served teacher; TRL's server_distillation names and defaults), ``teacher_server_timeout``,
``teacher_server_max_retries``, ``tool_call_timeout``, ``rollout_backend``, ``generation_batch_size``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["DistillationConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class DistillationConfig(TrainingConfig):
    """Settings of on-policy distillation; field names and defaults follow TRL 1.16's ``DistillationConfig``."""

    # > TRL's defaults for TrainingArguments fields
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's distillation default)."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default: on; generation turns it off while sampling)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: the trainer reads the raw 'prompt' (and 'teacher') columns and keeps every column (TRL's default is False too)."))

    # > Parameters that control the model and the teacher model
    model_init_kwargs: dict | str | None = field(default=None, metadata=_help("from_pretrained keyword arguments for a student given by name (dtype, revision, attn_implementation, ...); a JSON string works too."))
    trust_remote_code: bool = field(default=False, metadata=_help("Allow the student's and the teachers' own code (and tokenizers) from the Hub."))
    teacher_model_name_or_path: str | None = field(default=None, metadata=_help("Hub id or directory of the teacher (used when the trainer gets no teacher_model argument). It must share the student's vocabulary (else use the gold method)."))
    teacher_model_revision: str | None = field(default=None, metadata=_help("Revision (branch, tag, commit) of a teacher loaded by name."))
    teacher_model_init_kwargs: dict | str | None = field(default=None, metadata=_help("from_pretrained keyword arguments for a teacher given by name (dtype: the teacher computes in its own dtype); a JSON string works too."))
    teacher_models: dict | str | None = field(default=None, metadata=_help("Several teachers: {name: Hub id or directory}; each training row's 'teacher' column names the one that scores it (a row without it, or with None, uses the first). Not in TRL. A JSON string works too (CLI)."))
    teacher_model_server_url: str | None = field(default=None, metadata=_help("Base URL of a teacher server (vLLM's `vllm serve TEACHER --logprobs-mode processed_logprobs`, or `posttrain serve-teacher TEACHER_DIR`), e.g. http://127.0.0.1:8000: the teacher never sits in training memory; the loss is taken on the served top-k support (loss_top_k, loss_add_tail). No local teacher is loaded. Not in TRL's DistillationConfig (TRL's server_distillation names it so)."))
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
    vllm_server_port: int = field(default=8000, metadata=_help("Port of the student's vLLM server (server mode)."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Seconds to wait for one request to the vLLM server."))
    vllm_group_port: int = field(default=51216, metadata=_help("Accepted, no effect: posttrain does not push weights to a vLLM server."))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_help("Fraction of GPU memory colocated vLLM may take."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help("vLLM context window (prompt + completion); default: the model's."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Tensor parallelism of colocated vLLM."))

    # > Parameters that control the training
    beta: float = field(default=1.0, metadata=_help("Interpolation of the generalized JSD loss: 0.0 = forward KL(teacher || student), 0.5 = JSD, 1.0 = reverse KL(student || teacher). It selects the divergence; there is no reference model."))
    max_tool_calling_iterations: int | None = field(default=None, metadata=_help("With tools=: the most tool-calling rounds per episode (None: until max_completion_length, which counts model-written and tool tokens over all turns)."))
    tool_call_timeout: float | None = field(default=60.0, metadata=_help("posttrain: seconds one tool call may run; a call that runs longer is abandoned and ends its episode with stop reason 'tool_timeout' (None: no limit, as in TRL)."))

    # > Parameters of a served teacher (teacher_model_server_url; names and defaults of TRL's server_distillation)
    loss_top_k: int = field(default=1, metadata=_help("With a served teacher: teacher tokens the server returns per position and the loss's support: >= 1 with beta=0 (forward KL on the teacher's top-k); exactly 1 with beta > 0 (the teacher's top-1 and the sampled token). Without a server the loss uses the whole vocabulary and this is unused."))
    loss_add_tail: bool = field(default=True, metadata=_help("With a served teacher: add a tail entry holding the probability mass outside the support (log(1 - sum p)) to both distributions; False renormalizes them over the support."))
    teacher_server_timeout: float = field(default=60.0, metadata=_help("Seconds to wait for one teacher-server answer. Not in TRL."))
    teacher_server_max_retries: int = field(default=2, metadata=_help("Extra tries after a refused connection or HTTP 502/503 from the teacher server (not after a timeout). Not in TRL."))

    # > Parameters that control logging
    log_completions: bool = field(default=False, metadata=_help("At each logging step print a sample of (prompt, completion) (with rich, when installed) and write them to <output_dir>/completions/completions_<step>.parquet."))
    num_completions_to_print: int | None = field(default=None, metadata=_help("Rows printed by log_completions (None: all of the latest rollout)."))
    log_unique_prompts: bool = field(default=False, metadata=_help("log_completions keeps one row per distinct prompt."))

    def __post_init__(self) -> None:
        for name in ("model_init_kwargs", "teacher_model_init_kwargs", "teacher_models", "generation_kwargs", "chat_template_kwargs"):
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
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (sampling and the loss use it).")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: it must be >= 1.")
        if self.max_tool_calling_iterations is not None and (isinstance(self.max_tool_calling_iterations, bool) or self.max_tool_calling_iterations < 0):
            raise ConfigError(f"max_tool_calling_iterations={self.max_tool_calling_iterations!r} is invalid: use None (until max_completion_length) or an integer >= 0 (0: tools are never run).")
        if self.tool_call_timeout is not None and not self.tool_call_timeout > 0:
            raise ConfigError(f"tool_call_timeout={self.tool_call_timeout!r} is invalid: use seconds > 0 (e.g. 60), or None for no limit.")
        if self.auto_find_batch_size:
            raise ConfigError("auto_find_batch_size=True is not supported by distill: lower per_device_train_batch_size instead.")
        if self.teacher_models is not None:
            if not self.teacher_models:
                raise ConfigError("teacher_models is empty: give {name: Hub id or directory} for at least one teacher, or leave it None.")
            bad = {k: v for k, v in self.teacher_models.items() if not isinstance(k, str) or not isinstance(v, str)}
            if bad:
                raise ConfigError(f"teacher_models must map names to Hub ids or directories (strings), got {bad}.")
            if self.teacher_model_name_or_path is not None:
                raise ConfigError("teacher_model_name_or_path and teacher_models are both set: give one teacher by teacher_model_name_or_path, or several by teacher_models.")
        if self.teacher_model_server_url is not None:
            if not isinstance(self.teacher_model_server_url, str) or not self.teacher_model_server_url.strip():
                raise ConfigError(f"teacher_model_server_url={self.teacher_model_server_url!r} is invalid: give the server's base URL, e.g. http://127.0.0.1:8000, or None.")
            for name in ("teacher_model_name_or_path", "teacher_models"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"teacher_model_server_url and {name} are both set: a served teacher replaces the local one; unset one of them.")
            if isinstance(self.loss_top_k, bool) or not isinstance(self.loss_top_k, int) or self.loss_top_k < 1:
                raise ConfigError(f"loss_top_k={self.loss_top_k!r} is invalid with a served teacher: it must be an integer >= 1 (a server returns top-k "
                                  "log-probs, never the whole vocabulary).")
            if self.beta > 0 and self.loss_top_k != 1:
                raise ConfigError(f"loss_top_k={self.loss_top_k} with beta={self.beta}: a served teacher supports beta > 0 only on the top-1 support; "
                                  "set loss_top_k=1, or beta=0 (forward KL) to use the teacher's top-k.")
            if not self.teacher_server_timeout > 0 or self.teacher_server_max_retries < 0:
                raise ConfigError(f"teacher_server_timeout={self.teacher_server_timeout} / teacher_server_max_retries={self.teacher_server_max_retries} "
                                  "are invalid: the timeout must be > 0 seconds and the retries >= 0.")
        elif self.loss_top_k != 1 or self.loss_add_tail is not True:
            warnings.warn("posttrain: loss_top_k / loss_add_tail apply to a served teacher only (teacher_model_server_url); with a local teacher "
                          "distill takes the divergence on the whole vocabulary.", UserWarning, stacklevel=3)
        for name in ("shuffle_dataset", "ds3_gather_for_generation"):  # no-effect flags whose default is True
            if getattr(self, name) is False:
                warnings.warn(f"posttrain: {name}=False is accepted but changes nothing in distill (see `posttrain info distill`).", UserWarning, stacklevel=3)
