"""Diagnostics provoked in real tiny runs, and the verdict of `posttrain diagnose` on each kind of run.

Every run below is a real trainer on a tiny model from posttrain.testing (a few steps, logging
every step), with a crafted provocation; each test asserts which codes fire, with their evidence,
and the verdict ``diagnose(output_dir)`` gives. The runs are built once per module (~25 s in all).

The provocations do not depend on the machine: a trajectory at a high learning rate is chaotic (the
last bits of a CPU's float32 kernels and the thread count decide where it goes, e.g. whether
learning_rate=1.0 ends in NaN), so each run relies only on what holds whatever the rounding: a
learning rate low enough for the trajectory to be smooth (the rewards and KL are then the same to
~3 digits with AVX-512, AVX2 and default kernels), a reward that ignores the completions, or one
large step whose effect is far past the threshold (a learning-rate spike, NaN weights).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from posttrain.diagnostics import CODES, check_history, diagnose

pytestmark = pytest.mark.slow  # ~30 s of tiny real runs


def _low_tokens(completion_ids, **kwargs):
    """Exploitable verifiable reward: the fraction of completion tokens with a low id."""
    return [sum(3 <= t < 67 for t in c) / max(1, len(c)) for c in completion_ids]


def _constant(completion_ids, **kwargs):
    return [1.0] * len(completion_ids)


def _noise_reward(seed):
    rng = random.Random(seed)

    def noise(completion_ids, **kwargs):
        """A reward with nothing to learn: uniform noise."""
        return [rng.random() for _ in completion_ids]

    return noise


class _LearningRateSpike:
    """A trainer callback: optimizer step ``step`` runs at ``learning_rate`` (a bad schedule, a restart); the scheduler
    sets the run's own rate again at the next step. One Adam step at 1.0 moves every weight by ~1, far past any rounding."""

    def __init__(self, step: int, learning_rate: float):
        self.step, self.learning_rate = step, learning_rate

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step + 1 == self.step:
            for group in optimizer.param_groups:
                group["lr"] = self.learning_rate


