"""Chunked log-probs, entropies, SFT losses and distillation divergences (posttrain._chunked).

Every result is checked against the unchunked computation on materialized logits (loss and gradient),
the distillation divergences against TRL GKD's ``generalized_jsd_loss``, and memory with a
saved-tensor hook: no tensor of ``B*T*V`` elements is kept for backward.

Tolerances hold on any machine (the CPU kernels, their summation order and the thread count vary):
equivalence is shown in float64 at ``F64_RTOL`` (the chunked and unchunked computations are the same
math; float64 rounding is ~1e-16), the float32 kernels at ``F32_RTOL`` derived from their longest
reduction, and through a real model in float64 only (``build_model(dtype=torch.float64)``), since a
float32 model's backward amplifies the paths' last-bit differences by an amount that depends on the machine.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from posttrain import (
    causal_lm_states,
    chunked_distillation_divergence,
    chunked_nll_loss,
    chunked_token_logprobs,
    entropy_from_logits,
    lm_head_of,
    selective_log_softmax,
)

#: float64: the two computations differ only by rounding (~1e-16 per operation, ~1e-14 measured through a model);
#: a real bug (a chunk dropped, a wrong normalization) is off by > 1e-3.
F64_RTOL = 1e-10
#: float32, relative to the tensor's largest entry: every compared value is a few reductions of at most
#: V = 101 terms (the vocabulary; the rows are N = 37, the hidden size 16). Two summation orders of n
#: terms differ by at most ~n * eps (the classic gamma_n bound) of the terms' magnitude: 101 * 1.19e-7
#: = 1.2e-5 (measured <= 1.6e-6 with AVX-512, AVX2 and default kernels, 1 and 2 threads).
F32_RTOL = 101 * torch.finfo(torch.float32).eps
RTOL = {torch.float32: F32_RTOL, torch.float64: F64_RTOL}


def _close(actual, expected, rtol=None, what=""):
    """Relative to the largest magnitude of ``expected`` (a gradient has near-zero entries); ``rtol`` defaults by dtype."""
    rtol = RTOL[expected.dtype] if rtol is None else rtol
    scale = expected.abs().max().clamp(min=1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol}"


def _problem(n=37, h=16, v=101, bias=True, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    b = (torch.randn(v, generator=gen, dtype=dtype) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[3, 10, n - 1]] = -100
    return hidden, weight, b, labels


def _grads(out, params):
    return torch.autograd.grad(out, [p for p in params if p is not None])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("chunk_size", [1, 5, 36, 37, 1000])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_token_logprobs_and_entropy_match_unchunked(chunk_size, temperature, bias, dtype):
    hidden, weight, b, labels = _problem(bias=bias, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    g_lp, g_ent = torch.randn(labels.shape, generator=gen, dtype=dtype), torch.randn(labels.shape, generator=gen, dtype=dtype)
    r = chunked_token_logprobs(hidden, weight, labels, bias=b, temperature=temperature, chunk_size=chunk_size, return_entropy=True,
                               stats=("argmax", "mean_logit", "log_sum_sq"))
    grads = _grads((r.logps * g_lp).sum() + (r.entropy * g_ent).sum(), (hidden, weight, b))

    z = F.linear(hidden, weight, b) / temperature  # (N, V)
    valid = labels != -100
    logps = selective_log_softmax(z, labels.clamp(min=0)) * valid
    ent = entropy_from_logits(z)
    expected = _grads((logps * g_lp).sum() + (ent * g_ent).sum(), (hidden, weight, b))
    _close(r.logps, logps, what="logps")
    assert (r.logps[~valid] == 0).all()
    _close(r.entropy, ent, what="entropy")
    for got, exp, name in zip(grads, expected, ("hidden", "weight", "bias")):
        _close(got, exp, what=f"grad {name}")
    with torch.no_grad():
        assert torch.equal(r.stats["argmax"], z.argmax(-1))
        _close(r.stats["mean_logit"], z.mean(-1), what="mean_logit")
        _close(r.stats["log_sum_sq"], torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1), what="log_sum_sq")


def test_token_logprobs_float64_exact_and_detached_entropy():
    hidden, weight, b, labels = _problem(dtype=torch.float64)
    r = chunked_token_logprobs(hidden, weight, labels, bias=b, chunk_size=4, return_entropy=True, entropy_grad=False)
    assert not r.entropy.requires_grad and r.logps.dtype == torch.float64
    z = F.linear(hidden, weight, b)
    expected = selective_log_softmax(z, labels.clamp(min=0)) * (labels != -100)
    _close(r.logps, expected, rtol=1e-12)  # float64 rounding, ~5e-16 measured
    for got, exp in zip(_grads(r.logps.sum(), (hidden, weight, b)), _grads(expected.sum(), (hidden, weight, b))):
        _close(got, exp, rtol=1e-12)


def test_token_logprobs_bfloat16_head_matches_float_upcast_logits():
    """A bf16 head: the matmul runs in bf16 and the softmax in float32, as ``logits.float()`` unchunked."""
    hidden, weight, _, labels = _problem(bias=False)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    r = chunked_token_logprobs(hb, wb, labels, chunk_size=8)
    valid = labels != -100
    # The reference logits are the same bf16 matmuls on the same 8-row chunks (bit-identical by construction: a
    # bf16 matmul of all 37 rows may round differently on another CPU), upcast; the softmax is float32 on both sides.
    chunk_logits = torch.cat([F.linear(hb[i : i + 8], wb) for i in range(0, hb.shape[0], 8)]).float()
    expected = selective_log_softmax(chunk_logits, labels.clamp(min=0)) * valid
    _close(r.logps, expected, rtol=F32_RTOL)
    # the check can fail: a float32 matmul (no bf16 rounding of the logits, ~2e-3 each) is off by far more
    upcast = selective_log_softmax(F.linear(hb.float(), wb.float()), labels.clamp(min=0)) * valid
    assert ((upcast - expected).abs().max() / expected.abs().max()) > 10 * F32_RTOL
    got = _grads(r.logps.sum(), (hb, wb))
    exp = _grads((selective_log_softmax(F.linear(hb, wb).float(), labels.clamp(min=0)) * valid).sum(), (hb, wb))
    for g, e in zip(got, exp):
        assert g.dtype == torch.bfloat16
        # Each side rounds its result to bf16 (half an ulp, 2**-8, of the largest entry) from float32 sums grouped
        # differently, and rounds grad(logits) to bf16 from float32 values that may differ in their last bits (a
        # flipped rounding moves one term by 2**-8 of itself): at most ~2 bf16 eps (2 * 7.8e-3) of the largest entry.
        _close(g.float(), e.float(), rtol=2.5 * torch.finfo(torch.bfloat16).eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("dft", [False, True])
@pytest.mark.parametrize("chunk_size", [3, 37])
def test_nll_loss_matches_unchunked(dft, chunk_size, dtype):
    hidden, weight, b, labels = _problem(dtype=dtype)
    loss, scores = chunked_nll_loss(hidden, weight, labels, bias=b, chunk_size=chunk_size, dft=dft, stats=("argmax", "entropy"))
    grads = _grads(loss * 1.7, (hidden, weight, b))
    z = F.linear(hidden, weight, b)
    lp = selective_log_softmax(z, labels.clamp(min=0))
    per_token = -lp * (lp.detach().exp() if dft else 1.0)
    expected = (per_token * (labels != -100)).sum()
    _close(loss, expected, what="loss")
    for got, exp, name in zip(grads, _grads(expected * 1.7, (hidden, weight, b)), ("hidden", "weight", "bias")):
        _close(got, exp, what=f"grad {name}")
    _close(scores.entropy, entropy_from_logits(z.detach()), what="entropy")
    assert torch.equal(scores.stats["argmax"], z.argmax(-1))
    with torch.no_grad():  # no graph: the gradient is not formed (and nothing requires grad)
        loss, _ = chunked_nll_loss(hidden, weight, labels, bias=b, chunk_size=chunk_size, dft=dft)
    assert not loss.requires_grad
    _close(loss, expected.detach())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_divergence_matches_trl_gkd(beta, dtype):
    pytest.importorskip("trl")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    hidden, weight, b, _ = _problem(dtype=dtype)
    teacher_hidden = torch.randn(hidden.shape[0], 8, generator=torch.Generator().manual_seed(5), dtype=dtype)
    teacher_weight = torch.randn(weight.shape[0], 8, generator=torch.Generator().manual_seed(6), dtype=dtype)
    g = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(7), dtype=dtype)
    d = chunked_distillation_divergence(hidden, weight, teacher_hidden, teacher_weight, student_bias=b, beta=beta, temperature=0.9, chunk_size=7)
    ref = GKDTrainer.generalized_jsd_loss(F.linear(hidden, weight, b)[None], F.linear(teacher_hidden, teacher_weight)[None], beta=beta,
                                          temperature=0.9, reduction="none").sum(-1)[0]
    _close(d, ref, what="divergence")
    for got, exp in zip(_grads((d * g).sum(), (hidden, weight, b)), _grads((ref * g).sum(), (hidden, weight, b))):
        _close(got, exp, what="grad")


def test_bad_arguments_name_the_fix():
    hidden, weight, b, labels = _problem()
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        chunked_token_logprobs(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        chunked_token_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="unknown stats"):
        chunked_token_logprobs(hidden, weight, labels, stats=("max",))
    with pytest.raises(ValueError, match="do not match"):
        chunked_token_logprobs(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="beta must be in"):
        chunked_distillation_divergence(hidden, weight, hidden, weight, beta=2.0)
    from posttrain import ConfigError, TrainingConfig

    with pytest.raises(ConfigError, match="logprob_chunk_size"):
        TrainingConfig(logprob_chunk_size=-1)


# ----------------------------------------------------------------------------- through a real model
@pytest.fixture(scope="module")
def tok():
    from posttrain.testing.tiny_model import build_tokenizer

    return build_tokenizer()


def _model(tok, dtype=torch.float64, **kw):
    """The tiny model in float64 by default: its chunked and unchunked results agree to ~1e-14 on any machine."""
    from posttrain.testing.tiny_model import build_model

    return build_model(tok, hidden_size=32, num_layers=2, dtype=dtype, **kw)


def _batch(tok, b=3, t=9):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tok), (b, t), generator=gen)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


def _model_logps_and_grads(model, ids, mask, chunk_size, **kwargs):
    model.zero_grad()
    outputs, states = causal_lm_states(model, chunk_size=chunk_size, input_ids=ids, attention_mask=mask, **kwargs)
    scores = states[:, :-1].score(ids[:, -states.tensor.shape[1] + 1 :], temperature=0.8, return_entropy=True)
    ((scores.logps * mask[:, -scores.logps.shape[1] :]).sum() + 0.3 * scores.entropy.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return states, scores, grads


@pytest.mark.parametrize("variant", ["tied", "untied_bias", "logits_to_keep"])
def test_causal_lm_states_match_model_logits(tok, variant):
    model = _model(tok)
    kwargs = {}
    if variant == "untied_bias":  # an untied head with a bias (nn.Linear.forward adds it)
        model.config.tie_word_embeddings = False
        head = torch.nn.Linear(32, len(tok), bias=True, dtype=torch.float64)
        torch.nn.init.normal_(head.weight, std=0.2)
        torch.nn.init.normal_(head.bias, std=0.2)
        model.lm_head = head
    if variant == "logits_to_keep":
        kwargs["logits_to_keep"] = 5
    ids, mask = _batch(tok)
    states, scores, grads = _model_logps_and_grads(model, ids, mask, 4, **kwargs)
    assert states.is_chunked and states.tensor.shape[-1] == 32
    ref_states, ref_scores, ref_grads = _model_logps_and_grads(model, ids, mask, 0, **kwargs)
    assert not ref_states.is_chunked and ref_states.tensor.shape[-1] == len(tok)
    _close(scores.logps, ref_scores.logps, what="logps")
    _close(scores.entropy, ref_scores.entropy, what="entropy")
    assert grads.keys() == ref_grads.keys() and len(grads) > 5
    for name in grads:
        _close(grads[name], ref_grads[name], what=name)


def test_causal_lm_states_peft_lora(tok):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_model(tok), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False))
    assert lm_head_of(model) is not None
    ids, mask = _batch(tok)
    _, scores, grads = _model_logps_and_grads(model, ids, mask, 5)
    _, ref_scores, ref_grads = _model_logps_and_grads(model, ids, mask, 0)
    _close(scores.logps, ref_scores.logps)
    assert grads.keys() == ref_grads.keys() and all("lora" in n for n in grads)
    for name in grads:
        _close(grads[name], ref_grads[name], what=name)
    # a LoRA adapter on the head itself is not a plain Linear: the model's own logits are used
    on_head = peft.get_peft_model(_model(tok), peft.LoraConfig(r=4, target_modules=["lm_head"]))
    assert lm_head_of(on_head) is None
    _, states = causal_lm_states(on_head, chunk_size=4, input_ids=ids, attention_mask=mask)
    assert not states.is_chunked


def test_logit_postprocessing_falls_back_to_model_logits(tok):
    model = _model(tok)
    model.config.final_logit_softcapping = 30.0
    assert lm_head_of(model) is None
    ids, mask = _batch(tok)
    outputs, states = causal_lm_states(model, chunk_size=4, input_ids=ids, attention_mask=mask)
    assert not states.is_chunked and states.tensor is outputs.logits


def test_no_saved_tensor_holds_full_logits(tok):
    """V large enough that B*T*V floats are 33 MB: nothing of that size is saved for backward (unchunked: it is)."""
    b, t, v, h = 2, 64, 65536, 16
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=gen, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(v, h, generator=gen) * 0.1)
    labels = torch.randint(0, v, (b, t), generator=gen)
    full = b * t * v

    def largest_saved(fn):
        sizes = [0]

        def pack(x):
            sizes.append(x.numel())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = fn()
        out.backward()
        return max(sizes)

    chunked = largest_saved(lambda: chunked_token_logprobs(hidden, weight, labels, chunk_size=16, return_entropy=True).logps.sum())
    unchunked = largest_saved(lambda: selective_log_softmax(F.linear(hidden, weight).float(), labels).sum())
    assert unchunked >= full  # the check can fail: the unchunked graph keeps the logits
    assert chunked <= v * h, chunked  # at most the weight itself
    # the NLL forms its gradient in the forward and keeps it on the autograd node (not as saved tensors)
    loss, _ = chunked_nll_loss(hidden, weight, labels, chunk_size=16)
    kept = [x.numel() for x in loss.grad_fn.grads if x is not None]
    assert largest_saved(lambda: chunked_nll_loss(hidden, weight, labels, chunk_size=16)[0]) <= v * h
    assert kept and max(kept) <= v * h, kept


# ----------------------------------------------------------------------------- each method: chunked == unchunked
def _one_sgd_step(method: str, tok, model, tmp_path, chunk_size):
    """Train one SGD step (lr 1, no clipping) and return (logged loss, parameter change = -gradient)."""
    from posttrain.testing import make_tiny_datasets

    data = make_tiny_datasets(n=8)
    common = dict(output_dir=str(tmp_path / f"{method}_{chunk_size}"), max_steps=1, per_device_train_batch_size=4, learning_rate=1.0,
                  optim="sgd", max_grad_norm=0.0, lr_scheduler_type="constant", save_strategy="no", logging_steps=1, report_to="none",
                  disable_tqdm=True, gradient_checkpointing=False, logprob_chunk_size=chunk_size)
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if method == "sft":
        from posttrain.methods.sft import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data["prompt_completion"], processing_class=tok)
    elif method == "dpo":
        from posttrain.methods.dpo import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=DPOConfig(**common, use_weighting=True), train_dataset=data["preference"], processing_class=tok)
    elif method == "kto":
        from posttrain.methods.kto import KTOConfig, KTOTrainer

        trainer = KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=KTOConfig(**common), train_dataset=data["unpaired_preference"], processing_class=tok)
    else:
        def reward(completion_ids, **kwargs):
            return [sum(t % 3 == 0 for t in c) / max(1, len(c)) for c in completion_ids]

        if method == "grpo":
            from posttrain.methods.grpo import GRPOConfig as Config, GRPOTrainer as Trainer
        else:
            from posttrain.methods.rloo import RLOOConfig as Config, RLOOTrainer as Trainer
        args = Config(**common, num_generations=2, max_completion_length=4, beta=0.1)
        trainer = Trainer(model=model, reward_funcs=reward, args=args, train_dataset=data["prompt_only"], processing_class=tok)
    trainer.train()
    with open(os.path.join(common["output_dir"], "metrics.jsonl")) as fh:
        logs = [json.loads(line) for line in fh if line.strip()]
    loss = next(r["loss"] for r in logs if "loss" in r)
    delta = {n: before[n] - p.detach() for n, p in trainer.model.named_parameters()}
    return loss, delta, logs


@pytest.mark.parametrize("method", ["sft", "dpo", "kto", "grpo", "rloo"])
def test_method_loss_and_gradient_chunked_equal_unchunked(method, tok, tmp_path):
    """One SGD step of a float64 tiny model: the whole-model update agrees to F64_RTOL (measured <= 7e-14; in
    float32 the same comparison is off by up to 6.5e-5 on some CPUs, the backward amplifying last-bit differences)."""
    model = _model(tok)
    loss, delta, logs = _one_sgd_step(method, tok, model, tmp_path, chunk_size=7)  # 7 rows: several chunks, a ragged last one
    ref_loss, ref_delta, ref_logs = _one_sgd_step(method, tok, model, tmp_path, chunk_size=0)
    assert next(iter(delta.values())).dtype == torch.float64
    assert loss == pytest.approx(ref_loss, rel=F64_RTOL, abs=1e-12)  # (GRPO's first on-policy loss is ~0: abs)
    changed = [n for n in delta if ref_delta[n].abs().max() > 0]
    assert len(changed) > 5, f"{method}: too few parameters got a gradient ({changed})"
    for name in delta:
        _close(delta[name], ref_delta[name], what=f"{method} {name}")
    # the loop logs metrics as float32: two float64 values 1e-14 apart round to the same float32 or adjacent ones
    got = next(r["entropy"] for r in logs if "entropy" in r)
    exp = next(r["entropy"] for r in ref_logs if "entropy" in r)
    assert got == pytest.approx(exp, rel=2 * torch.finfo(torch.float32).eps)


def test_undeclared_logit_postprocessing_is_caught_by_the_probe(tok):
    """A forward that rescales its logits without saying so in the config: the probe position catches it, the
    forward reruns unchunked (exact scores), one warning, and that model is scored from its logits from then on."""
    import warnings

    model = _model(tok)
    forward = model.forward

    def scaled_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5 + 0.1  # e.g. a remote-code model's logit scale and offset
        return out

    model.forward = scaled_forward
    assert lm_head_of(model) is not None  # nothing in the config tells
    ids, mask = _batch(tok)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        states, scores, grads = _model_logps_and_grads(model, ids, mask, 4)
        again, _, _ = _model_logps_and_grads(model, ids, mask, 4)
    messages = [str(w.message) for w in caught if "changes the LM head's logits" in str(w.message)]
    assert len(messages) == 1 and "logprob_chunk_size=0" in messages[0]
    assert not states.is_chunked and not again.is_chunked
    _, ref_scores, ref_grads = _model_logps_and_grads(model, ids, mask, 0)
    _close(scores.logps, ref_scores.logps, what="logps")
    for name in grads:
        _close(grads[name], ref_grads[name], what=name)
    # a plain model passes the probe silently and returns the first position's logits only
    plain = _model(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs, states = causal_lm_states(plain, chunk_size=4, input_ids=ids, attention_mask=mask)
        assert states.is_chunked and outputs.logits.shape == (ids.shape[0], 1, len(tok))
        outputs, states = causal_lm_states(plain, chunk_size=4, input_ids=ids, attention_mask=mask)
    assert states.is_chunked and outputs.logits.shape == (ids.shape[0], 0, len(tok))  # verified once: no probe, no sync after


def test_probe_of_a_diverged_model_neither_raises_nor_falls_back(tok):
    """NaN/inf logits (a run at lr=1 diverging) compare as themselves: no error, no warning, still chunked."""
    import warnings

    model = _model(tok)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    ids, mask = _batch(tok)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outputs, states = causal_lm_states(model, chunk_size=4, input_ids=ids, attention_mask=mask)
    assert states.is_chunked and torch.isnan(outputs.logits).all()
