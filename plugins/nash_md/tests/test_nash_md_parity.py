"""Nash-MD parity with TRL 1.13.0 (the last release with ``trl.experimental.nash_md``) on fixed completions, float64.

``tests/data/trl_1_13_0_reference.json`` was written by ``scripts/make_trl_reference.py``: TRL 1.13's
own ``NashMDTrainer._compute_logprobs`` / ``_compute_losses`` on fixed prompts, policy completions and
preference probabilities, and TRL's ``GeometricMixtureWrapper`` log-probs of the same tokens, with
portable float64 weights (the same bits on any machine). Here the same token ids go through
posttrain's micro-batch path (``_with_ref_logps`` then ``compute_loss``) and the mixture function of
the sampler. Tolerances: the core stores the reference's log-probs in float32 (as for every online
method), ~1e-7 relative on a log-ratio: far inside rel 1e-5 (loss) and 1e-4 (gradients).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
import torch

import posttrain

posttrain.activate("nash_md", allow_experimental=True)
from posttrain.experimental.nash_md import NashMDConfig, NashMDTrainer  # noqa: E402
from posttrain_nash_md._mixture import mixture_scores  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "data" / "trl_1_13_0_reference.json").read_text())
_spec = importlib.util.spec_from_file_location("nash_md_make_trl_reference", HERE.parent / "scripts" / "make_trl_reference.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)


@pytest.fixture(autouse=True)
def _opted_in():
    """Opt in before every test: another test module of the same session (make test's rerun of the parity files) may reset
    the registry's activations after this module's import-time opt-in."""
    posttrain.activate("nash_md", allow_experimental=True)


def _micro_batch(rows, prompt_ids, pad):
    width = max(map(len, rows))
    completion_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    completion_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
            "completion_mask": completion_mask, "sampling_logprobs": torch.zeros(completion_ids.shape)}


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


@pytest.mark.parametrize("name", sorted(REFERENCE["configs"]))
def test_loss_and_gradients_match_trl_1_13(tiny_tokenizer, prompt_dataset, tmp_path, name):
    ref_cfg = REFERENCE["configs"][name]
    inputs = REFERENCE["inputs"]
    policy, ref = script.portable_model(tiny_tokenizer, script.SEED_POLICY), script.portable_model(tiny_tokenizer, script.SEED_REF)
    args = NashMDConfig(output_dir=str(tmp_path), beta=ref_cfg["beta"], report_to="none", max_new_tokens=8, per_device_train_batch_size=4)
    trainer = NashMDTrainer(model=policy, ref_model=ref, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                            train_dataset=prompt_dataset, processing_class=tiny_tokenizer)
    batch = trainer._with_ref_logps(_micro_batch(inputs["policy_completion_ids"], torch.tensor(inputs["prompt_ids"]), tiny_tokenizer.pad_token_id))
    batch["probability"] = torch.tensor(inputs["probability"], dtype=torch.float64)
    policy.train()
    loss, metrics = trainer.compute_loss(policy, batch, num_items_in_batch=len(inputs["probability"]))
    loss.backward()
    assert _rel(loss.item(), ref_cfg["loss"]) < 1e-5, (loss.item(), ref_cfg["loss"])
    assert _rel(metrics["loss/score"].item(), sum(ref_cfg["score"]) / 4) < 1e-5
    assert _rel(metrics["loss/kl"].item(), sum(ref_cfg["kl"]) / 4) < 1e-5
    worst = 0.0
    for index, (pname, param) in enumerate(policy.named_parameters()):
        grad = param.grad.detach().double()
        probe = torch.tensor(script.portable_values(param.numel(), 7000 + index), dtype=torch.float64).view_as(grad)
        ours = [grad.norm().item(), grad.sum().item(), (grad * probe).sum().item()]
        theirs = ref_cfg["grads"][pname]
        scale = max(abs(theirs[0]), 1e-12) * (param.numel() ** 0.5)  # |sum| <= norm * sqrt(n); |probe dot| <= norm * sqrt(n) * 2**-5
        for a, b, s in zip(ours, theirs, (abs(theirs[0]), scale, scale * 2**-5)):
            err = abs(a - b) / max(s, 1e-300)
            worst = max(worst, err)
            assert err < 1e-4, (pname, ours, theirs)
    print(f"Nash-MD parity [{name}]: loss rel err {_rel(loss.item(), ref_cfg['loss']):.2e}, worst gradient rel err {worst:.2e}")


@pytest.mark.parametrize("coef", sorted(REFERENCE["mixture"]))
def test_mixture_log_probs_match_trl_geometric_mixture_wrapper(tiny_tokenizer, coef):
    inputs = REFERENCE["inputs"]
    policy, ref = script.portable_model(tiny_tokenizer, script.SEED_POLICY).eval(), script.portable_model(tiny_tokenizer, script.SEED_REF).eval()
    batch = _micro_batch(inputs["policy_completion_ids"], torch.tensor(inputs["prompt_ids"]), tiny_tokenizer.pad_token_id)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        scores = mixture_scores(policy(input_ids=ids, attention_mask=mask).logits, ref(input_ids=ids, attention_mask=mask).logits, float(coef))
    p = batch["prompt_ids"].shape[1]
    ours = scores[:, p - 1 : -1].gather(-1, batch["completion_ids"][..., None]).squeeze(-1) * batch["completion_mask"]
    theirs = torch.tensor(REFERENCE["mixture"][coef], dtype=torch.float64)
    err = float(((ours - theirs).abs() / theirs.abs().clamp(min=1e-12)).max())
    print(f"Nash-MD mixture parity [c={coef}]: max rel err {err:.2e}")
    assert err < 1e-10
