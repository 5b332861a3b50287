"""PPO trainer: learning on a verifiable task, exact resume mid-rollout (policy, critic and both optimizers), what
gradient accumulation preserves, the critic saved for plain transformers, TRL's data and reward-model forms, bad input."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from posttrain import ConfigError


def low_token_fraction(completion_ids, **kwargs):
    """Verifiable toy reward: fraction of completion tokens whose id is in [3, 67)."""
    return [sum(3 <= t < 67 for t in c) / max(1, len(c)) for c in completion_ids]


class FixedLengthBackend:
    """A rollout backend returning, for each prompt, completions of exactly ``max_tokens`` seeded tokens (no EOS)."""

    name = "fixed-length"

    def __init__(self, vocab: int = 400):
        self.vocab, self.policy_version = vocab, 0

    def generate(self, prompt_ids, sampling):
        from posttrain import RolloutBatch

        prompts, completions = [], []
        for p in prompt_ids:
            for k in range(sampling.n):
                rng = random.Random(hash((tuple(p), k)) % (2**31))
                prompts.append(list(p))
                completions.append([rng.randrange(3, self.vocab) for _ in range(sampling.max_tokens)])
        return RolloutBatch(prompts, completions, [[-1.0] * len(c) for c in completions], [True] * len(completions), policy_version=self.policy_version)

    def update_weights(self, model):
        self.policy_version += 1


def _config(tmp_path, name="out", **overrides):
    from posttrain_ppo.config import PPOConfig

    values = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=8, response_length=6, max_steps=2, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", gradient_checkpointing=False, temperature=1.0)
    values.update(overrides)
    return PPOConfig(**values)


def _prompts(n=16):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(n)]})


def _rows(output_dir) -> dict[int, dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return {row["step"]: row for row in map(json.loads, filter(str.strip, fh)) if "loss" in row}


def _weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_reward_rises_on_a_verifiable_task(opt_in, tiny_model_dir, tmp_path):
    """Learning: the score (fraction of 'low' token ids) of the tiny random model rises within 20 rollouts (40 steps)."""
    from posttrain_ppo.trainer import PPOTrainer

    args = _config(tmp_path, per_device_train_batch_size=16, response_length=8, max_steps=40, learning_rate=2e-2, critic_learning_rate=3e-2,
                   num_ppo_epochs=2, num_mini_batches=1, kl_coef=0.0)
    trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_funcs=low_token_fraction, train_dataset=_prompts(), allow_experimental=True)
    trainer.train()
    rows = _rows(args.output_dir)
    scores = [rows[s]["objective/scores"] for s in sorted(rows)]
    before, after = sum(scores[:10]) / 10, sum(scores[-10:]) / 10  # the first and last 5 rollouts (2 steps each)
    print(f"PPO learning: mean score first 5 rollouts {before:.3f} -> last 5 rollouts {after:.3f}; explained variance "
          f"{rows[1]['val/explained_variance']:.2f} -> {rows[max(rows)]['val/explained_variance']:.2f}")
    assert after > before + 0.3
    expected = {"loss", "critic_loss", "objective/kl", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward", "kl",
                "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg", "val/ratio",
                "val/explained_variance", "policy/entropy_avg", "val/num_eos_tokens", "completions/mean_length", "rewards/low_token_fraction/mean"}
    assert expected <= set(rows[1]), expected - set(rows[1])


def test_resume_mid_rollout_is_exact_and_the_critic_loads_with_transformers(opt_in, tiny_model_dir, tmp_path):
    """Checkpoint at step 3, inside the first rollout's 4 updates (2 PPO epochs x 2 mini-batches): the resumed run repeats steps 4-6 bit for bit."""
    from transformers import AutoModelForSequenceClassification

    from posttrain_ppo.trainer import PPOTrainer

    def run(name, **kw):
        args = _config(tmp_path, name, per_device_train_batch_size=4, num_mini_batches=2, num_ppo_epochs=2, max_steps=6, save_strategy="steps",
                       save_steps=3, kl_coef=0.05, seed=5)
        trainer = PPOTrainer(args=args, model=tiny_model_dir, reward_funcs=low_token_fraction, train_dataset=_prompts(), allow_experimental=True)
        trainer.train(**kw)
        return args.output_dir, trainer

    full, trainer = run("full")
    ckpt = os.path.join(full, "checkpoint-3")
    assert {"critic", "scheduler_critic.pt"} <= set(os.listdir(ckpt))
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(full, "critic"))  # plain transformers loads the critic
    trained = trainer.loop.trainable_model("critic").state_dict()
    assert all(torch.equal(critic.state_dict()[k], trained[k]) for k in trained)
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(ckpt, os.path.join(resumed, "checkpoint-3"))
    run("resumed", resume_from_checkpoint=True)
    expected, got = _rows(full), _rows(resumed)
    assert sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):  # one process repeats the same ops in the same order: identical
        assert (got[step]["loss"], got[step]["critic_loss"], got[step]["policy/clipfrac_avg"]) == \
               (expected[step]["loss"], expected[step]["critic_loss"], expected[step]["policy/clipfrac_avg"]), step
    for name in ("", "critic"):
        a, b = _weights(os.path.join(full, name)), _weights(os.path.join(resumed, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("value_head", [False, True], ids=["critic", "value_head"])
def test_gradient_accumulation_8x1_equals_4x2_when_micro_batches_hold_equal_tokens(opt_in, tiny_tokenizer, tmp_path, value_head):
    """TRL's loss is a mean per micro-batch, averaged over the accumulation: equal to the 8x1 step when every
    micro-batch holds as many tokens (completions of one fixed length). float64: the layouts' other summation
    orders cost ~1e-16; the parameters after one step agree to 1e-10 relative per tensor (measured ~1e-15).
    The same with the value head (its weights are part of the policy's state dict)."""
    from datasets import Dataset

    from posttrain import RolloutEngine
    from posttrain.testing.tiny_model import build_model, build_reward_model
    from posttrain_ppo.trainer import PPOTrainer

    prompts = Dataset.from_dict({"prompt": [f"p{i} q{i}" for i in range(8)]})
    after = []
    for per_device, accumulation in ((8, 1), (4, 2)):
        args = _config(tmp_path, f"ga{accumulation}", per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
                       max_steps=1, num_ppo_epochs=1, kl_coef=0.1, adam_epsilon=1.0, value_head=value_head, value_head_init_std=0.1)
        critic = None if value_head else build_reward_model(tiny_tokenizer, seed=1, dtype=torch.float64)
        trainer = PPOTrainer(args=args, processing_class=tiny_tokenizer, model=build_model(tiny_tokenizer, dtype=torch.float64),
                             value_model=critic, reward_funcs=low_token_fraction, train_dataset=prompts,
                             rollout_engine=RolloutEngine(FixedLengthBackend()), allow_experimental=True)
        trainer.train()
        after.append({f"policy.{k}": v.clone() for k, v in trainer.model.state_dict().items()})
        if value_head:
            assert {"policy.value_head.weight", "policy.value_head.bias"} <= set(after[-1])
        else:
            after[-1].update({f"critic.{k}": v.clone() for k, v in trainer.loop.trainable_model("critic").state_dict().items()})
    for key, a in after[0].items():
        b = after[1][key]
        assert ((a - b).norm() / a.norm().clamp(min=1e-300)).item() <= 1e-10, key


def test_trl_input_ids_rows_a_reward_model_and_the_eos_penalty(opt_in, tiny_model_dir, tiny_tokenizer, tmp_path):
    """TRL's data form (pre-tokenized ``input_ids``) and its reward model; no completion of the fixed backend has an EOS."""
    from datasets import Dataset

    from posttrain import RolloutEngine
    from posttrain.testing.tiny_model import build_reward_model
    from posttrain_ppo.trainer import PPOTrainer

    data = Dataset.from_dict({"input_ids": [tiny_tokenizer(f"what is {i}")["input_ids"] for i in range(8)]})
    reward_model = build_reward_model(tiny_tokenizer, seed=3)
    args = _config(tmp_path, max_steps=1, num_ppo_epochs=1, missing_eos_penalty=2.0, stop_token="eos")
    trainer = PPOTrainer(args=args, processing_class=tiny_tokenizer, model=tiny_model_dir, reward_model=reward_model, train_dataset=data,
                         eval_dataset=data.select(range(4)), rollout_engine=RolloutEngine(FixedLengthBackend()), allow_experimental=True)
    assert trainer.reward_funcs[0] is not None and len(trainer.reward_funcs) == 1
    trainer.train()
    row = _rows(args.output_dir)[1]
    assert row["val/num_eos_tokens"] == 0.0
    assert row["objective/scores"] == pytest.approx(row["reward"] - 2.0, abs=1e-5)  # every completion misses the EOS
    metrics = trainer.evaluate()  # a rollout of the eval prompts, its loss pg + vf_coef * vf as in training
    assert {"eval_loss", "eval_objective/scores", "eval_loss/value_avg", "eval_val/explained_variance"} <= set(metrics), sorted(metrics)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(stop_token="eos", stop_token_id=2), "both set"),
        (dict(stop_token="newline"), "stop_token='newline' is invalid"),
        (dict(kl_estimator="k2"), "kl_estimator='k2' is invalid"),
        (dict(num_ppo_epochs=0), "num_ppo_epochs=0 is invalid"),
        (dict(num_mini_batches=0), "num_mini_batches=0 is invalid"),
        (dict(cliprange=0.0), "cliprange=0.0 is invalid"),
        (dict(gamma=1.5), "gamma=1.5, lam=0.95 are invalid"),
        (dict(temperature=0.0), "temperature=0.0 is invalid"),
        (dict(missing_eos_penalty=-1.0), "missing_eos_penalty=-1.0 is invalid"),
        (dict(reward_funcs=["accuracy"], reward_weights=[1.0, 2.0]), "reward_weights has 2 entries but reward_funcs has 1"),
    ],
)
def test_config_validation_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _config(tmp_path, **overrides)


def test_trainer_argument_errors(opt_in, tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_ppo.trainer import PPOTrainer

    common = dict(args=_config(tmp_path), processing_class=tiny_tokenizer, reward_funcs=low_token_fraction, train_dataset=_prompts(), allow_experimental=True)
    with pytest.raises(ConfigError, match="model and ref_model are the same object"):
        PPOTrainer(model=tiny_model, ref_model=tiny_model, **common)
    with pytest.raises(ConfigError, match="PPO needs a critic"):
        PPOTrainer(model=tiny_model, **common)  # an object without a path, and no value_model
    with pytest.raises(ConfigError, match="data_collator is not used"):
        PPOTrainer(model=tiny_model, data_collator=object(), **common)
    with pytest.raises(ConfigError, match="without a `score` head"):
        PPOTrainer(model=tiny_model, value_model=tiny_model, **common)
    from posttrain.testing.tiny_model import build_reward_model

    with pytest.raises(ConfigError, match="row 0 has no 'prompt' column"):
        PPOTrainer(**{**common, "train_dataset": [{"text": "x"}]}, model=tiny_model, value_model=build_reward_model(tiny_tokenizer))
