"""Nash-MD trainer: the mixture sampler, training and metrics, learning, gradient-accumulation equivalence, exact resume, judges, errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import posttrain
from posttrain import ConfigError

posttrain.activate("nash_md", allow_experimental=True)
from posttrain.experimental.nash_md import NashMDConfig, NashMDTrainer  # noqa: E402


@pytest.fixture(autouse=True)
def _opted_in():
    """Opt in before every test: another test module of the same session (make test's rerun of the parity files) may reset
    the registry's activations after this module's import-time opt-in."""
    posttrain.activate("nash_md", allow_experimental=True)


def low_token_fraction(completion_ids, **kwargs):
    """Verifiable toy reward: fraction of completion tokens whose id is in [3, 67)."""
    return [sum(3 <= t < 67 for t in c) / max(1, len(c)) for c in completion_ids]


def low_token_count(completion_ids, **kwargs):
    """The same toy reward on a scale where the Bradley-Terry probability sigmoid(s(y) - s(y')) is informative: the number of ids in [3, 67)."""
    return [float(sum(3 <= t < 67 for t in c)) for c in completion_ids]


def _config(tmp_path, **overrides) -> NashMDConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_new_tokens=6, max_steps=2, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", allow_experimental=True)
    values.update(overrides)
    return NashMDConfig(**values)


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip() and "loss" in json.loads(line)]


def test_mixture_sampler_log_probs_are_the_geometric_mixture(tiny_tokenizer):
    """The mixture backend's per-token log-probs equal log_softmax(c z_ref + (1-c) z_pi) of full forwards (temperature 1), and c=0 samples the policy."""
    from posttrain import RolloutEngine, SamplingParams
    from posttrain.testing.tiny_model import build_model
    from posttrain_nash_md._mixture import GeometricMixtureBackend, mixture_scores

    policy, ref = build_model(tiny_tokenizer, seed=0).double(), build_model(tiny_tokenizer, seed=1).double()
    prompts = [[5, 6, 7, 8], [9, 10]]  # different lengths: left padding in the batch
    for coef in (0.0, 0.3, 1.0):
        engine = RolloutEngine(GeometricMixtureBackend(policy, ref, tiny_tokenizer, mixture_coef=coef))
        batch = engine.generate(prompts, SamplingParams(max_tokens=6, n=2, seed=3, temperature=1.0))
        again = engine.generate(prompts, SamplingParams(max_tokens=6, n=2, seed=3, temperature=1.0))
        assert batch.completion_ids == again.completion_ids  # seeded: reproducible
        for p, c, lps in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs):
            ids = torch.tensor([p + c])
            with torch.no_grad():
                z_p, z_r = policy(input_ids=ids).logits[0], ref(input_ids=ids).logits[0]
            truth = mixture_scores(z_p, z_r, coef)[len(p) - 1 : len(p) - 1 + len(c)].gather(-1, torch.tensor(c)[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor(lps, dtype=torch.float64), truth, atol=1e-5), (coef, lps, truth.tolist())
            if coef == 0.0:
                assert torch.allclose(truth, torch.log_softmax(z_p.double(), -1)[len(p) - 1 : len(p) - 1 + len(c)].gather(-1, torch.tensor(c)[:, None]).squeeze(1))


def test_train_changes_parameters_and_logs_trl_metrics(tiny_tokenizer, prompt_dataset, tmp_path):
    from posttrain.testing.tiny_model import build_model

    model = build_model(tiny_tokenizer)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _config(tmp_path, max_steps=2, missing_eos_penalty=1.0, mixture_coef=[0.3])
    trainer = NashMDTrainer(model=model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    assert args.mixture_coef == 0.3 and args.beta == 0.1  # one-entry lists collapse to floats, as in TRL
    trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed, "no parameter changed"
    logged = _metrics(args.output_dir)
    assert [m["step"] for m in logged] == [1, 2]
    expected = {"loss", "loss/score", "loss/kl", "objective/entropy", "rewards/chosen", "rewards/rejected", "rewards/probabilities", "rewards/accuracies",
                "rewards/margins", "logps/chosen", "logps/rejected", "val/model_contain_eos_token", "val/ref_contain_eos_token", "beta", "mixture_coef", "kl"}
    assert expected <= set(logged[0]), expected - set(logged[0])
    assert logged[0]["mixture_coef"] == pytest.approx(0.3) and logged[0]["beta"] == pytest.approx(0.1)


def test_reward_rises_on_a_verifiable_task(tiny_tokenizer, tmp_path):
    """Learning: the policy's mean reward (fraction of 'low' token ids) rises within 30 steps of Nash-MD."""
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model

    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    args = _config(tmp_path, per_device_train_batch_size=16, max_new_tokens=8, max_steps=30, learning_rate=5e-2, beta=0.05, temperature=1.0, seed=0)
    trainer = NashMDTrainer(model=build_model(tiny_tokenizer), reward_funcs=low_token_count, args=args, train_dataset=prompts, processing_class=tiny_tokenizer)
    trainer.train()
    logged = _metrics(args.output_dir)
    rewards = [m["objective/model_scores"] / 8 for m in logged]  # as a fraction of the 8 tokens
    probability = [m["rewards/probabilities"] for m in logged]
    before, after = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    print(f"Nash-MD learning: policy reward first 5 steps {before:.3f} -> last 5 steps {after:.3f}; "
          f"P(policy > mixture) {sum(probability[:5]) / 5:.3f} -> {sum(probability[-5:]) / 5:.3f}; kl/token {logged[0]['kl']:.3f} -> {logged[-1]['kl']:.3f}")
    assert after > before + 0.15


def test_gradient_accumulation_4x1_equals_1x4(tiny_tokenizer, prompt_dataset, tmp_path):
    """The same step's pairs (the whole step is generated at once) in 4x1 and 1x4 micro-batches: equal updates (float64)."""
    from posttrain.testing.tiny_model import build_model

    params = []
    for bs, ga in ((4, 1), (1, 4)):
        torch.manual_seed(0)
        model = build_model(tiny_tokenizer).double()
        args = _config(tmp_path / f"{bs}x{ga}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1, learning_rate=1.0,
                       adam_epsilon=1.0, max_grad_norm=0.0, beta=0.3)
        trainer = NashMDTrainer(model=model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
        trainer.train()
        params.append({n: p.detach().clone() for n, p in model.named_parameters()})
    init = {n: p.detach().double() for n, p in build_model(tiny_tokenizer).named_parameters()}
    for name in params[0]:
        a, b = params[0][name] - init[name], params[1][name] - init[name]
        assert float((a - b).norm()) <= 1e-6 * max(float(a.norm()), 1e-12), name


def test_resume_reproduces_uninterrupted_losses(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """Checkpoint at step 2, resume: steps 3-4 log the same losses and scores (float64)."""
    tiny_model.double()
    kwargs = dict(max_steps=4, save_strategy="steps", save_steps=2, mixture_coef=0.4)
    args = _config(tmp_path, **kwargs)
    NashMDTrainer(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"), **kwargs)
    NashMDTrainer(model=copy.deepcopy(tiny_model), reward_funcs=low_token_fraction, args=resumed_args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (3, 4):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step
        assert resumed[step]["objective/model_scores"] == full[step]["objective/model_scores"]


def test_pairwise_judge_labels_the_pairs(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    """A core pairwise judge (RewardFunctionJudge) instead of reward scores: trains and logs accuracy/margins."""
    from posttrain.judges import RewardFunctionJudge

    def digits(completions, **kwargs):
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    args = _config(tmp_path, max_steps=1)
    trainer = NashMDTrainer(model=tiny_model, judge=RewardFunctionJudge(digits), args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    trainer.train()
    logged = _metrics(args.output_dir)
    assert "rewards/probabilities" in logged[0] and "objective/model_scores" not in logged[0]
    assert logged[0]["rewards/probabilities"] in {x / 8 for x in range(9)}  # 1, 0 or 1/2 per pair: a multiple of 1/8 over 4 pairs


@pytest.mark.parametrize(("overrides", "message"), [
    ({"loss_type": "hinge"}, "loss_type"),
    ({"use_vllm": True}, "use_vllm"),
    ({"max_new_tokens": 600}, "max_length"),
    ({"mixture_coef": [1.5]}, "mixture_coef"),
    ({"beta": -0.1}, "beta"),
])
def test_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, **overrides)


def test_trainer_errors(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    with pytest.raises(ConfigError, match="No reward source"):
        NashMDTrainer(model=tiny_model, args=_config(tmp_path), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    from peft import LoraConfig, get_peft_model

    with pytest.raises(ConfigError, match="already a PeftModel"):
        NashMDTrainer(model=get_peft_model(tiny_model, LoraConfig(r=4, target_modules="all-linear")), reward_funcs=low_token_fraction, args=_config(tmp_path),
                      train_dataset=prompt_dataset, processing_class=tiny_tokenizer, peft_config=LoraConfig(r=4, target_modules="all-linear"))


# ------------------------------------------------------------------ PEFT (TRL 1.13.0: a LoRA policy, the adapter-disabled base as the reference)
def _lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kwargs)


def test_mixture_of_a_peft_policy_without_ref_model_uses_the_adapter_disabled_base(tiny_tokenizer):
    """ref_model=None on a PEFT policy: the mixture's reference half is the base (adapters off): the same samples and log-probs as with a copy of the base."""
    from peft import get_peft_model
    from posttrain import RolloutEngine, SamplingParams
    from posttrain.testing.tiny_model import build_model
    from posttrain_nash_md._mixture import GeometricMixtureBackend

    base = build_model(tiny_tokenizer, seed=0).double()
    policy = get_peft_model(copy.deepcopy(base), _lora(init_lora_weights=False))  # random adapter: the policy differs from the base
    sampling = SamplingParams(max_tokens=6, n=2, seed=3, temperature=1.0)
    prompts = [[5, 6, 7, 8], [9, 10]]
    implicit = RolloutEngine(GeometricMixtureBackend(policy, None, tiny_tokenizer, mixture_coef=0.4)).generate(prompts, sampling)
    explicit = RolloutEngine(GeometricMixtureBackend(policy, base, tiny_tokenizer, mixture_coef=0.4)).generate(prompts, sampling)
    assert implicit.completion_ids == explicit.completion_ids
    assert implicit.logprobs == explicit.logprobs  # the same float64 computations on the same weights
    with_adapter = RolloutEngine(GeometricMixtureBackend(policy, policy, tiny_tokenizer, mixture_coef=0.4)).generate(prompts, sampling)
    assert with_adapter.logprobs != implicit.logprobs  # the adapter is really off in the reference half


def test_peft_config_without_ref_model_trains_the_adapter(tiny_tokenizer, prompt_dataset, tmp_path):
    """peft_config, no ref_model: no reference copy; only the adapter trains; the KL to the adapter-disabled base is logged."""
    from posttrain import is_peft_model
    from posttrain.testing.tiny_model import build_model

    args = _config(tmp_path, max_steps=2)
    trainer = NashMDTrainer(model=build_model(tiny_tokenizer), reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                            processing_class=tiny_tokenizer, peft_config=_lora())
    assert trainer.ref_model is None and trainer.mixture_backend.ref_model is None and is_peft_model(trainer.model)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed and all("lora_" in n for n in changed), changed
    assert _metrics(args.output_dir)[-1]["kl"] != 0.0  # step 2: the adapter moved the policy away from the base


def test_pre_pefted_model_and_peft_with_ref_model(tiny_tokenizer, prompt_dataset, tmp_path):
    """TRL's implicit reference of an already-PEFT model (adapter disabled), and peft_config beside an explicit ref_model."""
    from peft import get_peft_model
    from posttrain.testing.tiny_model import build_model

    trainer = NashMDTrainer(model=get_peft_model(build_model(tiny_tokenizer), _lora()), ref_model=None, reward_funcs=low_token_fraction,
                            args=_config(tmp_path, max_steps=1, per_device_train_batch_size=2), train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    assert trainer.ref_model is None
    trainer.train()
    assert "loss" in _metrics(trainer.args.output_dir)[-1]

    ref = build_model(tiny_tokenizer, seed=1)
    args = _config(tmp_path / "explicit", max_steps=1, per_device_train_batch_size=2)
    trainer = NashMDTrainer(model=build_model(tiny_tokenizer), ref_model=ref, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                            processing_class=tiny_tokenizer, peft_config=_lora())
    assert trainer.ref_model is ref and trainer.mixture_backend.ref_model is ref
    trainer.train()
    assert "loss" in _metrics(args.output_dir)[-1]
