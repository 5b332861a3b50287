"""The tiny trained teacher of the distillation tests and examples, and the report that measures a student against it."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return (AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_teacher_dir), tokenizer,
            AutoTokenizer.from_pretrained(tiny_teacher_dir))


def test_teacher_shares_the_students_vocabulary_and_tokenization(models):
    student, teacher, tokenizer, teacher_tokenizer = models
    assert teacher.config.vocab_size == student.config.vocab_size
    assert teacher.config.hidden_size == 2 * student.config.hidden_size  # a wider teacher: only the vocabulary is shared
    text = "<|im_start|>user\nwhat is 12 + 7? answer in \\boxed{}<|im_end|>\n<|im_start|>assistant\n\\boxed{19}<|im_end|>"
    assert teacher_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_teacher_answers_in_its_format_and_a_random_student_does_not(models):
    from posttrain.testing import arithmetic_prompts, distillation_report

    student, teacher, tokenizer, _ = models
    held_out = arithmetic_prompts(16, seed=7)
    of_teacher = distillation_report(teacher, teacher, tokenizer, held_out)
    assert of_teacher["kl_to_teacher"] == pytest.approx(0.0, abs=1e-12)
    assert of_teacher["format_accuracy"] >= 0.9  # trained to it: 1.0 measured on several machines' kernels
    of_student = distillation_report(student, teacher, tokenizer, held_out)
    assert of_student["format_accuracy"] == 0.0 and of_student["answer_accuracy"] == 0.0
    assert of_student["kl_to_teacher"] > 1.0  # measured 5.6 nats: the random student is far from the teacher
