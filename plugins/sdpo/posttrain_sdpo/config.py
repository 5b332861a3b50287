"""Config of SDPO (light: imports only posttrain).

Batch semantics (as TRL's): ``per_device_train_batch_size`` counts COMPLETIONS. One optimizer step trains on
``per_device_train_batch_size * gradient_accumulation_steps`` completions per process: that many divided by
``num_generations`` prompts, each sampled ``num_generations`` times by the student.

Every field of TRL 1.16's ``trl.experimental.sdpo.SDPOConfig`` exists here with its name and default. Fields that
cannot mean anything on posttrain's loop say so in a help text starting with "Accepted, no effect" (a non-default
value warns once); settings posttrain does not implement are refused in one line (``posttrain.ConfigError``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["SDPOConfig"]

DISTILLATION_MODES = ("sampled_token", "full_logits", "topk_logits")
TEACHER_MODEL_KINDS = ("base", "live", "ema")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class SDPOConfig(TrainingConfig):
    """Settings of SDPO; field names and defaults follow TRL 1.16's ``SDPOConfig``."""

    # > TRL's defaults for TrainingArguments fields (TRL's _BaseConfig)
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate of AdamW (TRL's SDPO default, transformers' 5e-5)."))
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default: on)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: every column is kept (the reward functions read any column; `privileged_context` is the environment feedback)."))

    # > Parameters that control the model
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability of the student and the teacher to 0."))

    # > Parameters that control data preprocessing
    max_prompt_length: int | None = field(default=512, metadata=_help("Maximum student prompt length in tokens; longer prompts keep their last tokens (the teacher prompt: max_reprompt_len)."))
    shuffle_dataset: bool = field(default=True, metadata=_help("Accepted, no effect: posttrain's loop always draws prompts in a seeded random order per epoch (set data_seed to change it)."))

    # > Parameters that control generation
    num_generations: int = field(default=8, metadata=_help("Completions sampled per prompt. Must divide per_device_train_batch_size * gradient_accumulation_steps."))
    num_generations_eval: int | None = field(default=None, metadata=_help("Completions sampled per eval prompt (default: num_generations)."))
    max_completion_length: int | None = field(default=256, metadata=_help("Maximum number of tokens generated per completion."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature; the student and teacher logits of the loss are divided by it too."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass (1.0 = off)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling (0 = off)."))
    min_p: float | None = field(default=None, metadata=_help("Min-p sampling (None = off)."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty during sampling (1.0 = off)."))
    cache_implementation: str | None = field(default=None, metadata=_help("Accepted, no effect: the transformers rollout backend uses transformers' default dynamic KV cache."))
    generation_kwargs: dict | None = field(default=None, metadata=_help("Overrides of the sampling settings: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, do_sample (False = greedy). Other keys are ignored with a warning."))
    chat_template_kwargs: dict | None = field(default=None, metadata=_help("Extra keyword arguments for apply_chat_template on conversational prompts (student and teacher)."))
    ds3_gather_for_generation: bool = field(default=True, metadata=_help("Accepted, no effect: under DeepSpeed ZeRO-3 the transformers backend generates with the engine's own per-layer parameter gathering."))
    generation_batch_size: int | None = field(default=None, metadata=_help("TRL's generation batch (completions per rollout). Only per_device_train_batch_size * gradient_accumulation_steps * processes (one rollout per optimizer step, the default) is offered."))
    steps_per_generation: int | None = field(default=None, metadata=_help("Optimizer micro-batches per generation. Only gradient_accumulation_steps (the default) is offered: one rollout per optimizer step; reuse a rollout with num_iterations."))
    rollout_backend: str = field(default="transformers", metadata=_help("Rollout engine backend: 'transformers' (the training model itself, CPU/GPU) or 'vllm' (GPU). posttrain's name; use_vllm=True sets 'vllm'."))

    # > Parameters that control vLLM
    use_vllm: bool = field(default=False, metadata=_help("TRL-compatible switch: True sets rollout_backend='vllm'."))
    use_teacher_server: bool = field(default=False, metadata=_help("Refused when True: teacher log-probs from the vLLM generation server (TRL: live teacher, vllm_mode='server') are not implemented; the teacher runs locally."))
    vllm_mode: str = field(default="colocate", metadata=_help("'colocate' (vLLM in the training process). 'server' is refused for training: posttrain cannot push updated weights to a server yet."))
    vllm_model_impl: str = field(default="vllm", metadata=_help("vLLM model implementation: 'vllm' or 'transformers'."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("Let colocated vLLM release its memory between generations."))
    vllm_server_base_url: str | None = field(default=None, metadata=_help("Base URL of the vLLM server (server mode); overrides vllm_server_host/port."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help("Host of the vLLM server (server mode)."))
    vllm_server_port: int = field(default=8000, metadata=_help("Port of the vLLM server (server mode)."))
    vllm_group_port: int = field(default=51216, metadata=_help("Accepted, no effect: posttrain does not push weights to a vLLM server."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Seconds to wait for one request to the vLLM server."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Tensor parallelism of colocated vLLM."))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_help("Fraction of GPU memory colocated vLLM may take."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help("vLLM context window (prompt + completion); default: the model's."))

    # > Parameters that control the data and the rewards (posttrain addition: rewards by name, for the CLI)
    reward_funcs: list[str] | None = field(default=None, metadata=_help("Reward functions by name: built-ins ('accuracy', 'format', 'overlong_penalty'), 'module:function' import paths, or a reward-model directory. Used when the trainer gets no reward_funcs argument; CLI: --reward_funcs accuracy my_mod:fn."))
    reward_weights: list[float] | None = field(default=None, metadata=_help("One weight per reward function (default: all 1.0)."))
    scale_rewards: str = field(default="group", metadata=_help("Advantage scaling: 'group' (True; the group's reward std), 'batch' (the rollout's std) or 'none' (False)."))

    # > Parameters that control the training
    num_iterations: int = field(default=1, metadata=_help("Optimizer steps per generated batch (mu); with > 1 the rollout-time log-probs feed the policy ratio and the distillation importance-sampling clip."))
    loss_type: str = field(default="dapo", metadata=_help("Aggregation of the policy loss: 'grpo' (mean of per-sequence means), 'bnpo' / 'dapo' (mean over the step's completion tokens), 'dr_grpo' (sum / (sequences x max_completion_length))."))
    mask_truncated_completions: bool = field(default=False, metadata=_help("Leave completions that hit max_completion_length out of both losses."))

    # > Parameters that control the online policy objective
    beta: float = field(default=0.0, metadata=_help("KL coefficient. Only 0.0: TRL's SDPO never uses it (no reference model); another value is refused."))
    epsilon: float = field(default=0.2, metadata=_help("Lower clipping epsilon of the policy ratio."))
    epsilon_high: float | None = field(default=None, metadata=_help("Upper clipping epsilon (default: epsilon; DAPO: 0.28)."))
    importance_sampling_level: str = field(default="token", metadata=_help("Policy ratio per 'token' or per 'sequence' (the mean log-ratio over the sequence's tokens, GSPO)."))

    # > Parameters that control the SDPO loss
    distillation_weight: float = field(default=1.0, metadata=_help("loss = (1 - w) * policy_loss + w * distillation_loss, w in [0, 1]: 1.0 pure self-distillation, 0.0 the GRPO-style policy gradient."))
    distillation_alpha: float = field(default=1.0, metadata=_help("Divergence interpolation in [0, 1]: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), between: the generalized JSD with mixture (1 - alpha) p_S + alpha p_T."))
    distillation_mode: str = field(default="sampled_token", metadata=_help("'sampled_token' (reverse-KL policy gradient on the sampled tokens; needs distillation_alpha=1.0), 'full_logits' (full vocabulary) or 'topk_logits' (the student's top-k tokens)."))
    distillation_topk: int | None = field(default=None, metadata=_help("k of distillation_mode='topk_logits' (required there)."))
    distillation_is_clip: float | None = field(default=2.0, metadata=_help("Cap of the importance ratio pi / pi_old applied to the per-token distillation loss when rollouts are reused (num_iterations > 1); None disables it."))
    distillation_add_tail: bool = field(default=False, metadata=_help("topk_logits: add one bucket holding the mass outside the top-k (else the top-k are renormalized)."))

    # > Parameters that control the teacher
    teacher_model_kind: str = field(default="ema", metadata=_help("The teacher's weights: 'ema' (a copy moved toward the student every teacher_sync_steps), 'base' (a frozen copy of the initial student; with PEFT the adapter-disabled model) or 'live' (the current student)."))
    teacher_update_rate: float = field(default=0.05, metadata=_help("EMA rate of teacher_model_kind='ema': teacher <- rate * student + (1 - rate) * teacher."))
    teacher_sync_steps: int = field(default=1, metadata=_help("Optimizer steps between EMA teacher updates."))

    # > Parameters that control reprompting
    use_successful_as_teacher: bool = field(default=True, metadata=_help("Put a successful rollout of the same group (reward >= success_reward_threshold) into the teacher's prompt."))
    success_reward_threshold: float = field(default=1.0, metadata=_help("Minimum reward of a rollout to serve as a demonstration."))
    dont_reprompt_on_self_success: bool = field(default=True, metadata=_help("Never use a completion as its own demonstration (only the group's other successful rollouts)."))
    max_reprompt_len: int = field(default=10240, metadata=_help("Maximum teacher prompt length in tokens (its last tokens are kept)."))
    reprompt_template: str = field(default="{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n", metadata=_help("The teacher's prompt (for messages: its last user turn) of a reprompted sample; must contain {prompt}, {solution} and {feedback}."))
    solution_template: str = field(default="\nCorrect solution:\n\n{successful_previous_attempt}\n\n", metadata=_help("How the demonstration enters {solution}; must contain {successful_previous_attempt}."))
    feedback_template: str = field(default="\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n", metadata=_help("How a row's `privileged_context` (environment feedback) enters {feedback}; must contain {feedback_raw}."))
    include_environment_feedback: bool = field(default=False, metadata=_help("Reprompt with the row's `privileged_context` (a non-empty string) as feedback."))
    environment_feedback_only_without_solution: bool = field(default=False, metadata=_help("Use the feedback only for samples without a successful demonstration."))
    remove_thinking_from_demonstration: bool = field(default=False, metadata=_help("Drop <think>...</think> blocks from the demonstration text."))

    # > Parameters that control diagnostics
    diagnostics_warning_interval: int = field(default=10, metadata=_help("Warn every N consecutive degenerate steps (flat rewards, no reprompted sample); 0 disables."))
    diagnostics_flat_tolerance: float = field(default=1e-8, metadata=_help("Tolerance under which the reward std or the reprompted fraction counts as zero."))

    def __post_init__(self) -> None:
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if self.reward_funcs is not None and isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        super().__post_init__()
        if self.use_vllm:
            self.rollout_backend = "vllm"
        for name, allowed in {"vllm_mode": ("colocate", "server"), "vllm_model_impl": ("vllm", "transformers"),
                              "distillation_mode": DISTILLATION_MODES, "teacher_model_kind": TEACHER_MODEL_KINDS}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(map(repr, allowed))}.")
        for name, allowed in {"loss_type": LOSS_TYPES, "scale_rewards": SCALE_REWARDS, "importance_sampling_level": ("token", "sequence")}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(map(repr, allowed))}.")
        if not 0.0 <= self.distillation_weight <= 1.0:
            raise ConfigError(f"distillation_weight={self.distillation_weight} is invalid: use a value in [0, 1] (1 pure self-distillation, 0 the policy gradient).")
        if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1.0:
            raise ConfigError(f"distillation_mode='sampled_token' only supports reverse KL: set distillation_alpha=1.0 (got {self.distillation_alpha}).")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ConfigError(f"distillation_alpha={self.distillation_alpha} is invalid: use a value in [0, 1] (0 forward KL, 1 reverse KL).")
        if self.distillation_mode == "topk_logits" and (self.distillation_topk is None or self.distillation_topk < 1):
            raise ConfigError(f"distillation_topk={self.distillation_topk!r} is invalid with distillation_mode='topk_logits': set a positive k (e.g. 100).")
        if self.distillation_is_clip is not None and not self.distillation_is_clip > 0:
            raise ConfigError(f"distillation_is_clip={self.distillation_is_clip} is invalid: use a positive cap or None.")
        if self.beta != 0.0:
            raise ConfigError(f"beta={self.beta} is not implemented: TRL's SDPO has no reference-model KL term (its beta is unused); leave beta=0.0.")
        for name, keys in (("reprompt_template", ("{prompt}", "{solution}", "{feedback}")), ("solution_template", ("{successful_previous_attempt}",)),
                           ("feedback_template", ("{feedback_raw}",))):
            missing = [k for k in keys if k not in getattr(self, name)]
            if missing:
                raise ConfigError(f"{name}={getattr(self, name)!r} must contain {' and '.join(keys)} (missing {', '.join(missing)}).")
        if self.max_reprompt_len < 1:
            raise ConfigError(f"max_reprompt_len={self.max_reprompt_len} is invalid: it must be >= 1.")
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has {len(self.reward_funcs)} ({self.reward_funcs}); give one weight per reward function.")
        if not 0.0 <= self.teacher_update_rate <= 1.0:
            raise ConfigError(f"teacher_update_rate={self.teacher_update_rate} is invalid: use a fraction in [0, 1].")
        if self.teacher_sync_steps < 1:
            raise ConfigError(f"teacher_sync_steps={self.teacher_sync_steps} is invalid: it must be >= 1.")
        if self.use_teacher_server:
            raise ConfigError("use_teacher_server=True is not implemented in posttrain's SDPO: the teacher runs locally (drop use_teacher_server).")
        if self.diagnostics_warning_interval < 0:
            raise ConfigError(f"diagnostics_warning_interval={self.diagnostics_warning_interval} is invalid: use 0 (off) or a positive interval.")
        if self.num_generations < 1:
            raise ConfigError(f"num_generations={self.num_generations} is invalid: it must be >= 1.")
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise ConfigError(f"num_generations_eval={self.num_generations_eval} is invalid: use None (= num_generations) or >= 1.")
        completions_per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if completions_per_step % self.num_generations != 0:
            raise ConfigError(
                f"num_generations={self.num_generations} does not divide the completions of one optimizer step: per_device_train_batch_size "
                f"({self.per_device_train_batch_size}) x gradient_accumulation_steps ({self.gradient_accumulation_steps}) = {completions_per_step} "
                "(per_device_train_batch_size counts completions): make it a multiple of num_generations."
            )
        if self.steps_per_generation is not None and self.steps_per_generation != self.gradient_accumulation_steps:
            raise ConfigError(
                f"steps_per_generation={self.steps_per_generation} is not offered: posttrain generates one rollout per optimizer step "
                f"(steps_per_generation = gradient_accumulation_steps = {self.gradient_accumulation_steps}); leave it None and reuse a rollout with num_iterations."
            )
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if self.generation_batch_size is not None and self.generation_batch_size != completions_per_step * world_size:
            raise ConfigError(
                f"generation_batch_size={self.generation_batch_size} is not offered: one rollout per optimizer step holds "
                f"per_device_train_batch_size x gradient_accumulation_steps x processes = {completions_per_step * world_size} completions; leave it None."
            )
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length!r} is invalid: it must be >= 1.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"max_prompt_length={self.max_prompt_length} is invalid: use None (no truncation) or >= 1.")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations={self.num_iterations} is invalid: it must be >= 1 (1 = fully on-policy).")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (the loss divides the logits by it).")
        if self.auto_find_batch_size:
            raise ConfigError("auto_find_batch_size=True is not supported by SDPO: a rollout holds whole groups of num_generations completions; lower per_device_train_batch_size instead.")
        for name in ("shuffle_dataset", "ds3_gather_for_generation"):  # no-effect flags whose default is True
            if getattr(self, name) is False:
                warnings.warn(f"posttrain: {name}=False is accepted but changes nothing in SDPO (see `posttrain info sdpo`).", UserWarning, stacklevel=3)
        for name in ("cache_implementation",):
            if getattr(self, name) is not None:
                warnings.warn(f"posttrain: {name} is accepted but changes nothing in SDPO (see `posttrain info sdpo`).", UserWarning, stacklevel=3)
