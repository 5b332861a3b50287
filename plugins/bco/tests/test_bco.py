"""BCO: data formats, bad input, the running moments and gradient accumulation, exact resume (with UDM), UDM from the
config, and learning on held-out prompts (examples/bco.yaml runs through the CLI in tests/test_examples.py)."""

from __future__ import annotations

import copy
import importlib.util
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

import posttrain
from posttrain.testing import make_tiny_datasets, warning_events

WORDS = ["cat", "dog", "tree", "blue", "house", "river", "green", "stone"]
TRL_METRICS = {"delta", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"}


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("bco", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def policy(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=0)


@pytest.fixture(scope="module")
def policy64(policy):
    """The policy in float64, for tests that compare two computations of the same quantity (tight tolerances on any machine)."""
    return copy.deepcopy(policy).to(torch.float64)


#: The running moments merge in float32 (TRL's arithmetic): each update rounds the batch mean and variance to float32
#: and takes about eight float32 operations; over a handful of updates their error stays below this many float32
#: roundings (2**-24 each) of the data's scale (max |x| for the mean, max x**2 for the variance).
MOMENT_ROUNDINGS = 64


def _trainer(tmp_path, model, tokenizer, data, **cfg):
    from posttrain_bco import BCOConfig, BCOTrainer

    kwargs = {k: cfg.pop(k) for k in ("ref_model", "embedding_func", "embedding_tokenizer", "eval_dataset", "peft_config") if k in cfg}
    cfg = {"per_device_train_batch_size": 8, "report_to": "none", "disable_tqdm": True, "gradient_checkpointing": False, "save_strategy": "no", **cfg}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BCOTrainer(model=copy.deepcopy(model), args=BCOConfig(output_dir=str(tmp_path / "out"), **cfg), train_dataset=data, processing_class=tokenizer, **kwargs)


def _unpaired(n: int, seed: int = 1):
    """Unpaired arithmetic rows: desirable = the right sum, undesirable = a word (alternating labels)."""
    pairs = make_tiny_datasets(n=n, seed=seed)["preference"]
    rows = []
    for i, (p, c) in enumerate(zip(pairs["prompt"], pairs["chosen"])):
        rows.append({"prompt": p, "completion": c, "label": True})
        rows.append({"prompt": p, "completion": " " + WORDS[i % len(WORDS)], "label": False})
    return rows


# ---------------------------------------------------------------------------- data
def test_importable_from_the_experimental_namespace():
    from posttrain.experimental.bco import BCOConfig, BCOTrainer
    from posttrain_bco import BCOConfig as Config, BCOTrainer as Trainer

    assert (BCOConfig, BCOTrainer) == (Config, Trainer)


def test_paired_rows_are_unpaired_and_an_implicit_prompt_is_extracted(tmp_path, policy, tiny_tokenizer):
    pairs = make_tiny_datasets(4)["preference"].to_list()
    explicit = _trainer(tmp_path / "a", policy, tiny_tokenizer, pairs).train_dataset
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in pairs]
    extracted = _trainer(tmp_path / "b", policy, tiny_tokenizer, implicit).train_dataset
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for k in ("chosen", "rejected") for r in pairs]
    direct = _trainer(tmp_path / "c", policy, tiny_tokenizer, unpaired).train_dataset
    assert explicit["label"] == [True] * 4 + [False] * 4  # TRL's order: the chosen of a chunk, then its rejected
    assert explicit["completion_input_ids"] == direct["completion_input_ids"] == extracted["completion_input_ids"]


