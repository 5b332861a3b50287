"""One test per validation error and warning of CPOConfig and of CPOTrainer's data checks (each names the field/row/column and the fix)."""

from __future__ import annotations

import pytest

from posttrain import ConfigError


def _config(tmp_path, **kwargs):
    from posttrain_cpo.config import CPOConfig

    return CPOConfig(output_dir=str(tmp_path), **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "kto_pair"}, "loss_type='kto_pair' is invalid: use one of sigmoid, hinge, ipo, simpo, alphapo"),
        ({"beta": 0.0}, "beta=0.0 is invalid: use beta > 0"),
        ({"label_smoothing": 0.7}, "label_smoothing=0.7 is invalid: use a label-flip probability in [0, 0.5]"),
        ({"cpo_alpha": -1.0}, "cpo_alpha=-1.0 is invalid: use a weight >= 0"),
        ({"max_length": 1}, "max_length=1 is invalid: use at least 2 tokens"),
        ({"max_completion_length": 0}, "max_completion_length=0 is invalid: use at least 1 token"),
    ],
    ids=["loss_type", "beta", "label_smoothing", "cpo_alpha", "max_length", "max_completion_length"],
)
def test_config_errors_name_the_field_and_the_fix(kwargs, message, tmp_path):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "alphapo"}, "loss_type='alphapo' with alpha=0.0 is plain SimPO"),
        ({"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing=0.1 has no effect with loss_type='hinge'"),
        ({"generate_during_eval": True}, "generate_during_eval=True has no effect"),
    ],
    ids=["alphapo_without_alpha", "hinge_smoothing", "generate_during_eval"],
)
def test_config_warnings_for_options_without_effect(kwargs, message, tmp_path):
    with pytest.warns(UserWarning, match=message.replace("(", r"\(").replace(")", r"\)")):
        _config(tmp_path, **kwargs)


def test_max_completion_length_warns_for_a_decoder_only_model(tiny_model_dir, tmp_path):
    with pytest.warns(UserWarning, match=r"max_completion_length=64 has no effect for a decoder-only model"):
        _trainer(tiny_model_dir, tmp_path, [GOOD], max_completion_length=64)


def test_alphapo_shorthand_is_simpo_without_nll_as_in_trl(tmp_path):
    args = _config(tmp_path, loss_type="alphapo", alpha=0.25, cpo_alpha=1.0)
    assert (args.loss_type, args.cpo_alpha, args.alpha) == ("simpo", 0.0, 0.25)


def _trainer(tiny_model_dir, tmp_path, rows, **cfg):
    import posttrain

    posttrain.activate("cpo", allow_experimental=True)
    from posttrain.experimental.cpo import CPOConfig, CPOTrainer

    return CPOTrainer(model=tiny_model_dir, args=CPOConfig(output_dir=str(tmp_path), **cfg), train_dataset=rows)


GOOD = {"prompt": "what is 1 + 1 =", "chosen": " 2", "rejected": " 3"}


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "completion": "b", "label": True}], "train_dataset has columns ['completion', 'label', 'prompt'], but CPO needs 'chosen' and 'rejected'"),
        ([GOOD, {**GOOD, "chosen": 3}], "train_dataset row 1, column 'chosen': expected a string (like the row's 'chosen'), got int"),
        ([GOOD, {**GOOD, "rejected": None}], "train_dataset row 1, column 'rejected': missing value"),
        ([GOOD, {**GOOD, "prompt": [{"role": "user", "content": "hi"}]}], "train_dataset row 1, column 'prompt': expected a string"),
        ([], "train_dataset is empty"),
        ([GOOD, "not a row"], "train_dataset row 1 is a str, not a dict of columns"),
        (
            [{"chosen": [{"role": "user", "content": "hi"}], "rejected": [{"role": "user", "content": "hi"}]}],
            "train_dataset row 0: 'chosen' and 'rejected' are identical conversations",
        ),
    ],
    ids=["columns", "type", "missing", "mixed_formats", "empty", "not_a_dict", "identical"],
)
def test_bad_rows_are_named_with_the_fix(rows, message, tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError) as info:
        _trainer(tiny_model_dir, tmp_path, rows)
    assert message in str(info.value)


def test_prompts_longer_than_max_length_drop_pairs_or_fail(tiny_model_dir, tmp_path):
    long = {**GOOD, "prompt": "please think step by step what is the sum " * 4}
    with pytest.warns(UserWarning, match="1 of 2 pairs dropped: their prompt alone fills max_length=12"):
        trainer = _trainer(tiny_model_dir, tmp_path, [GOOD, long], max_length=12)
    assert len(trainer.train_dataset) == 1
    with pytest.raises(ConfigError, match="every prompt of train_dataset has >= max_length=12 tokens"):
        _trainer(tiny_model_dir, tmp_path, [long], max_length=12)


def test_every_trl_cpo_config_field_exists_with_trls_default(tmp_path):
    """Users swap imports: each field TRL 1.16's CPOConfig adds to TrainingArguments is ours too, with the same default."""
    import dataclasses
    import warnings

    from transformers import TrainingArguments

    from posttrain_cpo.config import CPOConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig as TRLCPOConfig
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    ours = {f.name: f for f in dataclasses.fields(CPOConfig)}
    checked = []
    for f in dataclasses.fields(TRLCPOConfig):
        if f.name in base and f.name not in ("learning_rate", "gradient_checkpointing", "logging_steps"):
            continue  # plain TrainingArguments fields: posttrain.TrainingConfig's business
        assert f.name in ours, f"TRL's CPOConfig.{f.name} is missing"
        trl_default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        our_default = ours[f.name].default_factory() if ours[f.name].default_factory is not dataclasses.MISSING else ours[f.name].default
        assert our_default == trl_default, f"{f.name}: ours {our_default!r} != TRL {trl_default!r}"
        checked.append(f.name)
    assert {"beta", "loss_type", "cpo_alpha", "simpo_gamma", "alpha", "label_smoothing", "max_length"} <= set(checked)
