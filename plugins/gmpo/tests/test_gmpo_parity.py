"""Parity with TRL 1.16's ``trl.experimental.gmpo.GMPOTrainer``: same tiny weights, batch and hyperparameters give the same loss and gradients.

TRL's own ``GMPOTrainer._compute_loss`` runs on identical prepared inputs (prompt/completion ids and masks,
advantages, old and reference log-probs); one TRL trainer is built, its loss hyperparameters set per case.

Two comparisons:

* float64 (the reference one, machine-independent): our trainer on a float64 model against TRL's loss
  code on the same float64 model, where TRL's log-prob routine (whose fused LM head always computes in
  float32) is replaced by an exact float64 log-softmax of the model's logits. Everything after the
  log-probs, i.e. all of GMPO's objective, is TRL's code in float64. Loss to 1e-10 relative, gradients
  to 1e-8 by norm (measured: ~1e-15 / ~1e-14); far tighter than the 1e-5 / 1e-4 of the brief.
* float32, end to end through TRL's fused LM head: the same tolerances and their reasoning as
  plugins/grpo/tests/test_grpo_parity.py (rounding of float32 log-probs, ~1e-6 absolute).
"""

from __future__ import annotations

import copy

import pytest
import torch
from gmpo_helpers import low_token_fraction, perturbed_copy

trl = pytest.importorskip("trl")
gmpo_trl = pytest.importorskip("trl.experimental.gmpo")

from posttrain_gmpo.config import GMPOConfig  # noqa: E402
from posttrain_gmpo.trainer import GMPOTrainer, compute_group_advantages, per_token_logps_and_entropies  # noqa: E402

B, MAX_LEN = 6, 7

CASES = {
    "default": dict(),
    "asymmetric_clip": dict(epsilon=0.05, epsilon_high=0.1),
    "tight_clip": dict(epsilon=0.01),
    "beta_kl": dict(beta=0.1),
    "top_entropy": dict(top_entropy_quantile=0.5),
    "temperature": dict(temperature=0.7, beta=0.05),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import warnings

    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2)
    ref_model = perturbed_copy(model, scale=0.05)
    prompts = Dataset.from_dict({"prompt": ["what is 1 + 2", "hello", "the cat sat on the mat"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's experimental-API warning
        trl_args = gmpo_trl.GMPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), bf16=False, report_to="none", use_cpu=True,
                                       per_device_train_batch_size=B, num_generations=2, max_completion_length=MAX_LEN)
        trl_trainer = gmpo_trl.GMPOTrainer(model=copy.deepcopy(model), reward_funcs=low_token_fraction, args=trl_args, train_dataset=prompts, processing_class=tok)
    trl_trainer.current_gradient_accumulation_steps = 1
    ours_args = GMPOConfig(output_dir=str(tmp_path_factory.mktemp("ours")), per_device_train_batch_size=B, num_generations=2,
                           max_completion_length=MAX_LEN, report_to="none", save_strategy="no")
    ours = GMPOTrainer(model=copy.deepcopy(model), reward_funcs=low_token_fraction, args=ours_args, train_dataset=prompts, processing_class=tok,
                       allow_experimental=True)

    # left-padded prompts, right-padded completions of different lengths (one of a single token)
    gen = torch.Generator().manual_seed(0)
    prompt_lens, completion_lens = [3, 5, 5, 2, 4, 5], [7, 3, 1, 5, 7, 4]
    batch = {k: torch.zeros(B, w, dtype=torch.long) for k, w in (("prompt_ids", 5), ("prompt_mask", 5), ("completion_ids", MAX_LEN), ("completion_mask", MAX_LEN))}
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        batch["prompt_ids"][i, 5 - p :] = torch.randint(3, 400, (p,), generator=gen)
        batch["prompt_mask"][i, 5 - p :] = 1
        batch["completion_ids"][i, :c] = torch.randint(3, 400, (c,), generator=gen)
        batch["completion_mask"][i, :c] = 1
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.1])
    return dict(tok=tok, model=model, ref_model=ref_model, trl=trl_trainer, ours=ours, batch=batch, advantages=advantages)


def _configure(setup, overrides: dict, float64: bool) -> GMPOConfig:
    """Return our config for one case and set TRL's loss attributes to the same values."""
    from trl.trainer.utils import add_fused_lm_head

    args = GMPOConfig(output_dir=setup["ours"].args.output_dir, per_device_train_batch_size=B, num_generations=2,
                      max_completion_length=MAX_LEN, report_to="none", save_strategy="no", **overrides)
    t = setup["trl"]
    t.beta, t.epsilon_low = args.beta, args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.top_entropy_quantile, t.temperature = args.top_entropy_quantile, args.temperature
    if float64:
        t._get_per_token_logps_and_entropies = _exact_logps(args.temperature)
    else:
        t.__dict__.pop("_get_per_token_logps_and_entropies", None)  # TRL's own fused-head routine
        add_fused_lm_head(t.model, temperature=args.temperature, outputs=("log_probs", "entropy"))  # TRL fixes T at init
    setup["ours"].args = args
    return args