def test_bad_input_names_the_row_column_and_fix(tmp_path, policy, tiny_tokenizer):
    good = {"prompt": "what is 1 + 1 =", "completion": " 2", "label": True}
    with pytest.raises(posttrain.ConfigError, match=r"train_dataset row 1, column 'label': missing value .* BCO needs unpaired"):
        _trainer(tmp_path, policy, tiny_tokenizer, [good, {"prompt": "a", "completion": "b"}])
    with pytest.raises(posttrain.ConfigError, match=r"train_dataset row 1, column 'completion': expected a string, got int"):
        _trainer(tmp_path, policy, tiny_tokenizer, [good, {"prompt": "a", "completion": 3, "label": False}])
    with pytest.raises(posttrain.ConfigError, match=r"train_dataset row 0, column 'label': expected a bool"):
        _trainer(tmp_path, policy, tiny_tokenizer, [{**good, "label": "yes"}])
    with pytest.raises(posttrain.ConfigError, match=r"row 0, column 'prompt': missing value"):
        _trainer(tmp_path, policy, tiny_tokenizer, [{"text": "hello"}])
    with pytest.raises(posttrain.ConfigError, match=r"column 'completion': expected a non-empty list of \{'role', 'content'\} messages"):
        _trainer(tmp_path, policy, tiny_tokenizer, [{"prompt": [{"role": "user", "content": "hi"}], "completion": "x", "label": True}])
    with pytest.raises(posttrain.ConfigError, match="beta=0.0 is invalid"):
        _trainer(tmp_path, policy, tiny_tokenizer, [good], beta=0.0)
    with pytest.raises(posttrain.ConfigError, match="min_density_ratio=2.0, max_density_ratio=1.0 are invalid"):
        _trainer(tmp_path, policy, tiny_tokenizer, [good], min_density_ratio=2.0, max_density_ratio=1.0)
    with pytest.raises(posttrain.ConfigError, match="UDM needs both embedding_func= and embedding_tokenizer="):
        _trainer(tmp_path, policy, tiny_tokenizer, [good], embedding_tokenizer=tiny_tokenizer)



