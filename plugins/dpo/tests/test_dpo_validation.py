"""One test per validation error, and implicit-prompt extraction."""

from __future__ import annotations

import pytest

from dpo_helpers import make_ours
from posttrain import ConfigError


def _config(**kw):
    from posttrain.methods.dpo import DPOConfig

    return DPOConfig(output_dir="unused", **kw)


def test_config_rejects_unknown_loss_type():
    with pytest.raises(ConfigError, match=r"loss_type=\['sigmod'\] has unknown type\(s\) \['sigmod'\].*sigmoid"):
        _config(loss_type=["sigmod"])


def test_config_accepts_a_single_loss_type_string():
    assert _config(loss_type="ipo").loss_type == ["ipo"]


def test_config_rejects_loss_weights_of_the_wrong_length():
    with pytest.raises(ConfigError, match=r"loss_weights=\[0.8, 0.2\] has 2 weights for 3 loss types"):
        _config(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2])


def test_config_rejects_non_positive_beta():
    with pytest.raises(ConfigError, match=r"beta=0.0 is invalid"):
        _config(beta=0.0)


def test_config_rejects_exo_without_label_smoothing():
    with pytest.raises(ConfigError, match=r"label_smoothing=0.0 is invalid for loss_type 'exo_pair'.*1e-3"):
        _config(loss_type=["exo_pair"])


def test_config_rejects_robust_flip_rate_of_one_half_or_more():
    with pytest.raises(ConfigError, match=r"label_smoothing=0.5 is invalid for loss_type 'robust'"):
        _config(loss_type=["robust"], label_smoothing=0.5)


def test_config_rejects_f_divergence_with_a_loss_it_does_not_generalize():
    with pytest.raises(ConfigError, match=r"f_divergence_type='forward_kl' does not apply to loss_type \['bco_pair'\]"):
        _config(loss_type=["sigmoid", "bco_pair"], f_divergence_type="forward_kl")


def test_config_rejects_unknown_f_divergence():
    with pytest.raises(ConfigError, match=r"f_divergence_type='kl' is invalid"):
        _config(f_divergence_type="kl")


def test_config_rejects_wpo_weighting_with_aot():
    with pytest.raises(ConfigError, match=r"use_weighting=True cannot be combined with loss_type 'aot'"):
        _config(loss_type=["aot"], use_weighting=True)


def test_config_rejects_ld_alpha_outside_unit_interval():
    with pytest.raises(ConfigError, match=r"ld_alpha=1.5 is invalid"):
        _config(ld_alpha=1.5)


def test_config_rejects_unknown_truncation_mode():
    with pytest.raises(ConfigError, match=r"truncation_mode='left' is invalid"):
        _config(truncation_mode="left")


def test_config_rejects_sync_ref_model_with_precomputed_reference():
    with pytest.raises(ConfigError, match=r"sync_ref_model=True and precompute_ref_log_probs=True conflict"):
        _config(sync_ref_model=True, precompute_ref_log_probs=True)


def test_config_rejects_mixup_alpha_outside_range():
    with pytest.raises(ConfigError, match=r"ref_model_mixup_alpha=0.0 is invalid"):
        _config(ref_model_mixup_alpha=0.0)


def test_config_warns_when_label_smoothing_has_no_effect():
    with pytest.warns(UserWarning, match=r"label_smoothing=0.1 has no effect with loss_type=\['sigmoid'\]"):
        _config(label_smoothing=0.1)


