"""Helpers for the GOLD tests: two tiny tokenizers that split text differently, models on them, rows, a cross-tokenizer report."""

from __future__ import annotations

import re

import torch

#: the teacher's tokenizer: another BPE vocabulary (size and merges) than the student's build_tokenizer() default
TEACHER_VOCAB, TEACHER_SEED = 450, 2  # splits some numbers finer than the student's, some coarser


def saved_tokenizer(path, vocab_size: int = 512, seed: int = 0):
    """``build_tokenizer(vocab_size, seed)`` saved to ``path`` and reloaded (what a trainer loads by name)."""
    from transformers import AutoTokenizer

    from posttrain.testing.tiny_model import build_tokenizer

    build_tokenizer(vocab_size=vocab_size, seed=seed).save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def conversational_rows(n: int = 8, seed: int = 0, worked: bool = False) -> list[dict]:
    """Arithmetic prompt/completion rows (conversational), the completion in the tiny teacher's format (``worked``: with the sum written out)."""
    from posttrain.testing import arithmetic_prompts

    rows = []
    for r in arithmetic_prompts(n, seed=seed):
        question = r["prompt"][0]["content"]
        a, b = question.split("what is ")[1].split("?")[0].split(" + ")
        answer = f"{a} + {b} = {r['solution']}, so 1{a}{b} + 37 \\boxed{{{r['solution']}}}" if worked else f"\\boxed{{{r['solution']}}}"
        rows.append({"prompt": r["prompt"], "completion": [{"role": "assistant", "content": answer}], "solution": r["solution"]})
    return rows


_BOXED = re.compile(r"^\s*\\boxed\{(\d+)\}\s*$")


def _greedy(model, ids: list[int], steps: int, eos: int) -> list[int]:
    out = list(ids)
    for _ in range(steps):
        token = int(model(input_ids=torch.tensor([out])).logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
    return out[len(ids):]


@torch.no_grad()
def cross_tokenizer_report(student, student_tok, teacher, teacher_tok, prompts: list, max_new_tokens: int = 8) -> dict:
    """A student against a teacher with ANOTHER tokenizer, on held-out prompts.

    * ``nll_of_teacher_answer``: the student's negative log-likelihood (nats per answer) of the teacher's greedy answer
      text, tokenized by the student (a cross-entropy to the teacher: lower = closer).
    * ``format_accuracy``: share of the student's greedy answers reading ``\\boxed{N}`` and ending with its EOS.
    """
    was = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    nll, formatted = 0.0, 0
    try:
        for prompt in prompts:
            s_prompt = student_tok(student_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            t_prompt = teacher_tok(teacher_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            answer = teacher_tok.decode(_greedy(teacher, t_prompt, max_new_tokens, teacher_tok.eos_token_id), skip_special_tokens=False)
            a_ids = student_tok(answer, add_special_tokens=False)["input_ids"]
            logits = student(input_ids=torch.tensor([s_prompt + a_ids])).logits[0, len(s_prompt) - 1: len(s_prompt) - 1 + len(a_ids)].double()
            nll -= float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(a_ids).unsqueeze(1)).sum())
            mine = _greedy(student, s_prompt, max_new_tokens, student_tok.eos_token_id)
            ended = bool(mine) and mine[-1] == student_tok.eos_token_id
            formatted += int(ended and bool(_BOXED.match(student_tok.decode(mine[:-1], skip_special_tokens=False))))
    finally:
        student.train(was[0])
        teacher.train(was[1])
    return {"nll_of_teacher_answer": nll / len(prompts), "format_accuracy": formatted / len(prompts)}