# ---------------------------------------------------------------------------- the running moments
def test_running_moments_are_an_exact_parallel_merge():
    """Updating with 24 values at once or in any split gives the population mean/variance of all values seen: the merge
    is exact in real arithmetic, so what remains is its float32 rounding (:data:`MOMENT_ROUNDINGS`)."""
    from posttrain_bco.trainer import RunningMoments

    xs = torch.randn(24, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.3 + 0.1
    whole, split = RunningMoments(), RunningMoments()
    whole.update(xs)
    for part in (xs[:1], xs[1:4], xs[4:16], xs[16:]):
        split.update(part)
    tol_mean, tol_var = MOMENT_ROUNDINGS * 2.0**-24 * xs.abs().max().item(), MOMENT_ROUNDINGS * 2.0**-24 * (xs**2).max().item()
    var = xs.var(unbiased=False).item()
    for m in (whole, split):
        assert abs(m.mean - xs.mean().item()) <= tol_mean
        assert abs(m.var - var) <= tol_var
        assert abs(m.std - xs.std(unbiased=True).item()) <= tol_var / (2 * var**0.5) * 24 / 23 + 2.0**-23 * m.std  # d sqrt(v) = dv / (2 sqrt(v))
        assert m.count == 24 + 1e-24  # integer counts plus TRL's 1e-24 start: exact


def _naive_rewards(trainer, rows, beta):
    """beta * (log pi - log pi_ref) of each row from the models' full logits (independent of the chunked path)."""
    out = []
    for row in rows:
        ids = torch.tensor([row["completion_input_ids"]])
        total = []
        for model in (trainer.model, trainer.ref_model):
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
            total.append(logp[len(row["prompt_input_ids"]) - 1 :].sum())
        out.append(beta * (total[0] - total[1]).item())
    return out


def test_gradient_accumulation_8x1_vs_1x8(tmp_path, policy64, tiny_tokenizer):
    """Batch-coupled: delta is updated per micro-batch (as TRL). What holds exactly: the running moments after the step
    do not depend on the split, and the accumulated loss is the mean of the per-micro-batch losses, each with its own delta
    (measured: 8x1 loss 0.702177 with one delta, 1x8 loss 0.695698 with a delta per micro-batch).

    Float64 models: the rewards of the chunked path and of the naive full-logits path agree to ~1e-15, so what is left
    is the float32 merge of the moments (:data:`MOMENT_ROUNDINGS` roundings of max |r|); the loss is 1-Lipschitz in delta."""
    from posttrain.testing.tiny_model import build_model

    rows = _unpaired(4, seed=3)  # 8 rows
    ref = build_model(tiny_tokenizer, seed=5).to(torch.float64)  # a reference unlike the policy: non-zero rewards
    beta = 0.5
    big = _trainer(tmp_path / "big", policy64, tiny_tokenizer, rows, ref_model=copy.deepcopy(ref), beta=beta)
    small = _trainer(tmp_path / "small", policy64, tiny_tokenizer, rows, ref_model=copy.deepcopy(ref), beta=beta)
    data = [big.train_dataset[i] for i in range(8)]
    big.model.train(), small.model.train()
    loss_big, _ = big.compute_loss(big.model, big.collate(data), 8)
    micro = [small.compute_loss(small.model, small.collate([r]), 8)[0] for r in data]
    loss_ga = sum(micro)
    rewards = _naive_rewards(big, data, beta)
    tol = MOMENT_ROUNDINGS * 2.0**-24 * max(abs(r) for r in rewards)  # float32 moments
    assert abs(small.running.mean - big.running.mean) <= tol
    assert abs(small.running.var - big.running.var) <= tol * max(abs(r) for r in rewards)
    assert small.running.count == big.running.count == 8 + 1e-24
    assert abs(big.running.mean - sum(rewards) / 8) <= tol
    # each micro-batch i sees delta_i = the mean of the rewards 1..i (count starts at 1e-24)
    expected = []
    for i, (r, row) in enumerate(zip(rewards, data)):
        d = sum(rewards[: i + 1]) / (i + 1)
        expected.append((-math.log(1 / (1 + math.exp(-(r - d))))) if row["label"] else -math.log(1 / (1 + math.exp(r - d))))
    assert loss_ga.item() == pytest.approx(sum(expected) / 8, rel=1e-9, abs=tol)
    d_all = sum(rewards) / 8
    one_delta = [(-math.log(1 / (1 + math.exp(-(r - d_all))))) if row["label"] else -math.log(1 / (1 + math.exp(r - d_all))) for r, row in zip(rewards, data)]
    assert loss_big.item() == pytest.approx(sum(one_delta) / 8, rel=1e-9, abs=tol)
    print(f"8x1 loss {loss_big.item():.6f} (one delta), 1x8 loss {loss_ga.item():.6f} (delta per micro-batch), moment tolerance {tol:.1e}")
    assert abs(loss_big.item() - loss_ga.item()) > 1e-4  # the split matters, as documented


def test_gradient_accumulation_through_the_loop_keeps_the_moments(tmp_path, policy64, tiny_tokenizer):
    """One optimizer step through train(): 8 x 1 and 1 x 8 end with the same running moments (the merge is exact; float64
    models, so only the float32 merge arithmetic differs: :data:`MOMENT_ROUNDINGS` roundings of the rewards' scale)."""
    from posttrain.testing.tiny_model import build_model

    rows = _unpaired(4, seed=3)
    ref = build_model(tiny_tokenizer, seed=5).to(torch.float64)
    moments = {}
    for name, (bs, ga) in {"big": (8, 1), "accumulated": (1, 8)}.items():
        trainer = _trainer(tmp_path / name, policy64, tiny_tokenizer, rows, ref_model=copy.deepcopy(ref), per_device_train_batch_size=bs,
                           gradient_accumulation_steps=ga, max_steps=1, learning_rate=0.1, optim="sgd", beta=0.5)
        trainer.train()
        moments[name] = trainer.running.state_dict()
    scale = abs(moments["big"]["mean"]) + moments["big"]["std"] * 3  # the rewards' scale (all within 3 std of the mean here: 8 values)
    assert abs(moments["accumulated"]["mean"] - moments["big"]["mean"]) <= MOMENT_ROUNDINGS * 2.0**-24 * scale
    assert abs(moments["accumulated"]["var"] - moments["big"]["var"]) <= MOMENT_ROUNDINGS * 2.0**-24 * scale**2
    assert moments["accumulated"]["count"] == moments["big"]["count"] == 8 + 1e-24


# ---------------------------------------------------------------------------- resume and UDM
def _embedding_func(tokenizer):
    from posttrain.testing.tiny_model import build_model

    table = build_model(tokenizer, seed=2).get_input_embeddings().weight.detach() * 50.0

    def embed(input_ids, attention_mask):
        mask = attention_mask.float().unsqueeze(-1)
        return (table[input_ids] * mask).sum(1) / mask.sum(1).clamp(min=1)

    return embed


def test_resume_restores_running_moments_and_classifier_exactly(tmp_path, policy, tiny_tokenizer):
    rows = _unpaired(8, seed=4)
    kw = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 4, "seed": 7,
          "embedding_func": _embedding_func(tiny_tokenizer), "embedding_tokenizer": tiny_tokenizer, "prompt_sample_size": 6}
    full = _trainer(tmp_path / "full", policy, tiny_tokenizer, rows, **kw)
    full.train()
    resumed = _trainer(tmp_path / "resumed", policy, tiny_tokenizer, rows, **kw)
    resumed.set_classifier(torch.zeros_like(full.classifier.coef), torch.tensor(3.0))  # must come back from the checkpoint
    resumed.running.update(torch.tensor([5.0, 6.0]))  # likewise
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "out" / "checkpoint-2"))
    assert resumed.running.state_dict() == full.running.state_dict()
    assert torch.equal(resumed.classifier.coef, full.classifier.coef) and torch.equal(resumed.classifier.intercept, full.classifier.intercept)
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_udm_from_the_config_and_seeded_sampling(tmp_path, policy, tiny_tokenizer, tiny_model_dir):
    """udm_embedding_model: the mean-pooled last hidden state of a model by path; the prompt sample follows data_seed."""
    rows = _unpaired(6, seed=5)
    a = _trainer(tmp_path / "a", policy, tiny_tokenizer, rows, udm_embedding_model=tiny_model_dir, prompt_sample_size=5, seed=1)
    b = _trainer(tmp_path / "b", policy, tiny_tokenizer, rows, udm_embedding_model=tiny_model_dir, prompt_sample_size=5, seed=1)
    c = _trainer(tmp_path / "c", policy, tiny_tokenizer, rows, udm_embedding_model=tiny_model_dir, prompt_sample_size=5, seed=1, data_seed=99)
    assert torch.equal(a.classifier.coef, b.classifier.coef)
    assert not torch.equal(a.classifier.coef, c.classifier.coef)
    batch = a.collate([a.train_dataset[i] for i in range(4)])
    weights = a._udm_weights(batch)
    assert weights.shape == (4,) and bool(((weights >= 0.5) & (weights <= 10.0)).all())
    a.model.train()
    loss, metrics = a.compute_loss(a.model, batch, 4)
    assert math.isfinite(loss.item()) and set(metrics) == TRL_METRICS


