"""The PPO method spec and its paper presets (light: imports nothing but posttrain)."""

from posttrain import MethodSpec, Preset

SPEC = MethodSpec(
    name="ppo",
    maturity="experimental",
    plugin_api="1.8",  # the plugin API it is written against (1.8: ToolCallingRollout, the tool signal roles)
    summary="PPO for language models (TRL's PPOTrainer): policy + critic (a separate model or a value head on the policy), per-token KL penalty to a reference, GAE, clipped policy and value losses.",
    family="online-rl",
    trainer="posttrain_ppo.trainer:PPOTrainer",
    config="posttrain_ppo.config:PPOConfig",
    data_format="prompt_only",
    # a few steps on a tiny model (the conformance suite): a reward function, the critic initialized from the policy's directory
    tiny_run={"reward_funcs": ["posttrain.testing.rewards:digit_fraction_reward"], "response_length": 8, "num_ppo_epochs": 1,
              "stop_token": "eos", "gradient_checkpointing": False},
    signals={  # posttrain.SignalRole -> this method's metric name
        "reward": "objective/scores",
        "kl": "kl",
        "entropy": "policy/entropy_avg",
        "clip_fraction": "policy/clipfrac_avg",
        "value_loss": "loss/value_avg",
        "explained_variance": "val/explained_variance",
        "completion_length": "completions/mean_length",
        "truncation": "completions/clipped_ratio",
        "generation_time_fraction": "prepare_step_fraction",  # logged by the loop: the producer generates
        "tool_call_rate": "tools/call_frequency",  # tools= / environment_factory= runs only
        "tool_failure_rate": "tools/failure_frequency",
        "turns_per_episode": "tools/mean_turns",
        "turn_limit_rate": "tools/turn_limit_ratio",
    },
    actions={  # advice for the diagnostics' codes, naming this method's config fields (in backticks)
        "completions_truncated": "raise `response_length`, set `stop_token='eos'`, or penalize missing EOS with `missing_eos_penalty`.",
        "tool_calls_failing": "read the failing calls' error messages (the episodes' tool messages, which reward functions receive in "
                              "their completions); fix the tools or their docstrings (the schema the model reads), raise `tool_call_timeout` if "
                              "they time out, or reward well-formed calls.",
        "turn_limit_reached": "raise `max_tool_calling_iterations` (or `response_length`, which counts every turn's tokens), or reward "
                              "episodes that end with an answer.",
        "throughput_bound": "lower `response_length`, raise `local_rollout_forward_batch_size`, or train each rollout longer "
                            "(`num_ppo_epochs`, `num_mini_batches`).",
        "reward_plateau": "stop here if the score is good enough (`max_steps`); otherwise raise `learning_rate` or lower `kl_coef`.",
        "high_clip_ratio": "lower `learning_rate` or `num_ppo_epochs`, or raise `cliprange`.",
        "kl_blowup": "raise `kl_coef` (the per-token KL penalty), lower `learning_rate`, or check the reward for exploits.",
        "reward_hacking": "raise `kl_coef`, set `missing_eos_penalty`, lower `response_length`, and compare with a held-out reward (an eval_dataset).",
        "entropy_collapse": "lower `learning_rate`, raise `temperature` or `kl_coef` (PPO here has no entropy bonus).",
        "length_drift": "check the reward for a length bias; set `missing_eos_penalty` or lower `response_length`.",
        "critic_not_learning": "raise `critic_learning_rate` (or `vf_coef`), train each rollout longer (`num_ppo_epochs`), or set "
                               "`whiten_rewards=True` when scores are large; initialize the critic from a trained reward model (`value_model_path`); with `value_head=True` the head shares the "
                               "policy's `learning_rate`: raise `vf_coef`, or train a separate critic (`value_head=False`).",
    },
    papers=(
        "Schulman et al. 2017, Proximal Policy Optimization Algorithms, arXiv:1707.06347",
        "Ziegler et al. 2019, Fine-Tuning Language Models from Human Preferences, arXiv:1909.08593",
        "Huang et al. 2024, The N+ Implementation Details of RLHF with PPO: A Case Study on TL;DR Summarization, arXiv:2403.17031",
    ),
    presets={
        "ppo_tldr": Preset(
            summary="Huang et al. 2024's TL;DR PPO recipe (TRL's PPOConfig defaults): lr 3e-6, 4 PPO epochs, KL 0.05, GAE(1, 0.95), "
                    "clip 0.2 / 0.2, vf_coef 0.1, 53-token responses at temperature 0.7, the EOS trick (score -1 without EOS).",
            overrides={"learning_rate": 3e-6, "num_ppo_epochs": 4, "num_mini_batches": 1, "kl_coef": 0.05, "kl_estimator": "k1", "gamma": 1.0,
                       "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "whiten_rewards": False, "response_length": 53,
                       "temperature": 0.7, "stop_token": "eos", "missing_eos_penalty": 1.0},
            paper="arXiv:2403.17031",
        ),
        "ppo_ziegler": Preset(
            summary="Ziegler et al. 2019's PPO as TRL's classic PPOConfig took it from openai/lm-human-preferences: lr 1.41e-5, "
                    "4 PPO epochs, GAE(1, 0.95), clip 0.2 / 0.2, vf_coef 0.1, KL coefficient 0.2 (its initial value; fixed here: the "
                    "adaptive KL controller is not offered), temperature 0.7.",
            overrides={"learning_rate": 1.41e-5, "num_ppo_epochs": 4, "gamma": 1.0, "lam": 0.95, "cliprange": 0.2, "cliprange_value": 0.2,
                       "vf_coef": 0.1, "kl_coef": 0.2, "kl_estimator": "k1", "temperature": 0.7, "whiten_rewards": False},
            paper="arXiv:1909.08593",
        ),
        "ppo_schulman_mujoco": Preset(
            summary="The original PPO paper's continuous-control setting (Schulman et al. 2017, Table 3), mapped to this trainer: "
                    "Adam 3e-4, 10 epochs, minibatch 64 of a 2048-step horizon (32 mini-batches), gamma 0.99, GAE lambda 0.95, clip 0.2, "
                    "no value clipping (the paper clips only the ratio), no KL penalty. A reference point: tuned for MuJoCo, not for LMs.",
            overrides={"learning_rate": 3e-4, "num_ppo_epochs": 10, "num_mini_batches": 32, "gamma": 0.99, "lam": 0.95, "cliprange": 0.2,
                       "cliprange_value": 1e6, "kl_coef": 0.0},
            paper="arXiv:1707.06347",
        ),
    },
)
