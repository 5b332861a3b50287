"""Every config field of the six stable trainers exists with TRL 1.16's default, unless it is a listed departure.

A TRL user's code must work with an import change, defaults included: a default that differs
silently changes their run (GRPO's and RLOO's ``max_completion_length`` was 256 where TRL's is 512
until posttrain-grpo / posttrain-rloo 3.0.0, which cut answers short to zero reward). The comparison
covers every field of TRL's config classes, the ``transformers.TrainingArguments`` ones included
(TRL re-defaults several of them: ``learning_rate``, ``logging_steps``, ``gradient_checkpointing``,
``bf16``, ...). It runs for each stable plugin that is installed next to TRL; fields only posttrain
has (``logprob_chunk_size``, ``diagnostics_window``, ...) are not compared.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest

trl = pytest.importorskip("trl")

#: method -> the config class name in both ``posttrain_<method>`` and ``trl``
CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig", "reward": "RewardConfig", "kto": "KTOConfig", "grpo": "GRPOConfig", "rloo": "RLOOConfig",
           "distill": "DistillationConfig"}

#: Deliberate departures: ``field -> (ours, TRL's, why)``, for every method (both come from posttrain.TrainingConfig).
DEPARTURES = {
    # TRL leaves output_dir None and transformers then writes to "trainer_output"; posttrain's TrainingConfig
    # names a directory of its own (the trainers default to "<model name>-<Method>" when args is None, as TRL).
    "output_dir": ("outputs/run", None, "posttrain.TrainingConfig.output_dir"),
    # transformers resolves disable_tqdm=None to False unless the logging level is WARNING or above; posttrain
    # has no such coupling and shows the progress bar unless asked (help of posttrain.TrainingConfig.disable_tqdm).
    "disable_tqdm": (False, None, "posttrain.TrainingConfig.disable_tqdm"),
}


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _config_classes(method: str):
    plugin = pytest.importorskip(f"posttrain_{method}", reason=f"posttrain-{method} is not installed")
    return getattr(plugin, CONFIGS[method]), getattr(trl, CONFIGS[method])


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_trl_config_field_exists_with_trls_default(method):
    ours_cls, trl_cls = _config_classes(method)
    ours = {f.name: f for f in dataclasses.fields(ours_cls)}
    missing = [f.name for f in dataclasses.fields(trl_cls) if f.name not in ours]
    assert not missing, f"{ours_cls.__name__} lacks TRL 1.16's fields {missing}"
    differences = {}
    for theirs in dataclasses.fields(trl_cls):
        mine, expected = _default(ours[theirs.name]), _default(theirs)
        if mine != expected:
            differences[theirs.name] = (mine, expected)
    departures = {name: (mine, expected) for name, (mine, expected, _) in DEPARTURES.items()}
    unexplained = {name: values for name, values in differences.items() if departures.get(name) != values}
    assert not unexplained, f"{ours_cls.__name__} defaults differ from TRL 1.16's (ours, TRL's): {unexplained}"
    stale = sorted(set(departures) - set(differences))
    assert not stale, f"listed as departures but equal to TRL now, drop them from DEPARTURES: {stale}"


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_max_completion_length_is_trls_512(method):
    ours_cls, trl_cls = _config_classes(method)
    assert ours_cls(output_dir="unused").max_completion_length == trl_cls.__dataclass_fields__["max_completion_length"].default == 512


def test_the_dapo_preset_keeps_generation_within_its_overlong_penalty():
    """The built-in overlong_penalty reaches -1 at 256 tokens: the dapo preset generates up to there, not to the 512 default."""
    from posttrain.rewards import BUILTIN_REWARDS

    from posttrain_grpo._spec import SPEC

    overrides = SPEC.presets["dapo"].overrides
    assert "overlong_penalty" in overrides["reward_funcs"]
    assert overrides["max_completion_length"] == BUILTIN_REWARDS["overlong_penalty"].max_completion_len == 256
