"""SDPO trainer: learning on the tiny trained teacher, exact resume, accumulation invariance, data formats and one-line errors."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch

import posttrain
from posttrain import ConfigError, DataError


def even_length_reward(completion_ids, **kwargs):
    return [1.0 if len(c) % 2 == 0 else 0.0 for c in completion_ids]


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("sdpo", allow_experimental=True)


def _config(tmp_path, **overrides):
    from posttrain_sdpo.config import SDPOConfig

    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=5, max_steps=2,
                  learning_rate=1e-2, logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", gradient_checkpointing=False)
    values.update(overrides)
    return SDPOConfig(**values)


def _rows(n: int = 8):
    return [{"prompt": f"what is {i} + {i % 5}?", "privileged_context": "too long" if i % 2 else None} for i in range(n)]


def _metrics(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# ----------------------------------------------------------------------------- learning
_FORMAT = "answer in \\boxed{}"


def _strip_format(row: dict) -> dict:
    """The student prompt without the format instruction; the instruction is the row's environment feedback (privileged context)."""
    text = row["prompt"][0]["content"].replace(f" {_FORMAT}", "")
    return {"prompt": [{"role": "user", "content": text}], "privileged_context": _FORMAT, "solution": row["solution"]}


class _WithContext(torch.nn.Module):
    """A frozen model that reads each known student prompt with its privileged context put back (``"{prompt} {context}"``).

    ``distillation_report`` feeds it the student's prompt + answer tokens; it swaps in the with-context prompt, runs the
    model and returns the logits at the student's positions, so the report measures KL(model with context || student
    without it) on the with-context model's greedy answers, and the student's format accuracy without the context.
    """

    def __init__(self, model, tokenizer, rows):
        super().__init__()
        self.model = model
        self.prompts = {}
        for row in rows:
            plain = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            told = tokenizer.apply_chat_template([{"role": "user", "content": f"{row['prompt'][0]['content']} {row['privileged_context']}"}],
                                                 add_generation_prompt=True, tokenize=False)
            self.prompts[tuple(tokenizer(plain, add_special_tokens=False)["input_ids"])] = tokenizer(told, add_special_tokens=False)["input_ids"]

    @property
    def device(self):
        return self.model.device

    def forward(self, input_ids):
        ids = input_ids[0].tolist()
        (plain, told), = [(p, t) for p, t in self.prompts.items() if tuple(ids[: len(p)]) == p]
        out = self.model(input_ids=torch.tensor([told + ids[len(plain):]], device=input_ids.device))
        out.logits = out.logits[:, len(told) - len(plain):]
        return out


