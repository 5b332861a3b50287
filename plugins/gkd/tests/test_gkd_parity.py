"""GKD parity with TRL 1.16's ``trl.experimental.gkd`` on the same student, teacher and batch, in float64.

* the collated batch equals TRL's ``DataCollatorForChatML`` (left padding, labels -100 on prompt and padding);
* the per-token divergence of ``posttrain.chunked_distillation_divergence`` (hidden states + LM heads, row
  chunks) equals TRL's ``GKDTrainer.generalized_jsd_loss`` on the full logits, loss and student gradients,
  for beta 0 / 0.5 / 1 and temperature 1 / 0.7;
* ``GKDTrainer.compute_loss`` equals TRL's ``GKDTrainer.compute_loss`` (a real TRL trainer built on the same
  models), loss and gradients, with ``num_items_in_batch`` as TRL's Trainer passes it.

Float64 models make both sides differ by summation order only, so the tolerances hold on any machine.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import posttrain
from posttrain.testing import make_tiny_datasets

LOSS_REL, GRAD_REL = 1e-5, 1e-4  # the brief's tolerances; measured float64 differences are ~1e-14


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("gkd", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    student = build_model(tiny_tokenizer, hidden_size=32, num_layers=2, seed=0, dtype=torch.float64)
    teacher = build_model(tiny_tokenizer, hidden_size=48, num_layers=2, seed=1, dtype=torch.float64)
    return student, teacher


@pytest.fixture(scope="module")
def rows():
    data = make_tiny_datasets(n=6, seed=3)["messages"].to_list()
    data[1]["messages"] = data[1]["messages"][:-1] + [{"role": "assistant", "content": data[1]["messages"][-1]["content"] + " is the answer, I think"}]
    return data  # rows of different lengths: left padding in the batch


def _trl_trainer(tokenizer, student, teacher, tmp_path, rows, **cfg):
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig as TRLConfig
    from trl.experimental.gkd import GKDTrainer as TRLTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=len(rows), use_cpu=True, bf16=False,
                         gradient_checkpointing=False, max_length=64, **cfg)
        return TRLTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer, train_dataset=Dataset.from_list(rows))


def _ours(tokenizer, student, teacher, tmp_path, rows, **cfg):
    from posttrain.experimental.gkd import GKDConfig, GKDTrainer

    cfg = {"report_to": "none", "disable_tqdm": True, "gradient_checkpointing": False, "save_strategy": "no", "max_length": 64, "logprob_chunk_size": 5, **cfg}
    return GKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(output_dir=str(tmp_path / "ours"), **cfg), train_dataset=rows, processing_class=tokenizer)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def _grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_collated_batch_equals_trl(tiny_tokenizer, models, rows, tmp_path):
    from trl.experimental.utils import DataCollatorForChatML as TRLCollator

    student, teacher = models
    ours = _ours(tiny_tokenizer, copy.deepcopy(student), teacher, tmp_path, rows)
    batch = ours.collate([ours.train_dataset[i] for i in range(len(rows))])
    reference = TRLCollator(tokenizer=tiny_tokenizer, max_length=64)(rows)
    for key in ("input_ids", "attention_mask", "labels", "prompts", "prompt_attention_mask"):
        assert torch.equal(batch[key], reference[key]), key
    assert (batch["labels"] != -100).any(dim=1).all() and (batch["attention_mask"] == 0).any()  # completions, and padding to ignore
    assert ours.count_items(batch) == int((reference["labels"][:, 1:] != -100).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_divergence_equals_trl_generalized_jsd_loss(tiny_tokenizer, models, rows, tmp_path, beta, temperature):
    """The chunked per-token divergence on the completion rows, mean over them = TRL's loss on the full logits (and gradients)."""
    from trl.experimental.gkd import GKDTrainer as TRLTrainer

    from posttrain_gkd.trainer import generalized_jsd_loss

    student, teacher = models
    trainer = _ours(tiny_tokenizer, copy.deepcopy(student), teacher, tmp_path, rows)
    batch = trainer.collate([trainer.train_dataset[i] for i in range(len(rows))])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"][:, 1:]

    ref_model = copy.deepcopy(student)
    ref = TRLTrainer.generalized_jsd_loss(ref_model(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1].detach(), labels=labels,
                                          beta=beta, temperature=temperature)
    ref.backward()
    ours_model = copy.deepcopy(student)
    _, s_states = posttrain.causal_lm_states(ours_model, chunk_size=3, **inputs)
    with torch.no_grad():
        _, t_states = posttrain.causal_lm_states(teacher, chunk_size=3, **inputs)
    mask = labels != -100
    assert s_states.is_chunked and t_states.is_chunked  # hidden states + heads: no (B, T, V) logits were built
    per_token = posttrain.chunked_distillation_divergence(s_states.tensor[:, :-1][mask], s_states.weight, t_states.tensor[:, :-1][mask], t_states.weight,
                                                          beta=beta, temperature=temperature, chunk_size=3)
    loss = per_token.sum() / mask.sum()
    loss.backward()
    assert per_token.dtype == torch.float64
    assert _rel(loss.detach(), ref.detach()) < LOSS_REL, (float(loss), float(ref))
    ref_grads, our_grads = _grads(ref_model), _grads(ours_model)
    assert ref_grads.keys() == our_grads.keys() and ref_grads
    worst = max(_rel(our_grads[k], ref_grads[k]) for k in ref_grads)
    assert worst < GRAD_REL, worst
    # the plugin's reference formula (used when a head cannot be chunked) is TRL's too
    with torch.no_grad():
        mine = generalized_jsd_loss(student(**inputs).logits[:, :-1], teacher(**inputs).logits[:, :-1], labels=labels, beta=beta, temperature=temperature)
    assert _rel(mine, ref.detach()) < LOSS_REL


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_compute_loss_equals_trl_trainer(tiny_tokenizer, models, rows, tmp_path, beta):
    """Our compute_loss on the collated batch = TRL's GKDTrainer.compute_loss (a real TRL trainer on the same models), loss and grads.

    TRL's trainer computes the divergence at temperature 1 whatever ``temperature`` (its sampling temperature) is: so do we.
    """
    student, teacher = models
    trl_model, our_model = copy.deepcopy(student), copy.deepcopy(student)
    trl = _trl_trainer(tiny_tokenizer, trl_model, teacher, tmp_path, rows, beta=beta, temperature=0.7, lmbda=0.0)
    ours = _ours(tiny_tokenizer, our_model, teacher, tmp_path, rows, beta=beta, temperature=0.7, lmbda=0.0)
    batch = ours.collate([ours.train_dataset[i] for i in range(len(rows))])
    num_items = torch.tensor(float(ours.count_items(batch)) + 3.0)  # a step's count over more micro-batches than this one

    ref = trl.compute_loss(trl.model, dict(batch), num_items_in_batch=num_items)
    ref.backward()
    loss, metrics = ours.compute_loss(ours.model, batch, num_items)
    loss.backward()
    assert _rel(loss.detach(), ref.detach()) < LOSS_REL, (float(loss), float(ref))
    ref_grads, our_grads = _grads(trl.model), _grads(ours.model)
    assert ref_grads.keys() == our_grads.keys() and ref_grads
    worst = max(_rel(our_grads[k], ref_grads[k]) for k in ref_grads)
    assert worst < GRAD_REL, worst
    # logprob_chunk_size=0 (the models' own logits, on the completion rows): the same loss
    unchunked = _ours(tiny_tokenizer, copy.deepcopy(student), teacher, tmp_path, rows, beta=beta, lmbda=0.0, logprob_chunk_size=0, overwrite_output_dir=True)
    loss0, _ = unchunked.compute_loss(unchunked.model, batch, num_items)
    assert _rel(loss0.detach(), ref.detach()) < LOSS_REL
    # the logged divergence is the per-token mean of the micro-batch (TRL's batchmean loss)
    plain = trl.generalized_jsd_loss(trl.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1],
                                     teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1],
                                     labels=batch["labels"][:, 1:], beta=beta)
    assert _rel(metrics["divergence"], plain.detach()) < LOSS_REL


