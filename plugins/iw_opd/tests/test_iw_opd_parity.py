"""Parity with TRL 1.16's ``trl.experimental.iw_opd.IWOPDTrainer.compute_loss``: the same student, teacher and fixed completions.

Both trainers score the same micro-batch (left-padded prompts, right-padded completions of different lengths), in float64,
so the two computations differ by summation order only (~1e-15 relative) and the bounds hold on any machine and thread
count. Covered: the IW-OPD objective (gamma 0, 0.5, 2) and every branch of the 'jsd' objective TRL has (the mixed top-1
support with 'sampled' / 'argmax' reverse tokens, top-k supports with and without the tail bucket, the full vocabulary,
forward / reverse KL and JSD), with our log-probs chunked (3 rows per chunk, so every batch spans several chunks) and unchunked.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

import posttrain

pytest.importorskip("trl")

LOSS_REL, GRAD_REL = 1e-5, 1e-4  # the project's parity bounds; float64 measures ~1e-14


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("iw_opd", allow_experimental=True)
    yield


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """``(student_dir, tokenizer, student64, teacher64)``: the saved tiny student and a wider teacher with another seed, float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.testing.tiny_model import build_model, save_tiny_model

    student_dir = save_tiny_model(str(tmp_path_factory.mktemp("student")))
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).to(torch.float64)
    teacher = build_model(tokenizer, hidden_size=48, seed=7).to(torch.float64)
    teacher.config._name_or_path = student_dir  # TRL loads the teacher's tokenizer from here (the same as the student's)
    return student_dir, tokenizer, student, teacher


def _batch(tokenizer, seed: int = 0) -> dict:
    """A micro-batch as ``posttrain.rollout_micro_batches`` builds it: 4 prompts (left-padded), completions of 1..7 tokens (right-padded)."""
    rng = random.Random(seed)
    prompts = [tokenizer(f"what is {a} + {b}?", add_special_tokens=False)["input_ids"] for a, b in ((1, 2), (13, 4), (7, 19), (250, 3))]
    completions = [[rng.randrange(3, len(tokenizer)) for _ in range(n)] for n in (7, 3, 1, 5)]
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    pad = tokenizer.pad_token_id
    batch = {
        "prompt_ids": torch.tensor([[pad] * (width_p - len(p)) + p for p in prompts]),
        "prompt_mask": torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts]),
        "completion_ids": torch.tensor([c + [pad] * (width_c - len(c)) for c in completions]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in completions]),
    }
    batch["num_completion_tokens"] = int(batch["completion_mask"].sum())
    return batch


@pytest.fixture(scope="module")
def trl_trainer(pair, tmp_path_factory):
    from datasets import Dataset
    from trl.experimental.iw_opd import IWOPDConfig as TRLConfig
    from trl.experimental.iw_opd import IWOPDTrainer as TRLTrainer

    _, tokenizer, student, teacher = pair
    args = TRLConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", bf16=False, use_cpu=True, max_length=64,
                     max_completion_length=8, per_device_train_batch_size=4)
    data = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"}]] * 4})
    return TRLTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=args, train_dataset=data, processing_class=tokenizer)


@pytest.fixture(scope="module")
def ours(pair, tmp_path_factory):
    from posttrain_iw_opd import IWOPDConfig, IWOPDTrainer

    student_dir, tokenizer, student, teacher = pair
    posttrain.activate("iw_opd", allow_experimental=True)
    args = IWOPDConfig(output_dir=str(tmp_path_factory.mktemp("ours")), report_to="none", max_length=64, max_completion_length=8,
                       per_device_train_batch_size=4, gradient_checkpointing=False, save_strategy="no", disable_tqdm=True)
    data = [{"prompt": "hi"}] * 4
    return IWOPDTrainer(model=copy.deepcopy(student), teacher_model=copy.deepcopy(teacher), args=args, train_dataset=data, processing_class=tokenizer)


