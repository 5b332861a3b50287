"""Tests of KTOTrainer's TRL surface: constructor arguments, config conversion, datasets, evaluation, callbacks, TR sync, MoE loss."""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain import ConfigError

CONFIG = dict(report_to="none", disable_tqdm=True, logging_steps=1, save_strategy="no")


def _config(tmp_path, **kw):
    from posttrain.methods.kto import KTOConfig

    return KTOConfig(output_dir=str(tmp_path / "out"), **{**CONFIG, **kw})


def _trainer(tmp_path, model, tok, data, **kw):
    from posttrain.methods.kto import KTOTrainer

    trainer_kw = {k: kw.pop(k) for k in list(kw) if k in ("ref_model", "eval_dataset", "peft_config", "callbacks", "compute_metrics", "data_collator", "optimizers", "quantization_config")}
    return KTOTrainer(model=model, args=_config(tmp_path, **kw), train_dataset=data, processing_class=tok, **trainer_kw)


def _loss(trainer, batch, num_items_in_batch):
    """``compute_loss`` of a CPU ``batch`` on the training device, where the reference already is (an accelerator when present)."""
    trainer.model.to(trainer.loop.device)
    return trainer.compute_loss(trainer.model, trainer.loop.to_device(batch), num_items_in_batch)


@pytest.fixture
def policy(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, seed=0)


def _perturbed(model, scale: float = 0.05, seed: int = 0):
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return ref


# ---------------------------------------------------------------------------- construction
def test_signature_is_trls_plus_allow_experimental():
    import inspect

    from trl import KTOTrainer as TRLKTOTrainer

    from posttrain.methods.kto import KTOTrainer

    ours = list(inspect.signature(KTOTrainer.__init__).parameters)
    assert ours == list(inspect.signature(TRLKTOTrainer.__init__).parameters) + ["allow_experimental"]


def test_every_trl_config_field_exists_with_trls_default():
    import dataclasses

    import transformers
    from trl import KTOConfig as TRLKTOConfig

    from posttrain.methods.kto import KTOConfig

    ours = {f.name: f for f in dataclasses.fields(KTOConfig)}
    ta = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    for f in dataclasses.fields(TRLKTOConfig):
        assert f.name in ours, f.name
        if f.name not in ta or f.name in ("learning_rate", "gradient_checkpointing", "logging_steps", "train_sampling_strategy"):
            assert ours[f.name].default == f.default, f.name


