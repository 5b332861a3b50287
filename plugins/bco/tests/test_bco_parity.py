"""BCO parity with TRL 1.13.0's ``trl.experimental.bco`` (the last TRL release with BCO), from recorded values.

``tests/data/trl_1_13_0_reference.json`` is written by ``plugins/bco/scripts/make_trl_reference.py``
(TRL 1.13 in a throwaway venv, on the same tiny models and rows); no TRL 1.13 is needed here. For
every recorded configuration and two consecutive batches (the running delta of batch 2 depends on
batch 1): the collated tokens, the loss, the metrics, the running moments and the gradients of every
parameter (norm, sum, dot with a portable probe) agree.

Why the tolerances hold on any machine: the inputs are bit-identical everywhere (the models' weights
come from the generator's pure-Python stream, not torch's samplers, which differ between AVX2 and
other builds) and both sides compute in float64. The two computations then differ only in summation
order and in the log-softmax path (ours: chunked hidden states x LM head; TRL: full logits), about
1e-16 relative per operation; :data:`REL` = 1e-9 leaves a wide margin over the differences measured
(at most 5e-16 relative, with torch's AVX2 and its default kernels, 1 and 2 threads).

TRL rounds two intermediates to float32 (the running mean delta and its moments, the precomputed
reference log-probs) and so does posttrain, from float64 values equal to ~1e-16: the roundings agree
bit for bit unless such a value lies that close to a float32 rounding boundary (a chance of about 1e-9
each). They are checked first, to a float32 ulp or a few; if one did land apart, what depends on
it is compared at :data:`REL_AFTER_FLIP` = 1e-6 instead (one ulp of delta, 2**-24 |delta|, moves
each example's loss and gradient coefficient by at most that much).

The UDM weights come from scikit-learn's decision function, which TRL evaluates in float32 (float32
embeddings, float32 coefficients, a BLAS dot whose order depends on the machine); ours is float64.
They are compared within the float32 error bound of that dot product (:func:`_udm_weight_tolerance`),
and the loss path then runs on TRL's recorded weights, so it is still compared at :data:`REL`.
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
_spec.loader.exec_module(gen)  # the generator's rows, configs, portable models, embedding function and fingerprints (imports no trl)

REL = 1e-9  # float64 on both sides, bit-identical inputs: only summation order differs (see the module docstring)
REL_AFTER_FLIP = 1e-6  # when a float32-rounded intermediate landed one ulp apart (see the module docstring)
F32_ULP = 2.0**-23  # one float32 ulp is at most 2**-23 of the value


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("bco", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def models():
    from posttrain.testing.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    return tokenizer, gen.portable_model(tokenizer, gen.SEED_POLICY), gen.portable_model(tokenizer, gen.SEED_REF)


def test_reference_file_is_current(models):
    """A stale reference fails loudly: the generator's configs, rows, pins and model weights. The torch and transformers
    versions that produced it are recorded and printed when they differ from the installed ones; the comparison does not
    depend on them (float64, portable weights)."""
    import transformers

    assert REFERENCE["versions"]["trl"] == "1.13.0"
    assert REFERENCE["versions"]["sklearn"] == gen.PINS[1].split("==")[1], "regenerate with plugins/bco/scripts/make_trl_reference.py (pins changed)"
    assert REFERENCE["dtype"] == "float64" and REFERENCE["batch_size"] == gen.BATCH
    assert sorted(REFERENCE["configs"]) == sorted(gen.CONFIGS)
    for name, record in REFERENCE["configs"].items():
        assert record["spec"] == gen.CONFIGS[name], name
        assert record["rows"] == gen.ROWS[gen.CONFIGS[name]["rows"]](), name
    _, policy, ref = models
    # the same portable weights bit for bit; only the float64 summation order of the fingerprint may differ
    assert gen.weight_fingerprint(policy) == pytest.approx(REFERENCE["policy_weight_sum"], rel=1e-12)
    assert gen.weight_fingerprint(ref) == pytest.approx(REFERENCE["ref_weight_sum"], rel=1e-12)
    installed = {"torch": torch.__version__, "transformers": transformers.__version__}
    for lib, version in installed.items():
        if REFERENCE["versions"][lib] != version:
            print(f"note: the reference was recorded with {lib} {REFERENCE['versions'][lib]}, {version} is installed")


def _ours(name, models, tmp_path):
    from posttrain_bco import BCOConfig, BCOTrainer

    tokenizer, policy, ref = models
    spec = gen.CONFIGS[name]
    args = BCOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=gen.BATCH, per_device_eval_batch_size=gen.BATCH, report_to="none",
                     disable_tqdm=True, gradient_checkpointing=False, save_strategy="no", use_cpu=True, **spec["args"])
    kwargs = {}
    if spec["udm"]:
        kwargs = {"embedding_func": gen.make_embedding_func(gen.embedding_matrix(tokenizer)), "embedding_tokenizer": tokenizer}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BCOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref) if spec["ref_model"] else None, args=args,
                          train_dataset=gen.ROWS[spec["rows"]](), processing_class=gen.tokenizer_for(spec, tokenizer), **kwargs)


def _close(ours: float, theirs: float, rel: float, what: str, abs_: float = 0.0) -> None:
    assert ours == pytest.approx(theirs, rel=rel, abs=abs_), f"{what}: ours {ours!r} vs TRL 1.13 {theirs!r}"


def _same_f32(ours, theirs, what: str, ulps: int = 1) -> bool:
    """Float32-rounded intermediates (lists or numbers): True if bit-equal; False if some are within ``ulps`` float32 ulps
    (a value at a rounding boundary: the caller loosens what depends on it); fails otherwise."""
    ours, theirs = (list(x) if isinstance(x, (list, tuple)) else [x] for x in (ours, theirs))
    assert len(ours) == len(theirs), what
    for o, t in zip(ours, theirs):
        assert abs(o - t) <= ulps * F32_ULP * max(abs(o), abs(t)), f"{what}: ours {o!r} vs TRL 1.13 {t!r} (more than {ulps} float32 ulp apart)"
    return ours == theirs


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def _decision_error(embeddings: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor) -> torch.Tensor:
    """Bound (N,) on the error of scikit-learn's float32 decision function ``z = e . coef + b``: a dot product of H terms
    in float32 is within (H + 2) * 2**-24 * (sum_i |e_i coef_i| + |b|) of the exact value, whatever the summation order
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1)."""
    return (embeddings.shape[1] + 2) * 2.0**-24 * (embeddings.double().abs() @ coef.double().abs() + intercept.double().abs())


def _udm_weight_tolerance(embeddings: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Relative bound (N,) on |w_TRL - w_ours| / w of the density ratio ``w = p / (1 - p + 1e-8)``, ``p = sigmoid(z)``:
    d ln w / dz = 1 (p(1-p) dz/dp cancels), so an error dz in z moves ln w by dz; the float32 roundings of p (expit),
    1 - p, + 1e-8 and the division add at most 8 * 2**-24 / (1 - p). Clamping is 1-Lipschitz."""
    return _decision_error(embeddings, coef, intercept) + 8 * 2.0**-24 / (1 - p.double())


