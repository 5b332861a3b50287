"""Parity with TRL 1.16's ``trl.experimental.sdpo`` on the same student, teacher, teacher context and fixed completions.

1. The loss: TRL's ``SDPOTrainer.compute_loss`` (GA 1, so TRL's loss is the step's) against ours with
   ``num_items_in_batch`` = the batch's sequences (one micro-batch = the step), over what SDPO has beyond SDFT:
   the blend ``distillation_weight``, the policy loss (``loss_type``, ``importance_sampling_level``, ``epsilon_high``,
   advantages, pi_old) and the per-sample ``self_distillation_mask``, with each distillation mode. Float64 models on
   the CPU (rounding ~1e-16): loss relative 1e-5, gradients per tensor relative 1e-4.
2. The batch: TRL's ``_prepare_training_batch`` on fixed completions (its generation replaced by them) against our
   ``build_batches`` on the same rollout: rewards, advantages (every ``scale_rewards``), teacher prompts (the group's
   successful rollouts, feedback, the reprompt templates) and the self-distillation mask, exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

import posttrain

trl = pytest.importorskip("trl")
import datasets  # noqa: E402
from trl.experimental.sdpo import SDPOConfig as TRLSDPOConfig  # noqa: E402
from trl.experimental.sdpo import SDPOTrainer as TRLSDPOTrainer  # noqa: E402

B, P, PT, C = 6, 5, 9, 6


def even_length_reward(completion_ids, **kwargs):
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completion_ids]


def length_reward(completion_ids, **kwargs):
    return [len(c) / 10 for c in completion_ids]


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("sdpo", allow_experimental=True)


@pytest.fixture(scope="module")
def models():
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    student = build_model(tok, hidden_size=32, num_layers=2).double()
    teacher = build_model(tok, hidden_size=32, num_layers=2, seed=7).double()  # a teacher that differs from the student
    gen = torch.Generator().manual_seed(0)
    batch = {k: torch.zeros(B, w, dtype=torch.long) for k, w in (("prompt_ids", P), ("prompt_mask", P), ("teacher_prompt_ids", PT),
                                                                   ("teacher_prompt_mask", PT), ("completion_ids", C), ("completion_mask", C))}
    for i, (p, pt, c) in enumerate(zip([3, 5, 2, 4, 5, 1], [7, 9, 6, 8, 9, 3], [6, 3, 1, 5, 4, 6])):
        batch["prompt_ids"][i, P - p:] = torch.randint(3, 500, (p,), generator=gen)
        batch["prompt_mask"][i, P - p:] = 1
        batch["teacher_prompt_ids"][i, PT - pt:] = torch.randint(3, 500, (pt,), generator=gen)
        batch["teacher_prompt_mask"][i, PT - pt:] = 1
        batch["completion_ids"][i, :c] = torch.randint(3, 500, (c,), generator=gen)
        batch["completion_mask"][i, :c] = 1
    with torch.no_grad():  # pi_old: the current log-probs moved by noise, so the clipped ratios fall on both sides of their caps
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        logits = student(input_ids=ids, attention_mask=torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)).logits[:, P - 1 : -1]
        current = torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.3
    batch["old_per_token_logps"] = (current + noise) * batch["completion_mask"]
    batch["advantages"] = torch.tensor([1.2, -0.7, 0.3, -1.5, 0.9, 0.0], dtype=torch.float64)
    return tok, student, teacher, batch


CASES = [  # (distillation_weight, loss_type, level, mode, alpha, topk, add_tail, is_clip, epsilon_high, with_old, sd_mask, temperature)
    (1.0, "dapo", "token", "sampled_token", 1.0, None, False, 2.0, None, True, "some", 1.0),  # TRL's defaults
    (1.0, "dapo", "token", "sampled_token", 1.0, None, False, None, None, False, "all", 0.8),
    (0.0, "grpo", "token", "sampled_token", 1.0, None, False, 2.0, None, True, "some", 1.0),
    (0.0, "bnpo", "sequence", "sampled_token", 1.0, None, False, 2.0, 0.28, True, "some", 1.0),
    (0.0, "dr_grpo", "token", "sampled_token", 1.0, None, False, 2.0, None, False, "some", 1.0),
    (0.5, "dapo", "token", "topk_logits", 0.5, 20, True, 2.0, 0.28, True, "some", 1.0),
    (0.3, "grpo", "sequence", "full_logits", 0.0, None, False, None, None, True, "some", 1.3),
    (0.7, "dr_grpo", "token", "topk_logits", 1.0, 7, False, 1.5, None, True, "some", 1.0),
    (0.5, "bnpo", "token", "sampled_token", 1.0, None, False, 2.0, None, True, "none", 1.0),  # nothing to distill: the policy half
]
SD_MASKS = {"some": [1.0, 0.0, 1.0, 1.0, 0.0, 1.0], "all": [1.0] * B, "none": [0.0] * B}


def _rel_grad_errors(a: dict, b: dict) -> float:
    worst = 0.0
    for name, g in a.items():
        if g is None:  # no gradient on either side (e.g. nothing to distill and weight 1)
            assert b[name] is None or float(b[name].abs().max()) == 0.0, name
            continue
        assert b[name] is not None, name
        worst = max(worst, float((g - b[name]).norm() / g.norm().clamp(min=1e-30)))
    return worst


def _trl_trainer(tok, model, tmp_path, rows, **options):
    args = TRLSDPOConfig(output_dir=str(tmp_path / "trl"), bf16=False, use_cpu=True, report_to="none", **options)
    trainer = TRLSDPOTrainer(model=model, reward_funcs=[even_length_reward, length_reward], args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training loop; one micro-batch per step here
    return trainer


@pytest.mark.parametrize("chunk_size", [3, 0])
@pytest.mark.parametrize(("weight", "loss_type", "level", "mode", "alpha", "topk", "add_tail", "is_clip", "epsilon_high", "with_old", "sd_mask",
                          "temperature"), CASES)
def test_loss_and_gradients_equal_trl(models, tmp_path, chunk_size, weight, loss_type, level, mode, alpha, topk, add_tail, is_clip, epsilon_high,
                                      with_old, sd_mask, temperature):
    from posttrain_sdpo.config import SDPOConfig
    from posttrain_sdpo.trainer import SDPOTrainer

    tok, student, teacher, batch = models
    options = dict(distillation_weight=weight, loss_type=loss_type, importance_sampling_level=level, distillation_mode=mode, distillation_alpha=alpha,
                   distillation_topk=topk, distillation_add_tail=add_tail, distillation_is_clip=is_clip, epsilon_high=epsilon_high,
                   temperature=temperature, per_device_train_batch_size=B, num_generations=3, max_completion_length=8, gradient_checkpointing=False)
    rows = [{"prompt": "what is 1 + 2"}] * 4
    batch = dict(batch, self_distillation_mask=torch.tensor(SD_MASKS[sd_mask], dtype=torch.float64))
    if not with_old:
        batch.pop("old_per_token_logps")

    trl_model = copy.deepcopy(student).train()
    trl_trainer = _trl_trainer(tok, trl_model, tmp_path, rows, teacher_model_kind="live", **options)
    trl_trainer.teacher_model = teacher  # the same separate teacher on both sides
    trl_inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "self_distillation_mask")
                  if k in batch}
    if with_old:
        trl_inputs["old_per_token_logps"] = batch["old_per_token_logps"]
    trl_inputs["teacher_input_ids"] = torch.cat([batch["teacher_prompt_ids"], batch["completion_ids"]], 1)
    trl_inputs["teacher_attention_mask"] = torch.cat([batch["teacher_prompt_mask"], batch["completion_mask"]], 1)
    trl_loss = trl_trainer.compute_loss(trl_model, trl_inputs)
    trl_loss.backward()

    our_model = copy.deepcopy(student).train()
    ours = SDPOTrainer(model=our_model, reward_funcs=[even_length_reward, length_reward],
                       args=SDPOConfig(output_dir=str(tmp_path / "ours"), save_strategy="no", report_to="none", logprob_chunk_size=chunk_size, **options),
                       train_dataset=rows, processing_class=tok)
    ours.teacher_model = teacher
    our_batch = dict(batch, token_normalizer=batch["completion_mask"].sum().double())
    loss, metrics = ours.compute_loss(our_model, our_batch, B)
    loss.backward()

    assert loss.dtype == torch.float64
    rel_loss = abs(float(loss.detach()) - float(trl_loss.detach())) / max(abs(float(trl_loss.detach())), 1e-30)
    rel_grad = _rel_grad_errors({n: p.grad for n, p in trl_model.named_parameters()}, {n: p.grad for n, p in our_model.named_parameters()})
    print(f"w={weight} {loss_type}/{level} {mode} alpha={alpha} k={topk} tail={add_tail} clip={is_clip} eps_high={epsilon_high} old={with_old} "
          f"mask={sd_mask} T={temperature} chunk={chunk_size}: loss {float(loss):.6g} rel err {rel_loss:.1e}, worst grad rel err {rel_grad:.1e}")
    assert rel_loss <= 1e-5
    assert rel_grad <= 1e-4
    trl_metrics = trl_trainer._metrics["train"]
    if weight > 0.0:
        assert float(metrics["sdpo/distillation_loss"]) == pytest.approx(trl_metrics["sdpo/distillation_loss"][-1], rel=1e-5, abs=1e-12)
    if weight < 1.0:
        assert float(metrics["self_distillation/policy_loss"]) == pytest.approx(trl_metrics["self_distillation/policy_loss"][-1], rel=1e-5, abs=1e-12)


BATCH_CASES = [  # (conversational, scale_rewards, dont_reprompt_on_self_success, include_feedback, feedback_only_without_solution, remove_thinking)
    (False, "group", True, False, False, False),
    (True, "batch", False, True, False, True),
    (True, "none", True, True, True, False),
    (False, "group", True, True, False, False),
]


@pytest.mark.parametrize(("conversational", "scale", "no_self", "feedback", "feedback_only", "no_think"), BATCH_CASES)
def test_rewards_advantages_and_teacher_prompts_equal_trl(models, tmp_path, conversational, scale, no_self, feedback, feedback_only, no_think):
    """TRL's batch preparation on fixed completions (generation replaced by them) against ours on the same rollout."""
    from posttrain import RolloutBatch
    from posttrain_sdpo.config import SDPOConfig
    from posttrain_sdpo.trainer import SDPOTrainer

    tok, student, _, batch = models
    texts = ["what is 1 + 2?", "what is 4 + 4?"]
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": t}] if conversational else t,
             "privileged_context": fb} for t, fb in zip(texts, ["your answer was wrong", None])]
    completion_ids = [[40, 41, 42, 43], [44, 45, 46], [47, 48, 49, 50, 51, 52],  # group 0: lengths 4, 3, 6 -> rewards 1.4, 0.15, 1.6
                      [60, 61, 62], [63], [64, 65, 66, 67, 68]]  # group 1: all odd -> no demonstration
    if no_think:
        completion_ids[0] = tok("<think>hm</think>4", add_special_tokens=False)["input_ids"]
        completion_ids[0] += [40] * (len(completion_ids[0]) % 2)  # an even length: a success
    options = dict(scale_rewards=scale, dont_reprompt_on_self_success=no_self, include_environment_feedback=feedback,
                   environment_feedback_only_without_solution=feedback_only, remove_thinking_from_demonstration=no_think,
                   per_device_train_batch_size=B, num_generations=3, max_completion_length=8, reward_weights=[1.0, 0.5])

    trl_trainer = _trl_trainer(tok, copy.deepcopy(student).float().train(), tmp_path, rows, teacher_model_kind="live", **options)  # TRL's 'ema' reloads the model by name
    inputs = [row for row in rows for _ in range(3)]
    prompt_ids = trl_trainer._tokenize_prompts([r["prompt"] for r in inputs])

    def fixed_rollouts(_inputs):
        pad, width = tok.pad_token_id, max(map(len, completion_ids))
        return {"prompt_ids": torch.tensor([[pad] * (max(map(len, prompt_ids)) - len(p)) + p for p in prompt_ids]),
                "prompt_mask": torch.tensor([[0] * (max(map(len, prompt_ids)) - len(p)) + [1] * len(p) for p in prompt_ids]),
                "completion_ids": torch.tensor([c + [pad] * (width - len(c)) for c in completion_ids]),
                "completion_mask": torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completion_ids]),
                "raw_completion_lengths": torch.tensor([len(c) for c in completion_ids])}

    trl_trainer.sample_rollouts = fixed_rollouts
    trl_batch = trl_trainer._prepare_training_batch(inputs)

    ours = SDPOTrainer(model=copy.deepcopy(student).float(), reward_funcs=[even_length_reward, length_reward],
                       args=SDPOConfig(output_dir=str(tmp_path / "ours"), save_strategy="no", report_to="none", **options),
                       train_dataset=rows, processing_class=tok)
    rollout = RolloutBatch([list(p) for p in prompt_ids], completion_ids, [[0.0] * len(c) for c in completion_ids], [False] * B)
    our_batch = ours.build_batches(rows, [r["prompt"] for r in inputs], rollout, 3, B)[0]

    torch.testing.assert_close(our_batch["advantages"], trl_batch["advantages"].float(), rtol=1e-6, atol=1e-7)
    assert our_batch["self_distillation_mask"].tolist() == trl_batch["self_distillation_mask"].tolist()
    width = trl_batch["teacher_input_ids"].shape[1] - trl_batch["completion_ids"].shape[1]
    for i in range(B):
        trl_ids = trl_batch["teacher_input_ids"][i, :width][trl_batch["teacher_attention_mask"][i, :width].bool()].tolist()
        our_ids = our_batch["teacher_prompt_ids"][i][our_batch["teacher_prompt_mask"][i].bool()].tolist()
        assert our_ids == trl_ids, (i, tok.decode(our_ids), tok.decode(trl_ids))
    assert sum(trl_batch["self_distillation_mask"].tolist()) > 0  # the case reprompts something
