"""BCO: data formats, bad input, the running moments and gradient accumulation, exact resume (with UDM), UDM from the
config, and learning on held-out prompts (examples/bco.yaml runs through the CLI in tests/test_examples.py)."""

from __future__ import annotations

import copy
import math
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
    assert explicit["input_ids"] == direct["input_ids"] == extracted["input_ids"]


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
    with pytest.raises(posttrain.ConfigError, match="is_encoder_decoder=True is not supported"):
        _trainer(tmp_path, policy, tiny_tokenizer, [good], is_encoder_decoder=True)


# ---------------------------------------------------------------------------- the running moments
def test_running_moments_are_an_exact_parallel_merge():
    """Updating with 8 values at once or in any split gives the population mean/variance of all values seen (float64 numpy-free check)."""
    from posttrain_bco.trainer import RunningMoments

    xs = torch.randn(24, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.1
    whole, split = RunningMoments(), RunningMoments()
    whole.update(xs)
    for part in (xs[:1], xs[1:4], xs[4:16], xs[16:]):
        split.update(part)
    x64 = xs.double()
    for m in (whole, split):
        assert m.mean == pytest.approx(x64.mean().item(), rel=1e-6)
        assert m.var == pytest.approx(x64.var(unbiased=False).item(), rel=1e-5)
        assert m.std == pytest.approx(x64.std(unbiased=True).item(), rel=1e-5)
        assert m.count == pytest.approx(24, rel=1e-12)


def _naive_rewards(trainer, rows, beta):
    """beta * (log pi - log pi_ref) of each row from the models' full logits (independent of the chunked path)."""
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        total = []
        for model in (trainer.model, trainer.ref_model):
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
            total.append(logp[row["prompt_len"] - 1 :].sum())
        out.append(beta * (total[0] - total[1]).item())
    return out


def test_gradient_accumulation_8x1_vs_1x8(tmp_path, policy, tiny_tokenizer):
    """Batch-coupled: delta is updated per micro-batch (as TRL). What holds exactly: the running moments after the step
    do not depend on the split, and the accumulated loss is the mean of the per-micro-batch losses, each with its own delta
    (measured: 8x1 loss 0.702177 with one delta, 1x8 loss 0.695698 with a delta per micro-batch)."""
    from posttrain.testing.tiny_model import build_model

    rows = _unpaired(4, seed=3)  # 8 rows
    ref = build_model(tiny_tokenizer, seed=5)  # a reference unlike the policy: non-zero rewards
    beta = 0.5
    big = _trainer(tmp_path / "big", policy, tiny_tokenizer, rows, ref_model=copy.deepcopy(ref), beta=beta)
    small = _trainer(tmp_path / "small", policy, tiny_tokenizer, rows, ref_model=copy.deepcopy(ref), beta=beta)
    data = [big.train_dataset[i] for i in range(8)]
    big.model.train(), small.model.train()
    loss_big, _ = big.compute_loss(big.model, big.collate(data), 8)
    micro = [small.compute_loss(small.model, small.collate([r]), 8)[0] for r in data]
    loss_ga = sum(micro)
    for key in ("mean", "var", "count"):
        assert small.running.state_dict()[key] == pytest.approx(big.running.state_dict()[key], rel=1e-5, abs=1e-9), key
    rewards = _naive_rewards(big, data, beta)
    assert big.running.mean == pytest.approx(sum(rewards) / 8, rel=1e-4, abs=1e-7)
    # each micro-batch i sees delta_i = the mean of the rewards 1..i (count starts at 1e-24)
    expected = []
    for i, (r, row) in enumerate(zip(rewards, data)):
        d = sum(rewards[: i + 1]) / (i + 1)
        expected.append((-math.log(1 / (1 + math.exp(-(r - d))))) if row["label"] else -math.log(1 / (1 + math.exp(r - d))))
    assert loss_ga.item() == pytest.approx(sum(expected) / 8, rel=1e-4)
    d_all = sum(rewards) / 8
    one_delta = [(-math.log(1 / (1 + math.exp(-(r - d_all))))) if row["label"] else -math.log(1 / (1 + math.exp(r - d_all))) for r, row in zip(rewards, data)]
    assert loss_big.item() == pytest.approx(sum(one_delta) / 8, rel=1e-4)
    print(f"8x1 loss {loss_big.item():.6f} (one delta), 1x8 loss {loss_ga.item():.6f} (delta per micro-batch)")
    assert abs(loss_big.item() - loss_ga.item()) > 1e-6  # the split matters, as documented


def test_gradient_accumulation_through_the_loop_keeps_the_moments(tmp_path, policy, tiny_tokenizer):
    """One optimizer step through train(): 8 x 1 and 1 x 8 end with the same running moments (the merge is exact)."""
    from posttrain.testing.tiny_model import build_model

    rows = _unpaired(4, seed=3)
    ref = build_model(tiny_tokenizer, seed=5)
    moments = {}
    for name, (bs, ga) in {"big": (8, 1), "accumulated": (1, 8)}.items():
        trainer = _trainer(tmp_path / name, policy, tiny_tokenizer, rows, ref_model=copy.deepcopy(ref), per_device_train_batch_size=bs,
                           gradient_accumulation_steps=ga, max_steps=1, learning_rate=0.1, optim="sgd", beta=0.5)
        trainer.train()
        moments[name] = trainer.running.state_dict()
    for key in ("mean", "var", "count"):
        assert moments["accumulated"][key] == pytest.approx(moments["big"][key], rel=1e-5, abs=1e-9), key


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


def test_precomputed_reference_log_probs_equal_the_live_reference_for_eval_too(tmp_path, policy, tiny_tokenizer):
    rows = _unpaired(4, seed=6)
    live = _trainer(tmp_path / "live", policy, tiny_tokenizer, rows, eval_dataset=rows)
    pre = _trainer(tmp_path / "pre", policy, tiny_tokenizer, rows, eval_dataset=rows, precompute_ref_log_probs=True)
    assert pre.ref_model is None and "ref_logps" in pre.eval_dataset.column_names and "ref_logps" in pre.train_dataset.column_names
    a, b = live.evaluate(), pre.evaluate()
    assert set(a) == set(b)
    for key in a:
        if key.startswith("eval_") and isinstance(a[key], float) and "runtime" not in key and "per_second" not in key:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


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
    assert a == pytest.approx(b, rel=1e-6)


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
