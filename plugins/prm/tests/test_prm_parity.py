"""PRM parity with TRL 1.13.0's ``trl.experimental.prm`` (the last TRL release with PRMTrainer), from recorded values.

``tests/data/trl_1_13_0_reference.json`` is written by ``plugins/prm/scripts/make_trl_reference.py``
(TRL 1.13 in a throwaway venv, on the same tiny float64 model and rows); no TRL 1.13 is needed here.
For every recorded configuration (default, last step only, truncation, a two-token separator, a BOS
token, left padding): the tokenized train and eval rows and the collated tensors are equal exactly
(integers), and per batch the loss, the step accuracy and the gradients of every parameter (norm,
sum, dot with a portable probe) agree.

Tolerances: the model's weights are bit-identical on every machine (pure-Python generator), and both
sides run the model in float64. TRL's loss is transformers' token-classification loss, which casts
the logits to float32 before the cross-entropy (a downcast from float64); ours keeps float64. The two
losses therefore differ by float32 rounding of the logits (measured: below 1e-7 relative), so the
loss is compared at :data:`REL_LOSS` = 1e-5 and each gradient fingerprint at :data:`REL_GRAD` = 1e-4
of its scale (the gradient norm, or the value itself when larger) -- the project's parity bounds,
about 100x above what float32 rounding can produce.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib

import pytest
import torch

import posttrain

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "data" / "trl_1_13_0_reference.json").read_text())
_spec = importlib.util.spec_from_file_location("prm_make_trl_reference", HERE.parent / "scripts" / "make_trl_reference.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # the generator's rows, configs, portable model and fingerprints (imports no trl)

REL_LOSS = 1e-5
REL_GRAD = 1e-4


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("prm", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.testing.tiny_model import build_tokenizer

    return build_tokenizer()


def _trainer(tokenizer, name, tmp_path):
    from datasets import Dataset

    from posttrain_prm import PRMConfig, PRMTrainer

    spec = gen.CONFIGS[name]
    rows = REFERENCE["rows"]
    args = PRMConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=gen.BATCH, report_to="none", disable_tqdm=True,
                     gradient_checkpointing=False, save_strategy="no", **spec["args"])
    return PRMTrainer(model=gen.portable_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows),
                      processing_class=gen.tokenizer_for(spec, tokenizer))


def test_reference_inputs_are_the_generators(tokenizer):
    assert REFERENCE["rows"] == gen.stepwise_rows()
    assert set(REFERENCE["configs"]) == set(gen.CONFIGS)
    model = gen.portable_model(tokenizer)
    assert model.dtype == torch.float64
    assert math.isclose(gen.weight_fingerprint(model), REFERENCE["weight_sum"], rel_tol=1e-12)


@pytest.mark.parametrize("name", sorted(gen.CONFIGS))
def test_tokenization_loss_and_gradients_match_trl_1_13(tokenizer, name, tmp_path):
    ref = REFERENCE["configs"][name]
    trainer = _trainer(tokenizer, name, tmp_path)
    ours_train = [{k: list(r[k]) for k in ("input_ids", "labels")} for r in trainer.train_dataset]
    ours_eval = [{k: list(r[k]) for k in ("input_ids", "labels")} for r in trainer.eval_dataset]
    assert ours_train == ref["train_rows"]
    assert ours_eval == ref["eval_rows"]  # train_on_last_step_only applies to the training set only
    model = trainer.model
    model.train()
    worst = {"loss": 0.0, "grad": 0.0}
    for index, expected in enumerate(ref["batches"]):
        batch = trainer.collate(ours_train[index * gen.BATCH : (index + 1) * gen.BATCH])
        for key in ("input_ids", "attention_mask", "labels"):
            assert batch[key].tolist() == expected["tensors"][key], (index, key)
        loss, metrics = trainer.compute_loss(model, batch, trainer.count_items(batch))
        loss.backward()
        assert math.isclose(loss.item(), expected["loss"], rel_tol=REL_LOSS), (index, loss.item(), expected["loss"])
        worst["loss"] = max(worst["loss"], abs(loss.item() - expected["loss"]) / abs(expected["loss"]))
        assert metrics["accuracy"].item() == pytest.approx(expected["accuracy"], abs=1e-6)  # a float32 ratio of counts
        got = gen.grad_fingerprints(model)
        for param, (norm, total, dot) in expected["grads"].items():
            g_norm, g_total, g_dot = got[param]
            assert math.isclose(g_norm, norm, rel_tol=REL_GRAD, abs_tol=1e-15), (index, param, "norm", g_norm, norm)
            for what, ours, theirs, scale in (("sum", g_total, total, max(abs(total), norm)), ("dot", g_dot, dot, max(abs(dot), 0.03 * norm))):
                assert abs(ours - theirs) <= REL_GRAD * scale + 1e-15, (index, param, what, ours, theirs)
                worst["grad"] = max(worst["grad"], abs(ours - theirs) / scale if scale else 0.0)
            if norm:
                worst["grad"] = max(worst["grad"], abs(g_norm - norm) / norm)
        model.zero_grad(set_to_none=True)
    print(f"{name}: max relative error vs TRL 1.13: loss {worst['loss']:.2e}, gradients {worst['grad']:.2e}")


@pytest.mark.parametrize("name", sorted(gen.CONFIGS))
def test_static_tokenize_row_matches_trl_1_13(tokenizer, name):
    """``PRMTrainer.tokenize_row`` (TRL 1.13's static signature) on each recorded row gives TRL 1.13's train and eval rows exactly."""
    from posttrain_prm import PRMConfig, PRMTrainer

    spec, ref = gen.CONFIGS[name], REFERENCE["configs"][name]
    args = PRMConfig(output_dir="unused", report_to="none", **spec["args"])
    tok = gen.tokenizer_for(spec, tokenizer)
    for is_eval, expected in ((False, ref["train_rows"]), (True, ref["eval_rows"])):
        got = [PRMTrainer.tokenize_row(row, tok, args.step_separator, args.max_length, args.max_completion_length, args.train_on_last_step_only, is_eval)
               for row in REFERENCE["rows"]]
        assert got == expected, (name, is_eval)
