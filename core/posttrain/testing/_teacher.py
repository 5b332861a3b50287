"""A tiny *trained* teacher for distillation tests, demos and benchmarks, and a report of a student against it.

The teacher is the tiny Qwen2 of :mod:`posttrain.testing.tiny_model` (same tokenizer and vocabulary as the
student that ``save_tiny_model`` writes, twice its hidden width), trained for a few seconds with a plain
PyTorch loop to answer ``"what is A + B? answer in \\boxed{}"`` prompts (ChatML) with ``\\boxed{A+B}<|im_end|>``.
A tiny model cannot learn addition in seconds; it learns the *format* sharply (a random student never
produces it) and a distribution over digits, so a student distilled from it measurably moves toward it:
:func:`distillation_report` measures the forward KL to the teacher on the teacher's own greedy answers
to held-out prompts, and the share of the student's greedy answers in the teacher's format.
"""

from __future__ import annotations

import random
import re

__all__ = ["arithmetic_prompts", "train_teacher", "save_tiny_teacher", "distillation_report"]

_BOXED = re.compile(r"^\s*\\boxed\{(\d+)\}\s*$")


def arithmetic_prompts(n: int = 64, seed: int = 0, max_operand: int = 20) -> list[dict]:
    """``n`` rows ``{"prompt": [{"role": "user", "content": "what is A + B? answer in \\boxed{}"}], "solution": "A+B"}``.

    The format of ``examples/data/prompts_arith.jsonl`` (operands 1..``max_operand``); seeds give disjoint-enough
    train/held-out sets (use another ``seed`` for held-out prompts).
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        rows.append({"prompt": [{"role": "user", "content": f"what is {a} + {b}? answer in \\boxed{{}}"}], "solution": str(a + b)})
    return rows


def _prompt_text(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def train_teacher(tokenizer, *, hidden_size: int = 64, num_layers: int = 2, steps: int = 300, batch_size: int = 32,
                  learning_rate: float = 3e-3, seed: int = 0, arch: str = "qwen2"):
    """Return a tiny causal LM trained (plain PyTorch, CPU, a few seconds) on the arithmetic answer format.

    ``tokenizer`` must be the one trainers will use (the reloaded tokenizer of a saved tiny model splits
    digits differently from the in-process one: train with the tokenizer the student's directory reloads).
    The loss covers the answer tokens only (``\\boxed{A+B}`` and the end-of-turn token).
    """
    import torch

    from posttrain.testing.tiny_model import build_model

    model = build_model(tokenizer, arch=arch, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    rows = arithmetic_prompts(512, seed=seed + 1000)
    examples = []
    for row in rows:
        prompt_ids = tokenizer(_prompt_text(tokenizer, row["prompt"]), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(f"\\boxed{{{row['solution']}}}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt_ids, answer_ids))
    pad = tokenizer.pad_token_id
    generator = random.Random(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
        model.train()
        for _ in range(steps):
            batch = generator.sample(examples, batch_size)
            length = max(len(p) + len(a) for p, a in batch)
            ids = torch.full((batch_size, length), pad, dtype=torch.long)
            labels = torch.full((batch_size, length), -100, dtype=torch.long)
            mask = torch.zeros((batch_size, length), dtype=torch.long)
            for i, (p, a) in enumerate(batch):
                seq = p + a
                ids[i, : len(seq)] = torch.tensor(seq)
                labels[i, len(p): len(seq)] = torch.tensor(a)
                mask[i, : len(seq)] = 1
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


def save_tiny_teacher(out_dir: str, *, hidden_size: int = 64, num_layers: int = 2, steps: int = 300, seed: int = 0) -> str:
    """Write the tiny trained teacher (model + tokenizer, safetensors) to ``out_dir`` and return the path.

    Its tokenizer and vocabulary are those of :func:`posttrain.testing.tiny_model.save_tiny_model`, reloaded the
    way a trainer reloads them (``AutoTokenizer.from_pretrained``), so a student saved by ``save_tiny_model`` and
    this teacher share token ids. About 5-15 s on one CPU thread.
    """
    from transformers import AutoTokenizer

    from posttrain.testing.tiny_model import build_tokenizer

    build_tokenizer().save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = train_teacher(tokenizer, hidden_size=hidden_size, num_layers=num_layers, steps=steps, seed=seed)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _greedy(model, prompt_ids, max_new_tokens, eos_token_id):
    import torch

    ids = list(prompt_ids)
    for _ in range(max_new_tokens):
        logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -1]
        token = int(logits.argmax())
        ids.append(token)
        if token == eos_token_id:
            break
    return ids[len(prompt_ids):]


def distillation_report(student, teacher, tokenizer, prompts, max_new_tokens: int = 8, solutions=None) -> dict:
    """Measure ``student`` against ``teacher`` on held-out ``prompts``: ``{"kl_to_teacher", "format_accuracy", "answer_accuracy"}``.

    * ``kl_to_teacher``: forward KL(teacher || student) in nats, averaged over the tokens of the teacher's greedy
      answers (full-vocabulary distributions at temperature 1, float64 softmax, eval mode, no grad).
    * ``format_accuracy``: share of the student's greedy answers (``max_new_tokens``) that read ``\\boxed{N}`` and
      end with the end-of-turn token.
    * ``answer_accuracy``: share whose ``N`` equals the solution (``solutions``, or ``A+B`` parsed from the prompt).

    ``prompts``: conversational prompts (lists of messages), rows with a ``"prompt"`` key, or plain strings.
    Greedy decoding one prompt at a time (no padding, deterministic).
    """
    import torch

    rows = [p["prompt"] if isinstance(p, dict) else p for p in prompts]
    if solutions is None:
        solutions = []
        for p in prompts:
            if isinstance(p, dict) and "solution" in p:
                solutions.append(str(p["solution"]))
                continue
            text = p if isinstance(p, str) else _prompt_text(tokenizer, p if not isinstance(p, dict) else p["prompt"])
            m = re.search(r"(\d+) \+ (\d+)", text)
            solutions.append(str(int(m.group(1)) + int(m.group(2))) if m else None)
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    kl_sum, kl_tokens, formatted, correct = 0.0, 0, 0, 0
    eos = tokenizer.eos_token_id
    try:
        with torch.no_grad():
            for prompt, solution in zip(rows, solutions):
                prompt_ids = tokenizer(_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
                answer = _greedy(teacher, prompt_ids, max_new_tokens, eos)
                seq = torch.tensor([prompt_ids + answer], device=student.device)
                positions = slice(len(prompt_ids) - 1, len(prompt_ids) - 1 + len(answer))
                s = torch.log_softmax(student(input_ids=seq).logits[0, positions].double(), -1)
                t = torch.log_softmax(teacher(input_ids=seq.to(teacher.device)).logits[0, positions].double().to(s.device), -1)
                kl_sum += float((t.exp() * (t - s)).sum())
                kl_tokens += len(answer)
                mine = _greedy(student, prompt_ids, max_new_tokens, eos)
                ended = bool(mine) and mine[-1] == eos
                match = _BOXED.match(tokenizer.decode(mine[:-1] if ended else mine, skip_special_tokens=False))
                if ended and match:
                    formatted += 1
                    correct += int(solution is not None and match.group(1) == solution)
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    n = max(len(rows), 1)
    return {"kl_to_teacher": kl_sum / max(kl_tokens, 1), "format_accuracy": formatted / n, "answer_accuracy": correct / n}
