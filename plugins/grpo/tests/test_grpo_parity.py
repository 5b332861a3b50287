"""Parity with TRL 1.16: the same tiny weights, batch and hyperparameters give the same loss and gradients.

TRL's own ``GRPOTrainer._compute_loss`` is called on identical prepared inputs (prompt/completion ids
and masks, advantages, old and reference log-probs). One TRL trainer is built and its loss
hyperparameters are set per case (they are plain attributes that ``_compute_loss`` reads). Both on the CPU.

Tolerances. Both sides run float32: TRL's fused LM head computes its log-probs in float32 whatever
the model's dtype (float64 weights would only move the difference onto TRL's side); we score chunks of
hidden states against the LM head, with other reduction orders. Each token log-prob then carries a
rounding error of a few float32 ulps of log(V) ~ 6 (eps32 = 1.2e-7), ~1e-6 absolute; the ratios
exp(logp - old) then carry ~1e-6 relative, and the loss, a mean of terms of order |advantage| <= 1.2
with both signs, ~1e-6 absolute however much the terms cancel: the loss agrees to 1e-5 relative plus
1e-6 absolute (measured on this CPU: equal in every case). Gradients are compared per tensor by the norm of the difference relative to their own norm, to
1e-5 (measured: <= 5e-7), never entry by entry: entries near zero are all rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from grpo_helpers import low_token_fraction, perturbed_copy

trl = pytest.importorskip("trl")

from posttrain_grpo.config import GRPOConfig  # noqa: E402
from posttrain_grpo.trainer import GRPOTrainer, compute_group_advantages, importance_sampling_ratio, per_token_logps_and_entropies  # noqa: E402

B, MAX_LEN = 6, 7

CASES = {
    "grpo": dict(loss_type="grpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "dapo": dict(loss_type="dapo", epsilon_high=0.28),
    "bnpo": dict(loss_type="bnpo"),
    "cispo": dict(loss_type="cispo", epsilon_high=1.02),
    "sapo": dict(loss_type="sapo"),
    "luspo": dict(loss_type="luspo", importance_sampling_level="sequence"),
    "vespo": dict(loss_type="vespo"),
    "gspo_sequence": dict(loss_type="grpo", importance_sampling_level="sequence", epsilon=0.01, epsilon_high=0.012),
    "beta_kl": dict(loss_type="dapo", beta=0.1),
    "beta_kl_no_bias_correction": dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=False),
    "beta_kl_sequence": dict(loss_type="dapo", beta=0.05, importance_sampling_level="sequence"),
    "delta": dict(loss_type="dapo", delta=1.01, epsilon=0.005),
    "top_entropy": dict(loss_type="dapo", top_entropy_quantile=0.5),
    "temperature": dict(loss_type="dapo", temperature=0.7),
    "is_token_truncate": dict(loss_type="dapo", vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=1.02),
    "is_sequence_mask": dict(loss_type="grpo", vllm_importance_sampling_mode="sequence_mask", vllm_importance_sampling_clip_max=1.05),
    # tool-calling episodes: tool tokens (tool_mask 0) are attended to but carry no loss, KL or ratio
    "tool_mask_dapo": dict(loss_type="dapo", beta=0.1),
    "tool_mask_grpo_sequence": dict(loss_type="grpo", beta=0.1, importance_sampling_level="sequence"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2)
    ref_model = perturbed_copy(model, scale=0.05)
    prompts = Dataset.from_dict({"prompt": ["what is 1 + 2", "hello", "the cat sat on the mat"]})
    trl_args = trl.GRPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), bf16=False, report_to="none", use_cpu=True,
                              per_device_train_batch_size=B, num_generations=2, max_completion_length=MAX_LEN)
    trl_trainer = trl.GRPOTrainer(model=copy.deepcopy(model), reward_funcs=low_token_fraction, args=trl_args, train_dataset=prompts, processing_class=tok)
    trl_trainer.current_gradient_accumulation_steps = 1
    ours_args = GRPOConfig(output_dir=str(tmp_path_factory.mktemp("ours")), per_device_train_batch_size=B, num_generations=2,
                           max_completion_length=MAX_LEN, report_to="none", save_strategy="no")
    ours = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=low_token_fraction, args=ours_args, train_dataset=prompts, processing_class=tok)

    # a batch with left-padded prompts, right-padded completions of different lengths (one empty-ish)
    gen = torch.Generator().manual_seed(0)
    prompt_lens, completion_lens = [3, 5, 5, 2, 4, 5], [7, 3, 1, 5, 7, 4]
    prompt_ids = torch.zeros(B, 5, dtype=torch.long)
    prompt_mask = torch.zeros(B, 5, dtype=torch.long)
    completion_ids = torch.zeros(B, MAX_LEN, dtype=torch.long)
    completion_mask = torch.zeros(B, MAX_LEN, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_lens, completion_lens)):
        prompt_ids[i, 5 - p :] = torch.randint(3, 400, (p,), generator=gen)
        prompt_mask[i, 5 - p :] = 1
        completion_ids[i, :c] = torch.randint(3, 400, (c,), generator=gen)
        completion_mask[i, :c] = 1
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids, "completion_mask": completion_mask}
    advantages = torch.tensor([1.0, -0.5, 0.8, -1.2, 0.3, -0.1])
    return dict(tok=tok, model=model, ref_model=ref_model, trl=trl_trainer, ours=ours, batch=batch, advantages=advantages, gen=gen)


def _configure(setup, overrides: dict):
    """Return (our config, TRL inputs) for one case; set TRL's loss attributes to the same values."""
    args = GRPOConfig(output_dir=setup["ours"].args.output_dir, per_device_train_batch_size=B, num_generations=2,
                      max_completion_length=MAX_LEN, report_to="none", save_strategy="no", **overrides)
    t = setup["trl"]
    t.loss_type, t.beta, t.importance_sampling_level = args.loss_type, args.beta, args.importance_sampling_level
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.top_entropy_quantile, t.temperature, t.max_completion_length = args.top_entropy_quantile, args.temperature, MAX_LEN
    for name in ("delta", "use_bias_correction_kl", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):
        setattr(t.args, name, getattr(args, name))
    is_case = "vllm_importance_sampling_mode" in overrides
    t.use_vllm = is_case  # TRL applies its IS weight only under vLLM; our trainer whenever the engine is not the policy
    t.vllm_importance_sampling_correction = is_case
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(t.model, temperature=args.temperature, outputs=("log_probs", "entropy"))  # TRL fixes T at init
    return args


