"""Distillation with tools (TRL 1.16's ``DistillationTrainer(tools=...)``), through the core's ToolCallingRollout.

The student's episodes (model turns + inserted tool tokens) come from a scripted rollout backend, so every
test sees real tool calls on a random tiny student. Checked: a run trains and logs the ``tools/*`` metrics;
the loss on a tool-masked batch equals the divergence averaged over the model-written tokens only, derived
here from the full logits of both models on the whole sequence (so the teacher reads the tool tokens too);
parity with TRL's ``DistillationTrainer._compute_loss`` on the same tool-masked batch; the one-line errors.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from posttrain import ConfigError, DataError, RolloutEngine
from posttrain.methods.distill import DistillationConfig, DistillationTrainer
from posttrain.testing.scripted import ScriptedToolTurns
from posttrain.testing.tiny_model import build_model, build_tokenizer

from distill_helpers import rel_err
from posttrain_distill.trainer import generalized_jsd


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product of the two integers.
    """
    return a * b


ROWS = [{"prompt": [{"role": "user", "content": f"what is {i} times 7"}]} for i in range(8)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tools=True)


def _config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_completion_length=200, max_steps=2, learning_rate=1e-2,
                  logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", gradient_checkpointing=False,
                  max_tool_calling_iterations=2, logprob_chunk_size=16)
    values.update(overrides)
    return DistillationConfig(**values)


def _call_ids(tok, name, **arguments) -> list[int]:
    text = "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call><|im_end|>"
    return tok(text, add_special_tokens=False)["input_ids"]


def _turns(tok) -> list[list[int]]:
    return [_call_ids(tok, "multiply", a=6, b=7), tok("it is 42<|im_end|>", add_special_tokens=False)["input_ids"]]


def _trainer(tok, tmp_path, *, dtype=torch.float32, sharpen=False, **overrides) -> DistillationTrainer:
    student, teacher = build_model(tok, hidden_size=16, seed=0, dtype=dtype), build_model(tok, hidden_size=24, seed=1, dtype=dtype)
    if sharpen:  # sharp, different distributions: a divergence of order 1, far above float32 rounding
        with torch.no_grad():
            student.lm_head.weight.mul_(8.0)
            teacher.lm_head.weight.mul_(20.0)
    return DistillationTrainer(model=student, teacher_model=teacher, args=_config(tmp_path, **overrides), train_dataset=ROWS, processing_class=tok,
                               tools=[multiply], rollout_engine=RolloutEngine(ScriptedToolTurns(tok, _turns(tok), logprob=-0.7)))


def _tool_batch(trainer) -> dict:
    (batch,) = trainer._generate(ROWS[:3], seed=0)  # one micro-batch of 3 episodes
    tool = batch["tool_mask"]
    assert tool.shape == batch["completion_mask"].shape
    assert 0 < int(tool.sum()) < int(batch["completion_mask"].sum())  # inserted tool tokens sit between the two turns
    assert batch["num_completion_tokens"] == int((tool * batch["completion_mask"]).sum())
    return batch


# ----------------------------------------------------------------------------- a run
def test_distill_with_a_calculator_trains_two_steps_and_logs_tool_metrics(tok, tmp_path):
    trainer = _trainer(tok, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    with open(os.path.join(trainer.args.output_dir, "metrics.jsonl")) as fh:
        logged = [json.loads(line) for line in fh if line.strip()]
    assert [row["step"] for row in logged if "loss" in row][:2] == [1, 2]
    for row in logged[:2]:
        assert row["tools/call_frequency"] == 1.0 and row["tools/failure_frequency"] == 0.0
        assert row["tools/mean_turns"] == 2.0 and row["tools/turn_limit_ratio"] == 0.0
        assert row["completions/mean_length"] == sum(map(len, _turns(tok)))  # model-written tokens only (as TRL)
        assert row["loss"] > 0 and row["entropy"] > 0 and row["teacher_entropy"] > 0
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())  # it trained
    completions = list(trainer._logs["completion"])
    assert len(completions) == 4 and all("42" in c for c in completions)  # the tool's result is in the episode
    evaluated = trainer.evaluate(ROWS[:2])  # evaluation rolls out the same episodes
    assert evaluated["eval_tools/call_frequency"] == 1.0 and evaluated["eval_loss"] > 0