# ---------------------------------------------------------------------------- learning
def test_learns_to_classify_heldout_completions(tmp_path, tiny_tokenizer):
    """Held-out BCO loss falls and the held-out reward margin turns positive (printed; measured at one CPU core:
    eval_loss 0.693 -> 0.153, eval_rewards/margins 0.000 -> 8.23, delta -0.65 after 40 steps)."""
    from posttrain.testing.tiny_model import build_model

    rows = _unpaired(48, seed=1)  # 96 rows; the last 16 (8 prompts) are held out
    heldout_rows = rows[80:]
    trainer = _trainer(tmp_path, build_model(tiny_tokenizer, seed=3), tiny_tokenizer, rows[:80], eval_dataset=heldout_rows,
                       max_steps=40, learning_rate=1e-2, logging_steps=10, beta=0.5, seed=0)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"held-out BCO loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}, "
          f"margin {before['eval_rewards/margins']:.3f} -> {after['eval_rewards/margins']:.3f}, delta {after['eval_delta']:.3f}")
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert after["eval_rewards/margins"] > 1.0 > before["eval_rewards/margins"]
    logged = [row for row in trainer.state.log_history if "loss" in row and "train_loss" not in row]
    assert TRL_METRICS <= set(logged[-1]), set(logged[-1])
    assert warning_events(trainer.args.output_dir) == []  # a healthy run raises no false alarm