def _inputs(setup, args):
    batch = dict(setup["batch"])
    mask = batch["completion_mask"].float()
    with torch.no_grad():
        # fixed inputs (temperature 1), so a wrong temperature in the trained log-probs shows up in the loss
        current, _ = per_token_logps_and_entropies(setup["model"], batch, 1.0, compute_entropy=False)
        ref, _ = per_token_logps_and_entropies(setup["ref_model"], batch, 1.0, compute_entropy=False)
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(3)) * 0.05
    batch["advantages"] = setup["advantages"]
    batch["old_per_token_logps"] = (current + noise) * mask  # ratios != 1 so clipping is exercised
    if args.beta:
        batch["ref_per_token_logps"] = ref * mask
    return batch


@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_trl(setup, case):
    args = _configure(setup, CASES[case])
    batch = _inputs(setup, args)
    mask = batch["completion_mask"]
    if case.startswith("is_"):
        sampling = batch["old_per_token_logps"] - 0.01 * torch.arange(MAX_LEN).float()  # engine log-probs differ a little
        batch["importance_sampling_ratio"] = importance_sampling_ratio(batch["old_per_token_logps"], sampling, mask.float(),
                                                                       args.vllm_importance_sampling_mode, None, args.vllm_importance_sampling_clip_max)
    if case.startswith("tool_mask"):  # tokens 2-3 of every completion are a tool's result
        batch["tool_mask"] = torch.ones_like(mask)
        batch["tool_mask"][:, 2:4] = 0
        mask = mask * batch["tool_mask"]
    trl_inputs = dict(batch, num_items_in_batch=mask.sum())
    trl_loss = setup["trl"]._compute_loss(setup["trl"].model, trl_inputs)

    ours = setup["ours"]
    ours.args = args
    n_items = int(mask.sum()) if args.loss_type in ("dapo", "cispo", "vespo", "bnpo") else B
    our_batch = dict(batch, num_completion_tokens=int(mask.sum()))
    if args.loss_type == "bnpo":
        our_batch["bnpo_normalizer"] = mask.sum().float()
    our_loss, metrics = ours.compute_loss(ours.model, our_batch, torch.tensor(float(n_items)))
    print(f"{case}: ours={our_loss.item():.8f} trl={trl_loss.item():.8f} rel {abs(our_loss.item() - trl_loss.item()) / abs(trl_loss.item()):.1e}")
    assert torch.isfinite(our_loss)
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)  # see the module docstring
    assert "entropy" in metrics


