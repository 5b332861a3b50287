"""The method's spec (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="example_method",
    maturity="experimental",
    plugin_api="1.2",  # the plugin API it is written against: a literal, so the gate can refuse a core without it
    summary="SFT on plain text with input token dropout (example third-party plugin).",
    family="sft",
    trainer="posttrain_example_method.trainer:TokenDropoutSFTTrainer",
    config="posttrain_example_method.config:TokenDropoutSFTConfig",
    data_format="text",
    tiny_run={},  # a few steps on a tiny model (the conformance suite)
    # The diagnostics read metrics by role (posttrain.SignalRole): declare which of yours mean what.
    signals={"token_accuracy": "token_accuracy"},
    papers=("Bowman et al. 2016, Generating Sentences from a Continuous Space (word dropout), arXiv:1511.06349",),
    presets={
        "word_dropout": Preset(
            summary="Drop 25% of input tokens, as in the word-dropout ablation of the paper.",
            overrides={"token_dropout": 0.25},
            paper="arXiv:1511.06349",
        ),
    },
)
