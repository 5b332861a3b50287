"""SSD parity with TRL 1.15.0's ``trl.experimental.ssd`` (the last TRL release with SSD), from recorded values.

``tests/data/trl_1_15_0_reference.json`` is written by ``plugins/ssd/scripts/make_trl_reference.py`` (TRL 1.15 in a
throwaway venv, on the same tiny float64 model, prompts and completions); no TRL 1.15 is needed here. TRL's sampler
was replaced there by fixed completions; here the same completions go through posttrain's micro-batching and
``filter_empty`` step and its loss. For every recorded configuration: the prompt tokens (left truncation included),
which completions ``filter_empty`` keeps, each micro-batch's loss (TRL's, divided by the accumulation steps), TRL's
logged metrics, and the accumulated gradient of the step (norm, sum and dot with a portable probe per parameter).

Why the tolerances hold on any machine: the inputs are bit-identical everywhere (weights from the generator's
pure-Python stream) and both sides compute in float64; posttrain computes log-probs from hidden states x LM head in
row chunks, TRL from full logits (~1e-16 relative). TRL pads the whole step's rows together, posttrain each
micro-batch: different left padding shifts the RoPE positions, which attention sees only as relative offsets, but
transformers computes the rotary cos/sin in float32, so configurations whose micro-batches pad differently from
TRL's differ by ~1e-7 relative (measured: at most 1.3e-7 on gradients, 0 where the padding is the same).
LOSS_REL = 1e-5 and GRAD_REL = 1e-4 leave a wide margin over that.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib

import pytest
import torch

import posttrain

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "data" / "trl_1_15_0_reference.json").read_text())
_spec = importlib.util.spec_from_file_location("make_ssd_trl_reference", HERE.parent / "scripts" / "make_trl_reference.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # the generator's prompts, completions, configs, portable model and fingerprints (imports no trl)

LOSS_REL, GRAD_REL = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("ssd", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def models():
    tokenizer = gen.reference_tokenizer()
    return tokenizer, gen.portable_model(tokenizer, gen.SEED_POLICY)


def _close(ours: float, theirs: float, rel: float, floor: float = 1e-12) -> bool:
    return abs(ours - theirs) <= rel * max(abs(theirs), floor)


def test_reference_file_is_current(models):
    """A stale reference fails loudly: the generator's configs, rows, completions and model weights."""
    tokenizer, policy = models
    assert REFERENCE["versions"]["trl"] == "1.15.0" and REFERENCE["dtype"] == "float64"
    assert sorted(REFERENCE["configs"]) == sorted(gen.CONFIGS)
    assert REFERENCE["completions"] == gen.COMPLETIONS
    assert REFERENCE["completion_ids"] == gen.completion_ids(tokenizer)
    for name, record in REFERENCE["configs"].items():
        assert record["spec"] == gen.CONFIGS[name], name
        assert record["rows"] == [{"prompt": p} for p in gen.prompts(gen.CONFIGS[name]["prompts"])], name
    assert abs(gen.weight_fingerprint(policy) - REFERENCE["policy_weight_sum"]) <= 1e-12 * max(1.0, abs(REFERENCE["policy_weight_sum"]))


@pytest.mark.parametrize("name", sorted(gen.CONFIGS))
def test_loss_and_gradients_match_trl_1_15(name, models, tmp_path):
    from posttrain_ssd import SSDConfig, SSDTrainer

    from posttrain import RolloutBatch

    tokenizer, policy = models
    record = REFERENCE["configs"][name]
    spec = record["spec"]
    fixed = REFERENCE["completion_ids"]
    args = SSDConfig(output_dir=str(tmp_path), report_to="none", disable_tqdm=True, gradient_checkpointing=False, save_strategy="no",
                     max_completion_length=max(map(len, fixed)), **spec["args"])
    trainer = SSDTrainer(model=copy.deepcopy(policy), args=args, train_dataset=record["rows"], processing_class=tokenizer)
    model = trainer.model
    model.train()

    # the prompt tokens (chat template, left truncation) equal TRL's
    prompt_ids = [trainer._prompt_ids(row) for row in record["rows"]]
    assert prompt_ids == record["prompt_ids"]

    max_len = args.max_completion_length
    eos = tokenizer.eos_token_id
    rollout = RolloutBatch(prompt_ids, [list(c) for c in fixed], [[0.0] * len(c) for c in fixed],
                           [len(c) >= max_len and c[-1] != eos for c in fixed])
    micro = trainer.micro_batches(rollout, args.per_device_train_batch_size)
    assert len(micro) == args.gradient_accumulation_steps == len(record["micro_batch_losses"])
    kept = torch.cat([b["completion_mask"].sum(1) for b in micro]).tolist()
    assert kept == record["completion_mask_sums"]  # filter_empty keeps and drops the same completions

    ce, worst_loss = [], 0.0
    for batch, theirs in zip(micro, record["micro_batch_losses"]):
        loss, metrics = trainer.compute_loss(model, batch, None)
        loss.backward()
        worst_loss = max(worst_loss, abs(loss.item() - theirs) / abs(theirs))
        assert _close(loss.item(), theirs, LOSS_REL), (loss.item(), theirs)
        ce.append(metrics["ssd/cross_entropy_loss"].item())
        names = batch["rollout_metric_names"]
        values = dict(zip(names, batch["rollout_metric_values"].tolist()))
        for key in ("completions/mean_length", "completions/min_length", "completions/max_length", "ssd/active_sample_ratio"):
            assert values[key] == pytest.approx(record["metrics"][key][0], rel=1e-6), key
    for ours, theirs in zip(ce, record["metrics"]["ssd/cross_entropy_loss"]):
        assert _close(ours, theirs, LOSS_REL), (ours, theirs)

    worst = 0.0
    ours_fp = gen.grad_fingerprints(model)
    for pname, theirs in record["grads"].items():
        scale = max(abs(theirs[0]), 1e-30)  # the parameter's gradient norm bounds its sum and probe dot
        for o, t in zip(ours_fp[pname], theirs):
            worst = max(worst, abs(o - t) / scale)
            assert abs(o - t) <= GRAD_REL * scale, (pname, ours_fp[pname], theirs)
    print(f"{name}: max relative loss difference {worst_loss:.2e}, gradient difference {worst:.2e}")
