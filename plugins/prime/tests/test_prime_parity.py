"""PRIME parity: the policy loss, the implicit PRM's cross-entropy and both models' gradients of one step equal an
independent float64 implementation of the paper (Cui et al. 2025, arXiv:2502.01456) on fixed rollouts.

The paper, written out per completion (unpadded plain forwards of each model, no posttrain helper):

    r_t^i   = beta * (log pi_prm(y_t^i) - log pi_ref(y_t^i))                       implicit process reward
    b_i     = 1/(K-1) sum_{j != i} mean_t r_t^j                                   leave-one-out baseline
    A_t^i   = sum_{s >= t} (r_s^i - b_i)  +  o_i - 1/(K-1) sum_{j != i} o_j         process return + outcome RLOO
    A       <- (A - mean) / sqrt(var + 1e-8)  over the step's tokens               (whiten_advantages)
    L_pol   = -1/N sum_i mean_t A_t^i * pi(y_t^i) / stopgrad(pi(y_t^i))             (PPO at ratio 1)
    L_prm   =  1/N sum_i BCE(sigmoid(beta * sum_t log pi_prm/pi_ref (y^i)), o_i)    implicit PRM cross-entropy

TRL never shipped PRIME. The core stores no-grad log-probs (pi_ref, and the PRM's before its update) in
float32, as TRL does for its reference: the reference implementation rounds them the same way, so both
sides compute from the same numbers and agree to float64 summation order, on any machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from prime_helpers import FixedBackend, perturbed_copy

import posttrain

REL_LOSS, REL_GRAD = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("prime", allow_experimental=True)
    yield


def low_token_eighths(completion_ids, **kwargs):
    """Number of completion tokens with ids in [3, 67), divided by 8 (exact in float32), capped at 1."""
    return [min(1.0, sum(3 <= t < 67 for t in c) / 8) for c in completion_ids]


def _token_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).squeeze(-1)  # (C,)


@pytest.mark.parametrize("num_generations, whiten, coefs", [(2, True, (1.0, 1.0)), (4, True, (0.5, 2.0)), (4, False, (1.0, 1.0))])
def test_losses_and_gradients_equal_the_paper(tiny_tokenizer, prompt_dataset, tmp_path, num_generations, whiten, coefs):
    from posttrain import RolloutEngine, expand_prompts
    from posttrain.experimental.prime import PRIMEConfig, PRIMETrainer
    from posttrain.testing.tiny_model import build_model

    n, beta = 8, 0.5
    model = build_model(tiny_tokenizer).double()
    prm = perturbed_copy(model, scale=0.05, seed=2)  # a PRM that already differs from the reference: nonzero implicit rewards
    args = PRIMEConfig(output_dir=str(tmp_path), per_device_train_batch_size=n, num_generations=num_generations, max_completion_length=6, beta=beta,
                       whiten_advantages=whiten, process_reward_coef=coefs[0], outcome_reward_coef=coefs[1], max_steps=1, report_to="none",
                       disable_tqdm=True, save_strategy="no")
    backend = FixedBackend()
    trainer = PRIMETrainer(model=model, reward_funcs=low_token_eighths, args=args, train_dataset=prompt_dataset, processing_class=tiny_tokenizer,
                           rollout_engine=RolloutEngine(backend), prm_model=prm)
    rows = [trainer.train_dataset[i] for i in range(n // num_generations)]
    (batch,) = trainer._generate_and_score(rows, seed=0)
    losses, _ = trainer.compute_loss(model, batch, num_items_in_batch=n)
    (losses["model"] + losses["prm"]).backward()
    prm_model = trainer.prm
    ours = {("policy", k): p.grad.detach().clone() for k, p in model.named_parameters()}
    ours.update({("prm", k): p.grad.detach().clone() for k, p in prm_model.named_parameters()})
    model.zero_grad(), prm_model.zero_grad()

    # the paper, per completion
    _, prompt_ids = expand_prompts(rows, num_generations, trainer._prompt_ids, tiny_tokenizer)
    (request,) = backend.requests
    completions = backend.generate(*request).completion_ids
    ref = trainer.ref_model
    k = num_generations
    outcome = torch.tensor(low_token_eighths(completions), dtype=torch.float64)
    with torch.no_grad():
        rewards = [beta * (_token_logps(prm_model, p, y).float().double() - _token_logps(ref, p, y).float().double()) for p, y in zip(prompt_ids, completions)]
    advantages = []
    for i, r in enumerate(rewards):
        group = range(i // k * k, i // k * k + k)
        b = sum(rewards[j].mean() for j in group if j != i) / (k - 1)
        o = outcome[i] - sum(outcome[j] for j in group if j != i) / (k - 1)
        returns = torch.stack([(r[t:] - b).sum() for t in range(len(r))])
        advantages.append(coefs[0] * returns + coefs[1] * o)
    if whiten:
        flat = torch.cat(advantages)
        advantages = [(a - flat.mean()) / torch.sqrt(flat.var() + 1e-8) for a in advantages]
    policy_loss = torch.zeros((), dtype=torch.float64)
    prm_loss = torch.zeros((), dtype=torch.float64)
    for i, (p, y) in enumerate(zip(prompt_ids, completions)):
        logp = _token_logps(model, p, y)
        policy_loss = policy_loss - (advantages[i] * torch.exp(logp - logp.detach())).mean() / n
        with torch.no_grad():
            ref_logp = _token_logps(ref, p, y).float().double()
        implicit = beta * (_token_logps(prm_model, p, y) - ref_logp).sum()
        prm_loss = prm_loss + F.binary_cross_entropy_with_logits(implicit, outcome[i]) / n
    (policy_loss + prm_loss).backward()

    scale = sum(a.abs().mean() for a in advantages).item() / n  # the policy loss is a mean of signed terms: compare to their size
    assert abs(losses["model"].item() - policy_loss.item()) <= REL_LOSS * scale, (losses["model"].item(), policy_loss.item())
    assert abs(losses["prm"].item() - prm_loss.item()) <= REL_LOSS * abs(prm_loss.item())
    worst = {"policy": 0.0, "prm": 0.0}
    for (which, name), g in ours.items():
        ref_grad = dict(model.named_parameters() if which == "policy" else prm_model.named_parameters())[name].grad
        rel = ((g - ref_grad).norm() / ref_grad.norm().clamp(min=1e-30)).item()
        worst[which] = max(worst[which], rel)
        assert rel <= REL_GRAD, f"{which} {name}: gradient differs by {rel:.2e} relative"
    print(f"PRIME parity (K={k}, whiten={whiten}, coefs={coefs}): policy loss {losses['model'].item():.9e} vs {policy_loss.item():.9e}, "
          f"PRM loss {losses['prm'].item():.9e} vs {prm_loss.item():.9e}; worst grad rel policy {worst['policy']:.1e}, PRM {worst['prm']:.1e}")