def test_precomputed_reference_log_probs_equal_the_live_reference_for_eval_too(tmp_path, policy64, tiny_tokenizer):
    """Float64 models: the only difference is that the precomputed log-probs are stored as float32 (TRL's column), which
    moves each reward, and the loss (1-Lipschitz in the reward), by at most beta * 2**-24 * |ref log-prob|."""
    rows = _unpaired(4, seed=6)
    live = _trainer(tmp_path / "live", policy64, tiny_tokenizer, rows, eval_dataset=rows)
    pre = _trainer(tmp_path / "pre", policy64, tiny_tokenizer, rows, eval_dataset=rows, precompute_ref_log_probs=True)
    assert pre.ref_model is None and "reference_logps" in pre.eval_dataset.column_names and "reference_logps" in pre.train_dataset.column_names
    tol = pre.args.beta * 2.0**-24 * max(abs(x) for x in pre.eval_dataset["reference_logps"])
    a, b = live.evaluate(), pre.evaluate()
    assert set(a) == set(b)
    for key in a:
        if key.startswith("eval_") and isinstance(a[key], float) and "runtime" not in key and "per_second" not in key:
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=tol), key


def test_uninformative_embeddings_give_density_ratio_one_without_trls_pad_filter(tmp_path, policy, tiny_tokenizer):
    """All-zero prompt embeddings: the balanced classifier is p = 1/2 everywhere, so the density ratio is 1 and the loss equals
    BCO without UDM. TRL 1.13 filters rows whose embedding *mean* equals the pad token id (0 here: every row), which leaves
    fewer weights than undesirable losses; posttrain predicts each row directly (see docs/methods/bco.md)."""
    assert tiny_tokenizer.pad_token_id == 0
    rows = _unpaired(4, seed=8)

    def zeros(input_ids, attention_mask):
        return torch.zeros(input_ids.shape[0], 16)

    udm = _trainer(tmp_path / "udm", policy, tiny_tokenizer, rows, embedding_func=zeros, embedding_tokenizer=tiny_tokenizer, min_density_ratio=0.1)
    plain = _trainer(tmp_path / "plain", policy, tiny_tokenizer, rows)
    batch = udm.collate([udm.train_dataset[i] for i in range(8)])
    assert udm._udm_weights(batch).tolist() == pytest.approx([1.0] * 8, abs=1e-7)
    udm.model.train(), plain.model.train()
    a = udm.compute_loss(udm.model, batch, 8)[0].item()
    b = plain.compute_loss(plain.model, plain.collate([plain.train_dataset[i] for i in range(8)]), 8)[0].item()
    assert a == pytest.approx(b, rel=1e-6)  # the same computation but for weights within 1e-7 of 1 (asserted above)


