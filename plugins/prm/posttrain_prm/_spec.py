"""The PRM method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

_UESATO = "Uesato et al. 2022, arXiv:2211.14275"
_LIGHTMAN = "Lightman et al. 2023, arXiv:2305.20050"

SPEC = MethodSpec(
    name="prm",
    maturity="experimental",
    plugin_api="1.6",  # the plugin API it is written against
    summary="Process reward model: a token classifier labels every reasoning step correct or wrong at its separator (TRL's PRMTrainer); "
    "scores completions step by step as a reward function for GRPO/RLOO.",
    family="reward",
    trainer="posttrain_prm.trainer:PRMTrainer",
    config="posttrain_prm.config:PRMConfig",
    # TRL's stepwise rows (prompt, completions, labels) have no tiny-dataset format of their own: the
    # conformance run trains on prompt/completion/label rows, each completion read as one step.
    data_format="unpaired_preference",
    tiny_run={"max_length": 32, "gradient_checkpointing": False},
    signals={"token_accuracy": "accuracy"},  # step-label accuracy at the separator tokens (the loss is logged by the loop)
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "eval_divergence": "stop earlier (`max_steps` / `num_train_epochs`: PRMs overfit quickly), lower `learning_rate`, or add "
                           "more labelled solutions.",
        "data_repeated": "add stepwise rows (e.g. more sampled solutions per problem, labelled automatically), or lower "
                         "`num_train_epochs`.",
    },
    papers=(
        "Uesato, Kushman, Kumar, Song, Siegel, Wang, Creswell, Irving and Higgins 2022, Solving math word problems with "
        "process- and outcome-based feedback, arXiv:2211.14275",
        "Lightman, Kosaraju, Burda, Edwards, Baker, Lee, Leike, Schulman, Sutskever and Cobbe 2023, Let's Verify Step by "
        "Step, arXiv:2305.20050",
    ),
    presets={
        "process_supervision": Preset(
            summary="Process-supervised reward model: every step's label is trained, at the step's last token (the separator); "
            "TRL's defaults otherwise.",
            overrides={"train_on_last_step_only": False, "step_separator": "\n"},
            paper=f"{_UESATO} (process-based reward model); {_LIGHTMAN} (PRM on step-level labels)",
        ),
        "outcome_supervision": Preset(
            summary="Outcome-supervised reward model baseline: only the final step's label (the answer's correctness) is "
            "trained; evaluation still scores every step.",
            overrides={"train_on_last_step_only": True},
            paper=f"{_UESATO} (outcome-based reward model); {_LIGHTMAN} (ORM baseline)",
        ),
    },
)