# ----------------------------------------------------------------------------- the loss covers model-written tokens only
@pytest.mark.parametrize("beta,temperature", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.2)])
def test_tool_masked_loss_equals_the_divergence_over_model_written_tokens(tok, tmp_path, beta, temperature):
    """float64: compute_loss on a tool-masked batch == per-token generalized JSD of the full logits (student and teacher on the
    whole sequence, tool tokens included) averaged over completion_mask * tool_mask; same gradients, entropies and token count."""
    trainer = _trainer(tok, tmp_path, dtype=torch.float64, beta=beta, temperature=temperature)
    batch = _tool_batch(trainer)
    num_items = torch.tensor(float(batch["num_completion_tokens"]) + 5.0)  # a step-wide count (other micro-batches hold 5 more)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss, metrics = trainer.compute_loss(model, batch, num_items)
    loss.backward()
    ours_grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    # independently: full logits of both models on prompt + completion (model turns AND inserted tool tokens)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width, vocab = batch["completion_ids"].shape[1], len(tok)
    model.zero_grad(set_to_none=True)
    s_logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1]
    with torch.no_grad():
        t_logits = trainer.teacher_model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1]
    s_logp, t_logp = F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1)
    per_token = generalized_jsd(s_logp.reshape(-1, vocab), t_logp.reshape(-1, vocab), beta).view(s_logits.shape[:2])  # (B, C)
    written = (batch["completion_mask"] * batch["tool_mask"]).double()  # model-written tokens
    expected = (per_token * written).sum() / num_items
    expected.backward()
    assert rel_err(loss, expected) < 1e-10, (float(loss), float(expected))
    for n, g in ours_grads.items():
        assert rel_err(g, dict(model.named_parameters())[n].grad) < 1e-8, n
    worst = max(rel_err(g, dict(model.named_parameters())[n].grad) for n, g in ours_grads.items())
    print(f"tool-masked distill loss vs derived (beta={beta}, T={temperature}): loss rel {rel_err(loss, expected):.1e}, worst grad rel {worst:.1e}")
    count = written.sum()
    s_entropy = -(s_logp.exp() * s_logp).sum(-1)
    t_entropy = -(t_logp.exp() * t_logp).sum(-1)
    metric_tol = 4 * torch.finfo(torch.float32).eps  # the metrics are logged in float32 (two roundings of float64 sums)
    assert rel_err(metrics["entropy"], (s_entropy.detach() * written).sum() / count) < metric_tol
    assert rel_err(metrics["teacher_entropy"], (t_entropy * written).sum() / count) < metric_tol

    # the mask matters: over every completion token (tool tokens included) the loss is clearly another number
    everything = (per_token.detach() * batch["completion_mask"]).sum() / num_items
    assert abs(float(everything) - float(loss.detach())) > 1e-3 * abs(float(loss.detach()))
    no_tools = {k: v for k, v in batch.items() if k != "tool_mask"}
    assert rel_err(trainer.compute_loss(model, no_tools, num_items)[0], everything) < 1e-10


