"""GSPO-token parity with TRL 1.13.0's ``trl.experimental.gspo_token`` (the last TRL release with it), from recorded values.

``tests/data/trl_1_13_0_reference.json`` is written by ``plugins/gspo_token/scripts/make_trl_reference.py``
(TRL 1.13 in a throwaway venv calls its GSPO-token ``_compute_loss`` on a fixed batch); no TRL 1.13 is
needed here. For every recorded configuration (the four losses, the paper's clip ranges, a KL term,
two-sided clipping, top-entropy masking, a temperature, and the sequence / token levels for contrast)
our ``compute_loss`` on the same batch, old and reference log-probs gives the same loss, clip
fractions, KL, entropy, and gradients of every parameter (norm, sum, dot with a portable probe).

Why the tolerances hold on any machine: the inputs are bit-identical everywhere (portable weights
from a pure-Python stream, recorded log-probs) and both sides compute in float64; they differ only in
summation order and in the log-softmax path (ours: chunked hidden states x LM head; TRL: full
logits), ~1e-16 relative per operation. :data:`REL` = 1e-9 leaves a wide margin, and is far below
the task's 1e-5 (loss) / 1e-4 (gradients). A clip decision sitting within 1e-9 of its boundary
would flip a term; every ratio is at least 1e-6 away from every boundary (checked in the test).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import pathlib

import pytest
import torch

import posttrain

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "data" / "trl_1_13_0_reference.json").read_text())
_spec = importlib.util.spec_from_file_location("gspo_token_make_trl_reference", HERE.parent / "scripts" / "make_trl_reference.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # the generator's batch, configs and portable models (imports no trl)

REL = 1e-9  # float64 on both sides, bit-identical inputs (see the module docstring)


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("gspo_token", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset

    from posttrain.testing.tiny_model import build_tokenizer

    posttrain.activate("gspo_token", allow_experimental=True)
    from posttrain_gspo_token.config import GSPOTokenConfig
    from posttrain_gspo_token.trainer import GSPOTokenTrainer

    tokenizer = build_tokenizer()
    policy, ref = gen.portable_model(tokenizer, gen.SEED_POLICY), gen.portable_model(tokenizer, gen.SEED_REF)
    out = str(tmp_path_factory.mktemp("gspo_token_parity"))
    args = GSPOTokenConfig(output_dir=out, per_device_train_batch_size=gen.B, num_generations=2, max_completion_length=gen.MAX_LEN,
                           report_to="none", save_strategy="no", gradient_checkpointing=False)
    prompts = Dataset.from_dict({"prompt": ["what is 1 + 2", "hello", "the cat sat on the mat"]})
    trainer = GSPOTokenTrainer(model=copy.deepcopy(policy), reward_funcs=gen.low_token_fraction, args=args, train_dataset=prompts,
                               processing_class=tokenizer)
    return dict(trainer=trainer, policy=policy, ref=ref, out=out, config_cls=GSPOTokenConfig)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def test_reference_file_is_current(setup):
    assert REFERENCE["versions"]["trl"] == "1.13.0" and REFERENCE["dtype"] == "float64"
    assert sorted(REFERENCE["configs"]) == sorted(gen.CONFIGS)
    for name, record in REFERENCE["configs"].items():
        assert record["overrides"] == gen.CONFIGS[name], f"{name}: regenerate with plugins/gspo_token/scripts/make_trl_reference.py"
    assert REFERENCE["batch"] == {k: v.tolist() for k, v in gen.fixed_batch().items()}
    assert REFERENCE["advantages"] == gen.ADVANTAGES
    assert _rel(gen.weight_fingerprint(setup["policy"]), REFERENCE["policy_weight_sum"]) < 1e-12
    assert _rel(gen.weight_fingerprint(setup["ref"]), REFERENCE["ref_weight_sum"]) < 1e-12


@pytest.mark.parametrize("case", sorted(gen.CONFIGS))
def test_loss_metrics_and_gradients_match_trl_1_13(setup, case):
    record = REFERENCE["configs"][case]
    trainer = setup["trainer"]
    args = setup["config_cls"](output_dir=setup["out"], per_device_train_batch_size=gen.B, num_generations=2, max_completion_length=gen.MAX_LEN,
                               report_to="none", save_strategy="no", gradient_checkpointing=False, **record["overrides"])
    trainer.args = args
    batch = {k: torch.tensor(v) for k, v in REFERENCE["batch"].items()}
    mask = batch["completion_mask"]
    batch["advantages"] = torch.tensor(REFERENCE["advantages"], dtype=torch.float64)
    batch["old_per_token_logps"] = torch.tensor(record["old_per_token_logps"], dtype=torch.float64)
    if record["ref_per_token_logps"] is not None:
        batch["ref_per_token_logps"] = torch.tensor(record["ref_per_token_logps"], dtype=torch.float64)
    tokens = int(mask.sum())
    batch["num_completion_tokens"] = tokens
    if args.loss_type == "bnpo":
        batch["bnpo_normalizer"] = torch.tensor(float(tokens))
    n_items = torch.tensor(float(tokens if args.loss_type in ("dapo", "bnpo") else gen.B))

    model = trainer.model
    with torch.no_grad():  # the same weights as TRL's copy of the portable policy
        for p, q in zip(model.parameters(), setup["policy"].parameters()):
            p.copy_(q)
    model.train()
    model.zero_grad(set_to_none=True)
    loss, metrics = trainer.compute_loss(model, batch, n_items)
    loss.backward()

    # every importance ratio is at least 1e-6 from its clip boundaries: no decision can flip at REL
    from posttrain_gspo_token.trainer import importance_weights

    with torch.no_grad():
        logps, _, _ = posttrain.completion_logps(model, batch, args.temperature, compute_entropy=False)
        ratio = torch.exp(importance_weights(logps, batch["old_per_token_logps"], mask.double(), args.importance_sampling_level))
    valid = mask.bool() if ratio.shape[1] > 1 else torch.ones_like(ratio, dtype=torch.bool)
    eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    for bound in (1 - args.epsilon, 1 + eps_high) + ((args.delta,) if args.delta else ()):
        assert (ratio[valid] - bound).abs().min() > 1e-6, f"a ratio lies within 1e-6 of the clip bound {bound}: move the inputs"
    print(f"{case}: ours={loss.item():.12f} trl={record['loss']:.12f} rel {_rel(loss.item(), record['loss']):.1e}")
    assert _rel(loss.item(), record["loss"]) < REL
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy", "kl"):
        if name in record["metrics"]:
            assert abs(float(metrics[name]) - record["metrics"][name]) <= REL * max(1.0, abs(record["metrics"][name])), name
    worst = 0.0
    for index, (name, p) in enumerate(model.named_parameters()):
        grad = p.grad.detach().double()
        probe = torch.tensor(gen.portable_values(p.numel(), 7000 + index), dtype=torch.float64).view_as(grad)
        ours = [grad.norm().item(), grad.sum().item(), (grad * probe).sum().item()]
        theirs = record["grads"][name]
        assert theirs[0] > 0, name
        for o, t in zip(ours, theirs):
            err = abs(o - t) / theirs[0] * math.sqrt(p.numel())  # sum / dot are bounded by norm * sqrt(n) (x |probe| <= 2**-5)
            worst = max(worst, err)
            assert err < REL, f"{name}: ours {ours} trl {theirs}"
    print(f"{case}: worst gradient error relative to the gradient norm {worst:.1e}")
