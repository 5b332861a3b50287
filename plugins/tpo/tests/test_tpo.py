"""TPO / TPO-L: parity with TRL 1.16's ``trl.experimental.tpo`` (collated batch, loss, gradients, metrics) for every
loss_type and option, an unbatched naive computation of the paper's objectives, data formats, bad input, gradient
accumulation, exact resume with the gold rows, learning on held-out prompts, and examples/tpo.yaml through the CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import posttrain
from posttrain.testing import make_tiny_datasets, warning_events

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("tpo", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def policy(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=0)


@pytest.fixture(scope="module")
def policy64(policy):
    """The policy in float64, for tests comparing two computations of the same quantity (ours vs TRL's, batched vs naive,
    accumulated vs not): they then differ by summation order only (~1e-16 relative per operation), so :data:`REL` holds on
    any machine and thread count."""
    return copy.deepcopy(policy).to(torch.float64)


REL = 1e-9  # float64 paths; measured differences are below 1e-13 (see policy64)


def triples(n=8, fmt="preference", seed=0):
    """Rows with a gold 'reference' that differs from 'chosen' (so the NLL term is visible)."""
    data = make_tiny_datasets(n, seed=seed)[fmt]
    if fmt == "preference":
        return data.map(lambda r: {"reference": r["chosen"] + " exactly", "chosen": " about" + r["chosen"]})
    return data.map(lambda r: {"reference": [{"role": "assistant", "content": r["chosen"][0]["content"] + " exactly"}]})


def _ours(tokenizer, model, tmp_path, dataset, **cfg):
    from posttrain_tpo import TPOConfig, TPOTrainer

    cfg = {"per_device_train_batch_size": 8, "report_to": "none", "disable_tqdm": True, "gradient_checkpointing": False, "save_strategy": "no", **cfg}
    return TPOTrainer(model=copy.deepcopy(model), args=TPOConfig(output_dir=str(tmp_path / "ours"), **cfg), train_dataset=dataset, processing_class=tokenizer)


def _trl(tokenizer, model, tmp_path, dataset, **cfg):
    from trl.experimental.tpo import TPOConfig, TPOTrainer

    cfg = {"per_device_train_batch_size": 8, **cfg}
    args = TPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, report_to="none", gradient_checkpointing=False, use_cpu=True, disable_tqdm=True, **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tokenizer)


def _both(tokenizer, model, tmp_path, dataset, **cfg):
    theirs, ours = _trl(tokenizer, model, tmp_path, dataset, **cfg), _ours(tokenizer, model, tmp_path, dataset, **cfg)
    their_batch = theirs.data_collator([theirs.train_dataset[i] for i in range(len(theirs.train_dataset))])
    our_batch = ours.collate(ours.train_dataset)
    for key in ("input_ids", "attention_mask", "completion_mask"):  # the same numbers go into both losses
        assert torch.equal(our_batch[key], their_batch[key]), key
    for column in ("prompt_ids", "chosen_ids", "rejected_ids", "reference_ids"):  # TRL's processed columns, equal
        if column in ours.train_dataset.column_names:
            assert ours.train_dataset[column] == theirs.train_dataset[column], column
    return theirs, their_batch, ours, our_batch


CASES = {
    "sigmoid": {},
    "sigmoid-smoothing-alpha0.5": {"label_smoothing": 0.2, "tpo_alpha": 0.5, "beta": 0.5},
    "sigmoid-no-nll": {"tpo_alpha": 0.0, "beta": 1.0},
    "hinge": {"loss_type": "hinge", "beta": 2.0},
    "ipo": {"loss_type": "ipo", "beta": 0.5},
    "tpo-l": {"loss_type": "tpo-l", "beta": 2.0, "tpo_l_gamma": 0.3},
    "tpo-l-smoothing-no-nll": {"loss_type": "tpo-l", "beta": 1.0, "label_smoothing": 0.1, "tpo_alpha": 0.0},
}


@pytest.mark.parametrize("case", CASES)
def test_loss_gradients_and_metrics_match_trl(case, tiny_tokenizer, policy64, tmp_path):
    theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, policy64, tmp_path, triples(), **CASES[case])
    theirs.model.train()
    their_loss = theirs.compute_loss(theirs.model, their_batch)
    their_loss.backward()
    our_loss, our_metrics = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))
    our_loss.backward()
    print(f"{case}: ours={our_loss.item():.12f} trl={their_loss.item():.12f}")
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=REL)
    worst = 0.0
    for (name, a), (_, b) in zip(theirs.model.named_parameters(), ours.model.named_parameters()):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), name
            continue
        worst = max(worst, (a.grad - b.grad).abs().max().item() / max(a.grad.abs().max().item(), 1e-300))  # relative to the largest entry
    print(f"{case}: worst relative gradient difference {worst:.2e}")
    assert worst < REL
    their_metrics = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    assert set(our_metrics) | {"num_tokens"} == set(their_metrics), set(our_metrics) ^ set(their_metrics)
    for key, value in our_metrics.items():  # abs: metrics near zero (margins, mean logits) relative to their inputs' scale ~1-10
        assert value.item() == pytest.approx(their_metrics[key], rel=REL, abs=REL), key
    assert our_batch["num_tokens"] == their_metrics["num_tokens"]  # the loop logs the running sum


@pytest.mark.parametrize(
    "case",
    [
        {"fmt": "conversational_preference", "cfg": {"loss_type": "tpo-l", "beta": 2.0}},
        {"fmt": "conversational_preference", "implicit": True, "cfg": {}},
        {"fmt": "preference", "implicit": True, "cfg": {"max_length": 10}},
        {"fmt": "preference", "cfg": {"max_length": 9, "truncation_mode": "keep_end", "pad_to_multiple_of": 8, "loss_type": "ipo"}},
    ],
    ids=["conversational", "conversational-implicit", "implicit-truncated", "keep_end-pad8"],
)
def test_formats_and_truncation_match_trl(case, tiny_tokenizer, policy64, tmp_path):
    data = triples(fmt=case["fmt"])
    if case.get("implicit"):
        data = data.map(lambda r: {k: r["prompt"] + r[k] for k in ("chosen", "rejected", "reference")}).remove_columns("prompt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # keep_end is deprecated in TRL
        theirs, their_batch, ours, our_batch = _both(tiny_tokenizer, policy64, tmp_path, data, **case["cfg"])
    with torch.no_grad():
        their_loss = theirs.compute_loss(theirs.model, their_batch)
        our_loss = ours.compute_loss(ours.model, our_batch, ours.count_items(our_batch))[0]
    assert our_loss.item() == pytest.approx(their_loss.item(), rel=REL)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "tpo-l"])
def test_objective_equals_a_naive_per_row_computation_of_the_paper(loss_type, tiny_tokenizer, policy64, tmp_path):
    """Each response scored alone (no padding, no batching), the formulas written out as in arXiv:2405.16681 (TPO Eq.,
    TPO-L: -log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)), IPO's Eq. 17 and SLiC's hinge (float64 model)."""
    beta, gamma, alpha = 0.7, 0.4, 0.6
    trainer = _ours(tiny_tokenizer, policy64, tmp_path, triples(), loss_type=loss_type, beta=beta, tpo_l_gamma=gamma, tpo_alpha=alpha)
    model = trainer.model.eval()

    def score(prompt_ids, response_ids):  # (sum of log-probs, number of tokens, sum of NLL)
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        picked = logp[len(prompt_ids) - 1 :, :].gather(-1, ids[0, len(prompt_ids) :, None]).squeeze(-1)
        return picked.sum().item(), len(response_ids)

    pref, gold_nll, gold_tokens = [], 0.0, 0
    for row in trainer.train_dataset:
        (sw, nw), (sl, nl), (sg, ng) = (score(row["prompt_ids"], row[f"{k}_ids"]) for k in ("chosen", "rejected", "reference"))
        if loss_type == "sigmoid":
            pref.append(-math.log(1 / (1 + math.exp(-beta * (sw - sl)))))
        elif loss_type == "hinge":
            pref.append(max(0.0, 1 - beta * (sw - sl)))
        elif loss_type == "ipo":
            pref.append((sw / nw - sl / nl - 1 / (2 * beta)) ** 2)
        else:
            pref.append(-math.log(1 / (1 + math.exp(-(beta / nw * sw - beta / nl * sl - gamma)))))
        gold_nll, gold_tokens = gold_nll - sg, gold_tokens + ng
    expected = sum(pref) / len(pref) + alpha * gold_nll / gold_tokens
    with torch.no_grad():
        batch = trainer.collate(trainer.train_dataset)
        got = trainer.compute_loss(model, batch, trainer.count_items(batch))[0].item()
    assert got == pytest.approx(expected, rel=REL)


def test_bad_input_names_the_row_and_the_fix(tiny_tokenizer, policy, tmp_path):
    good = {"prompt": "what is 1 + 1 =", "chosen": " 2", "rejected": " 3", "reference": " 2 exactly"}
    with pytest.raises(posttrain.ConfigError, match=r"train_dataset row 1, column 'chosen': expected a string"):
        _ours(tiny_tokenizer, policy, tmp_path, [good, {**good, "chosen": 4}])
    with pytest.raises(posttrain.ConfigError, match=r"row 1: column 'reference' is missing .*set tpo_alpha=0.0"):
        _ours(tiny_tokenizer, policy, tmp_path, [good, {k: v for k, v in good.items() if k != "reference"}])
    with pytest.raises(posttrain.ConfigError, match=r"row 0: column 'rejected' is missing .* belong to the 'kto' method"):
        _ours(tiny_tokenizer, policy, tmp_path, [{"prompt": "a", "completion": "b", "label": True, "chosen": "b"}])
    with pytest.raises(posttrain.ConfigError, match=r"row 0, column 'reference': it does not start with the implicit prompt"):
        _ours(tiny_tokenizer, policy, tmp_path, [{"chosen": "Q: a", "rejected": "Q: b", "reference": "R: c"}])
    with pytest.raises(posttrain.ConfigError, match=r"row 0, column 'reference': expected a list of \{'role', 'content'\} messages"):
        _ours(tiny_tokenizer, policy, tmp_path, triples(2, "conversational_preference").map(lambda r: {"reference": "text"}))
    with pytest.raises(posttrain.ConfigError, match="loss_type='dpo' is invalid"):
        _ours(tiny_tokenizer, policy, tmp_path, [good], loss_type="dpo")
    with pytest.raises(posttrain.ConfigError, match="tpo_alpha=-1 is invalid"):
        _ours(tiny_tokenizer, policy, tmp_path, [good], tpo_alpha=-1)
    with pytest.warns(UserWarning, match="does not support label smoothing"):
        _ours(tiny_tokenizer, policy, tmp_path, [good], loss_type="hinge", label_smoothing=0.1)
    # without gold responses, tpo_alpha=0 trains the preference term alone (the gold rows are not built)
    trainer = _ours(tiny_tokenizer, policy, tmp_path, [{k: v for k, v in good.items() if k != "reference"}], tpo_alpha=0.0)
    assert trainer.collate(trainer.train_dataset)["input_ids"].shape[0] == 2


def _train(tokenizer, model, tmp_path, rows, bs, ga, **cfg):
    trainer = _ours(tokenizer, model, tmp_path, rows, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
                    learning_rate=1.0, optim="sgd", max_grad_norm=0.0, seed=0, **cfg)
    trainer.train()
    return [p.detach().clone() for p in trainer.model.parameters()]


def test_gradient_accumulation(tiny_tokenizer, policy64, tmp_path):
    """8 x 1 == 1 x 8 for the per-pair preference losses (any lengths); the gold NLL is a micro-batch token mean (as TRL),
    so with it 8 x 1 == 1 x 8 holds when every gold response has the same number of tokens, and not otherwise.
    Float64 model and one SGD step of lr 1: the weights move by the gradient, whose two computations agree to ~1e-15."""
    rows = triples(8).to_list()

    def worst(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    for loss_type in ("sigmoid", "tpo-l"):
        big = _train(tiny_tokenizer, policy64, tmp_path / f"{loss_type}big", rows, 8, 1, loss_type=loss_type, beta=1.0, tpo_alpha=0.0)
        acc = _train(tiny_tokenizer, policy64, tmp_path / f"{loss_type}acc", rows, 1, 8, loss_type=loss_type, beta=1.0, tpo_alpha=0.0)
        assert worst(big, acc) < REL, loss_type
    equal = [{**r, "reference": f" {i + 1}"} for i, r in enumerate(rows)]  # every gold response: one token + EOS
    lengths = {len(ids) for ids in _ours(tiny_tokenizer, policy64, tmp_path / "len", equal).train_dataset["reference_ids"]}
    assert lengths == {2}, lengths
    assert worst(_train(tiny_tokenizer, policy64, tmp_path / "eb", equal, 8, 1, beta=1.0), _train(tiny_tokenizer, policy64, tmp_path / "ea", equal, 1, 8, beta=1.0)) < REL
    unequal = [{**r, "reference": " 1" * (1 + i)} for i, r in enumerate(rows)]
    assert worst(_train(tiny_tokenizer, policy64, tmp_path / "ub", unequal, 8, 1, beta=1.0), _train(tiny_tokenizer, policy64, tmp_path / "ua", unequal, 1, 8, beta=1.0)) > 1e-4


def test_resume_with_gold_rows_is_exact(tiny_tokenizer, policy, tmp_path):
    cfg = {"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "save_strategy": "steps", "save_steps": 2, "seed": 0, "loss_type": "tpo-l"}
    full = _ours(tiny_tokenizer, policy, tmp_path / "full", triples(8), **cfg)
    full.train()
    resumed = _ours(tiny_tokenizer, policy, tmp_path / "resumed", triples(8), **cfg)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "ours" / "checkpoint-2"))
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


def test_learns_on_heldout_prompts(tiny_tokenizer, tmp_path):
    """Held-out TPO objective (preference loss + gold NLL) and preference accuracy on unseen prompts (before/after printed)."""
    from posttrain.testing.tiny_model import build_model

    words = ["cat", "dog", "tree", "blue", "house", "river", "green", "stone"]
    data = triples(48, seed=1)
    data = data.map(lambda r, i: {"rejected": " " + words[i % 8]}, with_indices=True)
    trainer = _ours(tiny_tokenizer, build_model(tiny_tokenizer, seed=3), tmp_path, data.select(range(40)), max_steps=40, learning_rate=1e-2,
                    logging_steps=10, beta=0.5)
    heldout = trainer.process_dataset(data.select(range(40, 48)), "heldout")

    def score():
        with torch.no_grad():
            loss, m = trainer.compute_loss(trainer.model, trainer.collate(heldout), len(heldout))
        return loss.item(), m["rewards/accuracies"].item()

    loss_before, acc_before = score()
    trainer.train()
    loss_after, acc_after = score()
    print(f"held-out TPO loss {loss_before:.3f} -> {loss_after:.3f}, accuracy {acc_before:.2f} -> {acc_after:.2f}")
    assert loss_after < 0.5 * loss_before and acc_after == 1.0
    assert warning_events(trainer.args.output_dir) == []  # a healthy run raises no false alarm


def test_example_yaml_trains_through_the_cli(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.cli import main

    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    code = main(["train", "tpo", "--config", "examples/tpo.yaml", "--allow-experimental", "tpo", "--model_name_or_path", tiny_model_dir,
                 "--output_dir", str(out), "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--preset", "tpo_l",
                 "--learning_rate", "1e-3"])
    assert code == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r][:2] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_nll_is_cross_entropy_on_gold_tokens_only(tiny_tokenizer, policy64, tmp_path):
    """The loss moves by delta_alpha * NLL when tpo_alpha changes, NLL being F.cross_entropy over the gold response tokens only
    (TRL's definition). Float64: the difference of two losses of ~10 cancels, and the tolerance is relative to those losses."""
    trainer = _ours(tiny_tokenizer, policy64, tmp_path, triples(), loss_type="ipo", beta=0.5, tpo_alpha=1.0)
    batch = trainer.collate(trainer.train_dataset)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    gold = slice(16, 24)
    mask = batch["completion_mask"][gold, 1:].bool()
    nll = F.cross_entropy(logits[gold][mask], batch["input_ids"][gold, 1:][mask])
    with_nll = trainer.compute_loss(trainer.model, batch, 8)[0]
    trainer.args.tpo_alpha = 0.5
    half = trainer.compute_loss(trainer.model, batch, 8)[0]
    assert (with_nll - half).item() == pytest.approx(0.5 * nll.item(), abs=REL * with_nll.item())


def test_evaluate_reports_trl_metric_names(tiny_tokenizer, policy, tmp_path):
    from posttrain_tpo import TPOConfig, TPOTrainer

    args = TPOConfig(output_dir=str(tmp_path), report_to="none", disable_tqdm=True, gradient_checkpointing=False, save_strategy="no", per_device_eval_batch_size=4)
    trainer = TPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=triples(4), eval_dataset={"a": triples(4, seed=2)}, processing_class=tiny_tokenizer)
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_a_loss"]) and "eval_a_rewards/margins" in metrics and "eval_a_entropy" in metrics, sorted(metrics)
    assert trainer.evaluate(eval_dataset=triples(4, seed=3))["eval_loss"] > 0