def test_tool_masked_loss_equals_trls_compute_loss(tok, tmp_path):
    """TRL 1.16's DistillationTrainer._compute_loss reads inputs['tool_mask'] (loss_mask = completion_mask * tool_mask): the same batch,
    the same float64 student and teacher give the same loss and gradients (TRL's chunked kernel computes in float32: relative 1e-5 /
    1e-4, as tests/test_distill_parity.py; the loss is of order 1, far above that rounding)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DistillationConfig as TRLConfig
    from trl import DistillationTrainer as TRLTrainer

    trainer = _trainer(tok, tmp_path, dtype=torch.float64, sharpen=True, beta=0.5, temperature=0.9)
    trl_student = copy.deepcopy(trainer.model)
    batch = _tool_batch(trainer)
    tensors = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "tool_mask")}
    num_items = torch.tensor(float(batch["num_completion_tokens"]) + 5.0)
    trainer.model.zero_grad(set_to_none=True)
    loss, metrics = trainer.compute_loss(trainer.model, batch, num_items)
    loss.backward()

    args = TRLConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, beta=0.5, temperature=0.9, report_to="none",
                     gradient_checkpointing=False, per_device_train_batch_size=3, max_completion_length=8)
    trl_trainer = TRLTrainer(model=trl_student, teacher_model=trainer.teacher_model, args=args, processing_class=tok,
                             train_dataset=Dataset.from_dict({"prompt": ["a", "b", "c"]}))
    unwrapped = trl_trainer.accelerator.unwrap_model(trl_trainer.model)
    ref, entropy_sum, n_valid = trl_trainer._compute_loss(unwrapped, tensors, num_items)
    ref.backward()
    assert float(ref.detach()) > 0.1
    assert int(n_valid) == batch["num_completion_tokens"]  # TRL counts the model-written tokens too
    assert rel_err(loss, ref) < 1e-5, (float(loss), float(ref))
    assert rel_err(metrics["entropy"], entropy_sum / n_valid) < 1e-5
    ours = dict(trainer.model.named_parameters())
    compared = 0
    for name, p in unwrapped.named_parameters():
        if p.grad is not None:
            assert rel_err(ours[name].grad, p.grad) < 1e-4, name
            compared += 1
    assert compared == sum(p.grad is not None for p in ours.values()) > 0
    worst = max(rel_err(ours[name].grad, p.grad) for name, p in unwrapped.named_parameters() if p.grad is not None)
    print(f"tool-masked distill vs TRL _compute_loss: loss {float(loss.detach()):.4f}, rel {rel_err(loss, ref):.1e}, worst grad rel {worst:.1e}")
    # and without its tool_mask TRL's loss is another number: the parity is on the masked loss
    unmasked, _, _ = trl_trainer._compute_loss(unwrapped, {k: v for k, v in tensors.items() if k != "tool_mask"}, num_items)
    assert abs(float(unmasked.detach()) - float(ref.detach())) > 1e-3 * float(ref.detach())


def test_served_teacher_reads_the_tool_tokens_and_the_loss_skips_them(tok, tmp_path):
    """A served teacher gets the whole sequences, tool tokens included: its log-prob of every completion token (model-written or
    inserted) and its top-1 equal the local teacher's on the full sequence; the served loss (TRL's default beta=1, loss_top_k=1)
    is the per-token served divergence (the plugin's served.py functions on those log-probs) over the model-written tokens only."""
    from posttrain import TeacherServer

    from posttrain_distill.served import served_topk_divergence

    local = _trainer(tok, tmp_path / "local", dtype=torch.float64, temperature=0.9)
    with TeacherServer(copy.deepcopy(local.teacher_model), tok) as server:
        served = DistillationTrainer(model=copy.deepcopy(local.model), processing_class=tok, tools=[multiply], train_dataset=ROWS,
                                     args=_config(tmp_path / "served", temperature=0.9, teacher_model_server_url=server.url, teacher_server_max_retries=0),
                                     rollout_engine=RolloutEngine(ScriptedToolTurns(tok, _turns(tok), logprob=-0.7)))
        batch = _tool_batch(served)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width, completion = batch["completion_ids"].shape[1], batch["completion_mask"].bool()
    with torch.no_grad():
        t_logp = F.log_softmax(local.teacher_model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1] / 0.9, -1)
    sampled = t_logp.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)  # (B, C), at tool tokens too
    # float64 on both sides; the server batches and pads its own forward (measured ~1e-11): a wrong sequence is off by O(1)
    assert rel_err(batch["teacher_actual_logprobs"][completion], sampled[completion]) < 1e-9
    assert torch.equal(batch["teacher_logprob_token_ids"][..., 0][completion], t_logp.argmax(-1)[completion])

    model = served.model
    num_items = torch.tensor(float(batch["num_completion_tokens"]) + 3.0)
    loss, _ = served.compute_loss(model, batch, num_items)
    with torch.no_grad():
        s_logp = F.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1] / 0.9, -1)
    s_sampled = s_logp.gather(-1, batch["completion_ids"].unsqueeze(-1))  # beta=1: the support is the sampled token (+ the tail)
    per_token = served_topk_divergence(s_sampled, sampled.unsqueeze(-1), torch.ones_like(s_sampled, dtype=torch.bool), beta=1.0)  # (B, C)
    written = (batch["completion_mask"] * batch["tool_mask"]).bool()
    expected = per_token[written].sum() / num_items
    assert float(expected) > 0 and rel_err(loss, expected) < 1e-8, (float(loss), float(expected))
    print(f"served tool-masked loss vs derived: rel {rel_err(loss, expected):.1e}; served vs local log-probs "
          f"rel {rel_err(batch['teacher_actual_logprobs'][completion], sampled[completion]):.1e}")
    everything = per_token[completion].sum() / num_items
    assert abs(float(everything) - float(expected)) > 1e-3 * float(expected)  # the tool tokens would change it


# ----------------------------------------------------------------------------- errors
def test_tool_errors_are_one_line(tok, tmp_path):
    def no_doc(a):
        return a

    student, teacher = build_model(tok, hidden_size=16, seed=0), build_model(tok, hidden_size=16, seed=1)
    with pytest.raises(ConfigError, match=r"^tool 'no_doc': its schema cannot be built"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_config(tmp_path), train_dataset=ROWS, processing_class=tok, tools=[no_doc])
    with pytest.raises(DataError, match=r"^train_dataset row 1: tools= needs a conversational 'prompt' .*got 'what is 2'"):
        DistillationTrainer(model=student, teacher_model=teacher, args=_config(tmp_path), processing_class=tok, tools=[multiply],
                            train_dataset=[ROWS[0], {"prompt": "what is 2"}])
    with pytest.raises(ConfigError, match=r"^tool_call_timeout=0 is invalid"):
        _config(tmp_path, tool_call_timeout=0)
    with pytest.raises(ConfigError, match=r"^max_tool_calling_iterations=-1 is invalid"):
        _config(tmp_path, max_tool_calling_iterations=-1)
