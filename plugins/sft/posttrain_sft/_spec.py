"""The ``sft`` method's spec (light: imports no torch, transformers or datasets)."""

from __future__ import annotations

from posttrain import API_VERSION, MethodSpec, Preset

_DFT = "Wu et al., On the Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification (DFT), arXiv:2508.05629"
_PACKING = "Ding et al., Fewer Truncations Improve Language Modeling, arXiv:2404.10830 (best-fit packing)"

SPEC = MethodSpec(
    name="sft",
    maturity="stable",
    plugin_api=API_VERSION,
    summary="Supervised fine-tuning: token NLL (or DFT) on text, chat or prompt/completion data, with packing.",
    family="sft",
    trainer="posttrain_sft.trainer:SFTTrainer",
    config="posttrain_sft.config:SFTConfig",
    signals={"token_accuracy": "mean_token_accuracy"},  # roles the diagnostics read
    papers=(_DFT, _PACKING),
    presets={
        "dft": Preset(
            summary="Dynamic Fine-Tuning: scale each token's NLL by its (detached) probability.",
            overrides={"loss_type": "dft"},
            paper=_DFT,
        ),
        "packing_bfd": Preset(
            summary="Pack sequences into max_length rows by best-fit decreasing, no cross-sequence attention.",
            overrides={"packing": True, "packing_strategy": "bfd"},
            paper=_PACKING,
        ),
        "completion_only": Preset(
            summary="Loss on completion tokens only (prompt/completion data; the default there, made explicit).",
            overrides={"completion_only_loss": True},
        ),
    },
)
