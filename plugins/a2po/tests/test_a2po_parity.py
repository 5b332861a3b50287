"""Parity with TRL 1.16's ``trl.experimental.a2po.A2POTrainer`` in float64 (TRL's A2PO scores plain logits, no fused head).

* Stage 2: TRL's ``compute_loss`` and ours on the same float64 tiny model and fixed batch (left-padded prompts,
  completions of different lengths, rewards, V*, reference log-probs): loss to 1e-10 relative and gradients to
  1e-8 by norm (measured ~1e-16 / ~1e-15; the brief asks 1e-5 / 1e-4).
* Stage 1: TRL's ``_estimate_optimal_values`` and ours on the same prompts, with a reward that depends on the
  prompt and the sample's index only (so the two samplers' different random draws do not matter): equal V*
  per prompt and the same training prompts dropped by ``filter_all_incorrect``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import posttrain

a2po_trl = pytest.importorskip("trl.experimental.a2po")

B, P, C = 5, 4, 6
N_SAMPLES = 4


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("a2po", allow_experimental=True)
    yield


def index_reward(prompts, completions, **kwargs):
    """Deterministic 0/1 reward: sample j of a prompt scores 1 when j < len(prompt) % (N_SAMPLES + 1) (so 0..N correct per prompt)."""
    return [float(i % N_SAMPLES < len(p) % (N_SAMPLES + 1)) for i, p in enumerate(prompts)]


def _trl_trainer(model, tok, dataset, tmp_path, **overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = a2po_trl.A2POConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=2,
                                   max_completion_length=4, num_value_samples=N_SAMPLES, **overrides)
        return a2po_trl.A2POTrainer(model=model, reward_funcs=index_reward, args=args, train_dataset=dataset, processing_class=tok)


@pytest.mark.parametrize("beta2", [1e-3, 0.5])
def test_stage2_loss_and_gradients_match_trl_float64(tiny_tokenizer, tmp_path, beta2):
    from datasets import Dataset
    from posttrain.experimental.a2po import A2POConfig, A2POTrainer
    from posttrain.testing.tiny_model import build_model

    from a2po_helpers import perturbed_copy

    tok = tiny_tokenizer
    model = build_model(tok, hidden_size=32, num_layers=2).double()
    dataset = Dataset.from_dict({"prompt": ["what is 1 + 2", "hello there", "the cat sat", "two plus two"]})
    trl_trainer = _trl_trainer(copy.deepcopy(model), tok, dataset, tmp_path, beta2=beta2)
    ours = A2POTrainer(model=copy.deepcopy(model), reward_funcs=index_reward, train_dataset=dataset, processing_class=tok,
                       args=A2POConfig(output_dir=str(tmp_path / "ours"), report_to="none", save_strategy="no", per_device_train_batch_size=2,
                                       max_completion_length=4, num_value_samples=N_SAMPLES, beta2=beta2, filter_all_incorrect=False))
    gen = torch.Generator().manual_seed(0)
    batch = {k: torch.zeros(B, w, dtype=torch.long) for k, w in (("prompt_ids", P), ("prompt_mask", P), ("completion_ids", C), ("completion_mask", C))}
    for i, (p, c) in enumerate(zip([3, 4, 2, 4, 1], [6, 2, 1, 4, 5])):
        batch["prompt_ids"][i, P - p :] = torch.randint(3, 400, (p,), generator=gen)
        batch["prompt_mask"][i, P - p :] = 1
        batch["completion_ids"][i, :c] = torch.randint(3, 400, (c,), generator=gen)
        batch["completion_mask"][i, :c] = 1
    ref = perturbed_copy(model, scale=0.05)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    with torch.no_grad():
        ref_logps = trl_trainer._get_sequence_logps(ref, input_ids, attention_mask, C)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    v_star = torch.tensor([0.3, 0.6, 0.1, 0.0, 0.45], dtype=torch.float64)
    trl_model, our_model = trl_trainer.model, ours.model
    trl_model.zero_grad()
    our_model.zero_grad()
    trl_loss = trl_trainer.compute_loss(trl_model, {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": C,
                                                    "ref_logps": ref_logps, "rewards": rewards, "v_star": v_star})
    our_loss, metrics = ours.compute_loss(our_model, dict(batch, ref_logps=ref_logps, rewards=rewards, v_star=v_star), torch.tensor(float(B), dtype=torch.float64))
    trl_loss.backward()
    our_loss.backward()
    rel = abs(our_loss.item() - trl_loss.item()) / abs(trl_loss.item())
    theirs = dict(trl_model.named_parameters())
    worst = max(((p.grad - theirs[n].grad).norm() / theirs[n].grad.norm()).item() for n, p in our_model.named_parameters())
    print(f"A2PO stage 2 beta2={beta2}: ours={our_loss.item():.12f} trl={trl_loss.item():.12f} loss rel {rel:.1e}, worst grad rel {worst:.1e}")
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-10, atol=0.0)
    assert worst <= 1e-8
    assert metrics["advantage"].item() == pytest.approx(trl_trainer._metrics["train"]["advantage"][-1], rel=1e-12)
    assert metrics["implicit_reward"].item() == pytest.approx(trl_trainer._metrics["train"]["implicit_reward"][-1], rel=1e-10)


def test_stage1_optimal_values_and_filter_match_trl(tiny_tokenizer, tmp_path):
    from datasets import Dataset
    from posttrain.experimental.a2po import A2POConfig, A2POTrainer
    from posttrain.testing.tiny_model import build_model

    tok = tiny_tokenizer
    model = build_model(tok, hidden_size=32, num_layers=2)
    prompts = ["a", "ab", "abc", "abcd", "abcde", "abcdef", "hello", "hi"]  # len % 5: 1 2 3 4 0 1 0 2 -> two all-incorrect prompts
    dataset = Dataset.from_dict({"prompt": prompts})
    trl_trainer = _trl_trainer(copy.deepcopy(model), tok, dataset, tmp_path)
    trl_trainer._estimate_optimal_values()
    ours = A2POTrainer(model=copy.deepcopy(model), reward_funcs=index_reward, train_dataset=dataset, processing_class=tok,
                       args=A2POConfig(output_dir=str(tmp_path / "ours"), report_to="none", save_strategy="no", per_device_train_batch_size=2,
                                       max_completion_length=4, num_value_samples=N_SAMPLES))
    assert set(ours._optimal_values) == set(trl_trainer._optimal_values) == set(prompts)  # TRL's keys: the prompt texts
    for p in prompts:
        assert ours.optimal_value(p) == pytest.approx(trl_trainer._optimal_values[p], rel=1e-6, abs=1e-7), p  # TRL scores in float32
    assert list(ours.train_dataset["prompt"]) == list(trl_trainer.train_dataset["prompt"])
    assert len(ours.train_dataset) == 6
    print("A2PO stage 1 V*:", {p: round(ours.optimal_value(p), 6) for p in prompts})
