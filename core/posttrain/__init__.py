"""posttrain: post-training for language models, every method a plugin.

Importing ``posttrain`` is light (no torch): the heavy names below are resolved lazily on first
attribute access, so ``posttrain list`` and plugin specs stay fast. Plugins import only names in
``__all__``; everything in ``_private`` modules may change without notice.
"""

from __future__ import annotations

import importlib
from typing import Any

from posttrain._errors import CheckpointError, CheckpointNotFoundError, DataError, DataNotFoundError, PosttrainError
from posttrain._spec import DATA_FORMATS, SIGNAL_ROLES, MethodSpec, Preset, SignalRole, SpecError
from posttrain.config import ConfigError, TrainingConfig, as_config, closest_field_names, config_fields

#: Version of the plugin contract ("MAJOR.MINOR"). A plugin built for another major, or for a
#: newer minor, is refused (see STABILITY.md).
API_VERSION = "1.9"

try:  # the distribution's version, single-sourced from pyproject.toml
    from importlib.metadata import version as _dist_version

    __version__ = _dist_version("posttrain")
except Exception:  # pragma: no cover - running from a source tree without install
    __version__ = "0+unknown"

# Heavy names, imported on first access: name -> "module:attribute".
_LAZY = {
    # registry and maturity gate
    "Registry": "posttrain._registry:Registry",
    "MethodInfo": "posttrain._registry:MethodInfo",
    "MethodNotAllowedError": "posttrain._registry:MethodNotAllowedError",
    "MethodNotFoundError": "posttrain._registry:MethodNotFoundError",
    "activate": "posttrain._registry:activate",
    "get_plugin_manager": "posttrain._plugins:get_plugin_manager",
    "hookimpl": "posttrain.hookspecs:hookimpl",
    "ensure_activated": "posttrain._registry:ensure_activated",
    "Activation": "posttrain._registry:Activation",
    # the method contract (plugin API 1.1)
    "MethodProtocol": "posttrain._protocol:MethodProtocol",
    "OptionalMethodMembers": "posttrain._protocol:OptionalMethodMembers",
    "MethodContractError": "posttrain._protocol:MethodContractError",
    "check_method": "posttrain._protocol:check_method",
    "TrainerSurface": "posttrain._surface:TrainerSurface",
    # training loop shell and checkpoints
    "TrainingLoop": "posttrain._loop:TrainingLoop",
    "TrainingState": "posttrain._loop:TrainingState",
    "TrainOutput": "posttrain._loop:TrainOutput",
    "CallbackList": "posttrain._loop:CallbackList",
    # shared plumbing (plain functions)
    "build_reference_model": "posttrain._plumbing:build_reference_model",
    # plugin API 1.2: bias-corrected EMA of the weights (SFT averaging, DPO reference)
    "BEMA": "posttrain._bema:BEMA",
    "BEMASaver": "posttrain._bema:BEMASaver",
    "disable_dropout": "posttrain._plumbing:disable_dropout",
    "is_peft_model": "posttrain._plumbing:is_peft_model",
    "adapter_disabled": "posttrain._plumbing:adapter_disabled",
    "common_prefix_length": "posttrain._plumbing:common_prefix_length",
    "prompt_completion_boundary": "posttrain._plumbing:prompt_completion_boundary",
    "tokenize_prompt": "posttrain._plumbing:tokenize_prompt",
    "load_reward_model": "posttrain._plumbing:load_reward_model",
    "build_reward_functions": "posttrain._plumbing:build_reward_functions",
    "gather_across_processes": "posttrain._plumbing:gather_across_processes",
    "resolve_dtype": "posttrain._plumbing:resolve_dtype",
    "sync_reference_model": "posttrain._plumbing:sync_reference_model",
    # one model-loading rule for every role: policy, reference, reward, teacher, critic, judge (plugin API 1.5)
    "load_pretrained": "posttrain._models:load_pretrained",
    "MODEL_ROLES": "posttrain._models:MODEL_ROLES",
    # a teacher served over HTTP (vLLM's /v1/completions prompt_logprobs protocol; plugin API 1.6)
    "TeacherServer": "posttrain._teacher_server:TeacherServer",
    "TeacherServerClient": "posttrain._teacher_server:TeacherServerClient",
    "TeacherServerError": "posttrain._teacher_server:TeacherServerError",
    # rewards (TRL's calling convention; see posttrain.rewards)
    "RewardFunctionError": "posttrain.rewards:RewardFunctionError",
    "RewardResult": "posttrain.rewards:RewardResult",
    "RewardModelFunction": "posttrain.rewards:RewardModelFunction",
    "SoftOverlongPunishment": "posttrain.rewards:SoftOverlongPunishment",
    "accuracy_reward": "posttrain.rewards:accuracy_reward",
    "format_reward": "posttrain.rewards:format_reward",
    "completion_text": "posttrain.rewards:completion_text",
    "extract_final_answer": "posttrain.rewards:extract_final_answer",
    "resolve_reward_functions": "posttrain.rewards:resolve_reward_functions",
    "compute_rewards": "posttrain.rewards:compute_rewards",
    "BUILTIN_REWARDS": "posttrain.rewards:BUILTIN_REWARDS",
    # pairwise judges (plugin API 1.5; Online DPO, XPO, Nash-MD; see posttrain.judges)
    "PairwiseJudge": "posttrain.judges:PairwiseJudge",
    "JudgeError": "posttrain.judges:JudgeError",
    "RewardFunctionJudge": "posttrain.judges:RewardFunctionJudge",
    "RewardModelJudge": "posttrain.judges:RewardModelJudge",
    "OpenAICompatibleJudge": "posttrain.judges:OpenAICompatibleJudge",
    "get_judge": "posttrain.judges:get_judge",
    # the online scaffold's reward statistics (plugin API 1.5)
    "group_statistics": "posttrain._online:group_statistics",
    "leave_one_out_baseline": "posttrain._online:leave_one_out_baseline",
    "pair_preferences_to_chosen_rejected": "posttrain._online:pair_preferences_to_chosen_rejected",
    # the online scaffold's steps: config -> policy, rewards, engine; prompts -> rollout -> rewards -> micro-batches (plugin API 1.5)
    "CompletionLog": "posttrain._online_steps:CompletionLog",
    "OnlineRewards": "posttrain._online_steps:OnlineRewards",
    "add_old_and_ref_logps": "posttrain._online_steps:add_old_and_ref_logps",
    "attach_rollout_metrics": "posttrain._online_steps:attach_rollout_metrics",
    "build_rollout_engine": "posttrain._online_steps:build_rollout_engine",
    "check_online_arguments": "posttrain._online_steps:check_online_arguments",
    "check_sync_ref_model": "posttrain._online_steps:check_sync_ref_model",
    "completion_logps": "posttrain._online_steps:completion_logps",
    "default_output_dir": "posttrain._online_steps:default_output_dir",
    "evaluate_online": "posttrain._online_steps:evaluate_online",
    "expand_prompts": "posttrain._online_steps:expand_prompts",
    "generate_rollout": "posttrain._online_steps:generate_rollout",
    "load_online_policy": "posttrain._online_steps:load_online_policy",
    "nanstd": "posttrain._online:nanstd",
    "prepare_prompt_dataset": "posttrain._online_steps:prepare_prompt_dataset",
    "prompt_token_ids": "posttrain._online_steps:prompt_token_ids",
    "reference_logps": "posttrain._online_steps:reference_logps",
    "resolve_online_rewards": "posttrain._online_steps:resolve_online_rewards",
    "reward_and_length_metrics": "posttrain._online_steps:reward_and_length_metrics",
    "rollout_micro_batches": "posttrain._online_steps:rollout_micro_batches",
    "router_aux_loss_settings": "posttrain._online_steps:router_aux_loss_settings",
    "sampler_is_old_policy": "posttrain._online_steps:sampler_is_old_policy",
    "sampling_from_config": "posttrain._online_steps:sampling_from_config",
    "score_rollout": "posttrain._online_steps:score_rollout",
    "slice_rollout": "posttrain._online_steps:slice_rollout",
    "find_latest_checkpoint": "posttrain._checkpoint:find_latest_checkpoint",
    "load_dataset_from_config": "posttrain._data:load_dataset_from_config",
    # numerics shared by methods
    "selective_log_softmax": "posttrain._ops:selective_log_softmax",
    "entropy_from_logits": "posttrain._ops:entropy_from_logits",
    "pad": "posttrain._ops:pad",
    # rollout engine
    "RolloutBackend": "posttrain._rollout:RolloutBackend",
    "RolloutEngine": "posttrain._rollout:RolloutEngine",
    "SamplingParams": "posttrain._rollout:SamplingParams",
    "RolloutBatch": "posttrain._rollout:RolloutBatch",
    "get_rollout_backend": "posttrain._rollout:get_rollout_backend",
    # episodes: rollout contract v2 (plugin API 1.5)
    "Segment": "posttrain._episode:Segment",
    "Episode": "posttrain._episode:Episode",
    "EpisodeBatch": "posttrain._episode:EpisodeBatch",
    "Environment": "posttrain._episode:Environment",
    "rollout_episodes": "posttrain._episode:rollout_episodes",
    # tools and environments during rollouts: TRL's tools= / environment_factory= (plugin API 1.8)
    "ToolCallingRollout": "posttrain._tools:ToolCallingRollout",
    "ToolRolloutResult": "posttrain._tools:ToolRolloutResult",
    "tool_schema": "posttrain._tools:tool_schema",
    "parse_tool_calls": "posttrain._tools:parse_tool_calls",
    "tool_response_ids": "posttrain._tools:tool_response_ids",
    "run_tool_call": "posttrain._tools:run_tool_call",
    "ToolCallResult": "posttrain._tools:ToolCallResult",
    "EnvironmentInfo": "posttrain._environments:EnvironmentInfo",
    "list_environments": "posttrain._environments:list_environments",
    "load_environment": "posttrain._environments:load_environment",
    # vision-language models: processors, images in rows, extra model inputs in batches (plugin API 1.9)
    "IMAGE_COLUMNS": "posttrain._vision:IMAGE_COLUMNS",
    "SEQUENCE_INPUT_KEYS": "posttrain._vision:SEQUENCE_INPUT_KEYS",
    "is_processor": "posttrain._vision:is_processor",
    "processor_tokenizer": "posttrain._vision:processor_tokenizer",
    "image_column": "posttrain._vision:image_column",
    "load_image": "posttrain._vision:load_image",
    "row_images": "posttrain._vision:row_images",
    "prepare_multimodal_messages": "posttrain._vision:prepare_multimodal_messages",
    "count_image_placeholders": "posttrain._vision:count_image_placeholders",
    "vision_prompt_inputs": "posttrain._vision:vision_prompt_inputs",
    "collate_model_inputs": "posttrain._vision:collate_model_inputs",
    "sequence_model_inputs": "posttrain._vision:sequence_model_inputs",
    "is_vision_model": "posttrain._vision:is_vision_model",
    "check_vision_model": "posttrain._vision:check_vision_model",
    "freeze_vision_tower": "posttrain._vision:freeze_vision_tower",
    "vision_tower_of": "posttrain._vision:vision_tower_of",
    "image_token_ids": "posttrain._vision:image_token_ids",
    "undecoded_image_columns": "posttrain._vision:undecoded_image_columns",
    "check_images_present": "posttrain._vision:check_images_present",
    # the producer the loop does not own (plugin API 1.5)
    "PromptSource": "posttrain._producer:PromptSource",
    "ProduceRequest": "posttrain._producer:ProduceRequest",
    "RolloutProducer": "posttrain._producer:RolloutProducer",
    "epoch_order": "posttrain._producer:epoch_order",
    # chunked log-probs and losses from hidden states and the LM head (issue 10; no (B, T, V) logits)
    "TokenScores": "posttrain._chunked:TokenScores",
    "TokenStates": "posttrain._chunked:TokenStates",
    "causal_lm_states": "posttrain._chunked:causal_lm_states",
    "chunked_token_logprobs": "posttrain._chunked:chunked_token_logprobs",
    "chunked_nll_loss": "posttrain._chunked:chunked_nll_loss",
    "chunked_distillation_divergence": "posttrain._chunked:chunked_distillation_divergence",
    "lm_head_of": "posttrain._chunked:lm_head_of",
    # the picture of a run (posttrain diagnose --plot)
    "plot_run": "posttrain._plot:plot_run",
}

__all__ = [
    "API_VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataError",
    "DataNotFoundError",
    "PosttrainError",
    "DATA_FORMATS",
    "MethodSpec",
    "Preset",
    "SpecError",
    "TrainingConfig",
    "__version__",
    "as_config",
    "closest_field_names",
    "config_fields",
    *sorted(_LAZY),
    # diagnostics (issue 9): the signal roles a spec declares, and the verdict of a run
    "SIGNAL_ROLES",
    "SignalRole",
    "diagnose",
]


def diagnose(output_dir: str) -> dict:
    """Return the verdict of the run in ``output_dir`` (see :func:`posttrain.diagnostics.diagnose`)."""
    from posttrain.diagnostics import diagnose as _diagnose

    return _diagnose(output_dir)


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'posttrain' has no attribute {name!r}")
    module_name, attr = target.split(":")
    value = getattr(importlib.import_module(module_name), attr)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
