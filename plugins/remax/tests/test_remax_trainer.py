"""ReMax trainer: the greedy baseline through the engine, training, learning, gradient-accumulation equivalence, resume,
validation errors, and examples/remax.yaml through the CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from remax_helpers import FixedBackend, low_token_fraction, perturbed_copy

import posttrain
from posttrain import ConfigError
from posttrain.testing import warning_events

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("remax", allow_experimental=True)
    yield


def _classes():
    from posttrain.experimental.remax import ReMaxConfig, ReMaxTrainer

    return ReMaxConfig, ReMaxTrainer


def _config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=2, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    values.update(overrides)
    return _classes()[0](**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_greedy_baseline_is_the_engines_argmax_completion(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """The baseline completion comes from the rollout engine at temperature 0 and equals a plain argmax decode of the policy."""
    from posttrain import expand_prompts

    trainer = _classes()[1](model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path, beta=0.0), train_dataset=prompt_dataset,
                            processing_class=tiny_tokenizer)
    rows = [trainer.train_dataset[i] for i in range(2)]
    prompts, ids = expand_prompts(rows, 1, trainer._prompt_ids, tiny_tokenizer)
    greedy = trainer._generate_greedy(prompts, ids, seed=0)
    for p, completion in zip(ids, greedy.completion_ids):
        seq = list(p)
        with torch.no_grad():
            for _ in range(len(completion)):  # independent argmax decoding, one token at a time, no cache
                seq.append(int(tiny_model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert completion == seq[len(p):]
    assert trainer._generate_greedy(prompts, ids, seed=5).completion_ids == greedy.completion_ids  # deterministic, seed-free


def test_train_changes_every_parameter_and_logs_metrics(tiny_tokenizer, prompt_dataset, tmp_path):
    from posttrain.testing.tiny_model import build_model

    model = build_model(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _config(tmp_path, beta=0.04, num_iterations=2, max_steps=3, reward_clip_range=[-5.0, 5.0], eval_strategy="steps", eval_steps=3)
    out = _classes()[1](model=model, reward_funcs=[low_token_fraction, "format"], args=args, train_dataset=prompt_dataset,
                        eval_dataset=prompt_dataset.select(range(2)), processing_class=tiny_tokenizer).train()
    assert {"eval_loss", "eval_reward", "eval_greedy/reward"} <= set(out.metrics)
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"
    logged = _metrics(args.output_dir)
    assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3]
    expected = {"loss", "reward", "greedy/reward", "greedy/mean_length", "advantage_abs_mean", "frac_reward_zero_std", "kl", "entropy",
                "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio", "rewards/low_token_fraction/mean"}
    assert expected <= set(logged[0]), expected - set(logged[0])


def test_reward_rises_on_a_verifiable_task(tiny_tokenizer, tmp_path):
    """Learning: the mean reward (fraction of 'low' token ids) of a tiny random model rises within 30 steps."""
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model

    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    args = _config(tmp_path, per_device_train_batch_size=16, num_generations=2, max_completion_length=8, max_steps=30, learning_rate=3e-2, beta=0.0)
    _classes()[1](model=build_model(tiny_tokenizer), reward_funcs=low_token_fraction, args=args, train_dataset=prompts, processing_class=tiny_tokenizer).train()
    logged = _metrics(args.output_dir)
    rewards, greedy = [m["reward"] for m in logged], [m["greedy/reward"] for m in logged]
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    greedy_before, greedy_after = sum(greedy[:5]) / 5, sum(greedy[-5:]) / 5
    print(f"ReMax learning: mean reward first 5 steps {before:.3f} -> last 5 steps {after:.3f}; greedy baseline {greedy_before:.3f} -> {greedy_after:.3f}")
    assert warning_events(args.output_dir) == []
    assert after > before + 0.15
    assert greedy_after > greedy_before + 0.15  # the argmax answer improves too


def test_gradient_accumulation_8x1_equals_1x8(tiny_tokenizer, prompt_dataset, tmp_path):
    """Same fixed rollouts: per-device batch 8 x GA 1 and 1 x 8 give the same parameters after one step (float64).

    The stored float32 old / reference log-probs, scored in different batch shapes, can round differently
    (~1e-7 relative through the KL penalty): each tensor's update is compared by relative norm to 1e-5.
    """
    from posttrain import RolloutEngine
    from posttrain.testing.tiny_model import build_model

    params = []
    for bs, ga in ((8, 1), (1, 8)):
        args = _config(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, num_generations=1, max_steps=1,
                       learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0, beta=0.1)
        model = build_model(tiny_tokenizer).double()
        trainer = _classes()[1](model=model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                                processing_class=tiny_tokenizer, rollout_engine=RolloutEngine(FixedBackend()))
        trainer.ref_model = trainer.loop.prepare_frozen(perturbed_copy(model))
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
    print(f"ReMax GA 8x1 vs 1x8: worst relative update difference {worst:.2e}")


def test_resume_reproduces_uninterrupted_losses(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """Checkpoint at step 3 (mid rollout reuse: num_iterations=2), resume: steps 4-5 log the same losses and baselines (float64)."""
    import copy

    tiny_model.double()
    args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2, beta=0.04)
    _classes()[1](model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2, beta=0.04,
                           resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    _classes()[1](model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=resumed_args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (4, 5):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["reward"] == full[step]["reward"] and resumed[step]["greedy/reward"] == full[step]["greedy/reward"]


def test_advantages_handle_unscorable_completions():
    from posttrain_remax.trainer import compute_remax_advantages

    nan = float("nan")
    sampled = torch.tensor([[1.0], [nan], [0.5], [0.25]])  # 2 prompts x 2 samples
    greedy = torch.tensor([[0.5], [nan]])
    adv, zero, base = compute_remax_advantages(sampled, greedy, torch.ones(1), 2)
    assert adv.tolist() == [0.5, 0.0, 0.0, 0.0] and zero.tolist() == [False, True] and base[0] == 0.5 and torch.isnan(base[1])


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(per_device_train_batch_size=6, num_generations=4), r"num_generations=4 does not divide"),
        (dict(num_generations=0), "num_generations=0 is invalid"),
        (dict(num_iterations=0), "num_iterations=0 is invalid"),
        (dict(beta=-0.1), "beta=-0.1 is invalid"),
        (dict(temperature=0.0), "temperature=0.0 is invalid"),
        (dict(reward_clip_range=[1.0, -1.0]), r"reward_clip_range=\[1.0, -1.0\] is invalid"),
    ],
)
def test_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


def test_missing_reward_funcs_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    with pytest.raises(ConfigError, match="ReMax needs reward functions"):
        _classes()[1](model=tiny_model, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)


def test_example_yaml_trains_through_the_cli(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.cli import main

    monkeypatch.chdir(ROOT)
    out = str(tmp_path / "cli")
    code = main(["train", "remax", "--config", "examples/remax.yaml", "--allow-experimental", "remax", "--model_name_or_path", tiny_model_dir,
                 "--output_dir", out, "--max_steps", "4", "--save_strategy", "no"])
    assert code in (0, None)
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4]