def _trl_inputs(batch: dict) -> dict:
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    labels = torch.cat([torch.full_like(batch["prompt_ids"], -100), batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "prompts": batch["prompt_ids"],
            "prompt_attention_mask": batch["prompt_mask"]}


def _loss_and_grads(compute, model):
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


OPTIONS = [
    dict(distillation_objective="iw_opd", iw_opd_gamma=0.5),
    dict(distillation_objective="iw_opd", iw_opd_gamma=0.0),
    dict(distillation_objective="iw_opd", iw_opd_gamma=2.0, temperature=0.7),
    dict(distillation_objective="jsd", beta=1.0, loss_top_k=1, loss_add_tail=True),  # TRL's jsd default: sampled-token reverse KL + tail
    dict(distillation_objective="jsd", beta=0.5, loss_top_k=1, loss_add_tail=True, reverse_kl_top_1_mode="argmax"),
    dict(distillation_objective="jsd", beta=0.3, loss_top_k=1, loss_add_tail=False),
    dict(distillation_objective="jsd", beta=0.0, loss_top_k=1, loss_add_tail=True),
    dict(distillation_objective="jsd", beta=0.0, loss_top_k=5, loss_add_tail=False),
    dict(distillation_objective="jsd", beta=1.0, loss_top_k=4, loss_add_tail=True),
    dict(distillation_objective="jsd", beta=0.5, loss_top_k=3, loss_add_tail=True, temperature=1.3),
    dict(distillation_objective="jsd", beta=0.0, loss_top_k=0),
    dict(distillation_objective="jsd", beta=1.0, loss_top_k=0),
    dict(distillation_objective="jsd", beta=0.5, loss_top_k=0, temperature=0.8),
]


@pytest.mark.parametrize("chunk_size", [3, 0], ids=["chunked", "unchunked"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items() if k != "distillation_objective") + f"-{o['distillation_objective']}")
def test_loss_and_gradients_equal_trl(pair, trl_trainer, ours, options, chunk_size):
    _, tokenizer, _, _ = pair
    batch = _batch(tokenizer)
    defaults = dict(temperature=1.0, beta=1.0, loss_top_k=1, loss_add_tail=True, reverse_kl_top_1_mode="sampled", iw_opd_gamma=0.5)
    settings = {**defaults, **options}
    for key, value in settings.items():
        setattr(trl_trainer, key, value)  # TRL's compute_loss reads these trainer attributes (copied from the config in __init__)
        setattr(ours.args, key, value)
    ours.args.logprob_chunk_size = chunk_size
    trl_loss, trl_grads = _loss_and_grads(lambda: trl_trainer.compute_loss(trl_trainer.model, _trl_inputs(batch)), trl_trainer.model)
    our_loss, our_grads = _loss_and_grads(lambda: ours.compute_loss(ours.model, batch, torch.tensor(float(batch["num_completion_tokens"])))[0], ours.model)
    assert our_loss.dtype == torch.float64
    assert torch.isfinite(trl_loss) and trl_loss.abs() > 1e-6, trl_loss  # a loss that is not trivially 0
    assert our_loss.item() == pytest.approx(trl_loss.item(), rel=LOSS_REL), (our_loss.item(), trl_loss.item())
    assert set(our_grads) == set(trl_grads)
    worst = 0.0
    for name, grad in trl_grads.items():
        rel = ((our_grads[name] - grad).norm() / grad.norm().clamp_min(1e-30)).item()
        worst = max(worst, rel)
        assert rel <= GRAD_REL, f"{name}: gradients differ by {rel:.2e} relative"
    print(f"{options} chunk={chunk_size}: loss {our_loss.item():.6e} vs {trl_loss.item():.6e}, worst grad rel {worst:.1e}")


def test_iw_opd_weights_follow_the_paper_on_a_hand_computed_sequence():
    """w_t = 1 + gamma (1 - sum_{s<t} |A_s| / sum_s |A_s|) on one sequence worked out by hand (padding: A = 0, no loss)."""
    from posttrain_iw_opd.trainer import iw_opd_token_loss

    student = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-1.5, -1.0, -0.5, -9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    per_token, advantage, weight = iw_opd_token_loss(student, teacher, mask, gamma=0.5, epsilon=1e-8)
    # A = [-0.5, 1.0, 0.0, (pad) 0]; |A| total 1.5; prefix before t: [0, 0.5, 1.5, 1.5]
    assert advantage.tolist() == [[-0.5, 1.0, 0.0, 0.0]]
    assert weight[0].tolist() == pytest.approx([1.5, 1.0 + 0.5 * (1 - 0.5 / 1.5), 1.0, 1.0], rel=1e-15)
    assert per_token[0, 3].item() == 0.0
    per_token.sum().backward()
    # d loss / d log pi_S(y_t) = -w_t A_t (A and w are constants)
    assert student.grad[0].tolist() == pytest.approx([0.75, -(1.0 + 0.5 * (1 - 1 / 3)), 0.0, 0.0], rel=1e-15)
