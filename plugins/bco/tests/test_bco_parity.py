"""BCO parity with TRL 1.13.0's ``trl.experimental.bco`` (the last TRL release with BCO), from recorded values.

``tests/data/trl_1_13_0_reference.json`` is written by ``plugins/bco/scripts/make_trl_reference.py``
(TRL 1.13 in a throwaway venv, on the same tiny models and rows); no TRL 1.13 is needed here. For
every recorded configuration and two consecutive batches (the running delta of batch 2 depends on
batch 1): the collated tokens, the loss (rel 1e-5), the metrics, the running moments and the
gradients of every parameter (norm, sum, dot with a seeded probe: rel 1e-4) agree.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import warnings

import pytest
import torch

import posttrain

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "data" / "trl_1_13_0_reference.json").read_text())
_spec = importlib.util.spec_from_file_location("make_trl_reference", HERE.parent / "scripts" / "make_trl_reference.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # the generator's rows, configs, embedding function and fingerprints (imports no trl)


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("bco", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def models():
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    return tokenizer, build_model(tokenizer, seed=gen.SEED_POLICY), build_model(tokenizer, seed=gen.SEED_REF)


def test_reference_file_is_current(models):
    """A stale reference fails loudly: same versions of what produced it, the same configs and inputs as the generator."""
    assert REFERENCE["versions"]["trl"] == "1.13.0"
    assert REFERENCE["versions"]["sklearn"] == gen.PINS[1].split("==")[1]
    assert REFERENCE["versions"]["torch"] == torch.__version__, "regenerate with plugins/bco/scripts/make_trl_reference.py (torch changed)"
    assert sorted(REFERENCE["configs"]) == sorted(gen.CONFIGS)
    for name, record in REFERENCE["configs"].items():
        assert record["spec"] == gen.CONFIGS[name], name
        assert record["rows"] == gen.ROWS[gen.CONFIGS[name]["rows"]](), name
    _, policy, _ = models
    assert float(sum(p.double().sum() for p in policy.parameters())) == pytest.approx(REFERENCE["policy_weight_sum"], rel=1e-12)


def _ours(name, models, tmp_path):
    from posttrain_bco import BCOConfig, BCOTrainer

    tokenizer, policy, ref = models
    spec = gen.CONFIGS[name]
    args = BCOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=gen.BATCH, per_device_eval_batch_size=gen.BATCH, report_to="none",
                     disable_tqdm=True, gradient_checkpointing=False, save_strategy="no", **spec["args"])
    kwargs = {}
    if spec["udm"]:
        kwargs = {"embedding_func": gen.make_embedding_func(gen.embedding_matrix(tokenizer)), "embedding_tokenizer": tokenizer}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BCOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref) if spec["ref_model"] else None, args=args,
                          train_dataset=gen.ROWS[spec["rows"]](), processing_class=gen.tokenizer_for(spec, tokenizer), **kwargs)


def _close(ours: float, theirs: float, rel: float, what: str, abs_: float = 0.0) -> None:
    assert ours == pytest.approx(theirs, rel=rel, abs=abs_), f"{what}: ours {ours!r} vs TRL 1.13 {theirs!r}"


@pytest.mark.parametrize("name", sorted(set(gen.CONFIGS) - {"prompt_over_budget"}))
def test_loss_metrics_moments_and_gradients_match_trl_1_13(name, models, tmp_path):
    record = REFERENCE["configs"][name]
    trainer = _ours(name, models, tmp_path)
    if gen.CONFIGS[name]["udm"]:  # the classifier TRL fitted (scikit-learn, tol 1e-4): the loss path is compared exactly
        trainer.set_classifier(torch.tensor(record["clf_coef"][0], dtype=torch.float64), torch.tensor(record["clf_intercept"][0], dtype=torch.float64))
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(rows) == 16
    worst = 0.0
    for b, theirs in enumerate(record["batches"]):
        batch = trainer.collate(rows[b * gen.BATCH : (b + 1) * gen.BATCH])
        t = theirs["tensors"]
        assert batch["input_ids"].tolist() == t["completion_input_ids"], f"batch {b}: input_ids"
        assert batch["attention_mask"].tolist() == t["completion_attention_mask"], f"batch {b}: attention_mask"
        assert torch.where(batch["completion_mask"].bool(), batch["input_ids"], -100).tolist() == t["completion_labels"], f"batch {b}: labels"
        assert batch["label"].tolist() == theirs["label"]
        if "embedding_input_ids" in t:
            assert batch["embedding_input_ids"].tolist() == t["embedding_input_ids"]
        if "reference_logps" in theirs:
            assert batch["ref_logps"].tolist() == pytest.approx(theirs["reference_logps"], rel=1e-5, abs=1e-6)
        trainer.model.train()
        loss, metrics = trainer.compute_loss(trainer.model, batch, trainer.count_items(batch))
        loss.backward()
        _close(loss.item(), theirs["loss"], 1e-5, f"{name} batch {b} loss")
        for key in ("mean", "var", "std", "count"):
            _close(trainer.running.state_dict()[key], theirs["running"][key], 1e-5, f"{name} batch {b} running {key}", abs_=1e-9)
        m = theirs["metrics"]
        _close(metrics["delta"].item(), m["delta"], 1e-5, f"{name} batch {b} delta", abs_=1e-9)
        for side in ("chosen", "rejected"):
            assert (f"rewards/{side}" in metrics) == (f"count/{side}" in m), f"{name} batch {b}: {side} metrics presence"
            if f"count/{side}" not in m:
                continue
            for key in ("rewards", "logps"):
                _close(metrics[f"{key}/{side}"].item(), m[f"{key}/{side}_sum"] / m[f"count/{side}"], 1e-5, f"{name} {key}/{side}", abs_=1e-7)
            # the sum of every logit (thousands of terms): float32 summation order differs
            _close(metrics[f"logits/{side}"].item(), m[f"logits/{side}_sum"] / m[f"count/{side}"], 1e-4, f"{name} logits/{side}", abs_=1e-3)
        if gen.CONFIGS[name]["udm"]:
            weights = trainer._udm_weights(batch)[~batch["label"]]
            assert weights.tolist() == pytest.approx(theirs["udm_weight_rejected"], rel=1e-5)
        ours_fp = gen.grad_fingerprints(trainer.model)
        assert sorted(ours_fp) == sorted(theirs["grads"])
        for pname, (norm, total, dot) in theirs["grads"].items():
            o_norm, o_total, o_dot = ours_fp[pname]
            scale = max(norm, 1e-12)
            _close(o_norm, norm, 1e-4, f"{name} batch {b} grad norm {pname}", abs_=1e-10)
            for o, r in ((o_total, total), (o_dot, dot)):  # sums/dots can cancel: relative to the gradient's norm
                assert abs(o - r) <= 1e-4 * scale * (1 + abs(r) / scale), f"{name} batch {b} grad {pname}: ours {o} vs TRL {r} (norm {norm})"
            worst = max(worst, abs(o_norm - norm) / scale)
        trainer.model.zero_grad(set_to_none=True)
    print(f"{name}: worst relative gradient-norm difference {worst:.1e}")
    # eval on the first batch (no running update, delta from after batch 2) matches TRL's prediction_step
    trainer.model.eval()
    with torch.no_grad():
        ev = trainer.evaluate_batches(trainer.model, [trainer.collate(rows[: gen.BATCH])])
    theirs = record["eval_first_batch"]
    _close(ev["loss"], theirs["loss"], 1e-5, f"{name} eval loss")
    _close(ev["delta"], theirs["metrics"]["delta"], 1e-5, f"{name} eval delta", abs_=1e-9)
    for side in ("chosen", "rejected"):
        if f"count/{side}" in theirs["metrics"]:
            _close(ev[f"rewards/{side}"], theirs["metrics"][f"rewards/{side}_sum"] / theirs["metrics"][f"count/{side}"], 1e-5, f"{name} eval rewards/{side}", abs_=1e-7)


def test_prompt_over_the_length_budget_departs_from_trl_which_exceeds_max_length(models, tmp_path):
    """TRL 1.13 cuts the completion with ``answer[: budget - len(prompt)]``: a negative index when the prompt alone exceeds the
    budget, which keeps all but the last few completion tokens, so the sequence exceeds max_length. Ours keeps no completion
    token but EOS (the prompt is never cut, as TRL); every other row is token-identical."""
    record = REFERENCE["configs"]["prompt_over_budget"]
    trainer = _ours("prompt_over_budget", models, tmp_path)
    max_length = gen.CONFIGS["prompt_over_budget"]["args"]["max_length"]
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    theirs = [seq for b in record["batches"] for seq in b["tensors"]["completion_input_ids"]]
    theirs_mask = [m for b in record["batches"] for m in b["tensors"]["completion_attention_mask"]]
    departed = exceeded = 0
    for row, seq, mask in zip(rows, theirs, theirs_mask):
        trl_ids = [t for t, m in zip(seq, mask) if m]
        budget = max_length - 2  # this tokenizer has no BOS and the completions do not end in EOS: TRL subtracts one for each
        if row["prompt_len"] > budget:
            departed += 1
            exceeded += len(trl_ids) > max_length
            assert row["input_ids"] == trl_ids[: row["prompt_len"]] + [trainer.processing_class.eos_token_id]
            assert len(trl_ids) >= len(row["input_ids"])
        else:
            assert row["input_ids"] == trl_ids
    assert departed > 0 and exceeded > 0, (departed, exceeded)


@pytest.mark.parametrize("name", ["udm", "udm_clamped"])
def test_density_ratio_classifier_matches_sklearn(name, models):
    """Our Newton fit of sklearn's balanced L2 logistic regression on TRL's sampled prompt embeddings agrees with sklearn's fit.

    The optimum is unique; sklearn's L-BFGS stops at tol=1e-4, ours at a 1e-12 gradient, so the
    probabilities agree to ~1e-4 (measured: printed) and the coefficients to ~1e-3 relative.
    """
    from posttrain_bco.trainer import DensityRatioClassifier, fit_density_ratio_classifier

    tokenizer, _, _ = models
    record = REFERENCE["configs"][name]
    chosen = torch.tensor(record["sample_chosen_embeddings"], dtype=torch.float32)
    rejected = torch.tensor(record["sample_rejected_embeddings"], dtype=torch.float32)
    coef, intercept = fit_density_ratio_classifier(chosen, rejected)
    theirs = DensityRatioClassifier(torch.tensor(record["clf_coef"][0], dtype=torch.float64), torch.tensor(record["clf_intercept"][0], dtype=torch.float64))
    ours = DensityRatioClassifier(coef, intercept)
    points = torch.cat([chosen, rejected])
    diff = (ours.predict_proba(points) - theirs.predict_proba(points)).abs().max().item()
    coef_diff = ((coef - theirs.coef).norm() / theirs.coef.norm()).item()
    print(f"{name}: max |p_ours - p_sklearn| = {diff:.2e}, relative coef difference {coef_diff:.2e}, intercept {intercept.item():.6f} vs {theirs.intercept.item():.6f}")
    assert diff < 1e-3 and coef_diff < 1e-2
    # the recorded batch probabilities are sklearn's predict_proba, as our predict_proba of sklearn's coefficients computes them
    trainer_embed = gen.make_embedding_func(gen.embedding_matrix(tokenizer))
    for theirs_batch in record["batches"]:
        t = theirs_batch["tensors"]
        emb = trainer_embed(torch.tensor(t["embedding_input_ids"]), torch.tensor(t["embedding_attention_mask"]))
        rejected_rows = [i for i, lab in enumerate(theirs_batch["label"]) if not lab]
        assert theirs.predict_proba(emb[rejected_rows]).tolist() == pytest.approx(theirs_batch["predict_proba_rejected"], rel=1e-5)


def test_sampled_embeddings_are_our_embedding_of_the_sampled_rows(models, tmp_path):
    """The recorded sample embeddings are embedding_func of the rows TRL drew: the embedding function is the same on both sides."""
    tokenizer, _, _ = models
    trainer = _ours("udm", models, tmp_path)
    record = REFERENCE["configs"]["udm"]
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for key, want in (("chosen", True), ("rejected", False)):
        part = [r for r in rows if r["label"] == want]
        ours = trainer._embed([part[i] for i in record[f"sample_{key}_indices"]])
        assert torch.allclose(ours, torch.tensor(record[f"sample_{key}_embeddings"]), rtol=1e-5, atol=1e-6)