def test_trl_static_helpers_match(tiny_tokenizer, models):
    """``GKDTrainer.generalized_jsd_loss`` (every reduction) and ``GKDTrainer.generate_on_policy_outputs`` (EOS, none, a list) equal TRL's."""
    from transformers import GenerationConfig
    from trl.experimental.gkd import GKDTrainer as TRLTrainer

    from posttrain.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 7, generator=generator, dtype=torch.float64), torch.randn(2, 5, 7, generator=generator, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100, 3, 4], [-100] * 5])
    for reduction in ("batchmean", "sum", "mean", "none"):
        for beta in (0.0, 0.3, 1.0):
            for lab in (None, labels):
                ours = GKDTrainer.generalized_jsd_loss(s, t, labels=lab, beta=beta, temperature=0.8, reduction=reduction)
                ref = TRLTrainer.generalized_jsd_loss(s, t, labels=lab, beta=beta, temperature=0.8, reduction=reduction)
                assert ours.shape == ref.shape and torch.allclose(ours, ref, rtol=1e-12, atol=0), (reduction, beta, lab is None)
    ours = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, num_items_in_batch=torch.tensor(7.0))
    assert torch.allclose(ours, TRLTrainer.generalized_jsd_loss(s, t, labels=labels, num_items_in_batch=torch.tensor(7.0)), rtol=1e-12)

    student = models[0]
    encoded = tiny_tokenizer(["hello there", "what is 1 + 1"], return_tensors="pt", padding=True, padding_side="left")
    inputs = {"prompts": encoded["input_ids"], "prompt_attention_mask": encoded["attention_mask"]}
    for eos in (tiny_tokenizer.eos_token_id, None, [tiny_tokenizer.eos_token_id, 5, 7, 9, 11]):
        config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id, eos_token_id=eos)
        for ours, ref in zip(GKDTrainer.generate_on_policy_outputs(student, inputs, config), TRLTrainer.generate_on_policy_outputs(student, inputs, config)):
            assert torch.equal(ours, ref), eos