class _NaNWeightsAfter:
    """A trainer callback: after optimizer step ``step`` the policy's first weight (the tied embedding) is NaN, as after a
    diverging update; whether learning_rate=1.0 alone gets there depends on the CPU's rounding."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            import torch

            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def _grpo(out, reward, callbacks=None, **overrides):
    from datasets import Dataset

    from posttrain.methods.grpo import GRPOConfig, GRPOTrainer
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    values = dict(output_dir=str(out), per_device_train_batch_size=16, num_generations=8, max_completion_length=8, max_steps=20, learning_rate=3e-2,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", diagnostics_window=10)
    values.update(overrides)
    prompts = Dataset.from_dict({"prompt": [f"what is {i} + {i}" for i in range(16)]})
    GRPOTrainer(model=build_model(tok), reward_funcs=reward, args=GRPOConfig(**values), train_dataset=prompts, processing_class=tok,
                callbacks=callbacks).train()
    return str(out)


def _lengths(completion_ids, *, centered):
    lengths = [float(len(c)) for c in completion_ids]
    mean = sum(lengths) / len(lengths)
    return [n - mean for n in lengths] if centered else lengths


def _longer_is_better(completion_ids, **kwargs):
    """Exploitable reward: longer completions score more."""
    return _lengths(completion_ids, centered=False)


def _longer_is_better_centered(completion_ids, **kwargs):
    """Favors longer completions, but its batch mean is always 0: no reward gain to show for it."""
    return _lengths(completion_ids, centered=True)


def _grpo_after_sft(out, reward, **overrides):
    """A tiny model first taught (SFT) to answer briefly and emit EOS, then GRPO with a length-biased reward."""
    from datasets import Dataset

    from posttrain.methods.sft import SFTConfig, SFTTrainer
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok)
    prompts = [f"what is {i} + {i}" for i in range(16)]
    sft = SFTConfig(output_dir=str(out) + "_sft", max_steps=30, per_device_train_batch_size=16, learning_rate=3e-3, logging_steps=5, save_strategy="no",
                    disable_tqdm=True, gradient_checkpointing=False, lr_scheduler_type="constant")
    SFTTrainer(model=model, args=sft, train_dataset=Dataset.from_dict({"prompt": prompts, "completion": [f" {2 * i}" for i in range(16)]}), processing_class=tok).train()
    from posttrain.methods.grpo import GRPOConfig, GRPOTrainer

    values = dict(output_dir=str(out), per_device_train_batch_size=16, num_generations=8, max_completion_length=16, max_steps=20, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", diagnostics_window=10)
    values.update(overrides)
    GRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(**values), train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok).train()
    return str(out)


def _sums(pairs):
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [f"what is {a} + {b} =" for a, b in pairs], "completion": [f" {a + b}" for a, b in pairs]})


def _sft(out, train, eval_dataset=None, **overrides):
    from posttrain.methods.sft import SFTConfig, SFTTrainer
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer()
    values = dict(output_dir=str(out), per_device_train_batch_size=4, logging_steps=1, save_strategy="no", disable_tqdm=True, diagnostics_window=6,
                  lr_scheduler_type="constant", gradient_checkpointing=False)
    values.update(overrides)
    SFTTrainer(model=build_model(tok), args=SFTConfig(**values), train_dataset=train, eval_dataset=eval_dataset, processing_class=tok).train()
    return str(out)


RUNS = {
    # a verifiable reward the tiny model can learn: the reward rises (the GRPO learning test's setup); throughput_bound at
    # threshold 0 fires whatever share of the step generation takes on this machine (a wall-clock measure)
    "improving": lambda out: _grpo(out, _low_tokens, max_steps=20, diagnostics_thresholds={"throughput_bound": 0.0}),
    # a noise reward: nothing to learn, the reward stays flat; truncation is then a warning
    "plateaued": lambda out: _grpo(out, _noise_reward(0), learning_rate=1e-3, max_steps=15),
    # a constant reward: every group has zero std
    "collapsing": lambda out: _grpo(out, _constant, max_steps=8),
    # a reward that favors longer completions but never rises: the length drifts
    "length_drift": lambda out: _grpo_after_sft(out, _longer_is_better_centered),
    # "longer = more reward": the reward rises only because completions grow
    "length_hacking": lambda out: _grpo_after_sft(out, _longer_is_better),
    # a huge learning rate on the exploitable reward: entropy collapses to ~0
    "entropy": lambda out: _grpo(out, _low_tokens, learning_rate=2e-1),
    # the exploitable reward with a KL penalty: the reward rises and so does the KL, past 1 nat/token (a smooth run at 3e-2:
    # reward t ~6, KL t ~7.6, KL 0 -> ~2.7; at 1e-1 both t sat near 2, on either side depending on the CPU)
    "over-optimizing": lambda out: _grpo(out, _low_tokens, beta=0.04),
    # a noise reward with a KL penalty: nothing to gain, then one step at learning_rate=1.0 (step 14) throws the policy off
    # the reference (KL ~1e-3 -> > 1 at step 15, in the last window)
    "drifting": lambda out: _grpo(out, _noise_reward(0), beta=0.04, learning_rate=1e-3, callbacks=[_LearningRateSpike(14, 1.0)]),
    # learning_rate=1.0 with two updates per generation: clipped ratios and a KL jump from step 2, then NaN weights after step 5
    "diverged": lambda out: _grpo(out, _low_tokens, learning_rate=1.0, num_iterations=2, beta=0.04, max_steps=8, callbacks=[_NaNWeightsAfter(5)]),
    # SFT with learning_rate=1.0 and no clipping: the loss rises; a memory_pressure threshold below the measured use
    "diverged_sft": lambda out: _sft(out, _sums([(a, b) for a in range(6) for b in range(6)][:32]), max_steps=12, learning_rate=1.0, max_grad_norm=0.0,
                                     diagnostics_thresholds={"memory_pressure": 0.001}),
    # 4 training rows for 40 epochs, evaluated on other sums: train loss down, eval loss up
    "overfit_sft": lambda out: _sft(out, _sums([(0, 0), (0, 1), (0, 2), (0, 3)]), _sums([(a, b) for a in range(5, 9) for b in range(5, 9)]), max_steps=40,
                                    learning_rate=1e-2, logging_steps=2, eval_strategy="steps", eval_steps=4, diagnostics_thresholds={"grad_norm_spike": 5.0}),
    # two steps
    "too short": lambda out: _grpo(out, _low_tokens, max_steps=2),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each provoked run, built on first use: name -> output_dir."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = RUNS[name](tmp_path_factory.mktemp(name.replace(" ", "_").replace("-", "_")))
        return built[name]

    return get


def _recorded(output_dir):
    with open(os.path.join(output_dir, "diagnostics.jsonl")) as fh:
        events = [json.loads(line) for line in fh if line.strip()]
    by_code = {}
    for e in events:
        by_code.setdefault(e["code"], []).append(e)
    return by_code


@pytest.mark.parametrize(
    "run, verdict",
    [("improving", "improving"), ("plateaued", "plateaued"), ("collapsing", "collapsing"), ("entropy", "collapsing"),
     ("over-optimizing", "over-optimizing"), ("drifting", "drifting"), ("length_drift", "drifting"), ("length_hacking", "over-optimizing"), ("diverged", "diverged"), ("diverged_sft", "diverged"),
     ("overfit_sft", "over-optimizing"), ("too short", "too short to tell")],
)
def test_diagnose_gives_the_verdict_of_each_recorded_run(runs, run, verdict):
    report = diagnose(runs(run))
    assert report["schema"] == 1 and report["verdict"] == verdict, (report["verdict"], report["reason"])
    assert report["finished"] and report["steps_logged"] >= 2 and report["reason"]
    if verdict not in ("improving", "too short to tell"):
        assert report["actions"], report


def test_improving_run_has_only_info_events_and_a_significant_reward_trend(runs):
    out = runs("improving")
    by_code = _recorded(out)
    assert {e["severity"] for events in by_code.values() for e in events} == {"info"}
    (throughput,) = by_code["throughput_bound"][-1:]
    assert 0 < throughput["evidence"]["prepare_step_fraction"] <= 1 and "use_vllm=True" in throughput["action"]
    assert diagnose(out)["evidence"]["reward_run_t"] > 2


def test_plateaued_run_reports_the_slope_and_its_noise_and_truncation(runs):
    by_code = _recorded(runs("plateaued"))
    plateau = by_code["reward_plateau"][-1]
    assert abs(plateau["evidence"]["reward_t"]) < 2 and plateau["evidence"]["reward_noise"] > 0 and plateau["evidence"]["reward_window_steps"] == 10
    assert by_code["completions_truncated"][-1]["severity"] == "warning" and "max_completion_length" in by_code["completions_truncated"][-1]["action"]


def test_constant_reward_fires_reward_std_collapse(runs):
    event = _recorded(runs("collapsing"))["reward_std_collapse"][-1]
    assert event["evidence"]["frac_reward_zero_std"] == 1.0 and event["evidence"]["recent_mean"] == 1.0 and "num_generations" in event["action"]


def test_huge_learning_rate_fires_entropy_collapse(runs):
    event = _recorded(runs("entropy"))["entropy_collapse"][-1]
    assert event["evidence"]["ratio"] < 0.1 and event["evidence"]["first"] > 6 and "temperature" in event["action"]


def test_exploitable_reward_with_kl_fires_reward_hacking_on_kl(runs):
    by_code = _recorded(runs("over-optimizing"))
    hacking = by_code["reward_hacking"][-1]
    assert hacking["evidence"]["reward_t"] > 2 and hacking["evidence"]["kl_t"] > 2 and "KL to the reference rose" in hacking["message"]
    assert "beta" in hacking["action"]


def test_noise_reward_with_kl_and_a_learning_rate_spike_drifts(runs):
    by_code = _recorded(runs("drifting"))
    blowup = by_code["kl_blowup"][0]  # first at the step after the spike: the smooth run before it stays far below 1
    assert blowup["step"] == 15 and blowup["evidence"]["kl"] > 1 and blowup["evidence"]["kl"] > 2 * blowup["evidence"]["recent_max"]
    assert "reward_hacking" not in by_code and "reward_plateau" in by_code


def test_learning_rate_one_fires_clip_and_kl_and_nan_weights_fire_non_finite(runs):
    by_code = _recorded(runs("diverged"))
    assert {"high_clip_ratio", "kl_blowup", "non_finite_loss"} <= set(by_code)
    clip = by_code["high_clip_ratio"][-1]["evidence"]
    assert clip["clip_ratio/region_mean"] >= 0.3 and 0 < clip["share_of_recent_updates"] <= 1
    assert by_code["kl_blowup"][0]["step"] == 2  # the first update at 1.0 moves the policy ~8 nats/token off the reference
    assert by_code["non_finite_loss"][0]["step"] <= 6 and by_code["non_finite_loss"][-1]["severity"] == "error"


def test_memory_pressure_suggests_half_the_micro_batch_from_measured_memory(runs):
    event = _recorded(runs("diverged_sft"))["memory_pressure"][0]
    ev = event["evidence"]
    assert ev["device"] and 0 < ev["peak_gb"] < ev["limit_gb"] and 0 < ev["fraction_used"] < 1
    assert (ev["suggested_per_device_train_batch_size"], ev["suggested_gradient_accumulation_steps"]) == (2, 2)
    assert "`per_device_train_batch_size=2` and `gradient_accumulation_steps=2`" in event["action"]


def test_memory_headroom_suggests_a_larger_micro_batch_with_less_accumulation(tmp_path):
    out = _sft(tmp_path, _sums([(a, b) for a in range(4) for b in range(4)]), max_steps=2, learning_rate=1e-3, per_device_train_batch_size=2,
               gradient_accumulation_steps=4)
    event = _recorded(out)["memory_headroom"][0]
    ev = event["evidence"]
    assert ev["fraction_used"] < 0.5 and event["severity"] == "info"
    k = ev["suggested_per_device_train_batch_size"] // 2
    assert k in (2, 4) and ev["suggested_gradient_accumulation_steps"] * k == 4  # the effective batch (8) is kept


def test_tiny_dataset_fires_eval_divergence_data_repeated_and_a_grad_norm_spike(runs):
    by_code = _recorded(runs("overfit_sft"))
    divergence = by_code["eval_divergence"][-1]["evidence"]
    assert divergence["eval_loss_last"] > divergence["eval_loss_best"] and divergence["loss_t"] < -2
    assert by_code["data_repeated"][-1]["evidence"]["train_rows"] == 4 and by_code["data_repeated"][-1]["evidence"]["epoch"] >= 4
    spike = by_code["grad_norm_spike"][-1]["evidence"]
    assert spike["grad_norm"] > 5 * spike["recent_median"]


def test_dpo_on_four_pairs_fires_preference_saturation_and_logs_events_to_tensorboard(tmp_path):
    from datasets import Dataset

    from posttrain.methods.dpo import DPOConfig, DPOTrainer
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    def pairs(sums, offsets):
        return Dataset.from_list([{"prompt": f"what is {a} + {b} =", "chosen": f" {a + b}", "rejected": f" {a + b + o}"} for a, b in sums for o in offsets])

    tok = build_tokenizer()
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=16, per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1, eval_strategy="steps",
                     eval_steps=4, save_strategy="no", disable_tqdm=True, diagnostics_window=6, lr_scheduler_type="constant", gradient_checkpointing=False,
                     report_to="tensorboard")
    held_out = pairs([(a, b) for a in range(5, 9) for b in range(5, 9)], [-1, 3])
    DPOTrainer(model=build_model(tok), args=args, train_dataset=pairs([(1, 2), (3, 4)], [1, 2]), eval_dataset=held_out, processing_class=tok).train()
    event = _recorded(args.output_dir)["preference_saturation"][-1]["evidence"]
    assert event["train_accuracy"] == 1.0 and event["eval_accuracy"] <= 0.85 and event["margin_t"] > 2
    assert diagnose(args.output_dir)["verdict"] == "over-optimizing"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = [os.path.join(root, f) for root, _, names in os.walk(tmp_path) for f in names if f.startswith("events.out")]
    assert files, "no tensorboard event file"
    tags = set()
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        tags |= set(acc.Tags().get("scalars", [])) | set(acc.Tags().get("tensors", []))
    assert "diagnostics/preference_saturation" in tags, sorted(tags)  # the scalar (severity level)
    assert any(t.startswith("diagnostics/preference_saturation/message") for t in tags), sorted(tags)  # the text


def test_zero_learning_rate_in_a_real_run(tmp_path):
    out = _sft(tmp_path, _sums([(0, 1), (1, 2), (2, 3), (3, 4)]), max_steps=3, learning_rate=0.0)
    assert "zero_learning_rate" in _recorded(out)


def test_length_biased_reward_without_gain_fires_length_drift(runs):
    out = runs("length_drift")
    recorded = _recorded(out)["length_drift"][-1]
    event = recorded["evidence"]
    assert event["relative_change"] > 0.3 and event["completion_length_t"] > 2 and abs(event["reward_t"]) < 2
    # GRPO's own advice (its spec's actions, recorded in the manifest), in the run and in the replayed verdict
    from posttrain import Registry

    declared = Registry().get_info("grpo").spec.actions
    assert "`loss_type='dr_grpo'`" in recorded["action"] and recorded["action"] == declared["length_drift"]
    assert json.load(open(os.path.join(out, "run_manifest.json")))["actions"] == dict(declared)
    (replayed,) = [e for e in diagnose(out)["events"] if e["code"] == "length_drift"]
    assert replayed["action"] == declared["length_drift"]


def test_longer_is_more_reward_fires_reward_hacking_on_length(runs):
    by_code = _recorded(runs("length_hacking"))
    hacking = by_code["reward_hacking"][-1]
    assert hacking["evidence"]["reward_t"] > 2 and hacking["evidence"]["completion_length_t"] > 2 and "length" in hacking["message"]
    assert "length_drift" not in by_code  # the length grows with the reward: hacking, not drift


def test_length_drift_rule_needs_no_reward_gain():
    rows = [{"step": i, "loss": 0.0, "reward": 0.5 + 0.01 * (-1) ** i, "completions/mean_length": 10 + 2 * i} for i in range(1, 11)]
    signals = {"reward": "reward", "completion_length": "completions/mean_length"}
    (event,) = [e for e in check_history(rows, signals=signals, window=10) if e.code == "length_drift"]
    assert event.evidence["relative_change"] > 0.3 and "length-unbiased loss" in event.action and "dr_grpo" not in event.action  # no method named: core advice
    (grpo,) = [e for e in check_history(rows, signals=signals, window=10, actions={"length_drift": "use `loss_type='dr_grpo'`."}) if e.code == "length_drift"]
    assert grpo.action == "use `loss_type='dr_grpo'`."
    rows_with_gain = [dict(r, reward=0.1 * r["step"]) for r in rows]
    codes = {e.code for e in check_history(rows_with_gain, signals=signals, window=10)}
    assert "length_drift" not in codes and "reward_hacking" in codes


def _distill_run(out, student: str, teacher: str, *, steps: int, learning_rate: float) -> dict:
    """A real distill run (tiny models, prompt-only arithmetic rows); returns its ``posttrain.diagnose`` report."""
    pytest.importorskip("posttrain_distill")
    from datasets import Dataset

    from posttrain.methods.distill import DistillationConfig, DistillationTrainer
    from posttrain.testing import arithmetic_prompts

    args = DistillationConfig(output_dir=str(out), learning_rate=learning_rate, lr_scheduler_type="constant", max_steps=steps,
                              per_device_train_batch_size=16, max_completion_length=8, logging_steps=1, save_strategy="no",
                              report_to=[], disable_tqdm=True, gradient_checkpointing=False)
    DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(arithmetic_prompts(64))).train()
    return diagnose(str(out))


def test_a_student_that_does_not_move_fires_divergence_stalled(tiny_model_dir, tiny_teacher_dir, tmp_path):
    # learning rate 1e-9: the random student's divergence to the trained teacher stays at ~4.9 for the whole window
    report = _distill_run(tmp_path / "run", tiny_model_dir, tiny_teacher_dir, steps=22, learning_rate=1e-9)
    events = {e["code"]: e for e in report["events"]}
    assert "divergence_stalled" in events and events["divergence_stalled"]["severity"] == "warning", events
    assert report["objective"] == "loss" and report["verdict"] == "plateaued", (report["verdict"], report["reason"])


def test_a_sharp_student_of_a_broad_teacher_fires_teacher_mode_collapse(tiny_model_dir, tiny_teacher_dir, tmp_path):
    # the roles swapped: the trained model (entropy ~0.6 nats on its samples) as the student of the random one (~6.2):
    # the student sits on one mode of a far broader teacher (measured ratio ~0.1)
    report = _distill_run(tmp_path / "run", tiny_teacher_dir, tiny_model_dir, steps=4, learning_rate=1e-9)
    events = {e["code"]: e for e in report["events"]}
    assert "teacher_mode_collapse" in events and events["teacher_mode_collapse"]["evidence"]["ratio"] < 0.5, events


def test_a_critic_that_does_not_move_fires_critic_not_learning(tiny_model_dir, tmp_path):
    # PPO with the critic's learning rate 1e-9: its values stay those of a random model, explaining none of the returns
    pytest.importorskip("posttrain_ppo")
    from datasets import Dataset

    from posttrain.experimental.ppo import PPOConfig, PPOTrainer
    from posttrain.testing import arithmetic_prompts

    out = str(tmp_path / "run")
    args = PPOConfig(output_dir=out, learning_rate=1e-9, critic_learning_rate=1e-9, lr_scheduler_type="constant", max_steps=22,
                     per_device_train_batch_size=8, response_length=8, num_ppo_epochs=1, num_mini_batches=1, logging_steps=1,
                     save_strategy="no", report_to=[], disable_tqdm=True, gradient_checkpointing=False)
    PPOTrainer(model=tiny_model_dir, args=args, train_dataset=Dataset.from_list(arithmetic_prompts(64)),
               reward_funcs=["posttrain.testing.rewards:digit_fraction_reward"], allow_experimental=True).train()
    events = {e["code"]: e for e in diagnose(out)["events"]}
    assert "critic_not_learning" in events and events["critic_not_learning"]["severity"] == "warning", events
    assert events["critic_not_learning"]["evidence"]["recent_mean"] <= 0


def test_tools_that_always_fail_in_episodes_cut_by_the_turn_limit_fire_both_tool_codes(tmp_path):
    # GRPO with tools: a policy that calls a tool in every turn (a scripted rollout backend: a random tiny model never
    # writes a tool call), a tool that always raises, and one tool round allowed: every call fails and every episode is
    # cut by the turn limit
    from posttrain import RolloutBatch, RolloutEngine
    from posttrain.methods.grpo import GRPOConfig, GRPOTrainer
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    tok = build_tokenizer(tools=True)
    call = tok('<tool_call>\n{"name": "lookup", "arguments": {"key": "x"}}\n</tool_call><|im_end|>', add_special_tokens=False)["input_ids"]

    class AlwaysCalls:
        policy_version, samples_from_policy = 0, False

        def generate(self, prompt_ids, sampling, model_inputs=None):
            return RolloutBatch([list(p) for p in prompt_ids], [call] * len(prompt_ids), [[-0.5] * len(call)] * len(prompt_ids), [False] * len(prompt_ids))

        def update_weights(self, model):
            self.policy_version += 1

    def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: The key.
        """
        raise KeyError(key)

    out = str(tmp_path / "run")
    args = GRPOConfig(output_dir=out, max_steps=5, per_device_train_batch_size=4, num_generations=4, max_completion_length=200, logging_steps=1,
                      save_strategy="no", report_to=[], disable_tqdm=True, max_tool_calling_iterations=1)
    rows = [{"prompt": [{"role": "user", "content": f"find {i}"}]} for i in range(8)]
    GRPOTrainer(model=build_model(tok), reward_funcs=[_constant], args=args, train_dataset=rows, processing_class=tok, tools=[lookup],
                rollout_engine=RolloutEngine(AlwaysCalls())).train()
    events = {e["code"]: e for e in diagnose(out)["events"]}
    assert events["tool_calls_failing"]["evidence"]["recent_mean"] == 1.0, events
    assert events["turn_limit_reached"]["evidence"]["recent_mean"] == 1.0 and events["turn_limit_reached"]["severity"] == "warning"
    assert "`max_tool_calling_iterations`" in events["turn_limit_reached"]["action"]


