"""Tests for the rollout engine (posttrain._rollout) on the transformers backend with a tiny model."""

import pytest
import torch

from posttrain._ops import selective_log_softmax
from posttrain._rollout import RolloutBatch, RolloutEngine, SamplingParams, TransformersBackend, get_rollout_backend

PROMPTS = ["the cat sat", "hello world please think step by step", "what is 3 + 4"]


#: The rollout scores in float32 (its log-probs are float32 lists) whatever the model's dtype. With a float64 model the
#: references below (one unpadded forward, another decode loop) agree with the rollout's logits to ~1e-16, so what is
#: left is the rollout's own float32 rounding: the logits rounded to float32 and a float32 log-softmax over 512 entries,
#: a few ulps of values of magnitude <= ~10 (|log p| ~ 6.2 here): 16 * 10 * eps32 = 1.9e-5 absolute. (With a float32
#: model the two paths' logits themselves differ in their last bits by an amount that depends on the CPU's kernels.)
LOGP_ATOL = 16 * 10 * torch.finfo(torch.float32).eps


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """The tiny model in float64 (see LOGP_ATOL); overrides posttrain.testing's float32 fixture in this module."""
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, dtype=torch.float64)


@pytest.fixture
def prompt_ids(tiny_tokenizer):
    ids = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in ids}) > 1  # different lengths: left padding is exercised
    return ids


@pytest.fixture
def engine(tiny_model, tiny_tokenizer):
    return RolloutEngine("transformers", model=tiny_model, tokenizer=tiny_tokenizer)


