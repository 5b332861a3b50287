"""The ``sft`` method's spec (light: imports no torch, transformers or datasets)."""

from __future__ import annotations

from posttrain import MethodSpec, Preset

_DFT = "Wu et al., On the Generalization of SFT: A Reinforcement Learning Perspective with Reward Rectification (DFT), arXiv:2508.05629"
_PACKING = "Ding et al., Fewer Truncations Improve Language Modeling, arXiv:2404.10830 (best-fit packing)"

SPEC = MethodSpec(
    name="sft",
    maturity="stable",
    plugin_api="1.9",  # the plugin API it is written against: a literal, so the gate can refuse a core without it
    summary="Supervised fine-tuning: token NLL (or DFT) on text, chat or prompt/completion data, with packing.",
    family="sft",
    trainer="posttrain_sft.trainer:SFTTrainer",
    config="posttrain_sft.config:SFTConfig",
    data_format="prompt_completion",
    tiny_run={},  # a few steps on a tiny model (the conformance suite)
    papers=(_DFT, _PACKING, "Block and Zhang 2025, EMA Without the Lag: Bias-Corrected Iterate Averaging Schemes (BEMA), arXiv:2508.00180"),
    signals={"token_accuracy": "mean_token_accuracy"},  # roles the diagnostics read
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
        "bema": Preset(
            summary="BEMA: keep the bias-corrected EMA of the weights (phi=400, kappa=0.5, eta=0.2, rho=10) and save it to output_dir/bema.",
            overrides={"use_bema": True, "bema_update_freq": 400, "bema_ema_power": 0.5, "bema_bias_power": 0.2, "bema_lag": 10},
            paper="arXiv:2508.00180",
        ),
    },
)
