"""TRL 1.16's surface: every ``DistillationConfig`` field with TRL's default, and ``DistillationTrainer``'s constructor signature."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

trl = pytest.importorskip("trl")

#: Deliberate departures: ``field -> (ours, TRL's, why)`` (both come from posttrain.TrainingConfig).
DEPARTURES = {
    "output_dir": ("outputs/run", None, "posttrain.TrainingConfig.output_dir"),
    "disable_tqdm": (False, None, "posttrain.TrainingConfig.disable_tqdm"),
}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def test_every_trl_config_field_exists_with_trls_default():
    from posttrain_distill.config import DistillationConfig

    ours = {f.name: f for f in dataclasses.fields(DistillationConfig)}
    theirs = dataclasses.fields(trl.DistillationConfig)
    missing = [f.name for f in theirs if f.name not in ours]
    assert not missing, f"DistillationConfig lacks TRL 1.16's fields {missing}"
    differences = {f.name: (_default(ours[f.name]), _default(f)) for f in theirs if _default(ours[f.name]) != _default(f)}
    expected = {name: (mine, trl_default) for name, (mine, trl_default, _) in DEPARTURES.items()}
    assert differences == expected, f"defaults differ from TRL 1.16's (ours, TRL's): {differences}"


def test_trl_defaults_of_the_method():
    from posttrain_distill.config import DistillationConfig

    args = DistillationConfig(output_dir="unused")
    assert (args.learning_rate, args.beta, args.temperature, args.max_completion_length, args.top_p, args.top_k) == (1e-6, 1.0, 1.0, 512, 1.0, 0)
    assert args.disable_dropout is False and args.log_completions is False and args.gradient_checkpointing is True


def test_constructor_signature_is_trls():
    from posttrain_distill.trainer import DistillationTrainer

    ours = list(inspect.signature(DistillationTrainer.__init__).parameters)[1:]
    theirs = list(inspect.signature(trl.DistillationTrainer.__init__).parameters)[1:]
    assert theirs == ["model", "teacher_model", "args", "train_dataset", "eval_dataset", "processing_class", "callbacks", "optimizers",
                      "quantization_config", "peft_config", "tools"]
    assert ours[: len(theirs)] == theirs  # then posttrain's own: rollout_engine, allow_experimental


def test_stable_import_path():
    from posttrain.methods.distill import DistillationConfig, DistillationTrainer

    assert DistillationTrainer.__name__ == trl.DistillationTrainer.__name__
    assert DistillationConfig.__name__ == trl.DistillationConfig.__name__
