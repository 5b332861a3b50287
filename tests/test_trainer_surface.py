"""TRL's trainer surface on the core loop (plugin API 1.1), with the toy method: state, callbacks, evaluate, best model, contract."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import EarlyStoppingCallback, TrainerCallback, TrainingArguments

from posttrain import MethodContractError, TrainingLoop, TrainOutput, check_method
from posttrain.testing._toy import TOY_SPEC, ToyConfig, ToyLMTrainer, toy_sequences


@pytest.fixture
def toy(register_method):
    register_method(TOY_SPEC)


def make(model, tokenizer, tmp_path, rows=None, **kw):
    cfg = {"learning_rate": 1e-2, "save_strategy": "no", "max_steps": 4, "per_device_train_batch_size": 4, "disable_tqdm": True, **kw}
    extra = {k: cfg.pop(k) for k in ("callbacks", "eval_dataset", "compute_metrics") if k in cfg}
    rows = rows or toy_sequences(16, vocab=len(tokenizer))
    return ToyLMTrainer(model=model, args=ToyConfig(output_dir=str(tmp_path / "run"), **cfg), train_dataset=rows, processing_class=tokenizer, **extra)


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def __getattribute__(self, name):
        if name.startswith("on_"):
            return lambda args, state, control, **kw: self.events.append((name, state.global_step))
        return object.__getattribute__(self, name)


def test_state_log_history_has_every_logged_row_and_ends_with_the_summary(toy, tiny_model, tiny_tokenizer, tmp_path):
    trainer = make(tiny_model, tiny_tokenizer, tmp_path)
    output = trainer.train()
    global_step, training_loss, metrics = output  # unpacks like transformers' TrainOutput
    assert isinstance(output, TrainOutput) and global_step == 4 and training_loss > 0
    history = trainer.state.log_history
    assert [row["step"] for row in history[:-1]] == [1, 2, 3, 4] and all("loss" in row and "epoch" in row for row in history[:-1])
    summary = history[-1]
    assert summary["train_loss"] == pytest.approx(training_loss) and summary["train_runtime"] > 0 and summary["step"] == 4
    assert trainer.state.global_step == 4 and trainer.state.max_steps == 4 and trainer.state.epoch == pytest.approx(1.0)
    with open(os.path.join(trainer.args.output_dir, "metrics.jsonl")) as fh:  # metrics.jsonl keeps one row per step
        assert [json.loads(line)["step"] for line in fh] == [1, 2, 3, 4]


def test_callbacks_see_the_events_in_transformers_order(toy, tiny_model, tiny_tokenizer, tmp_path):
    recorder = Recorder()
    trainer = make(tiny_model, tiny_tokenizer, tmp_path, callbacks=[recorder], max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer.train()
    names = [name for name, _ in recorder.events]
    assert names[0] == "on_train_begin" and names[-1] == "on_train_end"
    first_step = names[names.index("on_step_begin") : names.index("on_step_end") + 1]
    assert first_step == ["on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]
    assert names.count("on_step_end") == 2 and names.count("on_log") == 3  # 2 step logs + the summary
    assert ("on_step_end", 1) in recorder.events and ("on_step_end", 2) in recorder.events


def test_a_callback_can_stop_training_and_request_a_save(toy, tiny_model, tiny_tokenizer, tmp_path):
    class StopAfterTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_save = True
                control.should_training_stop = True

    trainer = make(tiny_model, tiny_tokenizer, tmp_path, callbacks=[StopAfterTwo], max_steps=10)
    assert trainer.train().global_step == 2
    assert os.path.isdir(os.path.join(trainer.args.output_dir, "checkpoint-2"))


def test_add_pop_remove_callback(toy, tiny_model, tiny_tokenizer, tmp_path):
    trainer = make(tiny_model, tiny_tokenizer, tmp_path)
    recorder = Recorder()
    trainer.add_callback(recorder)
    trainer.add_callback(EarlyStoppingCallback)
    assert isinstance(trainer.pop_callback(EarlyStoppingCallback), EarlyStoppingCallback)
    trainer.remove_callback(recorder)
    assert trainer.callback_handler.callbacks == []


def test_early_stopping_with_load_best_model_at_end(toy, tiny_model, tiny_tokenizer, tmp_path):
    """The monitored metric is scripted per evaluation (best at step 2, then two evaluations without improvement), so when
    early stopping fires does not depend on a training trajectory (an eval loss driven up by learning_rate=1.0 rises or
    not depending on the CPU's rounding). As in transformers' Trainer, the callback compares each evaluation with the best
    *before* it: patience 2 stops after the evaluations of steps 3 and 4, and the weights of step 2 are loaded."""
    scripted = iter([0.5, 0.3, 0.4, 0.35, 0.2, 0.1, 0.0])  # step 5 would improve: training must have stopped at 4

    def compute_metrics(prediction):
        return {"scripted": next(scripted)}

    rows = toy_sequences(16, vocab=len(tiny_tokenizer))
    trainer = make(
        tiny_model, tiny_tokenizer, tmp_path, rows=rows, eval_dataset=toy_sequences(8, vocab=len(tiny_tokenizer), seed=1), max_steps=20,
        eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True, metric_for_best_model="scripted",
        greater_is_better=False, compute_metrics=compute_metrics, callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
    )
    trainer.train()
    state = trainer.state
    assert state.global_step == 4
    evals = {row["step"]: row for row in state.log_history if "eval_scripted" in row}
    assert [evals[s]["eval_scripted"] for s in sorted(evals)] == [0.5, 0.3, 0.4, 0.35]
    assert state.best_metric == 0.3 and state.best_model_checkpoint.endswith("checkpoint-2")
    assert evals[2]["eval_loss"] != evals[4]["eval_loss"]  # the check below can fail: the weights moved after step 2
    assert trainer.evaluate()["eval_loss"] == evals[2]["eval_loss"]  # the best weights were loaded (same weights, same ops)


def test_eval_on_start_and_named_eval_sets_during_training(toy, tiny_model, tiny_tokenizer, tmp_path):
    evals = {"x": toy_sequences(4, seed=3, vocab=len(tiny_tokenizer)), "y": toy_sequences(4, seed=4, vocab=len(tiny_tokenizer))}
    trainer = make(tiny_model, tiny_tokenizer, tmp_path, eval_dataset=evals, eval_on_start=True, eval_strategy="steps", eval_steps=2)
    trainer.train()
    steps = [row["step"] for row in trainer.state.log_history if "eval_x_loss" in row]
    assert steps == [0, 2, 4]


def test_compute_metrics_gets_predictions_and_labels(toy, tiny_model, tiny_tokenizer, tmp_path):
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        mask = prediction.label_ids != -100
        return {"accuracy": float((prediction.predictions == prediction.label_ids)[mask].mean()), "my_metric": 0.123}

    trainer = make(tiny_model, tiny_tokenizer, tmp_path, compute_metrics=compute_metrics, eval_dataset=toy_sequences(5, vocab=len(tiny_tokenizer)))
    metrics = trainer.evaluate()
    assert metrics["eval_my_metric"] == 0.123 and 0.0 <= metrics["eval_accuracy"] <= 1.0 and seen[0][0] == 5


def test_trainer_accepts_plain_training_arguments(toy, tiny_model, tiny_tokenizer, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path / "ta"), max_steps=2, learning_rate=1e-3, report_to="none", disable_tqdm=True, save_strategy="no")
    trainer = ToyLMTrainer(model=tiny_model, args=args, train_dataset=toy_sequences(8, vocab=len(tiny_tokenizer)), processing_class=tiny_tokenizer)
    assert isinstance(trainer.args, ToyConfig) and trainer.args.learning_rate == 1e-3
    assert trainer.train().global_step == 2


def test_optim_sgd_and_logging_strategy_epoch(toy, tiny_model, tiny_tokenizer, tmp_path):
    trainer = make(tiny_model, tiny_tokenizer, tmp_path, optim="sgd", optim_args="momentum=0.9", logging_strategy="epoch", logging_first_step=False, max_steps=-1, num_train_epochs=2)
    trainer.train()
    assert isinstance(trainer.loop.optimizer.optimizer if hasattr(trainer.loop.optimizer, "optimizer") else trainer.loop.optimizer, torch.optim.SGD)
    assert [row["step"] for row in trainer.state.log_history if "loss" in row] == [4, 8]  # 16 rows / batch 4 = 4 steps an epoch


def test_model_tags_and_neftune_noise_only_in_training(toy, tiny_model, tiny_tokenizer, tmp_path):
    trainer = make(tiny_model, tiny_tokenizer, tmp_path, neftune_noise_alpha=5.0)
    assert {"posttrain", "toy_lm", "trl"} <= set(trainer.model.model_tags)
    ids = torch.tensor([[5, 6, 7, 8]])
    embed = trainer.model.get_input_embeddings()
    trainer.model.eval()
    assert torch.equal(embed(ids), embed(ids))
    trainer.model.train()
    assert not torch.equal(embed(ids), embed(ids))


def test_unsupported_trainingarguments_fields_warn_once(toy):
    with pytest.warns(UserWarning, match="dataloader_persistent_workers=True"):
        ToyConfig(dataloader_persistent_workers=True)


def test_load_best_model_at_end_needs_matching_strategies():
    with pytest.raises(ValueError, match="needs eval_strategy and save_strategy to match"):
        ToyConfig(load_best_model_at_end=True, eval_strategy="no")


class _NoCountItems:
    train_dataset = [1]

    def collate(self, examples):
        return {}

    def compute_loss(self, model, batch, num_items_in_batch):
        return 0, {}


class _BadComputeLoss(_NoCountItems):
    def count_items(self, batch):
        return 1

    def compute_loss(self, model, batch):  # missing num_items_in_batch
        return 0, {}


def test_method_contract_names_the_missing_or_mistyped_member():
    with pytest.raises(MethodContractError, match=r"method 'demo' \(_NoCountItems\) has no 'count_items': define _NoCountItems.count_items\(self, batch\)"):
        check_method(_NoCountItems(), plugin="demo")
    with pytest.raises(MethodContractError, match=r"compute_loss\(model, batch\) cannot be called with the 3 argument"):
        check_method(_BadComputeLoss(), plugin="demo")


def test_loop_setup_checks_the_method(toy, tiny_model, tmp_path):
    loop = TrainingLoop(ToyConfig(output_dir=str(tmp_path)), method="toy_lm")
    with pytest.raises(MethodContractError, match="has no 'count_items'"):
        loop.setup(tiny_model, method=_NoCountItems())


def test_user_optimizer_and_optimizer_class(toy, tiny_model, tiny_tokenizer, tmp_path):
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.5)
    trainer = ToyLMTrainer(model=tiny_model, args=ToyConfig(output_dir=str(tmp_path / "a"), max_steps=1, save_strategy="no", disable_tqdm=True),
                           train_dataset=toy_sequences(8, vocab=len(tiny_tokenizer)), processing_class=tiny_tokenizer)
    trainer.loop._given_optimizer = optimizer  # what TrainingLoop(optimizers=(optimizer, None)) sets
    trainer.train()
    assert trainer.loop.optimizer.optimizer is optimizer if hasattr(trainer.loop.optimizer, "optimizer") else trainer.loop.optimizer is optimizer
    loop = TrainingLoop(ToyConfig(output_dir=str(tmp_path / "b")), method="toy_lm", optimizer_cls_and_kwargs=(torch.optim.Adagrad, {"lr_decay": 0.1}))
    built = loop._build_optimizer(tiny_model)
    assert isinstance(built, torch.optim.Adagrad) and built.defaults["lr_decay"] == 0.1
    with pytest.raises(ValueError, match="either optimizers"):
        TrainingLoop(ToyConfig(output_dir=str(tmp_path / "c")), method="toy_lm", optimizers=(optimizer, None), optimizer_cls_and_kwargs=(torch.optim.SGD, {}))