def test_peft_reference_is_the_adapter_disabled_policy(tmp_path, policy, tiny_tokenizer):
    from peft import LoraConfig

    trainer = _trainer(tmp_path, policy, tiny_tokenizer, _unpaired(4, seed=9),
                       peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    assert trainer.ref_model is None
    batch = trainer.collate([trainer.train_dataset[i] for i in range(8)])
    ref_logps = trainer._reference_logps(batch)
    base_logps, _ = trainer._sequence_logps(policy, batch)
    policy_logps, _ = trainer._sequence_logps(trainer.model, batch)
    torch.testing.assert_close(ref_logps, base_logps.detach())
    assert not torch.allclose(policy_logps, base_logps)  # the adapter is active outside the reference context


# ---------------------------------------------------------------------------- TRL users' expectations
def test_processed_datasets_have_trls_columns(tmp_path, policy, tiny_tokenizer):
    """trainer.train_dataset / eval_dataset carry TRL 1.13's columns (``_tokenize`` + ``_process_tokens``), UDM's and the precomputed reference's."""
    rows = _unpaired(2, seed=2)
    trainer = _trainer(tmp_path, policy, tiny_tokenizer, rows, eval_dataset={"a": rows}, precompute_ref_log_probs=True,
                       embedding_func=_embedding_func(tiny_tokenizer), embedding_tokenizer=tiny_tokenizer, prompt_sample_size=2)
    trl_columns = {"prompt", "completion", "label", "prompt_input_ids", "prompt_attention_mask", "completion_input_ids",
                   "completion_attention_mask", "completion_labels", "embedding_input_ids", "embedding_attention_mask", "reference_logps"}
    assert set(trainer.train_dataset.column_names) == trl_columns
    assert set(next(iter(trainer.eval_dataset["a"]))) == trl_columns  # TRL's test_init_with_eval_dataset reads the first row
    row = trainer.train_dataset[0]
    prompt_len = len(row["prompt_input_ids"])
    assert row["prompt"] == rows[0]["prompt"] and row["completion"] == rows[0]["completion"] and row["label"] is True
    assert row["completion_input_ids"][:prompt_len] == row["prompt_input_ids"]
    assert row["completion_input_ids"][-1] == tiny_tokenizer.eos_token_id
    assert row["completion_labels"] == [-100] * prompt_len + row["completion_input_ids"][prompt_len:]
    assert row["completion_attention_mask"] == [1] * len(row["completion_input_ids"]) and row["prompt_attention_mask"] == [1] * prompt_len
    assert row["embedding_input_ids"] == tiny_tokenizer(rows[0]["prompt"], add_special_tokens=False)["input_ids"]


def test_compute_metrics_gets_the_implied_rewards_and_labels_at_evaluation(tmp_path, policy, tiny_tokenizer):
    """compute_metrics (refused before 0.2.0) is called at each evaluation with one implied reward per example and the labels;
    what it returns is logged with the eval_ prefix (TRL's test_compute_metrics: log_history[-2]["eval_test"])."""
    from posttrain.testing.tiny_model import build_model

    rows = _unpaired(4, seed=7)
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"test": 0.0, "chosen_share": float(prediction.label_ids.mean())}

    trainer = _trainer(tmp_path / "eval", policy, tiny_tokenizer, rows, eval_dataset=rows, ref_model=build_model(tiny_tokenizer, seed=5), beta=0.5)
    trainer.compute_metrics = compute_metrics
    metrics = trainer.evaluate()
    assert metrics["eval_test"] == 0.0 and metrics["eval_chosen_share"] == 0.5
    rewards, labels = seen[-1].predictions, seen[-1].label_ids
    assert rewards.shape == labels.shape == (8,) and labels.tolist() == [r["label"] for r in trainer.eval_dataset]
    # the class means of the predictions are the logged eval_rewards/* (the same float32 rewards, summed in another order):
    # two float32 sums of n terms each err by at most (n - 1) * eps32 * sum|r| <= n^2 * 2^-24 * max|r|
    n = len(rewards)
    tol = 2 * n * n * 2.0**-24 * float(abs(rewards).max())
    assert rewards[labels].mean() == pytest.approx(metrics["eval_rewards/chosen"], rel=0, abs=tol)
    assert rewards[~labels].mean() == pytest.approx(metrics["eval_rewards/rejected"], rel=0, abs=tol)
    trained = _trainer(tmp_path / "train", policy, tiny_tokenizer, rows, eval_dataset=rows, max_steps=3, eval_strategy="steps", eval_steps=3,
                       learning_rate=1e-2)
    trained.compute_metrics = compute_metrics
    trained.train()
    assert trained.state.log_history[-2]["eval_test"] == 0.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model_init_kwargs": {"dtype": "float32"}}, "is set but the model is already built"),
        pytest.param({"generate_during_eval": True}, "`generate_during_eval=True` requires Weights and Biases or Comet to be installed.",
                     marks=pytest.mark.skipif(bool(importlib.util.find_spec("wandb") or importlib.util.find_spec("comet_ml")), reason="a tracker is installed")),
    ],
    ids=["model_init_kwargs", "generate_during_eval"],
)
def test_what_trl_refuses_is_refused(kwargs, message, tmp_path, policy, tiny_tokenizer):
    with pytest.raises(ValueError, match=re.escape(message)):
        _trainer(tmp_path, policy, tiny_tokenizer, _unpaired(2), **kwargs)


