"""TRL 1.16's trainer surface on our DPOTrainer: arguments, evaluate(), callbacks, state, data forms, new config fields."""

from __future__ import annotations

import copy

import pytest
import torch
from dpo_helpers import assert_reference_kept_off_the_accelerator, loss_on_device, make_ours

from posttrain import ConfigError


def _trainer(tokenizer, model, tmp_path, data, name="out", **kw):
    from posttrain.methods.dpo import DPOConfig, DPOTrainer

    trainer_kw = {k: kw.pop(k) for k in list(kw) if k in ("ref_model", "eval_dataset", "callbacks", "compute_metrics", "data_collator", "peft_config")}
    cfg = {"per_device_train_batch_size": 4, "save_strategy": "no", "disable_tqdm": True, "gradient_checkpointing": False, **kw}
    return DPOTrainer(model=model, args=DPOConfig(output_dir=str(tmp_path / name), **cfg), train_dataset=data, processing_class=tokenizer, **trainer_kw)


# ---------------------------------------------------------------------------------------------- arguments
def test_signature_is_trls_plus_allow_experimental():
    import inspect

    import trl

    from posttrain.methods.dpo import DPOTrainer

    ours = list(inspect.signature(DPOTrainer.__init__).parameters)
    theirs = list(inspect.signature(trl.DPOTrainer.__init__).parameters)
    assert ours == theirs + ["allow_experimental"]


def test_config_has_every_trl_field_with_trls_default():
    import dataclasses

    import trl
    from transformers import TrainingArguments

    from posttrain.methods.dpo import DPOConfig

    ours = {f.name: f for f in dataclasses.fields(DPOConfig)}
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    for f in dataclasses.fields(trl.DPOConfig):
        assert f.name in ours, f.name
        if f.name in base and f.name not in ("learning_rate", "gradient_checkpointing", "logging_steps"):
            continue  # TrainingArguments fields: the core's defaults
        theirs = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        mine = ours[f.name].default if ours[f.name].default is not dataclasses.MISSING else ours[f.name].default_factory()
        assert mine == theirs, f.name


def test_plain_training_arguments_are_converted(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from transformers import TrainingArguments

    from posttrain.methods.dpo import DPOTrainer

    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, max_steps=1, report_to="none")
    trainer = DPOTrainer(model=tiny_model, args=args, train_dataset=pref_data["preference"], processing_class=tiny_tokenizer)
    assert type(trainer.args).__name__ == "DPOConfig"
    assert (trainer.args.learning_rate, trainer.args.output_dir, trainer.args.beta, trainer.args.max_length) == (3e-4, str(tmp_path), 0.1, 1024)


def test_missing_train_dataset_is_trls_error(tiny_tokenizer, tiny_model, tmp_path):
    from posttrain.methods.dpo import DPOConfig, DPOTrainer

    with pytest.raises(ValueError, match="`train_dataset` is required"):
        DPOTrainer(model=tiny_model, args=DPOConfig(output_dir=str(tmp_path)), processing_class=tiny_tokenizer)


