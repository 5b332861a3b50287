"""ReMax parity: loss and gradients of one step equal an independent float64 implementation of the paper's Algorithm 1.

Reference: Li et al. 2023 (arXiv:2310.10505), Algorithm 1, with the KL penalty in the sampled reward::

    A_i  = r(x_i, y_i) - beta * sum_t (log pi(y_i,t) - log pi_ref(y_i,t)) - r(x_i, y_bar_i)
    grad = -1/N sum_i A_i * grad sum_t log pi(y_i,t | x_i, y_i,<t)        (A_i held constant)

written as the on-policy surrogate -1/N sum_i A_i * pi(y_i) / stopgrad(pi(y_i)): its value is -mean(A),
its gradient the REINFORCE estimator above (what a trainer logs as the loss of an on-policy step)

computed here per sequence, unpadded, from plain forwards of the float64 model (no posttrain helper),
on fixed rollouts (a backend whose greedy completions differ from its samples). TRL never shipped ReMax,
so the paper is the reference. float64 makes the comparison hold on any machine. The core keeps rewards
and the stored old / reference log-probs in float32 (as TRL does): the reward here is a multiple of 1/8
(exact in float32), and the loss, a mean of signed terms that can cancel, is compared relative to the mean
of their magnitudes, -1/N sum_i |A_i| (the float32 KL of a term moves it by ~1e-7 of its own size).
"""

from __future__ import annotations

import pytest
import torch
from remax_helpers import FixedBackend, perturbed_copy

import posttrain

REL_LOSS, REL_GRAD = 1e-5, 1e-4


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("remax", allow_experimental=True)
    yield


def low_token_eighths(completion_ids, **kwargs):
    """Number of completion tokens with ids in [3, 67), divided by 8: exact in float32."""
    return [sum(3 <= t < 67 for t in c) / 8 for c in completion_ids]


def _sequence_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) of one unpadded sequence (temperature 1)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]  # (C, V): the positions that predict the completion
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, torch.tensor(completion).unsqueeze(-1)).sum()


@pytest.mark.parametrize("beta, num_generations", [(0.0, 1), (0.1, 2), (0.1, 4)])
def test_loss_and_gradients_equal_algorithm_1(tiny_tokenizer, prompt_dataset, tmp_path, beta, num_generations):
    from posttrain import RolloutEngine, expand_prompts
    from posttrain.experimental.remax import ReMaxConfig, ReMaxTrainer
    from posttrain.testing.tiny_model import build_model

    n = 8
    model = build_model(tiny_tokenizer).double()
    args = ReMaxConfig(output_dir=str(tmp_path), per_device_train_batch_size=n, num_generations=num_generations, max_completion_length=6,
                       beta=beta, max_steps=1, report_to="none", disable_tqdm=True, save_strategy="no")
    backend = FixedBackend()
    trainer = ReMaxTrainer(model=model, reward_funcs=low_token_eighths, args=args, train_dataset=prompt_dataset,
                           processing_class=tiny_tokenizer, rollout_engine=RolloutEngine(backend))
    ref = None
    if beta:
        ref = perturbed_copy(model)
        trainer.ref_model = trainer.loop.prepare_frozen(ref)
    rows = [trainer.train_dataset[i] for i in range(n // num_generations)]
    (batch,) = trainer._generate_and_score(rows, seed=0)
    model.zero_grad()
    loss, _ = trainer.compute_loss(model, batch, num_items_in_batch=n)
    loss.backward()
    ours = {name: p.grad.detach().clone() for name, p in model.named_parameters()}

    # the independent computation, from the backend's own completions
    prompts, prompt_ids = expand_prompts(rows, num_generations, trainer._prompt_ids, tiny_tokenizer)
    sampled_request, greedy_request = backend.requests
    assert greedy_request[1].greedy and greedy_request[1].n == 1 and greedy_request[0] == prompt_ids[::num_generations]
    assert not sampled_request[1].greedy and sampled_request[1].n == num_generations
    samples = backend.generate(sampled_request[0], sampled_request[1]).completion_ids  # the same fixed completions again
    greedies = backend.generate(greedy_request[0], greedy_request[1]).completion_ids
    model.zero_grad()
    total, scale = torch.zeros((), dtype=torch.float64), 0.0
    for i, (p, y) in enumerate(zip(prompt_ids, samples)):
        logp = _sequence_logps(model, p, y)
        reward = sum(3 <= t < 67 for t in y) / 8
        if beta:
            with torch.no_grad():
                reward -= beta * (logp.detach() - _sequence_logps(ref, p, y)).item()
        y_bar = greedies[i // num_generations]
        advantage = reward - sum(3 <= t < 67 for t in y_bar) / 8
        scale += abs(advantage) / n
        total = total - advantage * torch.exp(logp - logp.detach())  # value A, gradient A * grad log pi
    reference = total / n
    reference.backward()
    assert abs(loss.item() - reference.item()) <= REL_LOSS * scale, (loss.item(), reference.item(), scale)
    worst = 0.0
    for name, p in model.named_parameters():
        rel = ((ours[name] - p.grad).norm() / p.grad.norm().clamp(min=1e-30)).item()
        worst = max(worst, rel)
        assert rel <= REL_GRAD, f"{name}: gradient differs by {rel:.2e} relative"
    print(f"ReMax parity (beta={beta}, G={num_generations}): loss {loss.item():.9e} vs {reference.item():.9e} (|diff| / mean|A| {abs(loss.item() - reference.item()) / scale:.1e}), worst grad rel {worst:.2e}")
