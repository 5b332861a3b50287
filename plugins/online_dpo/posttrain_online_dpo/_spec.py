"""The Online DPO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

_PAPER = "arXiv:2402.04792"

SPEC = MethodSpec(
    name="online_dpo",
    maturity="experimental",
    plugin_api="1.6",  # the plugin API it is written against (1.6: judges, the online scaffold)
    summary="Online DPO / OAIF: the policy samples two completions per prompt, a judge (LLM, reward model or reward functions) picks the better one, a DPO or IPO loss trains on the pair.",
    family="online-preference",
    trainer="posttrain_online_dpo.trainer:OnlineDPOTrainer",
    config="posttrain_online_dpo.config:OnlineDPOConfig",
    data_format="prompt_only",
    # a few steps on a tiny model (the conformance suite): a verifiable reward labels each pair
    tiny_run={"reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"], "max_new_tokens": 8, "max_length": 64,
              "learning_rate": 1e-3, "gradient_checkpointing": False},
    signals={  # what the diagnostics may read (posttrain.SignalRole -> this method's metric name)
        "reward": "objective/scores",
        "kl": "kl",
        "preference_margin": "rewards/margins",
        "preference_accuracy": "rewards/accuracies",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: prepare_step generates
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "completions_truncated": "raise `max_new_tokens`, or set `missing_eos_penalty` to push the policy towards "
                                 "ending its completions.",
        "throughput_bound": "generate with vLLM (`use_vllm=True`), or lower `max_new_tokens`.",
        "reward_plateau": "stop here if the reward is good enough (`max_steps`); otherwise raise `learning_rate`, lower "
                          "`beta`, or make the reward give partial credit.",
        "kl_blowup": "raise `beta`, lower `learning_rate`, or check the judge / reward for exploits.",
        "reward_hacking": "raise `beta`, add `missing_eos_penalty` or cap `max_new_tokens`, check the judge / reward "
                          "function for exploits, and compare with a held-out reward (an eval_dataset).",
        "length_drift": "check the judge / reward for a length bias; lower `max_new_tokens` or set `missing_eos_penalty`.",
        "preference_saturation": "stop earlier (`max_steps`), raise `beta`, or use `loss_type='ipo'` (its loss does "
                                 "not push the margin past 1 / (2 beta)).",
    },
    papers=(
        "Guo, Zhang, Liu, Liu, Khalman, Llinares, Ramé, Mesnard, Zhao, Piot, Ferret and Blondel 2024, Direct Language "
        "Model Alignment from Online AI Feedback, arXiv:2402.04792",
        "Azar, Rowland, Piot, Guo, Calandriello, Valko and Munos 2023, A General Theoretical Paradigm to Understand "
        "Learning from Human Preferences, arXiv:2310.12036",
    ),
    presets={
        "online_dpo_sigmoid": Preset(
            summary="OAIF with the DPO loss: two on-policy samples per prompt, one preference each, sigmoid loss with beta 0.1, learning rate 5e-7.",
            overrides={"loss_type": "sigmoid", "beta": 0.1, "learning_rate": 5e-7},
            paper=_PAPER,
        ),
        "online_dpo_ipo": Preset(
            summary="OAIF with the IPO loss (online IPO): two on-policy samples per prompt, squared loss towards the margin 1 / (2 beta), beta (tau) 0.1.",
            overrides={"loss_type": "ipo", "beta": 0.1, "learning_rate": 5e-7},
            paper=_PAPER,
        ),
    },
)