def test_optimizers_cannot_be_honoured(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    from posttrain.methods.dpo import DPOConfig, DPOTrainer

    with pytest.raises(ConfigError, match=r"optimizers=\(optimizer, scheduler\) cannot be honoured.*optim, optim_args, learning_rate"):
        DPOTrainer(model=tiny_model, args=DPOConfig(output_dir=str(tmp_path)), train_dataset=pref_data["preference"], processing_class=tiny_tokenizer, optimizers=(optimizer, None))


def test_quantization_config_needs_a_model_name(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from posttrain.methods.dpo import DPOConfig, DPOTrainer

    with pytest.raises(ConfigError, match="quantization_config= applies only to a model given by name"):
        DPOTrainer(model=tiny_model, args=DPOConfig(output_dir=str(tmp_path)), train_dataset=pref_data["preference"], processing_class=tiny_tokenizer, quantization_config=object())


def test_peft_config_with_a_peft_model_is_refused(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="model is already a PeftModel and peft_config is given too"):
        _trainer(tiny_tokenizer, model, tmp_path, pref_data["preference"], peft_config=LoraConfig(r=2, target_modules=["v_proj"]))


def test_model_tags_and_trl_defaults(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from posttrain.methods.dpo import DPOConfig, DPOTrainer

    trainer = DPOTrainer(model=tiny_model, args=DPOConfig(output_dir=str(tmp_path)), train_dataset=pref_data["preference"], processing_class=tiny_tokenizer)
    assert {"trl", "dpo"} <= set(trainer.model.model_tags)
    assert trainer.args.gradient_checkpointing and trainer.model.model.gradient_checkpointing
    assert (trainer.args.learning_rate, trainer.args.logging_steps, trainer.args.logging_first_step) == (1e-6, 10, False)
    assert trainer.aux_loss_enabled is False


# ---------------------------------------------------------------------------------------------- surface
def test_callbacks_state_and_summary_row(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from transformers import TrainerCallback

    events = []

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            events.append(("step", state.global_step))

        def on_log(self, args, state, control, logs=None, **kwargs):
            events.append(("log", sorted(logs)))

    trainer = _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], max_steps=2, logging_steps=1, callbacks=[Recorder()])
    trainer.train()
    assert [e for e in events if e[0] == "step"] == [("step", 1), ("step", 2)]
    logged = [keys for kind, keys in events if kind == "log"]
    assert {"loss", "rewards/margins", "entropy", "mean_token_accuracy"} <= set(logged[0])
    assert trainer.state.global_step == 2
    summary = trainer.state.log_history[-1]
    assert {"train_loss", "train_runtime", "train_samples_per_second"} <= set(summary)
    assert summary["train_loss"] == pytest.approx((trainer.state.log_history[0]["loss"] + trainer.state.log_history[1]["loss"]) / 2)


def test_evaluate_a_new_dataset_and_a_dict_of_datasets(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    trainer = _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"])
    assert trainer.eval_dataset is None
    single = trainer.evaluate(eval_dataset=pref_data["conversational_preference"])
    assert single["eval_loss"] == pytest.approx(0.693147, abs=1e-4)  # the reference is the initial policy
    both = trainer.evaluate(eval_dataset={"text": pref_data["preference"], "chat": pref_data["conversational_preference"]})
    assert {"eval_text_loss", "eval_chat_loss", "eval_text_rewards/accuracies", "eval_chat_entropy"} <= set(both)
    assert both["eval_chat_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)
    assert trainer.state.log_history[-1]["eval_chat_loss"] == both["eval_chat_loss"]


def test_eval_dataset_dict_is_processed_per_split(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from datasets import Dataset, DatasetDict

    eval_sets = DatasetDict({"a": pref_data["preference"], "b": pref_data["conversational_preference"]})
    trainer = _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], eval_dataset=eval_sets)
    assert set(trainer.eval_dataset) == {"a", "b"}
    assert isinstance(trainer.train_dataset, Dataset) and isinstance(trainer.eval_dataset["b"], Dataset)
    assert trainer.eval_dataset["b"][0]["prompt_ids"] != trainer.eval_dataset["a"][0]["prompt_ids"]


def test_compute_metrics_gets_logits_and_input_ids(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    seen = {}

    def compute_metrics(prediction):
        seen["shapes"] = (prediction.predictions.shape, prediction.label_ids.shape)
        return {"my_metric": 0.123}

    trainer = _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], compute_metrics=compute_metrics, per_device_eval_batch_size=3)
    metrics = trainer.evaluate(eval_dataset=pref_data["preference"])
    assert metrics["eval_my_metric"] == 0.123
    (n, t, v), (n_labels, t_labels) = seen["shapes"]
    assert (n, v) == (16, len(tiny_tokenizer)) and (n_labels, t_labels) == (16, t)  # 8 pairs -> 16 sequences
    plain = _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], per_device_eval_batch_size=3)
    assert metrics["eval_loss"] == pytest.approx(plain.evaluate(eval_dataset=pref_data["preference"])["eval_loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------- precompute
def test_precompute_then_evaluate_new_data_before_and_after_training(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    data = pref_data["preference"]
    trainer = _trainer(tiny_tokenizer, tiny_model, tmp_path, data, eval_dataset={"kept": data}, precompute_ref_log_probs=True, max_steps=1, learning_rate=1e-2)
    assert trainer.ref_model is None
    assert trainer.evaluate(eval_dataset=data)["eval_loss"] == pytest.approx(0.693147, abs=1e-4)  # before training: the policy is the reference
    trainer.train()
    assert trainer.evaluate()["eval_kept_loss"] > 0  # stored at construction: still valid
    with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to evaluate"):
        trainer.evaluate(eval_dataset=data)


def test_precompute_with_explicit_reference_scores_new_data_after_training(tiny_tokenizer, policy_and_ref64, pref_data, tmp_path):
    policy, ref = policy_and_ref64  # float64: the batch shapes of precompute and live scoring then cost ~1e-16 only
    data = pref_data["preference"]
    pre = _trainer(tiny_tokenizer, copy.deepcopy(policy), tmp_path, data, ref_model=copy.deepcopy(ref), precompute_ref_log_probs=True, max_steps=1, learning_rate=1e-2)
    live = _trainer(tiny_tokenizer, copy.deepcopy(policy), tmp_path, data, name="live", ref_model=copy.deepcopy(ref), max_steps=1, learning_rate=1e-2)
    pre.train()
    live.train()
    assert_reference_kept_off_the_accelerator(pre)
    # what remains is the float32 storage of the precomputed training log-probs (as TRL's), ~1e-7 relative on the step's
    # gradient, hence on the evaluation after it: 1e-5 has margin
    assert pre.evaluate(eval_dataset=data)["eval_loss"] == pytest.approx(live.evaluate(eval_dataset=data)["eval_loss"], rel=1e-5)


def test_precompute_refuses_an_iterable_dataset(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    stream = pref_data["preference"].to_iterable_dataset()
    with pytest.raises(ValueError, match=r"precompute_ref_log_probs.*not supported with IterableDataset \(eval_dataset\['s'\]\)"):
        _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], eval_dataset={"s": stream}, precompute_ref_log_probs=True)


# ---------------------------------------------------------------------------------------------- data
def test_iterable_dataset_is_materialized_up_to_what_max_steps_needs(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from datasets import Dataset

    stream = pref_data["preference"].to_iterable_dataset()
    trainer = _trainer(tiny_tokenizer, tiny_model, tmp_path, stream, max_steps=1, per_device_train_batch_size=3, eval_dataset=stream)
    assert isinstance(trainer.train_dataset, Dataset) and len(trainer.train_dataset) == 3
    assert len(trainer.eval_dataset) == 8
    trainer.train()


def test_pretokenized_rows_with_stored_reference_log_probs(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    base = _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"])
    rows = [dict(r, ref_chosen_logps=-1.0, ref_rejected_logps=-2.0) for r in base.train_dataset]
    trainer = _trainer(tiny_tokenizer, tiny_model, tmp_path, rows)
    assert trainer.train_dataset[0]["prompt_ids"] == base.train_dataset[0]["prompt_ids"]
    batch = trainer.collate([trainer.train_dataset[i] for i in range(4)])
    assert torch.equal(batch["ref_rejected_logps"], torch.full((4,), -2.0))
    with torch.no_grad():
        _, metrics = loss_on_device(trainer, batch, 4)
        policy = trainer.policy_logps(trainer.model, trainer.loop.to_device(batch))
    # the same log-probs, a different order of two float32 operations: a few ulps (eps32 = 1.2e-7)
    assert metrics["rewards/chosen"].item() == pytest.approx((0.1 * (policy["chosen"] + 1.0)).mean().item(), rel=1e-5)
    with pytest.raises(ConfigError, match=r"row 1, column 'ref_rejected_logps': missing value"):
        _trainer(tiny_tokenizer, tiny_model, tmp_path, [rows[0], {k: v for k, v in rows[1].items() if k != "ref_rejected_logps"} | {"ref_rejected_logps": None}])


def test_tool_call_messages_and_config_tools_reach_the_template(tiny_tokenizer, tiny_model, tmp_path):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = (
        "{% if tools %}TOOLS:{{ tools | map(attribute='name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}CALL:{{ m.tool_calls[0].name }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    user = [{"role": "user", "content": "time?"}]
    row = {"prompt": user, "chosen": [{"role": "assistant", "tool_calls": [{"name": "clock"}]}], "rejected": [{"role": "assistant", "content": "noon"}]}
    with_tools = _trainer(tokenizer, tiny_model, tmp_path, [row], tools=[{"name": "clock"}])
    assert tokenizer.decode(with_tools.train_dataset[0]["prompt_ids"]).startswith("TOOLS:clock\n")
    assert "CALL:clock" in tokenizer.decode(with_tools.train_dataset[0]["chosen_ids"])
    own = _trainer(tokenizer, tiny_model, tmp_path, [dict(row, tools='[{"name": "calendar"}]')], tools=[{"name": "clock"}])
    assert tokenizer.decode(own.train_dataset[0]["prompt_ids"]).startswith("TOOLS:calendar\n")  # the row's own tools win


def test_custom_data_collator_is_used(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    calls = []
    default = _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"])
    rows = [default.train_dataset[i] for i in range(3)]
    batch = default.data_collator(rows)  # TRL's attribute: the collator in use, processed rows -> a batch
    assert torch.equal(batch["input_ids"], default.collate(rows)["input_ids"]) and batch["input_ids"].shape[0] == 6

    def collator(rows):
        calls.append(len(rows))
        return default.collate(rows)

    trainer = _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], data_collator=collator, max_steps=1)
    assert trainer.data_collator(rows)["input_ids"].shape[0] == 6 and calls == [3]  # the attribute routes through the given collator
    trainer.train()
    assert calls[1:] and calls[1] == 4


def test_pad_to_multiple_of_pads_the_batch(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    trainer = _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], pad_to_multiple_of=16)
    batch = trainer.collate([trainer.train_dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[1] == 16 and batch["attention_mask"][:, -1].sum() == 0


def test_use_logits_to_keep_gives_identical_loss_and_metrics(tiny_tokenizer, policy_and_ref64, pref_data, tmp_path):
    policy, ref = policy_and_ref64  # float64: the two forwards have other shapes (summation orders), ~1e-16 apart
    full = make_ours(tiny_tokenizer, policy, tmp_path, pref_data["conversational_preference"], ref=ref, name="full", ld_alpha=0.5, use_weighting=True)
    kept = make_ours(tiny_tokenizer, policy, tmp_path, pref_data["conversational_preference"], ref=ref, name="kept", ld_alpha=0.5, use_weighting=True, use_logits_to_keep=True)
    assert kept._use_logits_to_keep
    batch = full.collate(full.train_dataset)
    assert batch["completion_mask"].int().argmax(1).min() > 5  # the prompts really are skipped
    with torch.no_grad():
        loss_full, m_full = loss_on_device(full, batch, 8)
        loss_kept, m_kept = loss_on_device(kept, batch, 8)
    assert loss_kept.item() == pytest.approx(loss_full.item(), rel=1e-10)
    for key in m_full:  # some metrics are float32 by design (entropy, mean logits): 1e-6 is a few of their ulps
        assert m_kept[key].item() == pytest.approx(m_full[key].item(), rel=1e-6, abs=1e-12), key


def test_rpo_alpha_adds_the_weighted_sft_loss(tiny_tokenizer, policy_and_ref, pref_data, tmp_path):
    policy, ref = policy_and_ref
    data = pref_data["preference"]
    rpo = make_ours(tiny_tokenizer, policy, tmp_path, data, ref=ref, name="rpo", rpo_alpha=0.5)
    listed = make_ours(tiny_tokenizer, policy, tmp_path, data, ref=ref, name="listed", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    plain = make_ours(tiny_tokenizer, policy, tmp_path, data, ref=ref, name="plain")
    batch = rpo.collate(rpo.train_dataset)
    with torch.no_grad():
        losses = [loss_on_device(t, batch, 8)[0].item() for t in (rpo, listed, plain)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and losses[0] > losses[2] + 1.0


def test_existing_peft_model_gets_a_frozen_ref_adapter_equal_to_its_initial_adapter(tiny_tokenizer, policy_and_ref, pref_data, tmp_path):
    from peft import LoraConfig, get_peft_model

    policy, _ = policy_and_ref
    peft_model = get_peft_model(copy.deepcopy(policy), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a "pretrained" adapter: the base model is no longer the initial policy
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    trainer = _trainer(tiny_tokenizer, peft_model, tmp_path, pref_data["preference"])
    assert trainer.ref_model is None and "ref" in trainer.model.peft_config
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".ref." in n)
    trainable_before = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    batch = trainer.collate([trainer.train_dataset[i] for i in range(8)])
    loss, metrics = trainer.compute_loss(trainer.model, batch, 8)
    assert loss.item() == pytest.approx(0.693147, abs=1e-5) and abs(metrics["logps/chosen"].item()) > 0  # reference = initial adapter
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == trainable_before
    assert trainer.model.active_adapter == "default"
    loss.backward()
    assert all(p.grad is not None for n, p in trainer.model.named_parameters() if n in trainable_before)


# ---------------------------------------------------------------------------------------------- MoE auxiliary loss
def _tiny_moe(tokenizer):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
        router_aux_loss_coef=0.01, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_moe_auxiliary_loss_is_added_with_the_config_coefficient(tiny_tokenizer, pref_data, tmp_path):
    model = _tiny_moe(tiny_tokenizer)
    on = _trainer(tiny_tokenizer, copy.deepcopy(model), tmp_path, pref_data["preference"])
    off = _trainer(tiny_tokenizer, copy.deepcopy(model), tmp_path, pref_data["preference"], router_aux_loss_coef=0.0)
    assert (on.aux_loss_enabled, on.router_aux_loss_coef, off.aux_loss_enabled) == (True, 0.01, False)
    batch = on.collate([on.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        loss_on, metrics = loss_on_device(on, batch, 8)  # 4 pairs of a step of 8: half the micro-batch's aux weight
        loss_off, metrics_off = loss_on_device(off, batch, 8)
    assert metrics["aux_loss"].item() > 0 and "aux_loss" not in metrics_off
    # float32 (the experts' grouped GEMM has no float64 kernel), the same forward: a few ulps of a loss of ~0.7 apart
    assert loss_on.item() == pytest.approx(loss_off.item() + 0.01 * metrics["aux_loss"].item() * 4 / 8, rel=1e-6)


def test_router_aux_loss_coef_on_a_dense_model_is_refused(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    with pytest.raises(ConfigError, match=r"router_aux_loss_coef=0.1 but Qwen2ForCausalLM is not a Mixture-of-Experts model"):
        _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], router_aux_loss_coef=0.1)


# ---------------------------------------------------------------------------------------------- new validation errors
@pytest.mark.parametrize(
    "kw, message",
    [
        ({"pad_to_multiple_of": "eight"}, r"pad_to_multiple_of='eight' is invalid"),
        ({"pad_to_multiple_of": 0}, r"pad_to_multiple_of=0 is invalid"),
        ({"rpo_alpha": -1.0}, r"rpo_alpha=-1.0 is invalid"),
        ({"router_aux_loss_coef": -0.5}, r"router_aux_loss_coef=-0.5 is invalid"),
        ({"tools": "[not json"}, r"tools='\[not json' is not valid JSON"),
        ({"tools": {"name": "clock"}}, r"tools is a dict: give a list of tool schemas"),
    ],
)
def test_config_rejects_invalid_new_fields(kw, message):
    from posttrain.methods.dpo import DPOConfig

    with pytest.raises(ConfigError, match=message):
        DPOConfig(output_dir="unused", **kw)


def test_config_warns_for_trls_deprecations():
    from posttrain.methods.dpo import DPOConfig

    with pytest.warns(FutureWarning, match="truncation_mode='keep_end' is deprecated"):
        DPOConfig(output_dir="unused", truncation_mode="keep_end")
    with pytest.warns(FutureWarning, match="pad_token is deprecated"):
        DPOConfig(output_dir="unused", pad_token="<|im_end|>")
    assert DPOConfig(output_dir="unused", pad_to_multiple_of="none").pad_to_multiple_of is None


def test_pad_token_outside_the_vocabulary_is_refused(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    with pytest.raises(ConfigError, match=r"pad_token='<nope>' is not in the vocabulary"), pytest.warns(FutureWarning):
        _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], pad_token="<nope>")


def test_liger_fused_cross_entropy_is_refused(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    with pytest.raises(ConfigError, match=r"fused_linear_cross_entropy.*cannot be used with DPO"):
        _trainer(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": True})


def test_train_dataset_dict_and_image_columns_on_a_text_model_are_refused(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from datasets import DatasetDict

    from posttrain import DataError

    with pytest.raises(ConfigError, match=r"train_dataset is a dict of datasets \['train'\]: pass one dataset"):
        _trainer(tiny_tokenizer, tiny_model, tmp_path, DatasetDict({"train": pref_data["preference"]}))
    rows = [{"prompt": "a =", "chosen": " 1", "rejected": " 2", "images": []}]
    with pytest.raises(DataError, match=r"train_dataset has an image column 'images' \(vision-related data\) but the model .* is text-only"):  # VLMs: test_dpo_vlm.py
        _trainer(tiny_tokenizer, tiny_model, tmp_path, rows)


def test_non_dict_rows_are_refused(tiny_tokenizer, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"train_dataset row 0 is a str, not a dict of columns"):
        _trainer(tiny_tokenizer, tiny_model, tmp_path, ["what is 1 + 1 = 2"])


def test_padding_free_is_accepted_with_the_no_effect_warning():
    from posttrain.methods.dpo import DPOConfig

    with pytest.warns(UserWarning, match=r"accepted but change nothing.*padding_free=True"):
        config = DPOConfig(output_dir="unused", padding_free=True, generate_during_eval=True)
    assert config.padding_free is True