def _forward_logps(model, prompt, completion, temperature=1.0, top_k=0):
    """Reference: one unpadded forward pass over prompt+completion, log-probs at the completion positions."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[:, len(prompt) - 1 : -1] / temperature  # (1, C, V)
    if top_k:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return selective_log_softmax(logits, torch.tensor([completion]))[0]  # (C,)


def test_sampling_params_validation():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_tokens=4, top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_tokens=4, temperature=-1)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(max_tokens=4, stop_token_ids=5)
    with pytest.raises(ValueError, match="n="):
        SamplingParams(max_tokens=4, n=0)
    with pytest.raises(TypeError):
        SamplingParams(4)  # kw_only
    assert SamplingParams(max_tokens=4, stop_token_ids=[1, 2]).stop_token_ids == (1, 2)


def test_logprobs_match_forward_pass_left_padded(engine, tiny_model, prompt_ids):
    batch = engine.generate(prompt_ids, SamplingParams(max_tokens=10, seed=0))
    assert len(batch) == 3 and batch.policy_version == 0
    for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs):
        assert len(c) == len(lp) > 0
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), _forward_logps(tiny_model, p, c), atol=LOGP_ATOL, rtol=0)


def test_logprobs_are_processed_temperature_and_topk(tiny_model, tiny_tokenizer, prompt_ids):
    backend = TransformersBackend(tiny_model, tiny_tokenizer, generation_batch_size=2)  # chunked
    batch = backend.generate(prompt_ids, SamplingParams(max_tokens=8, temperature=0.7, seed=1))
    for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs):
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), _forward_logps(tiny_model, p, c, temperature=0.7), atol=LOGP_ATOL, rtol=0)
    batch = backend.generate(prompt_ids, SamplingParams(max_tokens=8, temperature=0.7, top_k=5, seed=2))
    for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs):
        ref = _forward_logps(tiny_model, p, c, temperature=0.7, top_k=5)
        assert torch.isfinite(torch.tensor(lp)).all()
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), ref, atol=LOGP_ATOL, rtol=0)
        assert (torch.tensor(lp, dtype=torch.float64) > _forward_logps(tiny_model, p, c, temperature=0.7) - LOGP_ATOL).all()  # renormalized mass


def test_seed_determinism_and_global_rng_untouched(engine, prompt_ids):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = engine.generate(prompt_ids, SamplingParams(max_tokens=8, seed=7))
    assert torch.equal(torch.get_rng_state(), state), "seeded generation must not advance the global RNG"
    b = engine.generate(prompt_ids, SamplingParams(max_tokens=8, seed=7))
    c = engine.generate(prompt_ids, SamplingParams(max_tokens=8, seed=8))
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.completion_ids != c.completion_ids


def test_n_grouping_and_to_tensors(engine, prompt_ids, tiny_tokenizer):
    batch = engine.generate(prompt_ids, SamplingParams(max_tokens=6, n=2, seed=3))
    assert batch.prompt_ids == [prompt_ids[0]] * 2 + [prompt_ids[1]] * 2 + [prompt_ids[2]] * 2
    assert batch.completion_ids[0] != batch.completion_ids[1]  # two different samples of prompt 0
    t = batch.to_tensors(pad_token_id=tiny_tokenizer.pad_token_id)
    P, C = max(map(len, prompt_ids)), max(map(len, batch.completion_ids))
    assert t["prompt_ids"].shape == t["prompt_mask"].shape == (6, P)
    assert t["completion_ids"].shape == t["completion_mask"].shape == t["sampling_logprobs"].shape == (6, C)
    assert t["sampling_logprobs"].dtype == torch.float32
    short = min(range(3), key=lambda i: len(prompt_ids[i]))
    assert t["prompt_mask"][2 * short, 0] == 0 and t["prompt_mask"][2 * short, -1] == 1  # left-padded
    assert t["prompt_mask"].sum(1).tolist() == [len(p) for p in batch.prompt_ids]


def test_stop_tokens_strip_and_truncation(engine, prompt_ids):
    free = engine.generate(prompt_ids, SamplingParams(max_tokens=8, seed=5, stop_token_ids=(0,)))
    assert all(len(c) == 8 for c in free.completion_ids) and all(free.truncated)
    stop = free.completion_ids[0][2]  # a token the first completion emits at position 2 (or earlier)
    batch = engine.generate(prompt_ids, SamplingParams(max_tokens=8, seed=5, stop_token_ids=(stop,)))
    for full, got, trunc, lp in zip(free.completion_ids, batch.completion_ids, batch.truncated, batch.logprobs):
        if stop in full:
            expected = full[: full.index(stop) + 1]  # ends with (and keeps) the stop token
            assert got == expected and trunc is False
        else:
            assert got == full and trunc is True
        assert len(lp) == len(got)
    assert batch.completion_ids[0][-1] == stop and len(batch.completion_ids[0]) <= 3


def test_default_stop_tokens_and_greedy(tiny_model, tiny_tokenizer, prompt_ids):
    backend = TransformersBackend(tiny_model, tiny_tokenizer)
    stops = backend._stop_ids(SamplingParams(max_tokens=2))
    assert tiny_tokenizer.eos_token_id in stops and tiny_tokenizer.pad_token_id in stops
    a = backend.generate(prompt_ids, SamplingParams(max_tokens=5, temperature=0))
    b = backend.generate(prompt_ids, SamplingParams(max_tokens=5, temperature=0, seed=9))
    assert a.completion_ids == b.completion_ids
    with torch.no_grad():
        first = tiny_model(torch.tensor([prompt_ids[0]])).logits[0, -1].argmax().item()
    assert a.completion_ids[0][0] == first


def test_generation_mode_restored_and_update_weights(tiny_model, tiny_tokenizer, prompt_ids):
    enable = getattr(tiny_model, "activation_checkpointing_enable", None) or tiny_model.gradient_checkpointing_enable
    enable()
    checkpointed = lambda: any(getattr(m, "gradient_checkpointing", False) is True for m in tiny_model.modules())  # noqa: E731
    assert checkpointed()
    tiny_model.config.use_cache = False
    tiny_model.train()
    engine = RolloutEngine(TransformersBackend(tiny_model, tiny_tokenizer))
    engine.generate(prompt_ids[:1], SamplingParams(max_tokens=3, seed=0))
    assert tiny_model.training and checkpointed() and tiny_model.config.use_cache is False
    assert engine.policy_version == 0
    engine.update_weights(tiny_model)
    assert engine.policy_version == 1
    assert engine.generate(prompt_ids[:1], SamplingParams(max_tokens=2, seed=0)).policy_version == 1


def test_input_validation(engine):
    with pytest.raises(TypeError, match="list of token-id lists"):
        engine.generate(torch.tensor([[1, 2]]), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"prompt_ids\[1\]"):
        engine.generate([[1, 2], []], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="logprobs"):
        RolloutBatch(prompt_ids=[[1]], completion_ids=[[2, 3]], logprobs=[[0.0]], truncated=[False])


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match=r"Unknown rollout backend 'nope'.*transformers.*vllm"):
        RolloutEngine("nope")


def test_backend_from_plugin_hook(tiny_tokenizer):
    from posttrain._plugins import get_plugin_manager
    from posttrain.hookspecs import hookimpl

    class EchoBackend:
        policy_version = 0

        def __init__(self, suffix):
            self.suffix = suffix

        def generate(self, prompt_ids, sampling):
            rows = [p for p in prompt_ids for _ in range(sampling.n)]
            return RolloutBatch(rows, [[self.suffix]] * len(rows), [[0.0]] * len(rows), [False] * len(rows))

        def update_weights(self, model):
            self.policy_version += 1

    class FakePlugin:
        @hookimpl
        def register_rollout_backends(self, register):
            register("echo", EchoBackend)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(FakePlugin(), name="fake")
    engine = RolloutEngine("echo", pm=pm, suffix=42)
    assert engine.generate([[1], [2]], SamplingParams(max_tokens=1, n=2)).completion_ids == [[42]] * 4
    assert isinstance(get_rollout_backend("echo", pm=pm, suffix=1), EchoBackend)
    with pytest.raises(TypeError, match="not a rollout backend"):
        RolloutEngine(object())


# ---------------------------------------------------------------------------- lean decode loop
def test_lean_decode_is_used_and_matches_generate_greedy(tiny_model, tiny_tokenizer, prompt_ids):
    """Greedy decoding is deterministic: the lean loop must give generate()'s tokens and processed log-probs exactly."""
    backend = TransformersBackend(tiny_model, tiny_tokenizer)
    from posttrain._rollout import _lean_decode_cache_arg

    assert _lean_decode_cache_arg(tiny_model) is not None  # the tiny model goes through the lean loop
    device = torch.device("cpu")
    for sampling in (SamplingParams(max_tokens=7, temperature=0), SamplingParams(max_tokens=7, temperature=0, repetition_penalty=1.3)):
        stops = backend._stop_ids(sampling)
        expanded = [p for p in prompt_ids for _ in range(2)]
        lean = backend._decode_chunk(tiny_model, expanded, stops, sampling, device, _lean_decode_cache_arg(tiny_model))
        with torch.no_grad():
            ref = backend._generate_chunk_with_generate(tiny_model, tiny_model, expanded, backend._generation_config(sampling, stops), stops, sampling, device)
        assert lean[0] == ref[0] and lean[2] == ref[2]
        for a, b in zip(lean[1], ref[1]):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=LOGP_ATOL, rtol=0)