def test_training_arguments_are_converted_like_trl(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    from transformers import TrainingArguments

    from posttrain.methods.kto import KTOConfig, KTOTrainer

    args = TrainingArguments(output_dir=str(tmp_path / "ta"), learning_rate=3e-4, per_device_train_batch_size=4, report_to="none")
    trainer = KTOTrainer(model=policy, args=args, train_dataset=tiny_datasets["unpaired_preference"], processing_class=tiny_tokenizer)
    assert type(trainer.args) is KTOConfig
    assert (trainer.args.learning_rate, trainer.args.per_device_train_batch_size, trainer.args.beta) == (3e-4, 4, 0.1)


def test_default_output_dir_is_trls(tiny_model_dir, tiny_datasets):
    from posttrain.methods.kto import KTOTrainer

    trainer = KTOTrainer(model=tiny_model_dir, train_dataset=tiny_datasets["unpaired_preference"])
    assert trainer.args.output_dir == f"{tiny_model_dir.rstrip('/').split('/')[-1]}-KTO"
    assert {"trl", "kto"} <= set(trainer.model.model_tags)


def test_trust_remote_code_reaches_from_pretrained_and_the_config_is_unchanged(tmp_path, tiny_model_dir, tiny_datasets, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    trainer = _trainer(tmp_path, tiny_model_dir, None, tiny_datasets["unpaired_preference"], trust_remote_code=True, model_init_kwargs={"dtype": "float32"})
    assert seen[0] is True
    assert trainer.args.model_init_kwargs == {"dtype": "float32"}


# ---------------------------------------------------------------------------- datasets
def test_train_and_eval_datasets_are_datasets_and_iterable_input_is_read_once(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    from datasets import Dataset

    data = tiny_datasets["unpaired_preference"]
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, data.to_iterable_dataset(), eval_dataset=data.to_iterable_dataset(), per_device_train_batch_size=4)
    reference = _trainer(tmp_path, copy.deepcopy(policy), tiny_tokenizer, data, per_device_train_batch_size=4)
    assert isinstance(trainer.train_dataset, Dataset) and isinstance(trainer.eval_dataset, Dataset)
    assert list(trainer.train_dataset) == list(reference.train_dataset) == list(trainer.eval_dataset)


@pytest.mark.parametrize("paired", [False, True])
def test_pretokenized_rows_are_used_as_given(tmp_path, policy, tiny_tokenizer, tiny_datasets, paired):
    from datasets import Dataset

    text = tiny_datasets["preference" if paired else "unpaired_preference"]
    reference = _trainer(tmp_path, copy.deepcopy(policy), tiny_tokenizer, text, per_device_train_batch_size=4)
    rows = list(reference.train_dataset)
    if paired:  # the processed text rows, re-paired: chosen half first (TRL's unpairing order)
        half = len(rows) // 2
        ids = Dataset.from_list([{"prompt_ids": c["prompt_ids"], "chosen_ids": c["completion_ids"], "rejected_ids": r["completion_ids"]} for c, r in zip(rows[:half], rows[half:])])
    else:
        ids = Dataset.from_list(rows)
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, ids, per_device_train_batch_size=4)
    assert list(trainer.train_dataset) == rows
    batch = trainer.collate(rows[:4])
    torch.testing.assert_close(_loss(trainer, batch, 4)[0], _loss(reference, reference.collate(rows[:4]), 4)[0])  # the same computation


def test_trls_collator_can_be_passed_as_data_collator(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    data = tiny_datasets["unpaired_preference"]
    ours = _trainer(tmp_path, policy, tiny_tokenizer, data, per_device_train_batch_size=4)
    theirs = _trainer(tmp_path, copy.deepcopy(policy), tiny_tokenizer, data, per_device_train_batch_size=4, data_collator=DataCollatorForUnpairedPreference(pad_token_id=tiny_tokenizer.pad_token_id))
    rows = list(ours.train_dataset.select(range(12, 16)))
    a, b = ours.collate(rows), theirs.data_collator(rows)
    for key in ("input_ids", "completion_mask", "KL_input_ids", "KL_completion_mask", "label"):
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(_loss(ours, a, 4)[0], _loss(theirs, b, 4)[0])  # equal batches, equal weights: the same computation


def test_data_collator_is_the_collator_in_use(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], per_device_train_batch_size=4)
    rows = list(trainer.train_dataset.select(range(4)))
    assert torch.equal(trainer.data_collator(rows)["KL_input_ids"], trainer.collate(rows)["KL_input_ids"])  # TRL's attribute


def test_a_peft_model_with_a_peft_config_is_refused(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=2, target_modules=["q_proj"])
    with pytest.raises(ConfigError, match="model is already a PeftModel and peft_config was given: merge and unload"):
        _trainer(tmp_path, get_peft_model(policy, lora), tiny_tokenizer, tiny_datasets["unpaired_preference"], peft_config=lora)


def test_a_collator_without_the_kl_sequences_is_rejected(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], per_device_train_batch_size=4,
                       data_collator=lambda rows: {"input_ids": torch.zeros(len(rows), 3, dtype=torch.long)})
    with pytest.raises(ConfigError, match=r"data_collator returned no \['attention_mask'"):
        trainer.collate(list(trainer.train_dataset.select(range(4))))


# ---------------------------------------------------------------------------- metrics, evaluation, callbacks
def test_a_class_missing_from_the_micro_batch_is_not_logged(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["preference"], per_device_train_batch_size=4)
    rows = list(trainer.train_dataset.select(range(4)))  # unpairing puts the desirable rows first
    assert all(r["label"] for r in rows)
    _, metrics = _loss(trainer, trainer.collate(rows), 4)
    assert {"rewards/chosen", "logps/chosen", "logits/chosen", "kl", "entropy"} <= set(metrics)
    assert not {"rewards/rejected", "logps/rejected", "rewards/margins"} & set(metrics)


def test_evaluate_accepts_a_raw_dataset_and_a_dict_of_them(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    data = tiny_datasets["unpaired_preference"]
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, data, ref_model=_perturbed(policy), per_device_train_batch_size=4)
    single = trainer.evaluate(eval_dataset=data)
    both = trainer.evaluate(eval_dataset={"a": data, "b": data.select(range(8))})
    for key in ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logits/rejected", "entropy"):
        assert both[f"eval_a_{key}"] == pytest.approx(single[f"eval_{key}"], rel=1e-6), key
    assert both["eval_b_loss"] != both["eval_a_loss"]
    logged = {k: v for row in trainer.state.log_history[-2:] for k, v in row.items()}  # evaluate() logs, as in transformers
    assert logged["eval_a_loss"] == both["eval_a_loss"] and logged["eval_b_loss"] == both["eval_b_loss"]


