"""ServerDistillationTrainer on the loop: learning toward the served tiny trained teacher, a teacher server that dies
mid-run (one line; the last checkpoint loads and resumes), gradient accumulation, data and config errors, and
examples/server_distill.yaml through the CLI."""

from __future__ import annotations

import os

import pytest
import torch

import posttrain
from posttrain import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _config(tmp_path, url, **fields):
    from posttrain_server_distill.config import ServerDistillationConfig

    values = dict(output_dir=str(tmp_path), teacher_model_server_url=url, per_device_train_batch_size=4, max_completion_length=6, max_steps=2,
                  learning_rate=1e-2, logging_steps=1, report_to="none", disable_tqdm=True, save_strategy="no", gradient_checkpointing=False, seed=0)
    values.update(fields)
    return ServerDistillationConfig(**values)


@pytest.mark.slow
def test_student_moves_toward_the_served_teacher(opt_in, tiny_model_dir, tiny_teacher_dir, teacher_server, tmp_path):
    """80 steps of forward KL on the teacher's top-32 (+ tail) served over HTTP, on the student's own samples of arithmetic prompts.

    On 16 held-out prompts (``posttrain.testing.distillation_report``): KL to the teacher on its greedy answers measured
    5.61 -> 0.16 nats/token, and the student's greedy answers take the teacher's ``\\boxed{N}<|im_end|>`` format, 0% -> 100%
    (the tiny teacher knows the format, not the sums: answer accuracy is not asserted).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.experimental.server_distill import ServerDistillationTrainer
    from posttrain.testing import arithmetic_prompts, distillation_report

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    held_out = arithmetic_prompts(16, seed=123)
    before = distillation_report(student, teacher, tokenizer, held_out)
    args = _config(tmp_path, teacher_server.url, max_steps=80, per_device_train_batch_size=8, learning_rate=1e-2, lr_scheduler_type="constant",
                   beta=0.0, loss_top_k=32, max_completion_length=10, logging_steps=10)
    trainer = ServerDistillationTrainer(model=student, args=args, train_dataset=arithmetic_prompts(64, seed=0), processing_class=tokenizer)
    trainer.train()
    after = distillation_report(trainer.model, teacher, tokenizer, held_out)
    print(f"server_distill learning: KL to teacher {before['kl_to_teacher']:.3f} -> {after['kl_to_teacher']:.3f}, "
          f"format accuracy {before['format_accuracy']:.2f} -> {after['format_accuracy']:.2f}")
    assert after["kl_to_teacher"] < 0.25 * before["kl_to_teacher"]
    assert before["format_accuracy"] == 0.0 and after["format_accuracy"] >= 0.5
    divergences = [row["divergence"] for row in trainer.state.log_history if "divergence" in row and "train_runtime" not in row]
    assert divergences[-1] < 0.25 * divergences[0]  # the training divergence (the teacher_divergence signal) falls too


def test_a_teacher_server_dying_mid_run_is_one_line_and_the_checkpoint_survives(opt_in, tiny_model_dir, tiny_teacher_dir, teacher_server, tmp_path):
    from transformers import AutoModelForCausalLM, TrainerCallback

    from posttrain import TeacherServer, TeacherServerError
    from posttrain.experimental.server_distill import ServerDistillationTrainer
    from posttrain.testing import arithmetic_prompts

    doomed = TeacherServer(tiny_teacher_dir).start()
    url = doomed.url

    class KillAfterStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                doomed.stop()  # the server dies; step 4 asks it for log-probs

    args = _config(tmp_path / "run", url, max_steps=4, save_strategy="steps", save_steps=2, teacher_server_max_retries=1)
    trainer = ServerDistillationTrainer(model=tiny_model_dir, args=args, train_dataset=arithmetic_prompts(32, seed=0), callbacks=[KillAfterStep3()])
    with pytest.raises(TeacherServerError) as info:
        trainer.train()
    message = str(info.value)
    assert "\n" not in message and f"teacher server {url}/v1/completions is unreachable" in message, message
    assert trainer.state.global_step == 3
    checkpoint = tmp_path / "run" / "checkpoint-2"
    AutoModelForCausalLM.from_pretrained(str(checkpoint))  # loadable as a model
    resumed = ServerDistillationTrainer(model=tiny_model_dir, args=_config(tmp_path / "resumed", teacher_server.url, max_steps=4, save_strategy="steps",
                                                                        save_steps=2), train_dataset=arithmetic_prompts(32, seed=0))
    resumed.train(resume_from_checkpoint=str(checkpoint))  # and resumable against a live server
    assert resumed.state.global_step == 4


def test_an_unreachable_server_fails_at_construction(opt_in, tiny_model_dir, tmp_path):
    from posttrain import TeacherServerError
    from posttrain.experimental.server_distill import ServerDistillationTrainer
    from posttrain.testing import arithmetic_prompts

    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TeacherServerError, match=f"teacher server http://127.0.0.1:{port}/v1/models is unreachable"):
        ServerDistillationTrainer(model=tiny_model_dir, args=_config(tmp_path, f"http://127.0.0.1:{port}", teacher_server_max_retries=0),
                                  train_dataset=arithmetic_prompts(8))


def test_gradient_accumulation_4x1_equals_2x2(opt_in, tiny_tokenizer, teacher_server, tmp_path):
    """One SGD step (lr 1, no clipping) in float64: batch 4 x GA 1 and 2 x GA 2 sample the same completions (one rollout per step,
    seeded by the step) and normalize by the step's completion tokens, so the updates agree to summation order (measured <= 3e-15)."""
    from posttrain.experimental.server_distill import ServerDistillationTrainer
    from posttrain.testing import arithmetic_prompts
    from posttrain.testing.tiny_model import build_model

    updates = []
    for bs, ga in ((4, 1), (2, 2)):
        model = build_model(tiny_tokenizer, seed=0).double()
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = _config(tmp_path / f"{bs}x{ga}", teacher_server.url, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=1,
                       optim="sgd", learning_rate=1.0, max_grad_norm=0.0, beta=0.0, loss_top_k=4)
        trainer = ServerDistillationTrainer(model=model, args=args, train_dataset=arithmetic_prompts(8, seed=0), processing_class=tiny_tokenizer)
        trainer.train()
        updates.append({n: p.detach() - initial[n] for n, p in model.named_parameters()})
    for name, a in updates[0].items():
        assert a.norm() > 0, name
        assert float((a - updates[1][name]).norm() / a.norm()) < 1e-9, name