def test_lean_decode_logprobs_under_top_p_min_p_and_repetition_penalty(tiny_model, tiny_tokenizer, prompt_ids):
    """Sampled log-probs equal a full forward with the same processors applied position by position."""
    from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

    sampling = SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=4)
    batch = TransformersBackend(tiny_model, tiny_tokenizer).generate(prompt_ids, sampling)
    procs = [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)]
    for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1]  # (C, V)
        ref = []
        for t in range(len(c)):
            scores = logits[t : t + 1]
            for proc in procs:
                scores = proc(torch.tensor([p + c[:t]]), scores)
            ref.append(torch.log_softmax(scores, -1)[0, c[t]])
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), torch.stack(ref), atol=LOGP_ATOL, rtol=0)


def test_inverse_cdf_sampler_distribution():
    from posttrain._rollout import _sample_inverse_cdf

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(1, 12, generator=gen), -1)
    probs[0, [0, 5, 11]] = 0.0  # masked tokens (first, middle, last) are never drawn
    probs = probs / probs.sum()
    torch.manual_seed(0)
    draws = _sample_inverse_cdf(probs.repeat(200_000, 1))
    freq = torch.bincount(draws, minlength=12).double() / len(draws)
    assert freq[[0, 5, 11]].sum() == 0
    sigma = (probs[0].double() * (1 - probs[0].double()) / len(draws)).sqrt()
    assert ((freq - probs[0].double()).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)
    # u rounding up to the total picks the last token with mass, never a masked one
    assert _sample_inverse_cdf(torch.tensor([[0.0, 0.0, 0.0, 0.0]]).add_(torch.tensor([[0.5, 0.5, 0.0, 0.0]]))).item() in (0, 1)