def _exact_logps(temperature: float):
    """TRL's ``_get_per_token_logps_and_entropies`` contract computed exactly in the model's dtype (float64 here)."""

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, compute_entropy=False, **_):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -logits_to_keep - 1 : -1] / temperature
        logp = torch.log_softmax(logits, dim=-1)
        mask = attention_mask[:, -logits_to_keep:].to(logp.dtype)
        per_token = logp.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1) * mask
        entropy = -(logp.exp() * logp).sum(-1) * mask if compute_entropy else None
        return per_token, entropy, None

    return logps_and_entropies


def _inputs(setup, args, model, ref_model, dtype):
    batch = dict(setup["batch"])
    mask = batch["completion_mask"].to(dtype)
    with torch.no_grad():
        current, _ = per_token_logps_and_entropies(model, batch, 1.0, compute_entropy=False)
        ref, _ = per_token_logps_and_entropies(ref_model, batch, 1.0, compute_entropy=False)
    # old log-probs a visible distance away (|noise| up to ~0.6), so the log-space clip at 0.4 and below acts
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(3), dtype=dtype) * 0.3
    batch["advantages"] = setup["advantages"].to(dtype)
    batch["old_per_token_logps"] = (current + noise) * mask
    if args.beta:
        batch["ref_per_token_logps"] = ref * mask
    return batch


def _run(setup, case: str, float64: bool):
    dtype = torch.float64 if float64 else torch.float32
    args = _configure(setup, CASES[case], float64)
    t, ours = setup["trl"], setup["ours"]
    trl_model = copy.deepcopy(setup["model"]).double() if float64 else t.model
    our_model = copy.deepcopy(setup["model"]).to(dtype)
    ref_model = copy.deepcopy(setup["ref_model"]).to(dtype)
    batch = _inputs(setup, args, our_model, ref_model, dtype)
    trl_model.zero_grad()
    trl_loss = t._compute_loss(trl_model, dict(batch))
    our_loss, metrics = ours.compute_loss(our_model, dict(batch), torch.tensor(float(B), dtype=dtype))
    trl_loss.backward()
    our_loss.backward()
    trl_grads = dict(trl_model.named_parameters())
    worst = 0.0
    for name, p in our_model.named_parameters():
        theirs = trl_grads[name].grad
        assert theirs is not None and theirs.norm() > 0, name
        worst = max(worst, ((p.grad - theirs).norm() / theirs.norm()).item())
    rel = abs(our_loss.item() - trl_loss.item()) / abs(trl_loss.item())
    print(f"GMPO {case} float{64 if float64 else 32}: ours={our_loss.item():.10f} trl={trl_loss.item():.10f} loss rel {rel:.1e}, worst grad rel {worst:.1e}")
    return our_loss, trl_loss, worst, metrics


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_trl_float64(setup, case):
    our_loss, trl_loss, worst, metrics = _run(setup, case, float64=True)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-10, atol=0.0)
    assert worst <= 1e-8
    assert {"entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"} <= set(metrics)


@pytest.mark.parametrize("case", ["default", "beta_kl"])
def test_loss_and_gradients_match_trl_end_to_end_float32(setup, case):
    our_loss, trl_loss, worst, _ = _run(setup, case, float64=False)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)  # see the module docstring
    assert worst <= 1e-5


def test_clipping_is_exercised_and_matches_trls_metrics(setup):
    """The parity batch really clips (else the clip code would be untested), and our clip fractions equal TRL's."""
    _configure(setup, CASES["tight_clip"], float64=True)
    t, ours = setup["trl"], setup["ours"]
    model = copy.deepcopy(setup["model"]).double()
    batch = _inputs(setup, ours.args, model, model, torch.float64)
    t._metrics["train"].clear()
    t.model.train()
    t._compute_loss(model, dict(batch))
    _, metrics = ours.compute_loss(model, dict(batch), torch.tensor(float(B)))
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[key].item() == pytest.approx(t._metrics["train"][key][-1], rel=1e-12), key
    assert metrics["clip_ratio/region_mean"].item() > 0.2


def test_group_advantages_are_grpos():
    """GMPO keeps GRPO's group-normalized advantages (TRL inherits them): (r - group mean) / (group std + 1e-4), TRL's nanstd."""
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([[1.0], [0.0], [0.5], [0.5], [2.0], [0.0], [1.0], [1.0]], dtype=torch.float64)
    adv, is_std_zero = compute_group_advantages(rewards, torch.ones(1, dtype=torch.float64), 4, "group", "sum_then_normalize")
    grouped = adv.view(2, 4)
    torch.testing.assert_close(grouped.mean(1), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)
    centred = rewards.view(2, 4) - rewards.view(2, 4).mean(1, keepdim=True)
    exact = centred / (rewards.view(2, 4).std(1, keepdim=True) + 1e-4)  # the unbiased std, all in float64
    torch.testing.assert_close(grouped, exact, rtol=1e-12, atol=1e-12)
    # TRL's nanstd computes its Bessel factor count / (count - 1) from integer counts in the default dtype (float32): 1e-7 relative
    trl = centred / (nanstd(rewards.view(2, 4), dim=1).unsqueeze(1) + 1e-4)
    torch.testing.assert_close(grouped, trl, rtol=1e-6, atol=1e-12)
    assert not is_std_zero.any()