def test_gradients_match_trl(setup):
    args = _configure(setup, dict(loss_type="dapo", beta=0.1, epsilon_high=0.28))
    batch = _inputs(setup, args)
    mask = batch["completion_mask"]
    t, ours = setup["trl"], setup["ours"]
    ours.args = args
    t.model.zero_grad()
    ours.model.zero_grad()
    t._compute_loss(t.model, dict(batch, num_items_in_batch=mask.sum())).backward()
    loss, _ = ours.compute_loss(ours.model, dict(batch, num_completion_tokens=int(mask.sum())), mask.sum().float())
    loss.backward()
    trl_grads = dict(t.model.named_parameters())
    worst = 0.0
    for name, p in ours.model.named_parameters():
        theirs = trl_grads[name].grad
        assert theirs.norm() > 0, name
        rel = ((p.grad - theirs).norm() / theirs.norm()).item()
        assert rel <= 1e-5, f"{name}: |ours - trl| / |trl| = {rel:.2e}"  # see the module docstring
        worst = max(worst, rel)
    print(f"worst relative gradient difference: {worst:.2e}")



def _exact_nanstd(x, dim=None, keepdim=False):
    """TRL's nanstd with its Bessel factor count / (count - 1) in x's dtype (TRL takes it in float32: ~1e-8 relative in
    float64). posttrain's nanstd computes it in the input's dtype since core 1.7, so the transcription does too."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True).to(x.dtype)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(count, float("nan")))
    std = torch.sqrt(variance * correction)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def _trl_advantages(rewards_per_func, weights, num_generations, scale_rewards, aggregation, nanstd_fn=None):
    """TRL 1.16's advantage block (grpo_trainer.py, _generate_and_score_completions), transcribed."""
    from trl.trainer.utils import nanstd as trl_nanstd

    nanstd = trl_nanstd if nanstd_fn is None else nanstd_fn

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
        if scale_rewards in ["group", "none"]:
            std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
        else:
            std = nanstd(rewards).expand_as(rewards)
        advantages = rewards - mean_grouped
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    else:
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1])
        rewards = (reward_k * weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
        std = nanstd(rewards).expand_as(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_advantages_match_trl_formula(scale_rewards, aggregation):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 2, generator=gen, dtype=torch.float64)  # float64: the two transcriptions may order their ops differently
    rewards[1, 0] = torch.nan  # one function returned None
    rewards[5] = torch.nan  # every function returned None: unscorable
    rewards[8:12, 1] = 0.5  # a group where one reward is constant
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64)
    ours, _ = compute_group_advantages(rewards.clone(), weights, 4, scale_rewards, aggregation)
    theirs = _trl_advantages(rewards.clone(), weights, 4, scale_rewards, aggregation, nanstd_fn=_exact_nanstd)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    trl_own = _trl_advantages(rewards.clone(), weights, 4, scale_rewards, aggregation)
    torch.testing.assert_close(ours, trl_own, rtol=1e-6, atol=1e-9)  # TRL's float32 Bessel factor: ~1e-8 relative
    assert ours[5] == 0.0


def test_advantages_zero_when_group_rewards_identical():
    rewards = torch.ones(4, 1)
    advantages, is_std_zero = compute_group_advantages(rewards, torch.ones(1), 4, "group", "sum_then_normalize")
    assert torch.all(advantages == 0) and torch.all(is_std_zero)