@pytest.mark.parametrize("name", sorted(set(gen.CONFIGS) - {"prompt_over_budget"}))
def test_loss_metrics_moments_and_gradients_match_trl_1_13(name, models, tmp_path):
    record = REFERENCE["configs"][name]
    trainer = _ours(name, models, tmp_path)
    assert next(trainer.model.parameters()).dtype == torch.float64
    if gen.CONFIGS[name]["udm"]:  # the classifier TRL fitted (scikit-learn, tol 1e-4): the loss path is compared exactly
        trainer.set_classifier(torch.tensor(record["clf_coef"][0], dtype=torch.float64), torch.tensor(record["clf_intercept"][0], dtype=torch.float64))
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(rows) == 16
    worst = {"loss": 0.0, "grad": 0.0}
    same = True  # every float32 intermediate so far bit-equal to TRL's
    for b, theirs in enumerate(record["batches"]):
        batch = trainer.collate(rows[b * gen.BATCH : (b + 1) * gen.BATCH])
        t = theirs["tensors"]
        assert batch["input_ids"].tolist() == t["completion_input_ids"], f"batch {b}: input_ids"
        assert batch["attention_mask"].tolist() == t["completion_attention_mask"], f"batch {b}: attention_mask"
        assert torch.where(batch["completion_mask"].bool(), batch["input_ids"], -100).tolist() == t["completion_labels"], f"batch {b}: labels"
        width = len(t["completion_labels"][0])  # the processed rows carry TRL's columns, equal to TRL's before padding
        block = rows[b * gen.BATCH : (b + 1) * gen.BATCH]
        assert [r["completion_labels"] + [-100] * (width - len(r["completion_labels"])) for r in block] == t["completion_labels"]
        assert [r["completion_attention_mask"] + [0] * (width - len(r["completion_attention_mask"])) for r in block] == t["completion_attention_mask"]
        assert batch["label"].tolist() == theirs["label"]
        if "embedding_input_ids" in t:
            assert batch["embedding_input_ids"].tolist() == t["embedding_input_ids"]
        if "reference_logps" in theirs:
            same &= _same_f32(batch["reference_logps"].tolist(), theirs["reference_logps"], f"{name} batch {b} precomputed reference log-probs")
        if gen.CONFIGS[name]["udm"]:
            rejected = ~batch["label"]
            trainer.__dict__.pop("_udm_weights", None)  # ours again (the previous batch pinned TRL's)
            weights = trainer._udm_weights(batch)  # (B,)
            embeddings = trainer.embedding_func(batch["embedding_input_ids"], batch["embedding_attention_mask"])[rejected]
            tol = _udm_weight_tolerance(embeddings, trainer.classifier.coef, trainer.classifier.intercept, trainer.classifier.predict_proba(embeddings))
            theirs_w = torch.tensor(theirs["udm_weight_rejected"], dtype=weights.dtype)
            assert ((weights[rejected].double() - theirs_w.double()).abs() <= tol * theirs_w.double()).all(), (weights[rejected].tolist(), theirs_w.tolist(), tol.tolist())
            weights[rejected] = theirs_w  # the loss path on TRL's own weights (an instance attribute shadows the method)
            trainer._udm_weights = lambda _batch, w=weights: w
        trainer.model.train()
        loss, metrics = trainer.compute_loss(trainer.model, batch, trainer.count_items(batch))
        loss.backward()
        m = theirs["metrics"]
        same &= _same_f32(_f32(metrics["delta"].item()), m["delta"], f"{name} batch {b} delta")
        for key in ("mean", "var", "std"):  # TRL's float32 merge arithmetic, a few roundings each
            same &= _same_f32(trainer.running.state_dict()[key], theirs["running"][key], f"{name} batch {b} running {key}", ulps=4)
        assert trainer.running.state_dict()["count"] == theirs["running"]["count"]
        rel = REL if same else REL_AFTER_FLIP
        _close(loss.item(), theirs["loss"], rel, f"{name} batch {b} loss")
        worst["loss"] = max(worst["loss"], abs(loss.item() / theirs["loss"] - 1))
        for side in ("chosen", "rejected"):
            assert (f"rewards/{side}" in metrics) == (f"count/{side}" in m), f"{name} batch {b}: {side} metrics presence"
            if f"count/{side}" not in m:
                continue
            for key in ("rewards", "logps", "logits"):
                # rewards = beta (logp - ref logp) may cancel: relative to beta |logp| (their scale); logits sum thousands of signed terms
                scale = {"rewards": trainer.args.beta * abs(m[f"logps/{side}_sum"]), "logps": 0.0, "logits": abs(m[f"logps/{side}_sum"])}[key]
                _close(metrics[f"{key}/{side}"].item(), m[f"{key}/{side}_sum"] / m[f"count/{side}"], rel, f"{name} batch {b} {key}/{side}",
                       abs_=rel * scale / m[f"count/{side}"])
        ours_fp = gen.grad_fingerprints(trainer.model)
        assert sorted(ours_fp) == sorted(theirs["grads"])
        for pname, (norm, total, dot) in theirs["grads"].items():
            o_norm, o_total, o_dot = ours_fp[pname]
            scale = max(norm, 1e-300)
            _close(o_norm, norm, rel, f"{name} batch {b} grad norm {pname}", abs_=1e-300)
            for o, r in ((o_total, total), (o_dot, dot)):  # sums/dots can cancel: relative to the gradient's norm (and the probe's scale)
                assert abs(o - r) <= rel * scale * (1 + abs(r) / scale), f"{name} batch {b} grad {pname}: ours {o} vs TRL {r} (norm {norm})"
            worst["grad"] = max(worst["grad"], abs(o_norm - norm) / scale)
        trainer.model.zero_grad(set_to_none=True)
    print(f"{name}: worst relative difference: loss {worst['loss']:.1e}, gradient norm {worst['grad']:.1e}; float32 intermediates bit-equal: {same}")
    # eval on the first batch (no running update, delta from after batch 2) matches TRL's prediction_step
    trainer.model.eval()
    if gen.CONFIGS[name]["udm"]:  # the eval batch is batch 1: TRL's weights of batch 1, as above
        batch = trainer.collate(rows[: gen.BATCH])
        weights = torch.ones(gen.BATCH)
        weights[~batch["label"]] = torch.tensor(record["batches"][0]["udm_weight_rejected"])
        trainer._udm_weights = lambda _batch, w=weights: w
    with torch.no_grad():
        ev = trainer.evaluate_batches(trainer.model, [trainer.collate(rows[: gen.BATCH])])
    theirs = record["eval_first_batch"]
    _close(ev["loss"], theirs["loss"], rel, f"{name} eval loss")
    _same_f32(_f32(ev["delta"]), theirs["metrics"]["delta"], f"{name} eval delta")
    for side in ("chosen", "rejected"):
        m = theirs["metrics"]
        if f"count/{side}" in m:
            _close(ev[f"rewards/{side}"], m[f"rewards/{side}_sum"] / m[f"count/{side}"], rel, f"{name} eval rewards/{side}",
                   abs_=rel * trainer.args.beta * abs(m[f"logps/{side}_sum"]) / m[f"count/{side}"])


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
        prompt_len = len(row["prompt_input_ids"])
        if prompt_len > budget:
            departed += 1
            exceeded += len(trl_ids) > max_length
            assert row["completion_input_ids"] == trl_ids[:prompt_len] + [trainer.processing_class.eos_token_id]
            assert len(trl_ids) >= len(row["completion_input_ids"])
        else:
            assert row["completion_input_ids"] == trl_ids
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
        # scikit-learn's float32 probability vs ours in float64: |dp| <= p (1 - p) |dz| + a few float32 roundings of p
        p = theirs.predict_proba(emb[rejected_rows])
        tol = p * (1 - p) * _decision_error(emb[rejected_rows], theirs.coef, theirs.intercept) + 4 * 2.0**-24 * p
        assert ((p - torch.tensor(theirs_batch["predict_proba_rejected"], dtype=torch.float64)).abs() <= tol).all(), (p.tolist(), theirs_batch["predict_proba_rejected"])


def test_sampled_embeddings_are_our_embedding_of_the_sampled_rows(models, tmp_path):
    """The recorded sample embeddings are embedding_func of the rows TRL drew: the embedding function is the same on both sides."""
    tokenizer, _, _ = models
    trainer = _ours("udm", models, tmp_path)
    record = REFERENCE["configs"]["udm"]
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    for key, want in (("chosen", True), ("rejected", False)):
        part = [r for r in rows if r["label"] == want]
        ours = trainer._embed([part[i] for i in record[f"sample_{key}_indices"]])
        # float64 means rounded once to float32 on both sides: equal, or one ulp apart at a rounding boundary
        torch.testing.assert_close(ours, torch.tensor(record[f"sample_{key}_embeddings"]), rtol=F32_ULP, atol=0.0)