def test_iterable_and_list_inputs_give_the_same_rows(tiny_tokenizer, policy, tmp_path):
    data = triples(4)
    rows = _ours(tiny_tokenizer, policy, tmp_path, data).train_dataset.to_list()
    assert _ours(tiny_tokenizer, policy, tmp_path, data.to_iterable_dataset()).train_dataset.to_list() == rows
    assert _ours(tiny_tokenizer, policy, tmp_path, data.to_list()).train_dataset.to_list() == rows


# ---------------------------------------------------------------------------- TRL users' expectations
def test_the_default_collator_is_the_trainers_data_collator(tiny_tokenizer, policy, tmp_path):
    """trainer.data_collator is the collator in use (TRL: DataCollatorForTriplePreference, without the gold rows when tpo_alpha=0),
    trainer.train_dataset a datasets.Dataset of TRL's columns; TRL's test_train_without_nll collates two of its rows."""
    from posttrain_tpo.trainer import DataCollatorForTriplePreference

    trainer = _ours(tiny_tokenizer, policy, tmp_path, triples(4), tpo_alpha=0.0, max_length=9, pad_to_multiple_of=4)
    collator = trainer.data_collator
    assert isinstance(collator, DataCollatorForTriplePreference) and collator.include_reference is False
    assert (collator.max_length, collator.truncation_mode, collator.pad_to_multiple_of, collator.pad_token_id) == (9, "keep_start", 4, tiny_tokenizer.pad_token_id)
    assert trainer.train_dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    batch = trainer.data_collator(list(trainer.train_dataset.select(range(2))))
    assert batch["input_ids"].shape == (4, 12)  # 2 branches x 2 rows; 9 tokens at most, padded to a multiple of 4
    assert _ours(tiny_tokenizer, policy, tmp_path, triples(4)).data_collator.include_reference is True


