"""PRM: learning on held-out stepwise rows, the step-by-step reward function (batched = unbatched, aggregations, errors),
GRPO training with it, gradient accumulation, data formats and bad input."""

from __future__ import annotations

import copy
import importlib.util
import math
import pathlib
import random

import pytest
import torch

import posttrain

HERE = pathlib.Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("prm_make_trl_reference", HERE.parent / "scripts" / "make_trl_reference.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # the parity generator's rows and portable float64 model


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("prm", allow_experimental=True)
    yield


def sums_rows(n: int, seed: int) -> list[dict]:
    """Stepwise rows: 2-3 steps 'a + b = c' (a, b in 0..2), each correct (c = a + b) or wrong (c off by 1 or 2), about half each."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        steps, labels = [], []
        for _ in range(rng.randint(2, 3)):
            a, b = rng.randint(0, 2), rng.randint(0, 2)
            ok = rng.random() < 0.5
            c = a + b if ok else a + b + rng.choice([1, 2])
            steps.append(f"{a} + {b} = {c}")
            labels.append(ok)
        rows.append({"prompt": "check the sums:", "completions": steps, "labels": labels})
    return rows


def _args(tmp_path, name="run", **kw):
    from posttrain_prm import PRMConfig

    base = {"per_device_train_batch_size": 16, "per_device_eval_batch_size": 32, "gradient_checkpointing": False, "report_to": "none",
            "disable_tqdm": True, "save_strategy": "no", "logging_steps": 10, "seed": 0}
    return PRMConfig(output_dir=str(tmp_path / name), **{**base, **kw})


@pytest.fixture(scope="module")
def trained_prm(tmp_path_factory):
    """Train a PRM on the tiny model for 400 steps; return (saved directory, eval before, eval after)."""
    from datasets import Dataset

    from posttrain.testing.tiny_model import save_tiny_model
    from posttrain_prm import PRMTrainer

    tmp = tmp_path_factory.mktemp("prm")
    model_dir = save_tiny_model(str(tmp / "tiny"))
    torch.manual_seed(0)
    trainer = PRMTrainer(model=model_dir, args=_args(tmp, max_steps=400, learning_rate=3e-3), train_dataset=Dataset.from_list(sums_rows(128, 1)),
                         eval_dataset=Dataset.from_list(sums_rows(48, 2)), allow_experimental=True)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model(str(tmp / "prm"))
    return str(tmp / "prm"), before, after, model_dir


def test_step_accuracy_rises_on_held_out_rows(trained_prm):
    """Learning: step-label accuracy on 48 held-out rows rises from chance (measured 0.51 -> 0.94, eval loss 0.69 -> 0.27)."""
    _, before, after, _ = trained_prm
    print(f"PRM learning: held-out step accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}, "
          f"eval loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}")
    assert before["eval_accuracy"] < 0.6
    assert after["eval_accuracy"] >= 0.75 and after["eval_accuracy"] > before["eval_accuracy"] + 0.15
    assert after["eval_loss"] < before["eval_loss"] - 0.1


def test_reward_function_scores_correct_solutions_higher(trained_prm):
    from posttrain_prm import ProcessRewardFunction

    path = trained_prm[0]
    rows = sums_rows(40, 3)
    right = [r for r in rows if all(r["labels"])]
    wrong = [r for r in rows if not any(r["labels"])]
    reward = ProcessRewardFunction(path, step_separator="\n", aggregation="min")
    assert reward.__name__ == "prm_min"
    text = lambda r: "\n".join(r["completions"]) + "\n"  # noqa: E731  (a trailing separator, as generated text often has)
    good = reward([r["prompt"] for r in right], [text(r) for r in right])
    bad = reward([r["prompt"] for r in wrong], [text(r) for r in wrong])
    mean_good, mean_bad = sum(good) / len(good), sum(bad) / len(bad)
    print(f"PRM reward (min over steps): all-correct solutions {mean_good:.3f} ({len(good)}), all-wrong {mean_bad:.3f} ({len(bad)})")
    assert mean_good > mean_bad + 0.2


def test_reward_function_batched_equals_unbatched_and_aggregates(tokenizer64_prm):
    """Step probabilities equal a by-hand forward of each sequence alone (float64); min/prod/last/mean follow from them."""
    from posttrain_prm import ProcessRewardFunction

    model, tokenizer = tokenizer64_prm
    prompts = ["what is 1 + 2 ?", "check:", "q"]
    completions = ["1 + 2 = 3\nthe answer is 3", "2 + 2 = 5\n\n4 * 1 = 4\n", [{"role": "assistant", "content": "7"}]]
    reward = ProcessRewardFunction(model, tokenizer=tokenizer, batch_size=2)
    probs = reward.step_probabilities(prompts, completions)
    assert [len(p) for p in probs] == [2, 2, 1]
    sep = tokenizer.encode("\n", add_special_tokens=False)
    for prompt, completion, got in zip(prompts, completions, probs):
        steps = [s for s in (completion if isinstance(completion, str) else completion[-1]["content"]).split("\n") if s.strip()]
        ids, positions = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]), []
        for step in steps:
            ids += list(tokenizer(step, add_special_tokens=False)["input_ids"]) + sep
            positions.append(len(ids) - 1)
        model.eval()  # (the classifier's dropout off, as the reward function scores)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, 2), alone: no padding
        model.train()
        expected = logits.softmax(-1)[positions, 1].tolist()
        assert got == pytest.approx(expected, rel=1e-12)
    for aggregation, fold in (("min", min), ("prod", math.prod), ("last", lambda p: p[-1]), ("mean", lambda p: sum(p) / len(p))):
        scores = ProcessRewardFunction(model, tokenizer=tokenizer, aggregation=aggregation)(prompts=prompts, completions=completions, solution=["x"] * 3)
        assert scores == pytest.approx([fold(p) for p in probs], rel=1e-12), aggregation
    assert model.training  # the training mode is restored


@pytest.fixture(scope="module")
def tokenizer64_prm():
    from posttrain.testing.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    model = gen.portable_model(tokenizer)
    model.config._name_or_path = ""
    model.train()
    return model, tokenizer


def test_reward_function_errors(tokenizer64_prm):
    from posttrain_prm import ProcessRewardFunction

    model, tokenizer = tokenizer64_prm
    reward = ProcessRewardFunction(model, tokenizer=tokenizer)
    with pytest.raises(posttrain.DataError, match="completion 1 has no step.*empty_reward"):
        reward(["a", "b"], ["1 + 1 = 2", "\n \n"])
    assert ProcessRewardFunction(model, tokenizer=tokenizer, empty_reward=-1.0)(["a", "b"], ["1 + 1 = 2", ""])[1] == -1.0
    with pytest.raises(posttrain.ConfigError, match="aggregation='max' is invalid"):
        ProcessRewardFunction(model, tokenizer=tokenizer, aggregation="max")
    with pytest.raises(posttrain.ConfigError, match="num_labels=1"):
        from posttrain.testing.tiny_model import build_reward_model

        ProcessRewardFunction(build_reward_model(tokenizer), tokenizer=tokenizer)


def test_grpo_trains_with_the_prm_reward(trained_prm, tmp_path):
    """GRPO (the stable plugin) runs 2 steps with ProcessRewardFunction as its reward function; the reward is logged."""
    import json

    from datasets import Dataset

    from posttrain.methods.grpo import GRPOConfig, GRPOTrainer
    from posttrain_prm import ProcessRewardFunction

    path, _, _, model_dir = trained_prm
    reward = ProcessRewardFunction(path, aggregation="prod", empty_reward=0.0)
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      learning_rate=1e-3, logging_steps=1, report_to="none", disable_tqdm=True, save_strategy="no", gradient_checkpointing=False)
    prompts = Dataset.from_dict({"prompt": [f"check the sums: {i} + {i % 3} =" for i in range(8)]})
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=args, train_dataset=prompts)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 2
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards) == 2 and all(0.0 <= r <= 1.0 for r in rewards), rewards
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters())


def test_gradient_accumulation_two_micro_batches_equal_one(tokenizer64_prm, tmp_path):
    """Loss / num_items of the whole step: two micro-batches of 4 rows give one batch of 8's gradient (float64)."""
    from datasets import Dataset

    from posttrain_prm import PRMTrainer

    model, tokenizer = tokenizer64_prm
    trainer = PRMTrainer(model=copy.deepcopy(model), args=_args(tmp_path), train_dataset=Dataset.from_list(gen.stepwise_rows()), processing_class=tokenizer)
    rows = list(trainer.train_dataset)
    grads = []
    for parts in ([rows], [rows[:4], rows[4:]]):
        trainer.model.zero_grad(set_to_none=True)
        batches = [trainer.collate(p) for p in parts]
        total = sum(trainer.count_items(b) for b in batches)
        for b in batches:
            trainer.compute_loss(trainer.model, b, total)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-15)


