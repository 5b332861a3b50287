"""MiniLLM parity with TRL 1.14.2's ``trl.experimental.minillm`` (the last TRL release with MiniLLM), from recorded values.

``tests/data/trl_1_14_2_reference.json`` is written by ``plugins/minillm/scripts/make_trl_reference.py``
(TRL 1.14.2 in a throwaway venv, its ``MiniLLMTrainer.compute_loss`` on the same tiny float64 student
and teacher and the same fixed batch); no TRL 1.14.2 is needed here. For every recorded configuration
(defaults; ``gamma`` with and without length normalization; ``kd_temperature`` != ``temperature``;
either MiniLLM term off; the dapo / grpo / bnpo / dr_grpo aggregations; old log-probs with clipping at
token and sequence level) the loss and the gradient of every student parameter (norm, sum, dot with a
portable probe) agree, with posttrain's chunked log-probs and divergence (small chunks: several per
batch) and with the unchunked logits.

Why the tolerances hold on any machine: the inputs are bit-identical everywhere (portable weights from
the generator's pure-Python stream; fixed token ids) and both sides compute in float64, so they differ
only in summation order (chunked hidden states x LM head against TRL's full logits), ~1e-15 relative.
:data:`REL_LOSS` / :data:`REL_GRAD` are the brief's 1e-5 / 1e-4; the measured differences are below 1e-12.
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
REFERENCE = json.loads((HERE / "data" / "trl_1_14_2_reference.json").read_text())
_spec = importlib.util.spec_from_file_location("minillm_make_trl_reference", HERE.parent / "scripts" / "make_trl_reference.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # the generator's configs, portable models, batch and fingerprints (imports no trl)

REL_LOSS, REL_GRAD = 1e-5, 1e-4
ABS_FLOOR = 1e-12  # gradient fingerprints that are ~0 on both sides (e.g. a sum of a softmax-invariant direction)


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("minillm", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def models():
    from posttrain.testing.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    student, teacher = gen.student_model(tokenizer), gen.teacher_model(tokenizer)
    # the portable weights are the generator's, bit for bit up to summation order
    assert gen.weight_fingerprint(student) == pytest.approx(REFERENCE["student_weight_sum"], rel=1e-12, abs=1e-12)
    assert gen.weight_fingerprint(teacher) == pytest.approx(REFERENCE["teacher_weight_sum"], rel=1e-12, abs=1e-12)
    return tokenizer, student, teacher


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), ABS_FLOOR)


def run_ours(models, name: str, chunk_size: int, tmp_path) -> tuple[float, dict]:
    from posttrain.experimental.minillm import MiniLLMConfig, MiniLLMTrainer

    tokenizer, student, teacher = models
    spec = REFERENCE["configs"][name]["spec"]
    data = REFERENCE["batch"]
    args = MiniLLMConfig(output_dir=str(tmp_path), per_device_train_batch_size=gen.BATCH, num_generations=2, max_completion_length=gen.COMPLETION_LEN,
                         report_to="none", gradient_checkpointing=False, disable_tqdm=True, logprob_chunk_size=chunk_size, **spec["args"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MiniLLMTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=args,
                                 train_dataset=[{"prompt": "what is 1 + 1 ="}] * gen.BATCH, processing_class=tokenizer)
    n_tokens = gen.BATCH * gen.COMPLETION_LEN
    batch = {
        "prompt_ids": torch.tensor(data["prompt_ids"]),
        "prompt_mask": torch.ones(gen.BATCH, gen.PROMPT_LEN, dtype=torch.long),
        "completion_ids": torch.tensor(data["completion_ids"]),
        "completion_mask": torch.ones(gen.BATCH, gen.COMPLETION_LEN, dtype=torch.long),
        "advantages": torch.tensor(data["advantages"], dtype=torch.float64),
        "num_completion_tokens": n_tokens,
        "share_divisor": torch.tensor(1.0),
        "step_token_normalizer": torch.tensor(float(n_tokens)),
    }
    old = REFERENCE["configs"][name]["old_per_token_logps"]
    if old is not None:
        batch["old_per_token_logps"] = torch.tensor(old, dtype=torch.float64)
    model = trainer.model
    model.train()
    loss, metrics = trainer.compute_loss(model, batch, trainer.count_items(batch))
    loss.backward()
    assert all(torch.isfinite(v).all() for v in metrics.values() if isinstance(v, torch.Tensor))
    return loss.item(), gen.grad_fingerprints(model)


@pytest.mark.parametrize("chunk_size", [5, 0], ids=["chunked", "full_logits"])
@pytest.mark.parametrize("name", list(REFERENCE["configs"]))
def test_loss_and_gradients_match_trl_1_14_2(models, name, chunk_size, tmp_path):
    expected = REFERENCE["configs"][name]
    loss, grads = run_ours(models, name, chunk_size, tmp_path)
    assert _rel(loss, expected["loss"]) < REL_LOSS, f"{name}: loss {loss!r} vs TRL 1.14.2 {expected['loss']!r}"
    assert set(grads) == set(expected["grads"])
    worst = max((_rel(a, b), pname) for pname in grads for a, b in zip(grads[pname], expected["grads"][pname]) if max(abs(a), abs(b)) > ABS_FLOOR)
    assert worst[0] < REL_GRAD, f"{name}: gradient fingerprint of {worst[1]} off by {worst[0]:.2e} relative"


def test_reference_exercises_every_term():
    """The recorded configurations differ where the terms they switch differ (the reference is not degenerate)."""
    losses = {name: REFERENCE["configs"][name]["loss"] for name in REFERENCE["configs"]}
    assert losses["default"] != losses["no_rkl_advantage"] != losses["no_single_step"]
    assert losses["gamma0.9"] != losses["default"] != losses["gamma0.9_no_length_norm"]
    assert losses["kd_temperature2_temperature0.7"] != losses["default"]
    norms = {name: REFERENCE["configs"][name]["grads"]["model.embed_tokens.weight"][0] for name in REFERENCE["configs"]}
    assert norms["default"] != norms["reward_only"] and norms["reward_only"] > 0.0


def test_config_defaults_match_trl_1_14_2():
    """Every field of TRL 1.14.2's MiniLLMConfig exists here with TRL's default (except the documented ones)."""
    import dataclasses

    from posttrain.experimental.minillm import MiniLLMConfig

    ours = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory()) for f in dataclasses.fields(MiniLLMConfig)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    trl = REFERENCE["config_defaults"]
    assert sorted(set(trl) - set(ours)) == []
    # posttrain's departures: no tqdm auto-detection (False, not None) and 'auto' padding spelled out (None on CPU/GPU, as TRL)
    documented = {"disable_tqdm", "pad_to_multiple_of", "output_dir", "logging_dir"}
    differ = {name for name in trl if name not in documented and json.dumps(ours[name], default=repr) != json.dumps(trl[name], default=repr)}
    assert differ == set(), {name: (ours[name], trl[name]) for name in differ}