def test_an_invalid_dtype_for_a_model_given_by_name_is_refused(tmp_path, tiny_model_dir, tiny_tokenizer):
    from posttrain_bco import BCOConfig, BCOTrainer

    args = BCOConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False, model_init_kwargs={"dtype": "float31"})
    with pytest.raises(posttrain.ConfigError, match=r"model_init_kwargs\['dtype'\]='float31' is invalid"):
        BCOTrainer(model=tiny_model_dir, args=args, train_dataset=_unpaired(2), processing_class=tiny_tokenizer)


def test_a_peft_model_with_peft_config_and_the_same_reference_object_are_refused(tmp_path, policy, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    from posttrain_bco import BCOConfig, BCOTrainer

    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    args = BCOConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False)
    with pytest.raises(posttrain.ConfigError, match="already a PeftModel and peft_config is given"):
        BCOTrainer(model=get_peft_model(copy.deepcopy(policy), lora), args=args, train_dataset=_unpaired(2), processing_class=tiny_tokenizer, peft_config=lora)
    model = copy.deepcopy(policy)
    with pytest.raises(posttrain.ConfigError, match="model and ref_model are the same object"):
        BCOTrainer(model=model, ref_model=model, args=args, train_dataset=_unpaired(2), processing_class=tiny_tokenizer)


def test_encoder_decoder_models_are_refused_whatever_the_flag_says(tmp_path, policy, tiny_tokenizer):
    """TRL 1.13 trains encoder-decoder models; posttrain's BCO refuses them at construction, naming the class. The flag is
    read when the trainer is built (TRL's tests set it on the config afterwards) and, as in TRL, the model's config decides."""
    from transformers import T5Config, T5ForConditionalGeneration

    from posttrain_bco import BCOConfig, BCOTrainer

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=len(tiny_tokenizer), d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2))
    for flag in (None, False, True):
        args = BCOConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False)
        args.is_encoder_decoder = flag
        with pytest.raises(posttrain.ConfigError, match="^T5ForConditionalGeneration is an encoder-decoder model; posttrain's BCO trains decoder-only"):
            BCOTrainer(model=t5, args=args, train_dataset=_unpaired(2), processing_class=tiny_tokenizer)
    args = BCOConfig(output_dir=str(tmp_path), report_to="none", gradient_checkpointing=False)
    args.is_encoder_decoder = True
    with pytest.warns(UserWarning, match="is_encoder_decoder=True is ignored: Qwen2ForCausalLM is a decoder-only model"):
        trainer = BCOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=_unpaired(2), processing_class=tiny_tokenizer)
    assert trainer.is_encoder_decoder is False