def test_compute_metrics_gets_the_implied_rewards_and_labels(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    seen = {}

    def compute_metrics(prediction):
        seen["predictions"], seen["labels"] = prediction.predictions, prediction.label_ids
        return {"my_metric": 0.25}

    data = tiny_datasets["unpaired_preference"]
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, data, eval_dataset=data, ref_model=_perturbed(policy), compute_metrics=compute_metrics, per_device_train_batch_size=4)
    metrics = trainer.evaluate()
    assert metrics["eval_my_metric"] == 0.25
    assert seen["predictions"].shape == (len(data),) and seen["labels"].tolist() == list(data["label"])
    assert seen["predictions"][seen["labels"]].mean() == pytest.approx(metrics["eval_rewards/chosen"], rel=1e-5)


def test_callbacks_see_every_step_and_log_and_the_summary_row_ends_the_history(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps, self.logs = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    recorder = Recorder()
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], callbacks=[recorder], max_steps=3, per_device_train_batch_size=4)
    trainer.train()
    assert recorder.steps == [1, 2, 3]
    assert [log["loss"] for log in recorder.logs if "loss" in log] == [row["loss"] for row in trainer.state.log_history if "loss" in row]
    summary = trainer.state.log_history[-1]
    assert {"train_runtime", "train_loss", "train_samples_per_second"} <= set(summary) and summary["step"] == 3
    assert all("kl" in row for row in trainer.state.log_history[:-1])


# ---------------------------------------------------------------------------- reference sync (TR-DPO style)
def test_sync_ref_model_mixes_the_policy_into_the_reference(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    ref = _perturbed(policy, scale=0.1)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], ref_model=ref, max_steps=1,
                       per_device_train_batch_size=4, learning_rate=1e-2, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.25)
    trainer.train()
    policy_after = dict(trainer.loop.unwrapped_model().named_parameters())
    for name, param in trainer.ref_model.named_parameters():
        torch.testing.assert_close(param, 0.25 * policy_after[name].detach() + 0.75 * before[name])
    state = trainer.state_dict()
    other = _trainer(tmp_path / "b", copy.deepcopy(policy), tiny_tokenizer, tiny_datasets["unpaired_preference"], per_device_train_batch_size=4, sync_ref_model=True)
    other.load_state_dict(state)  # resume restores the moved reference
    for (name, a), (_, b) in zip(other.ref_model.named_parameters(), trainer.ref_model.named_parameters()):
        assert torch.equal(a, b), name


def test_sync_ref_model_is_not_applied_between_sync_steps(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    ref = _perturbed(policy)
    before = [p.detach().clone() for p in ref.parameters()]
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], ref_model=ref, max_steps=2,
                       per_device_train_batch_size=4, sync_ref_model=True, ref_model_sync_steps=3)
    trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.ref_model.parameters()))


