"""Config of SSD (light: imports only posttrain).

Batch semantics (as TRL's SSD): SSD samples ONE completion per prompt (N = 1 in the paper), so
``per_device_train_batch_size`` counts prompts and completions alike. One optimizer step samples
``per_device_train_batch_size * gradient_accumulation_steps`` completions per process, then trains on
them in ``gradient_accumulation_steps`` micro-batches.

Every field of TRL 1.15's ``trl.experimental.ssd.SSDConfig`` (the last TRL release with SSD) exists
here with its name and default; the ones that cannot mean anything on posttrain's loop say so in a
help text starting with "Accepted, no effect" (setting one to a non-default value warns once).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["SSDConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class SSDConfig(TrainingConfig):
    """Settings of SSD (Simple Self-Distillation); field names and defaults follow TRL 1.15's ``SSDConfig``."""

    # > TRL's defaults for TrainingArguments fields (TRL's _BaseConfig; SSD keeps transformers' learning rate 5e-5)
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default: on; sampling turns it off while generating)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: SSD reads only the 'prompt' column (TRL keeps only that column too)."))

    # > Parameters that control generation and rollout reuse
    max_prompt_length: int | None = field(default=512, metadata=_help("Maximum prompt length in tokens; longer prompts keep their LAST tokens (truncated from the left). None: no limit."))
    max_completion_length: int = field(default=256, metadata=_help("Maximum number of tokens sampled per completion."))
    generation_batch_size: int | None = field(default=None, metadata=_help("Sequences generated at once by the transformers backend (default: all of a step); bounds memory. NOT TRL's meaning (a generation batch spanning several steps, see steps_per_generation)."))
    steps_per_generation: int | None = field(default=None, metadata=_help("Optimizer micro-batches per generation (TRL). Only gradient_accumulation_steps (the default) is offered: one rollout per optimizer step; reuse a rollout with num_iterations."))

    # > Parameters that control sampling (the training-time decoding T_train / rho_train of the paper)
    temperature: float = field(default=1.0, metadata=_help("Training-time sampling temperature (T_train in the paper). The loss is the cross-entropy at temperature 1, as in TRL and the paper."))
    top_k: int = field(default=0, metadata=_help("Training-time top-k truncation (0 = off)."))
    top_p: float = field(default=1.0, metadata=_help("Training-time nucleus truncation (1.0 = off)."))
    min_p: float | None = field(default=None, metadata=_help("Training-time min-p truncation (None = off)."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty while sampling (1.0 = off)."))
    generation_kwargs: dict | None = field(default=None, metadata=_help("Overrides of the sampling fields: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, do_sample (False = greedy). Other keys are ignored with a warning."))
    cache_implementation: str | None = field(default=None, metadata=_help("Accepted, no effect: the transformers rollout backend uses transformers' default dynamic KV cache."))
    chat_template_kwargs: dict | None = field(default=None, metadata=_help("Extra keyword arguments of apply_chat_template for conversational prompts."))

    # > Parameters that control vLLM generation
    use_vllm: bool = field(default=False, metadata=_help("TRL-compatible switch: True sets rollout_backend='vllm'."))
    rollout_backend: str = field(default="transformers", metadata=_help("Rollout engine backend: 'transformers' (the training model itself, CPU/GPU) or 'vllm' (GPU)."))
    vllm_mode: str = field(default="colocate", metadata=_help("'colocate' (vLLM in the training process). 'server' (an HTTP `vllm serve`) is refused for training: posttrain cannot push updated weights to a server yet."))
    vllm_model_impl: str = field(default="vllm", metadata=_help("vLLM model implementation: 'vllm' or 'transformers' (colocate mode)."))
    vllm_server_base_url: str | None = field(default=None, metadata=_help("Base URL of the vLLM server (server mode); overrides vllm_server_host/port."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help("Host of the vLLM server (server mode; used when vllm_server_base_url is None)."))
    vllm_server_port: int = field(default=8000, metadata=_help("Port of the vLLM server (server mode)."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Seconds to wait for one request to the vLLM server."))
    vllm_group_port: int = field(default=51216, metadata=_help("Accepted, no effect: posttrain does not push weights to a vLLM server (vllm_mode='server' is refused for training)."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Tensor parallelism of colocated vLLM."))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_help("Fraction of GPU memory colocated vLLM may take."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help("vLLM context window (prompt + completion); default: the model's."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("Let colocated vLLM release its memory between generations."))

    # > Parameters that control training behavior
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability of the model to 0 (TRL's SSD default: on)."))
    filter_empty: bool = field(default=True, metadata=_help("Leave out of the loss every sampled completion that is empty or a one-line stub: after stripping whitespace (special tokens removed) it is empty, or it has no newline and fewer than 10 characters. The paper's minimal syntactic filtering; set False for short-answer tasks."))
    num_iterations: int = field(default=1, metadata=_help("Optimizer steps per sampled batch (the same completions are trained on this many times)."))
    shuffle_dataset: bool = field(default=True, metadata=_help("Accepted, no effect: posttrain's loop always draws prompts in a seeded random order per epoch (set data_seed to change it)."))
    ds3_gather_for_generation: bool = field(default=True, metadata=_help("Accepted, no effect: under DeepSpeed ZeRO-3 the transformers backend generates with the engine's own per-layer parameter gathering."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_vllm:
            self.rollout_backend = "vllm"
        for name, allowed in {"rollout_backend": ("transformers", "vllm"), "vllm_mode": ("colocate", "server"),
                              "vllm_model_impl": ("vllm", "transformers", "auto")}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(allowed)}.")
        if self.max_prompt_length is not None and (isinstance(self.max_prompt_length, bool) or self.max_prompt_length < 1):
            raise ConfigError(f"max_prompt_length={self.max_prompt_length!r} is invalid: use a positive number of tokens, or None for no limit.")
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: it must be >= 1 (tokens sampled per completion).")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: the training-time sampling temperature must be > 0 (greedy samples: generation_kwargs={{'do_sample': False}}).")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_k={self.top_k}, top_p={self.top_p} are invalid: use top_k >= 0 (0 = off) and 0 < top_p <= 1 (1 = off).")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations={self.num_iterations} is invalid: it must be >= 1 (1 = train on each sample once).")
        if self.steps_per_generation is not None and self.steps_per_generation != self.gradient_accumulation_steps:
            raise ConfigError(
                f"steps_per_generation={self.steps_per_generation} is not offered: posttrain samples one rollout per optimizer step "
                f"(steps_per_generation = gradient_accumulation_steps = {self.gradient_accumulation_steps}). Leave it None, raise "
                "gradient_accumulation_steps for a larger rollout, or reuse a rollout for several steps with num_iterations."
            )
        if self.use_liger_kernel and (self.liger_kernel_config or {}).get("fused_linear_cross_entropy"):
            raise ConfigError('liger_kernel_config={"fused_linear_cross_entropy": True} cannot be used with SSD: drop that key (the loss is computed chunked from the hidden states).')