@pytest.mark.slow  # builds the tiny trained teacher (~20 s, shared) and trains 20 steps (~5 s per seed)
@pytest.mark.parametrize("seed", [0, 1])
def test_self_distillation_moves_the_model_without_feedback_toward_the_model_with_it(tiny_teacher_dir, tmp_path, seed):
    """Start from the tiny trained teacher; its prompt loses the format instruction, which becomes the row's environment
    feedback (``privileged_context``, include_environment_feedback=True). The teacher (teacher_model_kind='base': the
    frozen initial model) reads ``{prompt} {feedback}`` = the original prompt; groups with a correct answer (accuracy reward)
    also put it into the teacher prompt as the demonstration, and 20% of the loss is the policy gradient on the
    group-normalized accuracy reward. SDPO's default distillation (sampled_token, reverse KL) at lr 3e-4 for 20 steps.

    Held-out KL(initial model with the instruction || trained model without it), measured on this CPU (identical with
    OMP_NUM_THREADS=1 and 2): seed 0: 0.0964 -> 0.0254 nats/token, seed 1: 0.0964 -> 0.0227; format accuracy stays 1.0.
    (10 steps at 3e-4 leave it at 0.097; 1e-3 overshoots to 0.35: sampled_token is a one-sample estimator.)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.testing import arithmetic_prompts, distillation_report
    from posttrain_sdpo.trainer import SDPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    train = [_strip_format(r) for r in arithmetic_prompts(64, seed=1)]
    held_out = [_strip_format(r) for r in arithmetic_prompts(16, seed=2)]
    with_context = _WithContext(copy.deepcopy(model).eval(), tok, held_out)
    before = distillation_report(model, with_context, tok, held_out)
    args = _config(tmp_path, per_device_train_batch_size=16, num_generations=4, max_completion_length=8, max_steps=20, learning_rate=3e-4,
                   teacher_model_kind="base", seed=seed, include_environment_feedback=True, distillation_weight=0.8,
                   reprompt_template="{prompt}{feedback}{solution}", feedback_template=" {feedback_raw}")
    SDPOTrainer(model=model, reward_funcs=["accuracy"], args=args, train_dataset=train, processing_class=tok).train()
    after = distillation_report(model, with_context, tok, held_out)
    print(f"seed {seed}: before {before}, after {after}")
    logged = _metrics(args.output_dir)
    assert all(m["self_distillation/feedback_used_fraction"] == 1.0 for m in logged if "self_distillation/feedback_used_fraction" in m)
    assert max(m["self_distillation/success_sample_fraction"] for m in logged if "self_distillation/success_sample_fraction" in m) > 0
    assert after["kl_to_teacher"] < 0.5 * before["kl_to_teacher"]
    assert after["format_accuracy"] >= before["format_accuracy"]


# ----------------------------------------------------------------------------- training paths
def test_train_logs_trl_metrics_and_changes_the_weights(tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_sdpo.trainer import SDPOTrainer

    before = {n: p.detach().clone() for n, p in tiny_model.named_parameters()}
    args = _config(tmp_path, num_iterations=2, max_steps=3, distillation_weight=0.5, include_environment_feedback=True, eval_strategy="steps",
                   eval_steps=3, per_device_eval_batch_size=2)
    trainer = SDPOTrainer(model=tiny_model, reward_funcs=[even_length_reward], args=args, train_dataset=_rows(), eval_dataset=_rows(2),
                          processing_class=tiny_tokenizer)
    trainer.train()
    assert any(not torch.equal(before[n], p.detach()) for n, p in tiny_model.named_parameters())
    logged = _metrics(args.output_dir)
    expected = {"loss", "sdpo/distillation_loss", "self_distillation/distillation_loss", "self_distillation/policy_loss",
                "self_distillation/reward_mean", "self_distillation/reprompt_sample_fraction", "self_distillation/feedback_used_fraction",
                "self_distillation/rewards/even_length_reward", "completions/mean_length", "completions/clipped_ratio"}
    assert expected <= set(logged[0]), expected - set(logged[0])
    assert logged[0]["self_distillation/feedback_used_fraction"] > 0  # half the rows carry feedback
    assert any("eval_loss" in m for m in logged)


# ----------------------------------------------------------------------------- resume and accumulation
def test_resume_reproduces_uninterrupted_losses(tiny_model, tiny_tokenizer, tmp_path):
    """Checkpoint at step 3 (mid rollout reuse: num_iterations=2, EMA teacher, blended loss), resume: steps 4-5 log the same losses (float64)."""
    from posttrain_sdpo.trainer import SDPOTrainer

    tiny_model.double()
    common = dict(max_steps=5, save_strategy="steps", save_steps=3, num_iterations=2, teacher_model_kind="ema", teacher_update_rate=0.3,
                  distillation_weight=0.5, success_reward_threshold=0.0)
    args = _config(tmp_path, **common)
    SDPOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=[even_length_reward], args=args, train_dataset=_rows(), processing_class=tiny_tokenizer).train()
    full = {m["step"]: m for m in _metrics(args.output_dir)}
    resumed_args = _config(tmp_path, resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-3"), **common)
    SDPOTrainer(model=copy.deepcopy(tiny_model), reward_funcs=[even_length_reward], args=resumed_args, train_dataset=_rows(),
                processing_class=tiny_tokenizer).train()
    resumed = {m["step"]: m for m in _metrics(args.output_dir)}
    for step in (4, 5):
        assert resumed[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-12), step


def _float64_rotary(self, x, position_ids):
    """Qwen2's rotary tables computed in float64 (transformers computes the angles and cos / sin in float32, even for a float64 model)."""
    angles = position_ids[..., None].double() * self.inv_freq.to(device=x.device, dtype=torch.float64)
    emb = torch.cat((angles, angles), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


@pytest.mark.parametrize("rotary", ["float64", "transformers"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_gradient_accumulation_4x1_equals_1x4(tiny_model, tiny_tokenizer, tmp_path, monkeypatch, loss_type, rotary):
    """One step of 4 completions in one micro-batch or four: the same update (distillation: a mean over sequences; dapo: over the step's tokens).

    The one rounding source is the rotary position embedding. Each completion's teacher prompt holds a demonstration (another
    completion of its group, success_reward_threshold=0), so teacher prompts differ in length and their left padding differs
    between one micro-batch of 4 (padded to the longest) and four of 1 (no padding). Without position_ids, transformers'
    Qwen2 numbers positions from the padded start, so the same token sits at another absolute position, and it computes
    the rotary angles and their cos / sin in float32 (also for a float64 model). Attention depends only on relative positions
    in exact arithmetic, but each float32 cos / sin entry carries up to ~1 ulp (2**-24 relative) of rounding that differs
    between the two positions: measured 1.2e-8 relative on layers.0.self_attn.k_proj.bias (TRL has the same source: it
    left-pads without position_ids). With float64 rotary tables the two updates agree to 2.3e-14 (float64 rounding).
    """
    from transformers.models.qwen2 import modeling_qwen2

    from posttrain_sdpo.trainer import SDPOTrainer

    if rotary == "float64":
        monkeypatch.setattr(modeling_qwen2.Qwen2RotaryEmbedding, "forward", _float64_rotary)
    tolerance = 1e-10 if rotary == "float64" else 4 * 2.0**-24  # float64 rounding / a few float32 ulps of the rotary tables
    tiny_model.double()
    updates = []
    for i, (size, accumulation) in enumerate(((4, 1), (1, 4))):
        model = copy.deepcopy(tiny_model)
        args = _config(tmp_path / str(i), per_device_train_batch_size=size, gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                       learning_rate=1.0, max_grad_norm=0.0, distillation_mode="full_logits", distillation_alpha=0.5, distillation_weight=0.5,
                       loss_type=loss_type, success_reward_threshold=0.0, teacher_model_kind="live")
        SDPOTrainer(model=model, reward_funcs=[even_length_reward], args=args, train_dataset=_rows(), processing_class=tiny_tokenizer).train()
        updates.append({n: p.detach() - tiny_model.state_dict()[n] for n, p in model.named_parameters()})
    for name, update in updates[0].items():
        assert update.norm() > 0, name
        assert float((update - updates[1][name]).norm() / update.norm()) <= tolerance, name


# ----------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(("overrides", "match"), [
    ({"distillation_mode": "full_logits", "distillation_alpha": 0.5, "distillation_weight": 1.5}, "distillation_weight=1.5 is invalid"),
    ({"distillation_alpha": 0.5}, "distillation_alpha=1.0"),
    ({"distillation_mode": "topk_logits"}, "distillation_topk=None is invalid"),
    ({"loss_type": "cispo"}, "loss_type='cispo' is invalid"),
    ({"scale_rewards": "median"}, "scale_rewards='median' is invalid"),
    ({"importance_sampling_level": "word"}, "importance_sampling_level='word' is invalid"),
    ({"teacher_model_kind": "frozen"}, "teacher_model_kind='frozen' is invalid"),
    ({"beta": 0.01}, "beta=0.01 is not implemented"),
    ({"reprompt_template": "{prompt}{solution}"}, "missing {feedback}"),
    ({"solution_template": "no slot"}, "must contain {successful_previous_attempt}"),
    ({"use_teacher_server": True}, "use_teacher_server=True is not implemented"),
    ({"steps_per_generation": 3}, "steps_per_generation=3 is not offered"),
    ({"num_generations": 3}, "num_generations=3 does not divide"),
])
def test_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        _config(tmp_path, **overrides)


def test_trainer_errors_name_the_row_or_field(tiny_model, tiny_tokenizer, tmp_path):
    from posttrain_sdpo.trainer import SDPOTrainer

    with pytest.raises(ConfigError, match="SDPO needs reward functions"):
        SDPOTrainer(model=tiny_model, args=_config(tmp_path), train_dataset=_rows(), processing_class=tiny_tokenizer)
    assistant_last = [{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4
    with pytest.raises(DataError, match=r"train_dataset row 0: its prompt ends with a 'assistant' turn"):
        SDPOTrainer(model=tiny_model, reward_funcs=[even_length_reward], args=_config(tmp_path), train_dataset=assistant_last,
                    processing_class=tiny_tokenizer)
    bad_feedback = _rows(4)
    bad_feedback[3]["privileged_context"] = ["not", "a", "string"]
    with pytest.raises(DataError, match=r"train_dataset row 3: its privileged_context is a list"):
        SDPOTrainer(model=tiny_model, reward_funcs=[even_length_reward], args=_config(tmp_path), train_dataset=bad_feedback,
                    processing_class=tiny_tokenizer)