# ---------------------------------------------------------------------------- Mixture-of-Experts auxiliary loss
def _tiny_moe(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_moe_load_balancing_loss_is_added_with_its_coefficient(tmp_path, tiny_tokenizer, tiny_datasets):
    data = tiny_datasets["unpaired_preference"]
    model = _tiny_moe(tiny_tokenizer)
    with_aux = _trainer(tmp_path, model, tiny_tokenizer, data, ref_model=copy.deepcopy(model), per_device_train_batch_size=4, router_aux_loss_coef=0.5)
    without = _trainer(tmp_path, copy.deepcopy(model), tiny_tokenizer, data, ref_model=copy.deepcopy(model), per_device_train_batch_size=4, router_aux_loss_coef=0.0)
    assert with_aux.aux_loss_enabled and not without.aux_loss_enabled
    batch = with_aux.collate(list(with_aux.train_dataset.select(range(12, 16))))
    loss, metrics = _loss(with_aux, batch, 8)  # this micro-batch is half of the step
    plain, _ = _loss(without, batch, 8)
    assert float(metrics["aux_loss"]) > 0
    # float32 (the experts' grouped GEMM has no float64 kernel), the same forward on both sides: they differ by the rounding
    # of the final additions, which torch's default float32 tolerance (rtol 1.3e-6, atol 1e-5) covers
    torch.testing.assert_close(loss, plain + 0.5 * metrics["aux_loss"] * 4 / 8)


# ---------------------------------------------------------------------------- validation errors
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"ref_model_mixup_alpha": 0.0}, "ref_model_mixup_alpha=0.0"),
        ({"ref_model_sync_steps": 0}, "ref_model_sync_steps=0"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, "sync_ref_model=True and precompute_ref_log_probs=True conflict"),
        ({"router_aux_loss_coef": -1.0}, "router_aux_loss_coef=-1.0"),
        ({"pad_to_multiple_of": "eight"}, "pad_to_multiple_of='eight'"),
        ({"model_init_kwargs": "{not json"}, "model_init_kwargs="),
    ],
)
def test_config_rejects_invalid_value(tmp_path, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        _config(tmp_path, **overrides)


def test_config_resolves_trls_string_values(tmp_path):
    config = _config(tmp_path, pad_to_multiple_of="8", model_init_kwargs='{"dtype": "float32"}')
    assert (config.pad_to_multiple_of, config.model_init_kwargs, _config(tmp_path).pad_to_multiple_of) == (8, {"dtype": "float32"}, None)


def test_train_dataset_is_required(tmp_path, policy, tiny_tokenizer):
    with pytest.raises(ConfigError, match="`train_dataset` is required"):
        _trainer(tmp_path, policy, tiny_tokenizer, None)


def test_custom_optimizers_are_refused_with_the_alternative(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"optimizers=\(optimizer, scheduler\) is not supported.*lr_scheduler_type"):
        _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], optimizers=(optimizer, None))


def test_quantization_config_with_a_built_model_is_refused(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    with pytest.raises(ConfigError, match="quantization_config= applies only to a model given by name"):
        _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], quantization_config=object())


def test_router_aux_loss_coef_on_a_dense_model_is_refused(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    with pytest.raises(ConfigError, match="router_aux_loss_coef=0.1 is set but Qwen2ForCausalLM is not a Mixture-of-Experts model"):
        _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], router_aux_loss_coef=0.1)


def test_sync_ref_model_with_peft_is_refused(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    from peft import LoraConfig

    with pytest.raises(ConfigError, match="sync_ref_model=True needs a separate reference model"):
        _trainer(tmp_path, policy, tiny_tokenizer, tiny_datasets["unpaired_preference"], peft_config=LoraConfig(r=4, target_modules="all-linear"), sync_ref_model=True)


def test_precompute_with_an_iterable_dataset_is_refused(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    data = tiny_datasets["unpaired_preference"]
    with pytest.raises(ConfigError, match="precompute_ref_log_probs=True is not supported with IterableDataset"):
        _trainer(tmp_path, policy, tiny_tokenizer, data.to_iterable_dataset(), precompute_ref_log_probs=True, per_device_train_batch_size=4)


def test_precomputing_a_new_eval_set_after_training_without_a_reference_is_refused(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    data = tiny_datasets["unpaired_preference"]
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, data, precompute_ref_log_probs=True, per_device_train_batch_size=4, max_steps=1)
    assert "eval_loss" in trainer.evaluate(eval_dataset=data)  # before training the policy is the reference
    trainer.train()
    with pytest.raises(ConfigError, match="Cannot compute reference log-probs for a dataset passed to evaluate"):
        trainer.evaluate(eval_dataset=data)


def test_tools_column_reaches_the_chat_template_as_json_or_as_a_list(tmp_path, policy, tiny_tokenizer, tiny_datasets):
    import json

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (
        "{% if tools %}[tools:{% for t in tools %}{{ t['function']['name'] }}{% endfor %}]{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tool = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {"type": "object", "properties": {}}}}
    base = tiny_datasets["conversational_preference"].select(range(4))
    as_json = base.add_column("tools", [json.dumps([tool])] * 4)
    as_list = [{**row, "tools": [tool]} for row in base]
    a = _trainer(tmp_path, policy, tok, as_json, per_device_train_batch_size=4)
    b = _trainer(tmp_path, copy.deepcopy(policy), tok, as_list, per_device_train_batch_size=4)
    assert list(a.train_dataset) == list(b.train_dataset)
    assert tok.decode(a.train_dataset[0]["prompt_ids"]).startswith("[tools:add]<user>")
