"""GMPO trainer: the opt-in gate, TRL's config fields and defaults, training, learning, gradient accumulation, resume, errors."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from gmpo_helpers import low_token_fraction, perturbed_copy

import posttrain
from posttrain import ConfigError
from posttrain.testing import warning_events


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("gmpo", allow_experimental=True)
    yield


def _classes():
    from posttrain.experimental.gmpo import GMPOConfig, GMPOTrainer

    return GMPOConfig, GMPOTrainer


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    values.update(overrides)
    return _classes()[0](**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_every_trl_config_field_exists_with_trls_default():
    trl_gmpo = pytest.importorskip("trl.experimental.gmpo")
    ours = {f.name: f for f in dataclasses.fields(_classes()[0])}
    departures = {"output_dir": ("outputs/run", None), "disable_tqdm": (False, None)}  # as for every posttrain config (tests/... test_trl_defaults)

    def default(f):
        return f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)

    missing = [f.name for f in dataclasses.fields(trl_gmpo.GMPOConfig) if f.name not in ours]
    assert not missing
    differ = {f.name: (default(ours[f.name]), default(f)) for f in dataclasses.fields(trl_gmpo.GMPOConfig) if default(ours[f.name]) != default(f)}
    assert differ == departures
    assert _classes()[0](output_dir="x").epsilon == 0.4


def test_grpo_loss_fields_are_accepted_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="loss_type"):
        _config(tmp_path, loss_type="grpo")


def test_train_changes_every_parameter_and_logs_metrics(tiny_tokenizer, prompt_dataset, tmp_path):
    from posttrain.testing.tiny_model import build_model

    _, GMPOTrainer = _classes()
    model = build_model(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _config(tmp_path, beta=0.04, num_iterations=2, max_steps=3)
    trainer = GMPOTrainer(model=model, reward_funcs=[low_token_fraction, "format"], args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    trainer.train()
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"
    logged = _metrics(args.output_dir)
    assert [m["step"] for m in logged] == [1, 2, 3]
    expected = {"loss", "reward", "reward_std", "frac_reward_zero_std", "rewards/low_token_fraction/mean", "kl", "entropy",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio"}
    assert expected <= set(logged[0]), expected - set(logged[0])


def test_reward_rises_on_a_verifiable_task(tiny_tokenizer, tmp_path):
    """Learning: the mean reward (fraction of 'low' token ids) of a tiny random model rises within 30 steps."""
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model

    _, GMPOTrainer = _classes()
    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    args = _config(tmp_path, per_device_train_batch_size=16, num_generations=8, max_completion_length=8, max_steps=30, learning_rate=3e-2)
    trainer = GMPOTrainer(model=build_model(tiny_tokenizer), reward_funcs=low_token_fraction, args=args, train_dataset=prompts, processing_class=tiny_tokenizer)
    trainer.train()
    rewards = [m["reward"] for m in _metrics(args.output_dir)]
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"GMPO learning: mean reward first 5 steps {before:.3f} -> last 5 steps {after:.3f}")
    assert warning_events(args.output_dir) == []  # a healthy run raises no false alarm
    assert after > before + 0.15


def test_gradient_accumulation_8x1_equals_1x8(tiny_tokenizer, prompt_dataset, tmp_path):
    """Same fixed rollouts: per-device batch 8 x GA 1 and 1 x 8 give the same parameters after one step (float64; see RLOO's test)."""
    from posttrain import RolloutEngine
    from gmpo_helpers import FixedBackend
    from posttrain.testing.tiny_model import build_model

    _, GMPOTrainer = _classes()
    params = []
    for bs, ga in ((8, 1), (1, 8)):
        args = _config(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
                       learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0, beta=0.1)
        model = build_model(tiny_tokenizer).double()
        trainer = GMPOTrainer(model=model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                              processing_class=tiny_tokenizer, rollout_engine=RolloutEngine(FixedBackend()))
        trainer.ref_model = trainer.loop.prepare_frozen(perturbed_copy(model))  # a reference that differs, so the KL term has a gradient
        trainer.train()
        params.append({n: p.detach().cpu().clone() for n, p in model.named_parameters()})
    initial = dict(build_model(tiny_tokenizer).double().named_parameters())
    worst = 0.0
    for name in params[0]:
        update_a, update_b = params[0][name] - initial[name].detach(), params[1][name] - initial[name].detach()
        assert update_a.norm() > 0, name
        rel = ((update_a - update_b).norm() / update_a.norm()).item()
        assert rel <= 1e-5, f"{name}: the updates differ by {rel:.2e} relative"
        worst = max(worst, rel)
    print(f"GMPO worst relative update difference 8x1 vs 1x8: {worst:.2e}")


def test_resume_reproduces_uninterrupted_losses(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """Checkpoint at step 3 (mid rollout reuse: num_iterations=2), resume: steps 4-5 log the same losses (float64)."""
    import copy

    _, GMPOTrainer = _classes()
    tiny_model.double()
    args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2, beta=0.04)
    GMPOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2, beta=0.04,
                           resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    GMPOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=resumed_args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (4, 5):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["reward"] == full[step]["reward"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(per_device_train_batch_size=6, num_generations=4), r"num_generations=4 does not divide"),
        (dict(num_generations=1, per_device_train_batch_size=4), "num_generations=1 is invalid"),
        (dict(epsilon=0.0), "clipping ranges must be > 0"),
        (dict(beta=-0.1), "beta=-0.1 is invalid"),
        (dict(temperature=0.0), "temperature=0.0 is invalid"),
        (dict(reward_funcs=["accuracy"], reward_weights=[1.0, 2.0]), "reward_weights has 2 entries but reward_funcs has 1"),
    ],
)
def test_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


def test_missing_reward_funcs_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    _, GMPOTrainer = _classes()
    with pytest.raises(ConfigError, match="GMPO needs reward functions"):
        GMPOTrainer(model=tiny_model, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)


def test_output_dir_is_positional_as_in_trl(tmp_path):
    """TRL's configs (TrainingArguments) take output_dir as their first positional argument; the rest stays keyword-only."""
    import inspect

    Config = _classes()[0]
    args = Config(str(tmp_path / "pos"), epsilon_high=0.3)
    assert args.output_dir == str(tmp_path / "pos") and (args.epsilon, args.epsilon_high) == (0.4, 0.3)
    assert list(inspect.signature(Config).parameters)[0] == "output_dir"
    with pytest.raises(TypeError, match="multiple values for argument 'output_dir'"):
        Config("a", output_dir="b")
    with pytest.raises(TypeError, match="only positional argument"):
        Config("a", "b")
