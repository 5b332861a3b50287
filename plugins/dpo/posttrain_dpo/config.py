"""Config of the DPO method (light: imports only posttrain).

Field names and defaults follow TRL 1.16's ``DPOConfig``; where they differ it is said in the
field's help and in docs/methods/dpo.md.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass, field

from posttrain import ConfigError, TrainingConfig

__all__ = ["DPOConfig", "LOSS_TYPES", "F_DIVERGENCE_TYPES", "F_DIVERGENCE_LOSS_TYPES"]

#: Every supported ``loss_type`` (TRL 1.16's list).
LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: Losses built on the chosen-minus-rejected score difference: the only ones where the f-DPO
#: reparameterization's beta * log Z(x) term cancels (TRL 1.16 rejects the others too).
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


def _help(text: str) -> dict:
    return {"help": text}


def _resolve_pad_to_multiple_of(value):
    """Return ``pad_to_multiple_of`` as an int or None: 'auto' is 128 on AWS Neuron (one compilation per shape), else None."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return 128 if importlib.util.find_spec("torch_neuronx") is not None else None
        if text in ("none", "null", ""):
            return None
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"pad_to_multiple_of={value!r} is invalid: use a positive integer, 'auto' or None.") from None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"pad_to_multiple_of={value!r} is invalid: use a positive integer, 'auto' or None.")
    return value