def test_compute_metrics_gets_logits_and_input_ids_at_evaluation(tiny_tokenizer, policy, tmp_path):
    """compute_metrics (refused before 0.3.0) receives TRL 1.16's EvalPrediction: the logits of every collated row and its
    input_ids as labels (-100 padded across batches); its results are logged with the eval_ prefix."""
    from posttrain_tpo import TPOConfig, TPOTrainer

    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"test": 0.0}

    args = TPOConfig(output_dir=str(tmp_path / "eval"), report_to="none", disable_tqdm=True, gradient_checkpointing=False, save_strategy="no",
                     per_device_eval_batch_size=2)
    trainer = TPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=triples(4), eval_dataset=triples(4, seed=2),
                         processing_class=tiny_tokenizer, compute_metrics=compute_metrics)
    plain = TPOTrainer(model=copy.deepcopy(policy), args=TPOConfig(**{**args.to_dict(), "output_dir": str(tmp_path / "plain")}),
                       train_dataset=triples(4), eval_dataset=triples(4, seed=2), processing_class=tiny_tokenizer)
    metrics, reference = trainer.evaluate(), plain.evaluate()
    assert metrics["eval_test"] == 0.0
    for key, value in reference.items():  # the loop's own evaluation: the same item-weighted means (same batches, same ops)
        if key.startswith("eval_") and "runtime" not in key and "per_second" not in key:
            assert metrics[key] == pytest.approx(value, rel=1e-6), key
    logits, labels = seen[-1].predictions, seen[-1].label_ids
    assert logits.shape[0] == labels.shape[0] == 12 and logits.shape[-1] == len(tiny_tokenizer)  # 2 batches x 3 branches x 2 rows
    first = trainer.collate(trainer.eval_dataset.select(range(2)))
    width = first["input_ids"].shape[1]
    assert labels[:6, :width].tolist() == first["input_ids"].tolist() and (labels[:6, width:] == -100).all()


def test_what_trl_refuses_is_refused(tiny_tokenizer, policy, tmp_path):
    """An encoder-decoder model (TRL 1.16's TPO trains causal LMs only) and a PeftModel with peft_config."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5Config, T5ForConditionalGeneration

    from posttrain_tpo import TPOConfig, TPOTrainer

    args = TPOConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tiny_tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2))
    with pytest.raises(posttrain.ConfigError, match="^T5ForConditionalGeneration is an encoder-decoder model; posttrain's TPO trains decoder-only"):
        TPOTrainer(model=t5, args=args, train_dataset=triples(2), processing_class=tiny_tokenizer)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    with pytest.raises(posttrain.ConfigError, match="already a PeftModel and peft_config is given"):
        TPOTrainer(model=get_peft_model(copy.deepcopy(policy), lora), args=args, train_dataset=triples(2), processing_class=tiny_tokenizer, peft_config=lora)