def test_trainer_rejects_missing_columns_listing_found_ones(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    with pytest.raises(ConfigError, match=r"has columns \['completion', 'label', 'prompt'\].*needs 'chosen' and 'rejected'.*accepted formats.*'kto'"):
        make_ours(tiny_tokenizer, tiny_model, tmp_path, pref_data["unpaired_preference"])


def test_trainer_rejects_non_string_value_naming_row_and_column(tiny_tokenizer, tiny_model, tmp_path):
    rows = [{"prompt": "a =", "chosen": " 1", "rejected": " 2"}, {"prompt": "b =", "chosen": " 1", "rejected": 2}]
    with pytest.raises(ConfigError, match=r"train_dataset row 1, column 'rejected': expected a string.*got int"):
        make_ours(tiny_tokenizer, tiny_model, tmp_path, rows)


def test_trainer_rejects_mixed_conversational_and_text_columns(tiny_tokenizer, tiny_model, tmp_path):
    rows = [{"prompt": "hi", "chosen": [{"role": "assistant", "content": "1"}], "rejected": [{"role": "assistant", "content": "2"}]}]
    with pytest.raises(ConfigError, match=r"row 0, column 'prompt': expected a list of \{'role', 'content'\} messages"):
        make_ours(tiny_tokenizer, tiny_model, tmp_path, rows)


def test_trainer_rejects_missing_value(tiny_tokenizer, tiny_model, tmp_path):
    rows = [{"prompt": "a =", "chosen": None, "rejected": " 2"}]
    with pytest.raises(ConfigError, match=r"row 0, column 'chosen': missing value"):
        make_ours(tiny_tokenizer, tiny_model, tmp_path, rows)


def test_trainer_rejects_empty_dataset(tiny_tokenizer, tiny_model, tmp_path):
    with pytest.raises(ConfigError, match=r"train_dataset is empty"):
        make_ours(tiny_tokenizer, tiny_model, tmp_path, [])


def test_trainer_rejects_dataset_fully_truncated(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    with pytest.raises(ConfigError, match=r"every prompt of train_dataset has >= max_length=3 tokens"):
        make_ours(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], max_length=3)


def test_trainer_rejects_ref_model_that_is_the_policy(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from posttrain.methods.dpo import DPOConfig, DPOTrainer

    with pytest.raises(ConfigError, match=r"model and ref_model are the same object"):
        DPOTrainer(model=tiny_model, ref_model=tiny_model, args=DPOConfig(output_dir=str(tmp_path)), train_dataset=pref_data["preference"], processing_class=tiny_tokenizer)


def test_trainer_rejects_sync_ref_model_with_peft_reference(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    from peft import LoraConfig

    with pytest.raises(ConfigError, match=r"sync_ref_model=True needs a separate reference model"):
        make_ours(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], peft_config=LoraConfig(r=2, target_modules=["q_proj"]), sync_ref_model=True)


def test_extract_prompt_on_text_keeps_the_space_with_the_completion():
    from posttrain_dpo.trainer import extract_prompt

    assert extract_prompt("what is 2 + 2 = 4", "what is 2 + 2 = 5") == ("what is 2 + 2 =", " 4", " 5")


def test_extract_prompt_on_conversations_splits_at_the_first_different_message():
    from posttrain_dpo.trainer import extract_prompt

    user = {"role": "user", "content": "sky?"}
    chosen = [user, {"role": "assistant", "content": "blue"}]
    rejected = [user, {"role": "assistant", "content": "green"}]
    assert extract_prompt(chosen, rejected) == ([user], chosen[1:], rejected[1:])


def test_implicit_prompt_dataset_gives_the_explicit_prompt_batch(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    import torch

    explicit = pref_data["conversational_preference"]
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in explicit]
    a = make_ours(tiny_tokenizer, tiny_model, tmp_path, explicit, name="a")
    b = make_ours(tiny_tokenizer, tiny_model, tmp_path, implicit, name="b")
    batch_a, batch_b = a.collate(a.train_dataset), b.collate(b.train_dataset)
    assert torch.equal(batch_a["input_ids"], batch_b["input_ids"]) and torch.equal(batch_a["completion_mask"], batch_b["completion_mask"])


def test_conversational_prompt_ends_with_the_generation_prompt(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    trainer = make_ours(tiny_tokenizer, tiny_model, tmp_path, pref_data["conversational_preference"])
    row = trainer.train_dataset[0]
    assert tiny_tokenizer.decode(row["prompt_ids"]).endswith("<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(row["chosen_ids"]).endswith("<|im_end|>\n")


def test_every_preset_builds_a_valid_config():
    from posttrain_dpo._spec import SPEC

    assert len(SPEC.presets) == 20  # 19 paper variants + bema_ref (2.1.0)
    for name, preset in SPEC.presets.items():
        assert preset.paper and "arXiv" in preset.paper, name
        _config(**preset.overrides)


def test_precomputed_reference_missing_from_a_batch_raises(tiny_tokenizer, tiny_model, pref_data, tmp_path):
    trainer = make_ours(tiny_tokenizer, tiny_model, tmp_path, pref_data["preference"], precompute_ref_log_probs=True)
    rows = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in trainer.train_dataset]
    with pytest.raises(ConfigError, match=r"no precomputed reference log-probs"):
        trainer.compute_loss(trainer.model, trainer.collate(rows), len(rows))
