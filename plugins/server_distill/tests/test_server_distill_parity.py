"""Server distillation: parity with TRL 1.16's ``trl.experimental.server_distillation`` on fixed completions and served log-probs.

The same float64 tiny student, the same completions (variable lengths, some equal to the teacher's greedy answer so
the top-1 support collapses to one token) and the same teacher server (``TeacherServer`` serving the tiny trained
teacher in float64): TRL's ``ServerDistillationTrainer.compute_loss`` with TRL's own ``VLLMClient`` against our
``ServerDistillationTrainer.compute_loss`` with ``TeacherServerClient``. Loss at relative 1e-5 and every gradient at
relative 1e-4 (float64 on both sides: they differ by summation order and TRL's float32 copy of the teacher's answer),
for every mode TRL accepts: beta 0 (loss_top_k 1 and 3), 0.5 and 1 (loss_top_k 1), loss_add_tail on/off, temperature
1 and 0.7, chunked and unchunked student log-probs; and the configs TRL refuses (loss_top_k 0, argmax mode) refused.
"""

from __future__ import annotations

import os

import pytest
import torch

from posttrain import ConfigError

REL_LOSS, REL_GRAD = 1e-5, 1e-4


@pytest.fixture(scope="module")
def served64(tiny_teacher_dir):
    from posttrain import TeacherServer

    with TeacherServer(tiny_teacher_dir, dtype=torch.float64) as server:
        yield server


@pytest.fixture(scope="module")
def trl_client(served64, monkeypatch_module):
    requests = pytest.importorskip("requests")  # noqa: F841 - TRL's client needs it (the plugin's test extra)
    import trl.generation.vllm_client as vllm_client

    # TRL's client refuses to start without the vllm package, which it never uses for these two HTTP calls
    monkeypatch_module.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    return vllm_client.VLLMClient(base_url=served64.url, connection_timeout=10.0)


@pytest.fixture(scope="module")
def monkeypatch_module():
    patch = pytest.MonkeyPatch()
    yield patch
    patch.undo()


@pytest.fixture(scope="module")
def student(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=1, dtype=torch.float64).train()


@pytest.fixture(scope="module")
def batch(tiny_tokenizer, tiny_teacher_dir):
    """TRL's on-policy layout: left-padded prompts, right-padded completions; rows 0 and 2 are the teacher's greedy answers."""
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float64).eval()
    tok = tiny_tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
               for text in ("What is 3 + 4?", "What is 12 + 9?", "Hi", "What is 1 + 1?")]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    generator = torch.Generator().manual_seed(0)
    completions = []
    for i, ids in enumerate(prompt_ids):
        if i in (0, 2):  # the teacher's greedy tokens: the sampled token is the teacher's top-1 (support of one token)
            out, seq = [], list(ids)
            with torch.no_grad():
                for _ in range(6):
                    token = int(teacher(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
                    out.append(token)
                    seq.append(token)
            completions.append(out)
        else:  # random tokens of another length
            completions.append(torch.randint(3, len(tok), (3 + 2 * i,), generator=generator).tolist())
    pad = tok.pad_token_id
    P, C = max(map(len, prompt_ids)), max(map(len, completions))
    return {
        "prompt_ids": torch.tensor([[pad] * (P - len(p)) + p for p in prompt_ids]),
        "prompt_mask": torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompt_ids]),
        "completion_ids": torch.tensor([c + [pad] * (C - len(c)) for c in completions]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in completions]),
    }


def _trl_loss(student, batch, trl_client, **settings):
    """TRL 1.16's ServerDistillationTrainer.compute_loss on this batch (the trainer object holds only what compute_loss reads)."""
    from trl.experimental.server_distillation import ServerDistillationTrainer as TRLTrainer

    trainer = object.__new__(TRLTrainer)
    trainer.beta, trainer.temperature = settings["beta"], settings["temperature"]
    trainer.loss_top_k, trainer.loss_add_tail, trainer.reverse_kl_top_1_mode = settings["loss_top_k"], settings["loss_add_tail"], "sampled"
    trainer.teacher_client = trl_client
    trainer.model = student
    trainer.current_gradient_accumulation_steps = 1
    return TRLTrainer.compute_loss.__wrapped__(trainer, student, dict(batch))


