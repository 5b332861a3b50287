"""MiniLLM with a vision-language student and teacher (GRPO's image path, copied): a run-through; both forwards see the images."""

from __future__ import annotations

import pytest
import torch

from posttrain import ConfigError
from posttrain.testing.tiny_vlm import build_vlm, colour_rows

from posttrain_minillm import MiniLLMConfig, MiniLLMTrainer


def _args(tmp_path, **overrides) -> MiniLLMConfig:
    fields = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=4, max_steps=2,
                  report_to="none", save_strategy="no", logging_steps=1)
    return MiniLLMConfig(**{**fields, **overrides})


def test_vision_run_through_and_student_and_teacher_see_the_images(tmp_path):
    student, processor = build_vlm(family="idefics3")
    teacher, _ = build_vlm(family="idefics3", seed=1)
    trainer = MiniLLMTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=colour_rows(8, format="prompt"),
                             processing_class=processor, allow_experimental=True)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    (batch,) = trainer._generate_and_score(colour_rows(2, seed=5, format="prompt"), seed=0, indices=[0, 1])
    assert batch["model_inputs"]["pixel_values"].shape[0] == 4
    swapped = dict(batch, model_inputs={**batch["model_inputs"], "pixel_values": batch["model_inputs"]["pixel_values"].flip(0)})
    with torch.no_grad():
        _, metrics = trainer.compute_loss(trainer.model, batch, 4)
        _, other = trainer.compute_loss(trainer.model, swapped, 4)
    assert abs(metrics["entropy"] - other["entropy"]) > 1e-6  # the student's forward sees the images
    assert abs(metrics["teacher_entropy"] - other["teacher_entropy"]) > 1e-6  # ... and the teacher's


def test_a_text_only_teacher_is_refused_with_image_rows(tmp_path):
    from transformers import AutoModelForCausalLM

    student, processor = build_vlm(family="idefics3")
    teacher = AutoModelForCausalLM.from_config(student.config.text_config)  # the student's vocabulary, no vision tower
    with pytest.raises(ConfigError, match=r"train_dataset has an image column 'images' but MiniLLM's teacher .* is text-only") as info:
        MiniLLMTrainer(model=student, teacher_model=teacher, args=_args(tmp_path), train_dataset=colour_rows(4, format="prompt"),
                       processing_class=processor, allow_experimental=True)
    assert "\n" not in str(info.value)