def test_data_formats_and_bad_input(tokenizer64_prm, tmp_path):
    from datasets import Dataset

    from posttrain_prm import PRMConfig, PRMTrainer

    model, tokenizer = tokenizer64_prm

    def build(rows, **kw):
        return PRMTrainer(model=copy.deepcopy(model), args=_args(tmp_path, **kw), train_dataset=Dataset.from_list(rows), processing_class=tokenizer)

    stepwise = build([{"prompt": "p:", "completions": ["1 + 1 = 2"], "labels": [True]}]).train_dataset[0]
    one_step = build([{"prompt": "p:", "completion": "1 + 1 = 2", "label": True}]).train_dataset[0]
    assert stepwise == one_step  # prompt/completion/label rows are single-step stepwise rows
    tokenized = build([{"input_ids": [5, 6, 7], "labels": [-100, -100, 1]}]).train_dataset[0]
    assert tokenized == {"input_ids": [5, 6, 7], "labels": [-100, -100, 1]}
    with pytest.raises(posttrain.DataError, match="row 1: 2 steps but 1 labels"):
        build([{"prompt": "p", "completions": ["a"], "labels": [True]}, {"prompt": "p", "completions": ["a", "b"], "labels": [True]}])
    with pytest.raises(posttrain.DataError, match="row 0: 'completions' is empty"):
        build([{"prompt": "p", "completions": [], "labels": []}])
    with pytest.raises(posttrain.DataError, match="PRM training needs stepwise supervision"):
        build([{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(posttrain.DataError, match="conversational messages are not supported"):
        build([{"prompt": [{"role": "user", "content": "p"}], "completions": ["a"], "labels": [True]}])
    with pytest.raises(posttrain.DataError, match="no step label is left"):
        build([{"prompt": "a long prompt with many words", "completions": ["a"], "labels": [True]}], max_length=3)
    with pytest.raises(posttrain.ConfigError, match="step_separator=''"):
        PRMConfig(output_dir=str(tmp_path / "x"), step_separator="")
    from posttrain.testing.tiny_model import build_reward_model

    with pytest.raises(posttrain.ConfigError, match="num_labels=1.*num_labels=2"):
        PRMTrainer(model=build_reward_model(tokenizer), args=_args(tmp_path), train_dataset=Dataset.from_list(gen.stepwise_rows()), processing_class=tokenizer)


def test_tokenize_row_is_the_trainers_tokenizer_and_tags(tokenizer64_prm, tmp_path, monkeypatch):
    """The trainer tokenizes every stepwise row through the static ``PRMTrainer.tokenize_row`` (TRL 1.13's signature;
    ``is_eval`` False for the train set, True for eval), and the model carries ``_tag_names`` as its tags (TRL's test_tags)."""
    from datasets import Dataset

    from posttrain_prm import PRMTrainer

    model, tokenizer = tokenizer64_prm
    calls = []
    original = PRMTrainer.tokenize_row

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_eval", args[-1] if len(args) == 7 else None))
        return original(*args, **kwargs)

    monkeypatch.setattr(PRMTrainer, "tokenize_row", staticmethod(spy))
    rows = gen.stepwise_rows()
    trainer = PRMTrainer(model=copy.deepcopy(model), args=_args(tmp_path, train_on_last_step_only=True), train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(rows[:3]), processing_class=tokenizer)
    assert calls == [False] * len(rows) + [True] * 3
    first = original(rows[0], tokenizer, "\n", None, None, True, False)
    assert trainer.train_dataset[0] == first and sum(v != -100 for v in first["labels"]) == 1  # last step only, in training
    assert trainer.eval_dataset[0] == original(rows[0], tokenizer, "\n", None, None, True, True)
    assert trainer.model.model_tags == PRMTrainer._tag_names and {"trl", "prm"} <= set(PRMTrainer._tag_names)
    with pytest.raises(posttrain.DataError, match="one label per step"):
        original({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, tokenizer, "\n", None, None, False, False)