def _our_loss(student, batch, served64, chunk_size, **settings):
    from posttrain_server_distill.config import ServerDistillationConfig
    from posttrain_server_distill.trainer import ServerDistillationTrainer, teacher_micro_batch

    from posttrain import TeacherServerClient

    trainer = object.__new__(ServerDistillationTrainer)
    trainer.args = ServerDistillationConfig(output_dir="unused", teacher_model_server_url=served64.url, logprob_chunk_size=chunk_size,
                                            beta=settings["beta"], loss_top_k=settings["loss_top_k"], loss_add_tail=settings["loss_add_tail"],
                                            temperature=settings["temperature"])
    trainer.beta, trainer.temperature = settings["beta"], settings["temperature"]
    trainer.loss_top_k, trainer.loss_add_tail = settings["loss_top_k"], settings["loss_add_tail"]
    trainer.teacher_client = TeacherServerClient(served64.url)
    prompts = [[int(t) for t, m in zip(row, mask) if m] for row, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
    completions = [[int(t) for t, m in zip(row, mask) if m] for row, mask in zip(batch["completion_ids"], batch["completion_mask"])]
    teacher = trainer._teacher_logprobs(prompts, completions)
    ours = {**batch, "teacher": teacher_micro_batch(teacher, slice(0, len(prompts)), batch["completion_ids"].shape[1])}
    items = torch.tensor(float(batch["completion_mask"].sum()))
    return trainer.compute_loss(student, ours, items)


def _loss_and_grads(student, compute):
    student.zero_grad(set_to_none=True)
    loss = compute()
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    return loss.detach(), grads


MODES = [  # (beta, loss_top_k): every combination TRL's config accepts
    (0.0, 1), (0.0, 3), (0.5, 1), (1.0, 1),
]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("loss_add_tail", [True, False])
@pytest.mark.parametrize("beta,loss_top_k", MODES)
def test_loss_and_gradients_equal_trl(student, batch, served64, trl_client, beta, loss_top_k, loss_add_tail, temperature):
    settings = dict(beta=beta, loss_top_k=loss_top_k, loss_add_tail=loss_add_tail, temperature=temperature)
    trl_loss, trl_grads = _loss_and_grads(student, lambda: _trl_loss(student, batch, trl_client, **settings))
    assert torch.isfinite(trl_loss)
    for chunk_size in (5, 0):  # chunked from the hidden states (5 rows a chunk), and from the model's full logits
        loss, grads = _loss_and_grads(student, lambda: _our_loss(student, batch, served64, chunk_size, **settings))
        assert abs(float(loss) - float(trl_loss)) <= REL_LOSS * max(abs(float(trl_loss)), 1e-12), (chunk_size, float(loss), float(trl_loss))
        if beta == 0.0 and loss_top_k == 1 and not loss_add_tail:  # one token renormalized over itself: the loss is 0 (TRL's too)
            assert float(trl_loss) == 0.0
            continue
        assert trl_grads.keys() == grads.keys()
        for name, expected in trl_grads.items():
            scale = float(expected.abs().max())
            error = float((grads[name] - expected).abs().max())
            assert error <= REL_GRAD * scale + 1e-15, f"{name}: max |diff| {error:.3e} vs max |grad| {scale:.3e} (chunk_size={chunk_size})"


def test_trl_layout_matches_the_support_dedup(student, batch, served64):
    """Rows 0 and 2 are the teacher's greedy tokens: with beta=0.5 their support is one token (the top-1 is the sampled token)."""
    from posttrain_server_distill.loss import served_support
    from posttrain_server_distill.trainer import teacher_micro_batch

    from posttrain import TeacherServerClient

    prompts = [[int(t) for t, m in zip(row, mask) if m] for row, mask in zip(batch["prompt_ids"], batch["prompt_mask"])]
    completions = [[int(t) for t, m in zip(row, mask) if m] for row, mask in zip(batch["completion_ids"], batch["completion_mask"])]
    answer = TeacherServerClient(served64.url).sequence_logprobs([p + c for p, c in zip(prompts, completions)], [len(p) for p in prompts], 1)
    teacher = teacher_micro_batch(answer, slice(0, 4), batch["completion_ids"].shape[1])
    ids, mask, _ = served_support(teacher, batch["completion_ids"], batch["completion_mask"], beta=0.5, loss_top_k=1)
    assert ids.shape[-1] == 2
    assert not mask[0, :6, 1].any() and not mask[2, :6, 1].any()  # greedy rows: the second entry is off the support
    assert mask[1, : len(completions[1]), 1].any()  # random tokens: mostly not the teacher's top-1


@pytest.mark.parametrize("fields,match", [
    ({"beta": 0.0, "loss_top_k": 0}, "loss_top_k=0 is invalid with beta=0"),
    ({"beta": 0.5, "loss_top_k": 0}, "loss_top_k=0 is invalid with beta=0.5"),
    ({"beta": 1.0, "loss_top_k": 5}, "loss_top_k=5 is invalid with beta=1.0"),
    ({"reverse_kl_top_1_mode": "argmax"}, "reverse_kl_top_1_mode='argmax' is not supported"),
    ({"reverse_kl_top_1_mode": "first"}, "reverse_kl_top_1_mode='first' is invalid"),
    ({"teacher_model_server_url": "localhost:8000"}, "give an http"),
])
def test_configs_trl_refuses_are_refused(fields, match, tmp_path):
    from trl.experimental.server_distillation import ServerDistillationConfig as TRLConfig

    from posttrain_server_distill.config import ServerDistillationConfig

    base = {"output_dir": str(tmp_path), "teacher_model_server_url": "http://127.0.0.1:8000"}
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace("[", r"\[")):
        ServerDistillationConfig(**{**base, **fields})
    if "teacher_model_server_url" not in fields:  # TRL refuses the same settings (it accepts any non-empty URL string)
        with pytest.raises(ValueError):
            TRLConfig(**{**base, "report_to": "none", **fields})


def test_missing_url_names_the_fix(tmp_path, monkeypatch):
    from posttrain_server_distill.config import URL_ENV, ServerDistillationConfig

    monkeypatch.delenv(URL_ENV, raising=False)
    with pytest.raises(ConfigError, match="teacher_model_server_url is not set.*serve-teacher"):
        ServerDistillationConfig(output_dir=str(tmp_path))
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9")
    assert ServerDistillationConfig(output_dir=str(tmp_path)).teacher_model_server_url == "http://127.0.0.1:9"
