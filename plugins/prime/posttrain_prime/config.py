"""Config of PRIME (light: imports only posttrain).

Batch semantics (as RLOO's): ``per_device_train_batch_size`` counts COMPLETIONS, not prompts: one step
trains on ``per_device_train_batch_size * gradient_accumulation_steps / num_generations`` prompts, each
sampled ``num_generations`` times. TRL never shipped PRIME; the fields follow posttrain's RLOO config
(TRL 1.16's ``RLOOConfig`` names) plus PRIME's own (``beta``, ``prm_*``, ``*_reward_coef``,
``accuracy_filter_range``). Fields that cannot mean anything here say "Accepted, no effect".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["PRIMEConfig"]


def _help(text: str) -> dict:
    return {"help": text}


@dataclass(kw_only=True)
class PRIMEConfig(TrainingConfig):
    """Settings of PRIME (implicit process rewards from an online-trained implicit PRM); names follow TRL 1.16's ``RLOOConfig``."""

    # > RLOO's defaults (TRL 1.16) for TrainingArguments fields
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's RLOO default)."))
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (as TRL's RLOO: on; generation turns it off while sampling)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: every dataset column is kept and passed to the reward functions (as TRL's RLOO)."))

    # > Parameters that control the model
    router_aux_loss_coef: float | None = field(default=None, metadata=_help("Weight of a Mixture-of-Experts model's load-balancing loss added to the loss (None: the model config's router_aux_loss_coef; 0 disables it). An error on a non-MoE model."))
    disable_dropout: bool = field(default=False, metadata=_help("Set every dropout probability of the policy (and reference) to 0."))

    # > Parameters that control the data and the rewards
    reward_funcs: list[str] | None = field(
        default=None,
        metadata=_help(
            "Reward functions by name: built-ins ('accuracy', 'format', 'overlong_penalty'), 'module:function' import "
            "paths, or a reward-model directory / Hub id (loaded as a 1-label sequence classifier). Used when the "
            "trainer gets no reward_funcs argument; CLI: --reward_funcs accuracy my_mod:fn."
        ),
    )
    reward_weights: list[float] | None = field(default=None, metadata=_help("One weight per reward function (default: all 1.0)."))
    chat_template_kwargs: dict | None = field(default=None, metadata=_help("Extra keyword arguments for apply_chat_template on conversational prompts."))
    shuffle_dataset: bool = field(default=True, metadata=_help("Accepted, no effect: posttrain's loop always draws prompts in a seeded random order per epoch (set data_seed to change it)."))

    # > Parameters that control generation
    num_generations: int = field(default=4, metadata=_help("Completions sampled per prompt (K; 4 in the paper). Must be >= 2 (leave-one-out baselines) and divide per_device_train_batch_size * gradient_accumulation_steps."))
    num_generations_eval: int | None = field(default=None, metadata=_help("Completions sampled per eval prompt (default: num_generations)."))
    max_completion_length: int = field(default=512, metadata=_help("Maximum number of tokens generated per completion (TRL's RLOO default)."))
    temperature: float = field(default=1.0, metadata=_help("Sampling temperature; the trained log-probs use the same temperature."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass (1.0 = off)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling (0 = off)."))
    min_p: float | None = field(default=None, metadata=_help("Min-p sampling (None = off)."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty during sampling (1.0 = off)."))
    generation_kwargs: dict | None = field(default=None, metadata=_help("Overrides of the sampling settings: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, do_sample (False = greedy). Other keys (num_beams, ...) are ignored with a warning: the rollout engine samples one sequence per draw with its exact log-probs."))
    pad_to_multiple_of: int | str | None = field(default="auto", metadata=_help("Pad prompt and completion tensors to a multiple of this length ('auto' or None: no extra padding; 128 on AWS Neuron in TRL)."))
    steps_per_generation: int | None = field(default=None, metadata=_help("Optimizer micro-batches per generation (TRL). Only gradient_accumulation_steps (the default) is offered: one rollout per optimizer step; reuse a rollout with num_iterations."))
    rollout_backend: str = field(default="transformers", metadata=_help("Rollout engine backend: 'transformers' (the training model itself, CPU/GPU) or 'vllm' (GPU)."))
    generation_batch_size: int | None = field(default=None, metadata=_help("Sequences generated at once by the transformers backend (default: all of a step); bounds memory. NOT TRL's meaning (its generation batch spanning several steps, see steps_per_generation)."))
    cache_implementation: str | None = field(default=None, metadata=_help("Accepted, no effect: the transformers rollout backend uses transformers' default dynamic KV cache."))
    use_transformers_continuous_batching: bool = field(default=False, metadata=_help("Accepted, no effect: the transformers rollout backend generates with model.generate (use rollout_backend='vllm' for a batching engine)."))
    transformers_continuous_batching_config: dict | None = field(default=None, metadata=_help("Accepted, no effect: see use_transformers_continuous_batching."))
    use_transformers_paged: bool = field(default=False, metadata=_help("Accepted, no effect: deprecated in TRL (use_transformers_continuous_batching)."))
    ds3_gather_for_generation: bool = field(default=True, metadata=_help("Accepted, no effect: under DeepSpeed ZeRO-3 the transformers backend generates with the engine's own per-layer parameter gathering."))

    # > Parameters that control vLLM (rollout_backend='vllm')
    use_vllm: bool = field(default=False, metadata=_help("TRL-compatible switch: True sets rollout_backend='vllm'."))
    vllm_mode: str = field(default="colocate", metadata=_help("'colocate' (vLLM in the training process). 'server' (an HTTP `vllm serve`) is refused for training: posttrain cannot push updated weights to a server yet."))
    vllm_model_impl: str = field(default="vllm", metadata=_help("vLLM model implementation: 'vllm' or 'transformers' (colocate mode)."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("Let colocated vLLM release its memory between generations."))
    vllm_structured_outputs_regex: str | None = field(default=None, metadata=_help("Accepted, no effect: posttrain's vLLM backend does not constrain decoding."))
    vllm_server_base_url: str | None = field(default=None, metadata=_help("Base URL of the vLLM server (server mode); overrides vllm_server_host/port."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help("Host of the vLLM server (server mode; used when vllm_server_base_url is None)."))
    vllm_server_port: int = field(default=8000, metadata=_help("Port of the vLLM server (server mode)."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Seconds to wait for one request to the vLLM server."))
    vllm_group_port: int = field(default=51216, metadata=_help("Accepted, no effect: posttrain does not push weights to a vLLM server (vllm_mode='server' is refused for training)."))
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata=_help("Fraction of GPU memory colocated vLLM may take."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help("vLLM context window (prompt + completion); default: the model's."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Tensor parallelism of colocated vLLM."))

    # > Parameters that control the loss
    beta: float = field(default=0.05, metadata=_help("beta of the implicit process reward r_t = beta * (log pi_prm(y_t) - log pi_ref(y_t)) (0.05 in the paper). There is no KL penalty to the policy (the paper uses none)."))
    num_iterations: int = field(default=1, metadata=_help("Optimizer steps per generated batch; rollouts are reused and old log-probs kept."))
    epsilon: float = field(default=0.2, metadata=_help("Lower clipping range of the per-token PPO ratio."))
    epsilon_high: float | None = field(default=None, metadata=_help("Upper clipping range (default: epsilon)."))
    reward_clip_range: list[float] | None = field(default=None, metadata=_help("Clamp the weighted outcome reward to [low, high], e.g. [0, 1]."))
    mask_truncated_completions: bool = field(default=False, metadata=_help("Exclude completions that hit max_completion_length from the losses."))
    process_reward_coef: float = field(default=1.0, metadata=_help("Weight of the implicit process rewards' return in the advantage (0 = outcome-only RLOO)."))
    outcome_reward_coef: float = field(default=1.0, metadata=_help("Weight of the outcome reward's leave-one-out advantage."))
    whiten_advantages: bool = field(default=True, metadata=_help("Standardize the per-token advantages over the step's completion tokens (as PRIME's reference implementation)."))
    accuracy_filter_range: list[float] | None = field(default=None, metadata=_help("Online prompt filtering: a prompt whose mean outcome reward over its num_generations samples lies outside [low, high] gets no policy or PRM loss, e.g. [0.2, 0.8] (the paper). None: keep every prompt."))

    # > Parameters that control the implicit PRM (a second trainable causal LM) and the reference
    prm_model_name_or_path: str | None = field(default=None, metadata=_help("The implicit PRM's initial weights (a causal LM with the policy's tokenizer). None: a copy of the initial policy (the paper initializes it from the SFT model)."))
    prm_learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of the PRM's own AdamW (1e-6 in the paper)."))
    prm_weight_decay: float = field(default=0.0, metadata=_help("Weight decay of the PRM's optimizer."))

    # > Parameters that control logging
    log_completions: bool = field(default=False, metadata=_help("At each logging step print a sample of (prompt, completion, rewards, advantage) (with rich, when installed) and write them to <output_dir>/completions/completions_<step>.parquet."))
    num_completions_to_print: int | None = field(default=None, metadata=_help("Rows printed by log_completions (None: all of the latest rollout)."))
    log_unique_prompts: bool = field(default=False, metadata=_help("log_completions keeps one row per distinct prompt."))
    log_multimodal: bool = field(default=True, metadata=_help("Accepted, no effect: PRIME here trains text-only models."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_liger_kernel and (self.liger_kernel_config or {}).get("fused_linear_cross_entropy"):
            raise ConfigError(
                'liger_kernel_config={"fused_linear_cross_entropy": True} cannot be used with PRIME: the loss needs the '
                "log-probs of every completion token, which the fused loss never builds. Drop that key (as TRL requires)."
            )
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
        if self.num_generations < 2:
            raise ConfigError(f"num_generations={self.num_generations} is invalid: PRIME's leave-one-out baselines need at least 2 completions per prompt (4 in the paper).")
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise ConfigError(f"num_generations_eval={self.num_generations_eval} is invalid: use None (= num_generations) or >= 1.")
        completions_per_step = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if completions_per_step % self.num_generations != 0:
            raise ConfigError(
                f"num_generations={self.num_generations} does not divide the completions of one optimizer step: "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) = {completions_per_step}. per_device_train_batch_size counts "
                "completions, not prompts. Fix: make per_device_train_batch_size * gradient_accumulation_steps a multiple "
                f"of num_generations (e.g. per_device_train_batch_size={self.num_generations}), or change num_generations."
            )
        if self.steps_per_generation is not None and self.steps_per_generation != self.gradient_accumulation_steps:
            raise ConfigError(
                f"steps_per_generation={self.steps_per_generation} is not offered: posttrain generates one rollout per optimizer "
                f"step (steps_per_generation = gradient_accumulation_steps = {self.gradient_accumulation_steps}). Leave it None, "
                "raise gradient_accumulation_steps for a larger rollout, or reuse a rollout for several steps with num_iterations."
            )
        if self.auto_find_batch_size:
            raise ConfigError(
                "auto_find_batch_size=True is not supported by PRIME (as by TRL's RLOO): a rollout must hold whole groups of "
                "num_generations completions; lower per_device_train_batch_size instead."
            )
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length={self.max_completion_length} is invalid: it must be >= 1.")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations={self.num_iterations} is invalid: it must be >= 1 (1 = fully on-policy).")
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta} is invalid: the implicit reward coefficient must be > 0 (0.05 in the paper).")
        if not self.prm_learning_rate >= 0:
            raise ConfigError(f"prm_learning_rate={self.prm_learning_rate} is invalid: it must be >= 0 (1e-6 in the paper).")
        if self.accuracy_filter_range is not None:
            if len(self.accuracy_filter_range) != 2 or not self.accuracy_filter_range[0] <= self.accuracy_filter_range[1]:
                raise ConfigError(f"accuracy_filter_range={self.accuracy_filter_range} is invalid: give [low, high] with low <= high, e.g. [0.2, 0.8].")
            self.accuracy_filter_range = [float(v) for v in self.accuracy_filter_range]
        if not self.epsilon > 0 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ConfigError(f"epsilon={self.epsilon}, epsilon_high={self.epsilon_high} are invalid: clipping ranges must be > 0.")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (the log-probs are computed at this temperature).")
        if self.reward_clip_range is not None:
            if len(self.reward_clip_range) != 2 or not self.reward_clip_range[0] < self.reward_clip_range[1]:
                raise ConfigError(f"reward_clip_range={self.reward_clip_range} is invalid: give [low, high] with low < high, e.g. [-10, 10].")
            self.reward_clip_range = [float(v) for v in self.reward_clip_range]
        if self.reward_funcs is not None and isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has {len(self.reward_funcs)} "
                f"({self.reward_funcs}); give one weight per reward function."
            )
        for name in ("shuffle_dataset", "ds3_gather_for_generation", "log_multimodal"):  # no-effect flags whose default is True
            if getattr(self, name) is False:
                warnings.warn(f"posttrain: {name}=False is accepted but changes nothing in PRIME (see `posttrain info prime`).", UserWarning, stacklevel=3)
