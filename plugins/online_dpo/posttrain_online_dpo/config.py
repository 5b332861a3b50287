"""Config of Online DPO (light: imports only posttrain).

Batch semantics (TRL's): ``per_device_train_batch_size`` counts PROMPTS. Each prompt is sampled
twice, so one micro-batch trains on ``per_device_train_batch_size`` pairs (twice as many
completions) and one optimizer step on ``per_device_train_batch_size * gradient_accumulation_steps``
pairs per process.

Every field of TRL 1.16's ``OnlineDPOConfig`` exists here with its name and default; the ones that
cannot mean anything on posttrain's loop say so in a help text starting with "Accepted, no effect"
(setting one to a non-default value warns once). Fields TRL does not have are marked "posttrain:".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["OnlineDPOConfig", "LOSS_TYPES", "UNDECIDED_RULES"]

#: TRL 1.16's ``OnlineDPOConfig.loss_type`` choices.
LOSS_TYPES = ("sigmoid", "ipo")
#: What a judge's "cannot tell" (-1) does to its pair (``judge_undecided``).
UNDECIDED_RULES = ("drop", "first", "second")


def _help(text: str) -> dict:
    return {"help": text}


# Copied from posttrain_gmpo.config._accept_positional_output_dir
def _accept_positional_output_dir(cls):
    """Let ``cls(output_dir, **fields)`` work as with TRL's configs (transformers' ``TrainingArguments`` takes
    ``output_dir`` as its first positional argument); every other field stays keyword-only."""
    import functools
    import inspect

    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if len(args) > 1:
            raise TypeError(f"{cls.__name__}() takes output_dir as its only positional argument; pass the other {len(args) - 1} by name.")
        if args:
            if "output_dir" in kwargs:
                raise TypeError(f"{cls.__name__}() got multiple values for argument 'output_dir'")
            kwargs["output_dir"] = args[0]
        init(self, **kwargs)

    params = list(inspect.signature(init).parameters.values())
    output_dir = next(p for p in params if p.name == "output_dir").replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
    __init__.__signature__ = inspect.Signature([params[0], output_dir, *(p for p in params[1:] if p.name != "output_dir")])
    cls.__init__ = __init__
    return cls


@_accept_positional_output_dir
@dataclass(kw_only=True)
class OnlineDPOConfig(TrainingConfig):
    """Settings of Online DPO / OAIF (Guo et al. 2024, arXiv:2402.04792); names and defaults follow TRL 1.16's ``OnlineDPOConfig``."""

    # > Defaults overridden from TrainingConfig (as TRL 1.16)
    learning_rate: float = field(default=5e-7, metadata=_help("Peak learning rate of AdamW (TRL's Online DPO default 5e-7)."))
    logging_steps: int = field(default=10, metadata=_help("Log metrics every N optimizer steps (TRL's default)."))
    gradient_checkpointing: bool = field(default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default: on; set False for tiny models)."))
    remove_unused_columns: bool = field(default=False, metadata=_help("Accepted, no effect: every dataset column is kept and passed to the reward functions (TRL's default is False too)."))

    # > Parameters that control the rewards / the judge
    reward_model_path: str | None = field(default=None, metadata=_help("Path (or Hub id) of a sequence-classification reward model; used when the trainer gets no reward_funcs / judge and the config no reward_funcs / judge."))
    reward_funcs: list[str] | None = field(
        default=None,
        metadata=_help(
            "posttrain: reward functions by name (built-ins such as 'accuracy', 'module:function' import paths, or a "
            "reward-model directory); used when the trainer gets no reward_funcs argument. CLI: --reward_funcs my_mod:fn."
        ),
    )
    reward_weights: list[float] | None = field(default=None, metadata=_help("One weight per reward function (default: all 1.0); the weighted sum scores each completion."))
    judge: str | None = field(
        default=None,
        metadata=_help(
            "posttrain: a registered pairwise judge by name ('reward_functions', 'reward_model', 'openai', or a plugin's), "
            "built with judge_kwargs; used when the trainer gets no judge / reward_funcs argument."
        ),
    )
    judge_kwargs: dict | None = field(default=None, metadata=_help("posttrain: keyword arguments of the judge named by `judge` (e.g. {\"base_url\": \"http://localhost:8000/v1\", \"model\": \"m\"})."))
    judge_undecided: str = field(
        default="drop",
        metadata=_help(
            "posttrain: what a judge's 'cannot tell' (-1) does to its pair: 'drop' (left out of the loss), 'first' or "
            "'second' (that completion is chosen). Reward functions / models never answer -1: equal scores choose the "
            "first completion, as TRL 1.16."
        ),
    )

    # > Parameters that control generation
    max_new_tokens: int = field(default=64, metadata=_help("Maximum number of tokens to generate per completion."))
    max_length: int = field(
        default=512,
        metadata=_help(
            "Maximum total length (prompt + completion) of the sequences scored for the loss; longer prompts are cut on "
            "the left so that the completion is kept whole."
        ),
    )
    temperature: float = field(default=0.9, metadata=_help("Sampling temperature. The loss scores completions at temperature 1 (as TRL)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass (1.0 = off)."))
    top_k: int = field(default=0, metadata=_help("Top-k sampling (0 = off)."))
    min_p: float | None = field(default=None, metadata=_help("Min-p sampling (None = off)."))
    repetition_penalty: float = field(default=1.0, metadata=_help("Repetition penalty during sampling (1.0 = off)."))
    generation_kwargs: dict | None = field(default=None, metadata=_help("Overrides of the sampling settings: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens, do_sample (False = greedy). Other keys are ignored with a warning."))
    cache_implementation: str | None = field(default=None, metadata=_help("Accepted, no effect: the transformers rollout backend uses transformers' default dynamic KV cache."))
    missing_eos_penalty: float | None = field(default=None, metadata=_help("Subtracted from the score of a completion without an EOS token (reward functions / reward models only; a judge's preference has no score). Must be >= 0."))
    rollout_backend: str = field(default="transformers", metadata=_help("posttrain: rollout engine backend, 'transformers' (the training model itself) or 'vllm' (GPU)."))
    generation_batch_size: int | None = field(default=None, metadata=_help("posttrain: sequences generated at once by the transformers backend (default: all of a step); bounds memory."))

    # > Parameters that control the loss
    beta: float | list[float] = field(
        default_factory=lambda: [0.1],
        metadata=_help(
            "Deviation from the reference model (higher: less). For loss_type='ipo' it is tau of the IPO paper. A list "
            "gives one beta per epoch, the last one for every later epoch; a one-element list becomes a float."
        ),
    )
    loss_type: str = field(default="sigmoid", metadata=_help("'sigmoid' (DPO's loss) or 'ipo' (IPO's squared loss)."))
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability of the policy (and reference) to 0."))

    # > Parameters that control vLLM (rollout_backend='vllm')
    use_vllm: bool = field(default=False, metadata=_help("TRL-compatible switch: True sets rollout_backend='vllm'."))
    vllm_model_impl: str = field(default="vllm", metadata=_help("vLLM model implementation: 'vllm' or 'transformers'."))
    vllm_structured_outputs_regex: str | None = field(default=None, metadata=_help("Accepted, no effect: posttrain's vLLM backend does not constrain decoding."))
    vllm_gpu_memory_utilization: float | None = field(default=0.55, metadata=_help("Fraction of GPU memory colocated vLLM may take."))
    vllm_mode: str = field(default="colocate", metadata=_help("'colocate' (vLLM in the training process). 'server' is refused for training: posttrain cannot push updated weights to a server yet."))
    vllm_server_base_url: str | None = field(default=None, metadata=_help("Base URL of the vLLM server (server mode)."))
    vllm_server_host: str = field(default="0.0.0.0", metadata=_help("Host of the vLLM server (server mode)."))
    vllm_server_port: int = field(default=8000, metadata=_help("Port of the vLLM server (server mode)."))
    vllm_server_timeout: float = field(default=240.0, metadata=_help("Seconds to wait for the vLLM server."))
    vllm_group_port: int = field(default=51216, metadata=_help("Accepted, no effect: posttrain does not push weights to a vLLM server."))
    vllm_tensor_parallel_size: int = field(default=1, metadata=_help("Tensor parallelism of colocated vLLM."))
    vllm_enable_sleep_mode: bool = field(default=False, metadata=_help("Let colocated vLLM release its memory between generations."))
    vllm_max_model_length: int | None = field(default=None, metadata=_help("posttrain: vLLM context window (default: max_length + max_new_tokens, as TRL)."))

    # > Other parameters
    ds3_gather_for_generation: bool = field(default=True, metadata=_help("Accepted, no effect: under DeepSpeed ZeRO-3 the transformers backend generates with the engine's own parameter gathering."))

    @property
    def max_completion_length(self) -> int:
        """The core's name of ``max_new_tokens`` (read by the rollout helpers)."""
        return self.max_new_tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_vllm:
            self.rollout_backend = "vllm"
        if self.vllm_max_model_length is None and self.rollout_backend == "vllm":
            self.vllm_max_model_length = self.max_length + self.max_new_tokens
        if isinstance(self.beta, (list, tuple)):
            if not self.beta:
                raise ConfigError("beta=[] is invalid: give a float or a non-empty list (one beta per epoch).")
            self.beta = [float(b) for b in self.beta]
            if len(self.beta) == 1:
                self.beta = self.beta[0]
        betas = self.beta if isinstance(self.beta, list) else [self.beta]
        if any(not b > 0 for b in betas):
            raise ConfigError(f"beta={self.beta} is invalid: every beta must be > 0 (the IPO target 1 / (2 beta) and the DPO scale need it).")
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type!r} is invalid: use one of {', '.join(LOSS_TYPES)}.")
        if self.judge_undecided not in UNDECIDED_RULES:
            raise ConfigError(f"judge_undecided={self.judge_undecided!r} is invalid: use one of {', '.join(UNDECIDED_RULES)}.")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ConfigError(f"missing_eos_penalty={self.missing_eos_penalty} is invalid: it must be >= 0 (it is subtracted from the score).")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} is invalid: it must be >= 1.")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} is invalid: it must be >= 2 (prompt + completion tokens).")
        if self.temperature <= 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be > 0 (use generation_kwargs={{'do_sample': False}} for greedy).")
        for name, allowed in {"vllm_mode": ("colocate", "server"), "vllm_model_impl": ("vllm", "transformers"), "rollout_backend": ("transformers", "vllm")}.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: use one of {', '.join(allowed)}.")
        if self.auto_find_batch_size:
            raise ConfigError("auto_find_batch_size=True is not supported by Online DPO: lower per_device_train_batch_size instead.")
        if self.reward_funcs is not None and isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if self.reward_weights is not None and self.reward_funcs is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} entries but reward_funcs has {len(self.reward_funcs)} "
                f"({self.reward_funcs}); give one weight per reward function."
            )
        if self.max_new_tokens >= self.max_length:
            warnings.warn(
                f"max_new_tokens ({self.max_new_tokens}) >= max_length ({self.max_length}): prompts will be cut (or dropped) "
                "in the scoring forward; keep max_length > max_new_tokens + the longest prompt.", UserWarning, stacklevel=3,
            )
        for name in ("ds3_gather_for_generation",):  # no-effect flags whose default is True
            if getattr(self, name) is False:
                warnings.warn(f"posttrain: {name}=False is accepted but changes nothing in Online DPO (see `posttrain info online_dpo`).", UserWarning, stacklevel=3)