def test_every_code_is_provoked_by_a_test_in_this_file():
    text = open(__file__).read()
    assert all(f'"{code}"' in text for code in CODES), [code for code in CODES if f'"{code}"' not in text]


def test_cli_prints_the_verdict_as_text_and_json(runs):
    out = runs("collapsing")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    text = subprocess.run([sys.executable, "-m", "posttrain", "diagnose", out], capture_output=True, text=True, env=env)
    assert text.returncode == 0 and "verdict: COLLAPSING" in text.stdout and "reward_std_collapse" in text.stdout
    js = subprocess.run([sys.executable, "-m", "posttrain", "diagnose", out, "--format", "json"], capture_output=True, text=True, env=env)
    report = json.loads(js.stdout)
    assert report["schema"] == 1 and report["verdict"] == "collapsing" and report["method"] == "grpo"
    assert {"code", "severity", "count", "first_step", "last_step", "message", "evidence", "action"} <= set(report["events"][0])
    missing = subprocess.run([sys.executable, "-m", "posttrain", "diagnose", os.path.dirname(out) + "/nothing"], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "no metrics.jsonl" in missing.stderr


def test_sft_runs_are_told_only_sft_settings(runs):
    """SFT has no num_generations, beta, ...: every action its runs record names only fields of SFTConfig (issue 18)."""
    from posttrain import config_fields
    from posttrain.diagnostics import action_fields
    from posttrain.methods.sft import SFTConfig

    fields = {f["name"] for f in config_fields(SFTConfig)}
    recorded = [e for name in ("overfit_sft", "diverged_sft") for events in _recorded(runs(name)).values() for e in events]
    assert {"eval_divergence", "data_repeated", "memory_pressure"} <= {e["code"] for e in recorded}
    for e in recorded:
        assert set(action_fields(e["action"])) <= fields, (e["code"], e["action"])
        assert not {"num_generations", "use_vllm", "dr_grpo", "label_smoothing", "mask_truncated_completions"} & set(re.findall(r"\w+", e["action"])), e
