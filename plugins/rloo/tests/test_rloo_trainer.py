"""RLOO trainer: construction, training, learning, gradient-accumulation equivalence, resume, validation errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from rloo_helpers import low_token_fraction, perturbed_copy

from posttrain import ConfigError
from posttrain.rewards import RewardFunctionError
from posttrain_rloo.config import RLOOConfig
from posttrain_rloo.trainer import RLOOTrainer
from posttrain.testing import warning_events


def _config(tmp_path, **overrides) -> RLOOConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                  max_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none")
    values.update(overrides)
    return RLOOConfig(**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_init_minimal(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = RLOOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path, beta=0.0), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    assert trainer.reward_func_names[0] == "low_token_fraction"
    assert trainer.ref_model is None  # beta == 0: no reference model is loaded


@pytest.mark.parametrize("normalize_advantages", [False, True])
def test_train_changes_every_parameter_and_logs_metrics(tiny_tokenizer, prompt_dataset, tmp_path, normalize_advantages):
    from posttrain.testing.tiny_model import build_model

    model = build_model(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _config(tmp_path, normalize_advantages=normalize_advantages, beta=0.04, num_iterations=2, max_steps=3, reward_clip_range=[-5.0, 5.0])
    trainer = RLOOTrainer(model=model, reward_funcs=[low_token_fraction, "format"], args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    trainer.train()
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change"
    logged = _metrics(args.output_dir)
    assert [m["step"] for m in logged] == [1, 2, 3]
    expected = {"loss", "reward", "reward_std", "frac_reward_zero_std", "rewards/low_token_fraction/mean", "rewards/low_token_fraction/std",
                "rewards/format/mean", "kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "completions/mean_length", "completions/min_length", "completions/max_length", "completions/clipped_ratio"}
    assert expected <= set(logged[0]), expected - set(logged[0])


def test_reward_rises_on_a_verifiable_task(tiny_tokenizer, tmp_path):
    """Learning: the mean reward (fraction of 'low' token ids) of a tiny random model rises within 30 steps."""
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model

    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    args = _config(tmp_path, per_device_train_batch_size=16, num_generations=8, max_completion_length=8, max_steps=30, learning_rate=3e-2, beta=0.0)
    trainer = RLOOTrainer(model=build_model(tiny_tokenizer), reward_funcs=low_token_fraction, args=args, train_dataset=prompts, processing_class=tiny_tokenizer)
    trainer.train()
    rewards = [m["reward"] for m in _metrics(args.output_dir)]
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"RLOO learning: mean reward first 5 steps {before:.3f} -> last 5 steps {after:.3f}")
    assert warning_events(args.output_dir) == []  # a healthy run raises no false alarm
    assert after > before + 0.15


@pytest.mark.parametrize("num_generations", [2, 8])
def test_gradient_accumulation_8x1_equals_1x8(tiny_tokenizer, prompt_dataset, tmp_path, num_generations):
    """Same fixed rollouts: per-device batch 8 x GA 1 and 1 x 8 give the same parameters after one step.

    float64, so that the layouts' summation orders cost ~1e-16. What remains: the rollout buffer stores
    the old and reference log-probs in float32 (as TRL does), scored in other batch shapes by the two
    layouts, so a stored value can round to the neighbouring float32 (eps32 * |logp| ~ 1e-6 absolute);
    through beta = 0.1 and the sequence sums of the KL penalty that moves the advantages, hence the
    update (~ lr * gradient with adam_epsilon=1), by ~1e-6 relative. Each tensor's update is compared by
    the norm of the difference relative to its own norm, to 1e-5 (measured <= 1e-7), while a
    mis-normalized micro-batch (an error of order 1e-1) cannot hide in it.
    """
    from posttrain import RolloutEngine
    from rloo_helpers import FixedBackend
    from posttrain.testing.tiny_model import build_model

    params = []
    for bs, ga in ((8, 1), (1, 8)):
        args = _config(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, num_generations=num_generations, max_steps=1,
                       learning_rate=1.0, adam_epsilon=1.0, max_grad_norm=0.0, beta=0.1)
        model = build_model(tiny_tokenizer).double()
        trainer = RLOOTrainer(model=model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                              processing_class=tiny_tokenizer, rollout_engine=RolloutEngine(FixedBackend()))
        trainer.ref_model = trainer.loop.prepare_frozen(perturbed_copy(model))  # a reference that differs, so the KL penalty changes the advantages
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
    print(f"worst relative update difference: {worst:.2e}")


def test_resume_reproduces_uninterrupted_losses(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """Checkpoint at step 3 (mid rollout reuse: num_iterations=2), resume: steps 4-5 log the same losses.

    float64: the same computation agrees to ~1e-16 even where kernels are not bit-reproducible
    (accelerators), while a wrongly restored state (weights, rollout buffer, Adam moments, schedule,
    RNG) moves the loss by far more than 1e-12.
    """
    import copy

    tiny_model.double()
    model = copy.deepcopy(tiny_model)
    args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2, beta=0.04)
    RLOOTrainer(model=model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}

    resumed_args = _config(tmp_path, max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2, beta=0.04,
                           resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"))
    RLOOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=resumed_args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (4, 5):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["reward"] == full[step]["reward"]


def test_conversational_prompts_and_reward_funcs_from_config(tiny_model, tiny_tokenizer, tiny_datasets, tmp_path):
    """reward_funcs given by name in the config (as the CLI does); chat-templated prompts; eval reports rewards."""
    from datasets import Dataset

    rows = [{"prompt": [{"role": "user", "content": p}], "solution": s} for p, s in zip(tiny_datasets["prompt_only"]["prompt"], tiny_datasets["prompt_only"]["solution"])]
    data = Dataset.from_list(rows)
    args = _config(tmp_path, reward_funcs=["accuracy", "rloo_helpers:low_token_fraction"], reward_weights=[1.0, 0.5])
    trainer = RLOOTrainer(model=tiny_model, args=args, train_dataset=data, eval_dataset=data.select(range(2)), processing_class=tiny_tokenizer)
    assert trainer._prompt_ids(trainer.train_dataset[0])[-3:] == tiny_tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"][-3:]
    out = trainer.train()
    assert "eval_reward" in out.metrics and "rewards/accuracy/mean" in _metrics(args.output_dir)[0]


def test_reward_model_given_as_object(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    from posttrain.testing.tiny_model import build_reward_model

    trainer = RLOOTrainer(model=tiny_model, reward_funcs=[build_reward_model(tiny_tokenizer)], args=_config(tmp_path, max_steps=1),
                          train_dataset=prompt_dataset, processing_class=tiny_tokenizer, reward_processing_classes=[tiny_tokenizer])
    trainer.train()
    assert "reward" in _metrics(trainer.args.output_dir)[0]


def test_peft_reference_is_the_adapter_disabled_model(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    from peft import LoraConfig

    trainer = RLOOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path, beta=0.1, max_steps=2),
                          train_dataset=prompt_dataset, processing_class=tiny_tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear"))
    assert trainer.ref_model is None
    trainer.train()
    assert _metrics(trainer.args.output_dir)[-1]["kl"] != 0  # the adapter moved away from the base model (k1 may be < 0)


# ------------------------------------------------------------------ reward function errors
def test_reward_function_error_names_the_function(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    def broken_reward(completions, **kwargs):
        raise KeyError("missing column")

    trainer = RLOOTrainer(model=tiny_model, reward_funcs=broken_reward, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    with pytest.raises(RewardFunctionError, match="broken_reward"):
        trainer.train()


def test_reward_function_wrong_count_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    def short_reward(completions, **kwargs):
        return [1.0]

    trainer = RLOOTrainer(model=tiny_model, reward_funcs=short_reward, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    with pytest.raises(RewardFunctionError, match=r"short_reward.*1 rewards for 8 completions"):
        trainer.train()


def test_reward_function_non_numeric_error_names_sample(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    def text_reward(completions, **kwargs):
        return [0.0, "good"] + [0.0] * (len(completions) - 2)

    trainer = RLOOTrainer(model=tiny_model, reward_funcs=text_reward, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    with pytest.raises(RewardFunctionError, match="text_reward.*sample 1"):
        trainer.train()


# ------------------------------------------------------------------ validation errors (one test each)
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(per_device_train_batch_size=6, num_generations=4), r"num_generations=4 does not divide.*\(6\) x gradient_accumulation_steps \(1\) = 6"),
        (dict(num_generations=1, per_device_train_batch_size=4), "num_generations=1 is invalid"),
        (dict(num_iterations=0), "num_iterations=0 is invalid"),
        (dict(beta=-0.1), "beta=-0.1 is invalid"),
        (dict(epsilon=0.0), "clipping ranges must be > 0"),
        (dict(temperature=0.0), "temperature=0.0 is invalid"),
        (dict(reward_clip_range=[1.0, -1.0]), r"reward_clip_range=\[1.0, -1.0\] is invalid"),
        (dict(reward_funcs=["accuracy"], reward_weights=[1.0, 2.0]), "reward_weights has 2 entries but reward_funcs has 1"),
        (dict(max_completion_length=0), "max_completion_length=0 is invalid"),
        (dict(use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True}), 'fused_linear_cross_entropy": True} cannot be used with RLOO'),
    ],
)
def test_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


def test_missing_reward_funcs_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    with pytest.raises(ConfigError, match="RLOO needs reward functions"):
        RLOOTrainer(model=tiny_model, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)


def test_reward_weights_count_error(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    with pytest.raises(ConfigError, match="reward_weights has 2 entries for 1 reward functions"):
        RLOOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path, reward_weights=[1.0, 2.0]), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)


def test_data_collator_is_the_collator_in_use(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = RLOOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    rows = [prompt_dataset[i] for i in range(2)]
    assert trainer.data_collator(rows) == trainer.collate(rows) == {"rows": rows}  # TRL's attribute; raw prompts (the producer generates)


def test_dataset_without_prompt_error(tiny_model, tiny_tokenizer, tiny_datasets, tmp_path):
    with pytest.raises(ConfigError, match="row 0 has no 'prompt' column"):
        RLOOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path), train_dataset=tiny_datasets["text"], processing_class=tiny_tokenizer)


@pytest.mark.parametrize("top_k, expect_policy_forward", [(0, False), (5, True)])
def test_old_logps_come_from_the_unfiltered_sampler_without_an_extra_forward(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, top_k, expect_policy_forward):
    """With the policy as its own unfiltered sampler, pi_old is the sampling log-probs: no no-grad policy forward."""
    from posttrain import expand_prompts
    from posttrain_rloo.trainer import per_token_logps_and_entropies

    # float64 model: the full forward is float64; the sampler's log-probs are float32 (see the tolerance below)
    tiny_model.double()
    trainer = RLOOTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=_config(tmp_path, beta=0.05, top_k=top_k),
                          train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    rows, g, seed = [trainer.train_dataset[i] for i in range(2)], trainer.args.num_generations, trainer.args.seed
    rollout = trainer._generate(*expand_prompts(rows, g, trainer._prompt_ids, tiny_tokenizer), g, seed)  # generation's forwards happen here
    trainer._generate = lambda *args, **kwargs: rollout  # the same rollout again, so that only the scoring forwards are counted
    calls = []
    for model in (trainer.model, trainer.ref_model):
        model.register_forward_pre_hook(lambda module, args: calls.append(module))
    micro_batches = trainer._generate_and_score(rows, seed)
    assert any(m is trainer.model for m in calls) == expect_policy_forward
    assert any(m is trainer.ref_model for m in calls)  # the KL penalty still needs the reference
    for batch in micro_batches:  # and the sampler's log-probs equal a forward of the policy
        on_device = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            forward, _ = per_token_logps_and_entropies(trainer.model, on_device, trainer.args.temperature, compute_entropy=False)
        mask = batch["completion_mask"].bool()
        if not expect_policy_forward:
            stored = batch["old_per_token_logps"][mask]
            # the sampler's log_softmax runs in float32 on float32-rounded logits (the decode loop's `.float()`): its error is a few
            # float32 roundings of the logsumexp's magnitude (|logp| + |logit|, logits < 1 in this tiny random model), not of logp
            atol = 16 * torch.finfo(torch.float32).eps * (1.0 + float(forward[mask].abs().max()))
            torch.testing.assert_close(stored, forward[mask].to(stored.dtype), rtol=2.5e-7, atol=atol)
