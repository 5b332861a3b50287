"""Configuration of the ``sft`` method (light: imports only ``posttrain``)."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from posttrain import ConfigError, TrainingConfig


def _help(text: str) -> dict:
    return {"help": text}

__all__ = ["SFTConfig"]

LOSS_TYPES = ("nll", "dft")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
TRUNCATION_MODES = ("keep_start", "keep_end")
DATASET_KWARGS = ("skip_prepare_dataset",)


@dataclass(kw_only=True)
class SFTConfig(TrainingConfig):
    """Settings of supervised fine-tuning; every field of ``trl.SFTConfig`` (1.16) with its name and default."""

    # > Overridden defaults (TRL's SFT values)
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate of AdamW (TRL's SFT default)."})
    logging_steps: int = field(default=10, metadata={"help": "Log metrics every N optimizer steps."})
    logging_first_step: bool = field(default=False, metadata={"help": "Also log after the first step (off, as in TRL/transformers)."})
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute activations in backward to save memory (TRL's SFT default: on; ~20% slower)."},
    )

    # > Parameters that control the model
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the load-balancing auxiliary loss of Mixture-of-Experts models. None: the model config's value; 0.0 turns it off. An error on a non-MoE model."},
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "Set the chat template: a .jinja/.j2 file, or a tokenizer (Hub id or directory) to clone it from, with its added tokens and EOS (the embeddings are resized)."},
    )

    # > Parameters that control the data
    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the raw text of language-modeling data."})
    dataset_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Options of dataset preparation; the only key is skip_prepare_dataset (True: rows are used as given and must hold input_ids, and labels if masks are present)."},
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Accepted, no effect: rows are tokenized once, in the trainer's process."},
    )
    eos_token: str | None = field(
        default=None,
        metadata={"help": "Appended to text/completion strings that do not already end with it; None = the tokenizer's eos_token. Chat data relies on its template."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Truncate every tokenized sequence to this many tokens (see truncation_mode); with packing, the row length. None: no truncation."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "'keep_start' keeps the first max_length tokens; 'keep_end' (deprecated in TRL) the last ones."},
    )
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the processed rows (with seed), also before packing."})
    packing: bool = field(default=False, metadata={"help": "Pack several sequences into rows of max_length tokens."})
    packing_strategy: str = field(
        default="bfd",
        metadata={"help": "'bfd' (best-fit decreasing, over-long sequences truncated), 'bfd_split' (over-long sequences split into max_length pieces) or 'wrapped' (concatenate and cut every max_length tokens; attention crosses sequences)."},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Concatenate each micro-batch into one row with restarting position_ids instead of padding (always on with bfd/bfd_split packing). Without packing it needs max_length=None."},
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad each batch's length to a multiple of this. 'auto': 128 on Neuron (AWS Trainium), no padding elsewhere."},
    )
    eval_packing: bool | None = field(default=None, metadata={"help": "Pack the eval dataset; None = as packing."})

    # > Parameters that control the loss
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss on completion tokens only. None = on for prompt/completion data; True requires prompt/completion data (or a completion_mask column)."},
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={"help": "Loss on assistant turns only (conversational data): from the template's {% generation %} markers, else by rendering the conversation turn by turn."},
    )
    loss_type: str = field(
        default="nll",
        metadata={"help": "'nll' (token cross-entropy) or 'dft' (NLL scaled by the detached token probability, arXiv:2508.05629); 'chunked_nll' is TRL's deprecated alias of 'nll'."},
    )
    activation_offloading: bool = field(
        default=False,
        metadata={"help": "Keep the activations saved for backward in CPU memory (torch.autograd.graph.save_on_cpu) instead of on the accelerator."},
    )

    # > Deprecated in TRL
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Deprecated (TRL): the padding token; set tokenizer.pad_token and pass processing_class instead."},
    )

    use_bema: bool = field(
        default=False,
        metadata=_help("Keep a BEMA average of the weights and save it to output_dir/bema at the end (as TRL's BEMACallback; preset 'bema')."),
    )
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
        for name in ("model_init_kwargs", "dataset_kwargs"):  # TRL accepts JSON strings (the CLI passes them so)
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{name}={value!r} is not valid JSON ({exc.msg}): give a dict or a JSON object string.") from None
        super().__post_init__()
        if self.loss_type == "chunked_nll":
            warnings.warn("loss_type='chunked_nll' is deprecated (TRL 1.x) and computes the same loss as 'nll': use loss_type='nll'.", FutureWarning, stacklevel=3)
            self.loss_type = "nll"
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type={self.loss_type!r} is invalid: use one of {', '.join(map(repr, LOSS_TYPES))}.")
        if self.packing_strategy == "bfd-requeue":
            warnings.warn("packing_strategy='bfd-requeue' was renamed 'bfd_split': use packing_strategy='bfd_split'.", FutureWarning, stacklevel=3)
            self.packing_strategy = "bfd_split"
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ConfigError(f"packing_strategy={self.packing_strategy!r} is invalid: use one of {', '.join(map(repr, PACKING_STRATEGIES))}.")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(f"truncation_mode={self.truncation_mode!r} is invalid: use 'keep_start' (or the deprecated 'keep_end').")
        if self.truncation_mode == "keep_end":
            warnings.warn("truncation_mode='keep_end' is deprecated (TRL 1.x): use truncation_mode='keep_start'.", FutureWarning, stacklevel=3)
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 2):
            raise ConfigError(f"max_length={self.max_length!r} is invalid: use an integer >= 2, or None for no truncation.")
        if (self.packing or self.eval_packing) and self.max_length is None:
            raise ConfigError("packing needs max_length (the packed row length): set max_length, e.g. 1024, or packing=False / eval_packing=False.")
        if not self.dataset_text_field:
            raise ConfigError("dataset_text_field is empty: name the column that holds the text (default 'text').")
        self.pad_to_multiple_of = _resolve_pad_to_multiple_of(self.pad_to_multiple_of)
        if self.dataset_kwargs is not None:
            if not isinstance(self.dataset_kwargs, dict):
                raise ConfigError(f"dataset_kwargs={self.dataset_kwargs!r} is invalid: give a dict such as {{'skip_prepare_dataset': True}}.")
            unknown = sorted(set(self.dataset_kwargs) - set(DATASET_KWARGS))
            if unknown:
                raise ConfigError(f"dataset_kwargs has unknown keys {unknown}: the only key is 'skip_prepare_dataset'.")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ConfigError(f"router_aux_loss_coef={self.router_aux_loss_coef} is invalid: use a weight >= 0, or None for the model's own.")
        if isinstance(self.gradient_checkpointing_kwargs, dict) and self.gradient_checkpointing_kwargs.get("selective"):
            # TRL 1.16's selective activation checkpointing; torch.utils.checkpoint would fail on the key at the first forward
            raise ConfigError(
                "gradient_checkpointing_kwargs={'selective': True} (TRL's selective activation checkpointing) is not offered: drop "
                "the 'selective' key (gradient_checkpointing=True then recomputes every decoder layer), or set gradient_checkpointing=False."
            )
        if self.pad_token is not None:
            warnings.warn("pad_token is deprecated (TRL 1.x): set tokenizer.pad_token and pass processing_class=tokenizer instead.", FutureWarning, stacklevel=3)


def _resolve_pad_to_multiple_of(value):
    """Return ``pad_to_multiple_of`` as an int or None ('auto': 128 on Neuron, else None; CLI strings parsed)."""
    if value == "auto":  # torch_neuronx is installed only on AWS Trainium/Inferentia hosts
        import importlib.util

        return 128 if importlib.util.find_spec("torch_neuronx") is not None else None
    if isinstance(value, str):
        if value.strip().lower() in ("none", "null", ""):
            return None
        try:
            value = int(value)
        except ValueError:
            raise ConfigError(f"pad_to_multiple_of={value!r} is invalid: use a positive integer, 'auto' or None.") from None
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"pad_to_multiple_of={value!r} is invalid: use a positive integer, 'auto' or None.")
    return value