@dataclass(kw_only=True)
class DPOConfig(TrainingConfig):
    """Settings of DPO training (field names and defaults follow TRL 1.16's ``DPOConfig``)."""

    # > Parameters whose defaults differ from TrainingConfig (TRL 1.16's DPOConfig values)
    learning_rate: float = field(default=1e-6, metadata=_help("Peak learning rate of AdamW (TRL's DPO default)."))
    gradient_checkpointing: bool = field(
        default=True, metadata=_help("Recompute activations in backward to save memory (TRL's default for DPO: on).")
    )
    logging_first_step: bool = field(
        default=False, metadata=_help("Also log after the first step (TRL/transformers default: off; the last step is always logged).")
    )

    # > Parameters that control the model
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata=_help(
            "Weight of the Mixture-of-Experts load-balancing auxiliary loss added to the DPO loss; None = the model "
            "config's router_aux_loss_coef, 0.0 = off. Setting it for a non-MoE model is an error."
        ),
    )
    disable_dropout: bool = field(default=True, metadata=_help("Set every dropout probability in the policy and reference to 0."))

    # > Parameters that control the data preprocessing
    dataset_num_proc: int | None = field(
        default=None, metadata=_help("Accepted, no effect: rows are tokenized in the training process (one pass, before training).")
    )
    max_length: int | None = field(
        default=1024,
        metadata=_help(
            "Maximum tokens of prompt + completion; longer sequences are truncated per truncation_mode. With 'keep_start', "
            "pairs whose prompt alone has >= max_length tokens are dropped. None disables truncation."
        ),
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata=_help(
            "Keep only the last max_prompt_length prompt tokens (TRL < 1.0 semantics; TRL 1.16 has no such field). "
            "None keeps the whole prompt."
        ),
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata=_help("How max_length truncates: 'keep_start' (drop the end) or 'keep_end' (drop the start; deprecated in TRL 1.16)."),
    )
    padding_free: bool = field(
        default=False,
        metadata=_help(
            "Accepted, no effect: as in TRL 1.16 (where padding-free DPO is temporarily unavailable and falls back to "
            "padding), batches are right-padded."
        ),
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata=_help("Pad batches to a multiple of this length; 'auto' = 128 on AWS Neuron devices, no padding elsewhere (TRL 1.16)."),
    )
    pad_token: str | None = field(
        default=None,
        metadata=_help("Deprecated (as in TRL 1.16): the padding token; set tokenizer.pad_token and pass processing_class= instead."),
    )
    tools: list | None = field(
        default=None,
        metadata=_help(
            "Tool schemas (JSON-schema dicts) given to the chat template of conversational rows that have no 'tools' "
            "column of their own (TRL < 1.0's DPOConfig.tools)."
        ),
    )
    use_logits_to_keep: bool = field(
        default=False,
        metadata=_help(
            "Compute the LM head only from the batch's first completion token on (logits_to_keep), saving memory on "
            "long prompts; identical log-probs (TRL < 1.0's DPOConfig.use_logits_to_keep)."
        ),
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata=_help(
            "Compute the reference log-probs of every train and eval pair once, before training, and store them in the "
            "rows; no reference copy is kept (an explicit ref_model is moved to the CPU)."
        ),
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata=_help("Batch size of the reference precompute; None = per_device_train_batch_size (train) / per_device_eval_batch_size (eval)."),
    )
    generate_during_eval: bool = field(
        default=False,
        metadata=_help(
            "Accepted, no effect: TRL < 1.0 logged sampled completions to W&B/Comet tables during evaluation; generate "
            "from the saved model (or a TrainerCallback) instead."
        ),
    )

    # > Parameters that control the training
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata=_help(
            "Loss type(s): " + ", ".join(LOSS_TYPES) + ". Several are summed with loss_weights."
        ),
    )
    loss_weights: list[float] | None = field(
        default=None,
        metadata=_help("Weight of each loss_type (same length); None = 1.0 each. MPO: [0.8, 0.2, 1.0]."),
    )
    rpo_alpha: float | None = field(
        default=None,
        metadata=_help(
            "RPO (TRL < 1.0's DPOConfig.rpo_alpha): add rpo_alpha times the chosen completions' NLL (the 'sft' loss) "
            "to the loss. None = off; same as adding 'sft' to loss_type with that weight."
        ),
    )
    beta: float = field(
        default=0.1,
        metadata=_help("Deviation from the reference: higher beta stays closer. For 'ipo' it is the paper's tau."),
    )
    label_smoothing: float = field(
        default=0.0,
        metadata=_help("Label-flip probability for 'robust' (in [0, 0.5)), epsilon for 'exo_pair' (> 0; paper: 1e-3), and smoothing for 'aot'/'aot_unpaired'."),
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata=_help("f-DPO divergence: reverse_kl (standard DPO), forward_kl, js_divergence or alpha_divergence."),
    )
    f_alpha_divergence_coef: float = field(default=0.5, metadata=_help("alpha of the alpha-divergence (f_divergence_type='alpha_divergence')."))
    use_weighting: bool = field(
        default=False,
        metadata=_help("WPO: weight each pair's loss by the policy's length-normalized (sampling-aligned) probability of chosen times rejected."),
    )
    ld_alpha: float | None = field(
        default=None,
        metadata=_help("LD-DPO alpha in [0, 1]: log-probs of tokens beyond the shorter completion's length are scaled by it. None = off."),
    )
    discopop_tau: float = field(default=0.05, metadata=_help("DiscoPOP temperature tau of the log-ratio modulation."))
    activation_offloading: bool = field(
        default=False,
        metadata=_help(
            "Keep the activations saved for backward in CPU memory during the training forward "
            "(torch.autograd.graph.save_on_cpu); nothing to offload when training on the CPU."
        ),
    )
    sync_ref_model: bool = field(
        default=False,
        metadata=_help("TR-DPO: every ref_model_sync_steps steps set reference = alpha * policy + (1 - alpha) * reference."),
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata=_help("TR-DPO alpha of the reference soft update, in (0, 1]."))
    ref_model_sync_steps: int = field(default=512, metadata=_help("TR-DPO tau: optimizer steps between reference updates."))

    bema_ref_model: bool = field(
        default=False,
        metadata=_help("Update the reference model with the policy's BEMA weights every bema_ref_model_update_freq steps (trl.experimental.bema_for_ref_model; preset 'bema_ref')."),
    )
    bema_ref_model_update_freq: int = field(default=400, metadata=_help("BEMA reference: copy the BEMA weights into the reference every this many steps."))
    bema_ref_model_update_after: int = field(default=0, metadata=_help("BEMA reference: steps before the first reference update."))
    # > BEMA: bias-corrected EMA of the weights (Block and Zhang 2025, arXiv:2508.00180; TRL's BEMACallback)
    bema_update_freq: int = field(default=400, metadata=_help("BEMA: update the average every this many optimizer steps (the paper's phi)."))
    bema_ema_power: float = field(default=0.5, metadata=_help("BEMA: kappa, power of the EMA decay beta_t = (lag + multiplier * t)^-kappa (0 disables the EMA)."))
    bema_bias_power: float = field(default=0.2, metadata=_help("BEMA: eta, power of the bias-correction scale alpha_t = (lag + multiplier * t)^-eta."))
    bema_lag: int = field(default=10, metadata=_help("BEMA: rho, the virtual starting age of both schedules."))
    bema_update_after: int = field(default=0, metadata=_help("BEMA: tau, the burn-in step at which theta_0 and the EMA are snapshotted."))
    bema_multiplier: float = field(default=1.0, metadata=_help("BEMA: gamma, the step multiplier of both schedules."))
    bema_min_ema_multiplier: float = field(default=0.0, metadata=_help("BEMA: lower bound of the EMA decay beta_t."))
    bema_device: str = field(default="cpu", metadata=_help("BEMA: device of the average's buffers (keep 'cpu' to spare accelerator memory)."))

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        if not self.loss_type:
            raise ConfigError("loss_type=[] is invalid: give at least one loss type, e.g. ['sigmoid'].")
        unknown = [t for t in self.loss_type if t not in LOSS_TYPES]
        if unknown:
            raise ConfigError(f"loss_type={self.loss_type} has unknown type(s) {unknown}: use any of {', '.join(LOSS_TYPES)}.")
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in self.loss_weights]
            if len(self.loss_weights) != len(self.loss_type):
                raise ConfigError(
                    f"loss_weights={self.loss_weights} has {len(self.loss_weights)} weights for {len(self.loss_type)} loss types "
                    f"{self.loss_type}: give one weight per loss type, or None for 1.0 each."
                )
        if not self.beta > 0:
            raise ConfigError(f"beta={self.beta} is invalid: use beta > 0 (TRL's default is 0.1).")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ConfigError(f"f_divergence_type={self.f_divergence_type!r} is invalid: use one of {', '.join(F_DIVERGENCE_TYPES)}.")
        if self.f_divergence_type != "reverse_kl":
            bad = [t for t in self.loss_type if t not in F_DIVERGENCE_LOSS_TYPES]
            if bad:
                raise ConfigError(
                    f"f_divergence_type={self.f_divergence_type!r} does not apply to loss_type {bad}: the f-DPO "
                    f"reparameterization only holds for {', '.join(F_DIVERGENCE_LOSS_TYPES)}. Use f_divergence_type='reverse_kl' "
                    "with these losses."
                )
        if "exo_pair" in self.loss_type and not 0.0 < self.label_smoothing < 1.0:
            raise ConfigError(
                f"label_smoothing={self.label_smoothing} is invalid for loss_type 'exo_pair': EXO needs epsilon in (0, 1); "
                "the paper recommends label_smoothing=1e-3."
            )
        if "robust" in self.loss_type and not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"label_smoothing={self.label_smoothing} is invalid for loss_type 'robust': the label-flip rate must be in "
                "[0, 0.5) (the loss divides by 1 - 2 * label_smoothing); the paper uses 0.1."
            )
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing} is invalid: use a value in [0, 1].")
        if self.label_smoothing > 0 and not {"robust", "exo_pair", "aot", "aot_unpaired"} & set(self.loss_type):
            warnings.warn(
                f"label_smoothing={self.label_smoothing} has no effect with loss_type={self.loss_type} (as in TRL 1.16, the "
                "'sigmoid' loss has no conservative-DPO smoothing): use loss_type ['robust'] for noisy labels.",
                stacklevel=3,
            )
        if self.use_weighting and {"aot", "aot_unpaired"} & set(self.loss_type):
            raise ConfigError(
                "use_weighting=True cannot be combined with loss_type 'aot'/'aot_unpaired': those losses sort the pairs of "
                "a batch, which would misalign the per-pair WPO weights. Drop use_weighting or choose another loss."
            )
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"ld_alpha={self.ld_alpha} is invalid: use a value in [0, 1] (1.0 = no down-weighting), or None.")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError(f"max_length={self.max_length} is invalid: use a positive token count, or None for no truncation.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"max_prompt_length={self.max_prompt_length} is invalid: use a positive token count, or None.")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ConfigError(f"truncation_mode={self.truncation_mode!r} is invalid: use 'keep_start' or 'keep_end'.")
        if self.truncation_mode == "keep_end":
            warnings.warn(
                "truncation_mode='keep_end' is deprecated in TRL 1.16 (removal planned for TRL 2.0): it still works here, "
                "but prefer truncation_mode='keep_start' (the default).",
                FutureWarning,
                stacklevel=3,
            )
        self.pad_to_multiple_of = _resolve_pad_to_multiple_of(self.pad_to_multiple_of)
        if self.pad_token is not None:
            warnings.warn(
                "pad_token is deprecated (as in TRL 1.16, removal planned for TRL 2.0): set tokenizer.pad_token and pass the "
                "tokenizer as processing_class= instead.",
                FutureWarning,
                stacklevel=3,
            )
        if isinstance(self.tools, str):  # the CLI passes JSON
            try:
                self.tools = json.loads(self.tools)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"tools={self.tools[:80]!r} is not valid JSON ({exc.msg}): give a list of tool schemas.") from None
        if self.tools is not None and not isinstance(self.tools, list):
            raise ConfigError(f"tools is a {type(self.tools).__name__}: give a list of tool schemas (dicts), or None.")
        if self.rpo_alpha is not None and not self.rpo_alpha >= 0:
            raise ConfigError(f"rpo_alpha={self.rpo_alpha} is invalid: use a weight >= 0 (the RPO paper uses 1.0), or None.")
        if self.router_aux_loss_coef is not None and not self.router_aux_loss_coef >= 0:
            raise ConfigError(f"router_aux_loss_coef={self.router_aux_loss_coef} is invalid: use a weight >= 0, 0.0 to turn it off, or None.")
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ConfigError(f"precompute_ref_batch_size={self.precompute_ref_batch_size} is invalid: use a positive integer or None.")
        if not self.discopop_tau > 0:
            raise ConfigError(f"discopop_tau={self.discopop_tau} is invalid: use a positive temperature (paper: 0.05).")
        if not 0.0 < self.ref_model_mixup_alpha <= 1.0:
            raise ConfigError(f"ref_model_mixup_alpha={self.ref_model_mixup_alpha} is invalid: use a value in (0, 1] (paper: 0.6).")
        if self.ref_model_sync_steps < 1:
            raise ConfigError(f"ref_model_sync_steps={self.ref_model_sync_steps} is invalid: use a positive number of steps.")
        if self.bema_ref_model and (self.sync_ref_model or self.precompute_ref_log_probs):
            raise ConfigError(
                "bema_ref_model=True conflicts with "
                + ("sync_ref_model=True (two reference updates)" if self.sync_ref_model else "precompute_ref_log_probs=True (the reference changes during training)")
                + ": set one of them to False."
            )
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ConfigError(
                "sync_ref_model=True and precompute_ref_log_probs=True conflict: TR-DPO updates the reference during training, "
                "so precomputed reference log-probs would go stale. Set one of them to False."
            )