def test_data_and_argument_errors_name_the_fix(opt_in, tiny_model_dir, teacher_server, tmp_path):
    from posttrain.experimental.server_distill import ServerDistillationTrainer

    args = _config(tmp_path, teacher_server.url)
    with pytest.raises(ConfigError, match="train_dataset` is required"):
        ServerDistillationTrainer(model=tiny_model_dir, args=args)
    with pytest.raises(ConfigError, match="row 0 has no 'prompt' column"):
        ServerDistillationTrainer(model=tiny_model_dir, args=args, train_dataset=[{"question": "2 + 2?"}])
    with pytest.raises(ConfigError, match="optimizers=.*not supported"):
        ServerDistillationTrainer(model=tiny_model_dir, args=args, train_dataset=[{"prompt": "hi"}], optimizers=(object(), None))


def test_experimental_gate(clean_gate, tiny_model_dir, teacher_server, tmp_path):
    from posttrain_server_distill.trainer import ServerDistillationTrainer

    with pytest.raises(posttrain.PosttrainError, match="experimental"):
        ServerDistillationTrainer(model=tiny_model_dir, args=_config(tmp_path, teacher_server.url), train_dataset=[{"prompt": "hi"}])


def test_example_yaml_trains_through_the_cli(tiny_model_dir, tiny_teacher_dir, teacher_server, tmp_path, clean_gate):
    """examples/server_distill.yaml with the tiny model against the served tiny teacher: the divergence falls."""
    import json

    from posttrain.cli import main

    out = tmp_path / "run"
    code = main(["train", "server_distill", "--config", os.path.join(ROOT, "examples", "server_distill.yaml"), "--allow-experimental", "server_distill",
                 "--model_name_or_path", tiny_model_dir, "--teacher_model_server_url", teacher_server.url, "--output_dir", str(out),
                 "--dataset_name", os.path.join(ROOT, "examples", "data", "prompts_arith.jsonl"), "--max_steps", "30"])
    assert code == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    divergences = [row["divergence"] for row in rows if "divergence" in row]
    assert divergences[-1] < 0.7 * divergences[0], divergences
