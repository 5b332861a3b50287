"""The transformers backend drives its lean decode loop only where a probe showed it equals the truth (issue 18 item 5).

Everything else -- M-RoPE / vision models (a tiny Qwen2-VL built here), a request carrying extra model
inputs, an architecture whose lean loop disagrees with a full forward pass, a probe that raises -- goes
through ``model.generate`` with scores, and its sampling log-probs still equal a forward pass.
"""

import pytest
import torch

from posttrain._ops import selective_log_softmax
from posttrain._rollout import (
    SamplingParams,
    TransformersBackend,
    _decode_choice,
    _declares_mrope,
    _probe_lean_decode,
)
import posttrain._rollout as rollout
from posttrain.testing.tiny_model import _to_dtype, build_model

PROMPTS = ["the cat sat", "hello world please think step by step", "what is 3 + 4"]

#: Both decode paths return float32 log-probs whatever the model's dtype (the logits / processed scores are
#: rounded to float32 and log-softmaxed in float32). With a float64 model the reference below (one unpadded
#: forward, float64) agrees with the logits the backend rounded to ~1e-15, so what is left is the float32
#: rounding of logits of magnitude <= ~1 and of a log-softmax over 512 entries (|log p| ~ 6.2 here): a few
#: ulps of values <= ~10, so 16 * 10 * eps32 = 1.9e-5 absolute (as in tests/test_rollout.py).
LOGP_ATOL = 16 * 10 * torch.finfo(torch.float32).eps


@pytest.fixture
def prompt_ids(tiny_tokenizer):
    ids = [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in ids}) > 1  # different lengths: left padding is exercised
    return ids


@pytest.fixture
def probe_calls(monkeypatch):
    """Count the probes ``_decode_choice`` runs (the real probe runs; only the calls are counted)."""
    calls = []
    real = rollout._probe_lean_decode

    def counting(backend, model, *args, **kwargs):
        calls.append(model)
        return real(backend, model, *args, **kwargs)

    monkeypatch.setattr(rollout, "_probe_lean_decode", counting)
    return calls


def _tiny_qwen2_vl(tokenizer):
    """A tiny Qwen2-VL (2 text layers of width 32, a 1-block vision tower of width 16), float64, built in-process."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    vocab = len(tokenizer)
    special = dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},  # sums to head_dim / 2
            **special,
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=2, spatial_merge_size=1, temporal_patch_size=1),
        # vision placeholders outside the text vocabulary: a text-only completion can never contain one
        image_token_id=vocab, video_token_id=vocab + 1, vision_start_token_id=vocab + 2, vision_end_token_id=vocab + 3,
        tie_word_embeddings=True,
        **special,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(config)
    return _to_dtype(model, torch.float64)


def _wrong_model(tokenizer, arch="qwen2"):
    """The tiny model, float64, in a subclass whose forward ignores ``position_ids`` once the KV cache holds tokens.

    The model then counts decode positions from the padded length, so a left-padded row's new tokens sit
    ``padding`` positions too far from its prompt: a wrong lean loop, which the unpadded forward pass (the
    truth) disagrees with. The forward keeps its signature, so the lean loop's signature check passes.
    """
    import functools

    good = build_model(tokenizer, arch=arch)
    base = type(good)

    @functools.wraps(base.forward)  # inspect.signature follows __wrapped__: the same parameters as the real forward
    def forward(self, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            kwargs["position_ids"] = None
        return base.forward(self, *args, **kwargs)

    wrong = type(f"Wrong{base.__name__}", (base,), {"forward": forward})(good.config)
    wrong.load_state_dict(good.state_dict())
    wrong.generation_config = good.generation_config
    return _to_dtype(wrong, torch.float64)


def _forward_logps(model, prompt, completion, temperature=1.0):
    """Reference: one unpadded forward pass over prompt+completion, float64 log-probs at the completion positions."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[:, len(prompt) - 1 : -1].double() / temperature  # (1, C, V)
    return selective_log_softmax(logits, torch.tensor([completion]))[0]  # (C,)


def _assert_logps_match_forward(model, batch, temperature=1.0):
    assert len(batch) > 0
    for p, c, lp in zip(batch.prompt_ids, batch.completion_ids, batch.logprobs):
        assert len(c) == len(lp) > 0
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), _forward_logps(model, p, c, temperature), atol=LOGP_ATOL, rtol=0)


# ---------------------------------------------------------------------------- 1. M-RoPE VLM -> generate
def test_qwen2_vl_takes_generate_and_its_logprobs_equal_a_forward_pass(tiny_tokenizer, prompt_ids, probe_calls):
    model = _tiny_qwen2_vl(tiny_tokenizer)
    assert rollout._lean_decode_cache_arg(model) is not None  # its forward signature alone would pick the lean loop
    backend = TransformersBackend(model, tiny_tokenizer)
    greedy = backend.generate(prompt_ids, SamplingParams(max_tokens=6, temperature=0))
    assert backend.decode_choice.path == "generate" and "M-RoPE" in backend.decode_choice.reason
    _assert_logps_match_forward(model, greedy)
    sampling = SamplingParams(max_tokens=6, temperature=0.8, n=2, seed=3)
    sampled = backend.generate(prompt_ids, sampling)
    assert backend.decode_choice.path == "generate"
    _assert_logps_match_forward(model, sampled, temperature=0.8)
    assert sampled.completion_ids == backend.generate(prompt_ids, sampling).completion_ids  # seeded: reproducible
    assert probe_calls == []  # declared M-RoPE: never probed


def test_declares_mrope_reads_vision_and_rope_configs(tiny_tokenizer):
    vl_config = _tiny_qwen2_vl(tiny_tokenizer).config
    assert _declares_mrope(vl_config)
    assert _declares_mrope(vl_config.text_config)  # no vision_config here: the rope parameters' mrope_section
    assert not _declares_mrope(build_model(tiny_tokenizer).config)


def test_extra_model_inputs_take_generate_without_probing(tiny_tokenizer, probe_calls):
    model = build_model(tiny_tokenizer)
    backend = TransformersBackend(model, tiny_tokenizer)
    choice = _decode_choice(backend, model, model, torch.device("cpu"), model_inputs={"pixel_values": torch.zeros(1, 3, 4, 4)})
    assert choice.path == "generate" and "pixel_values" in choice.reason
    per_prompt = [{}, {"pixel_values": torch.zeros(1, 3, 4, 4), "image_grid_thw": torch.tensor([[1, 2, 2]])}]  # one dict per prompt
    choice = _decode_choice(backend, model, model, torch.device("cpu"), model_inputs=per_prompt)
    assert choice.path == "generate" and "['image_grid_thw', 'pixel_values']" in choice.reason
    assert probe_calls == []
    for nothing in ({}, [{}, {}], None):  # no extra input: the probe decides
        assert _decode_choice(backend, model, model, torch.device("cpu"), model_inputs=nothing).path == "lean"
    assert len(probe_calls) == 1


# ---------------------------------------------------------------------------- 2. plain decoders keep the lean loop
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_decoder_takes_the_lean_loop_probed_once(tiny_tokenizer, prompt_ids, probe_calls, arch):
    model = build_model(tiny_tokenizer, arch=arch, dtype=torch.float64)
    backend = TransformersBackend(model, tiny_tokenizer, generation_batch_size=2)  # two chunks per call
    greedy = backend.generate(prompt_ids, SamplingParams(max_tokens=6, temperature=0))
    assert backend.decode_choice.path == "lean" and backend.decode_choice.reason.startswith("probe passed")
    _assert_logps_match_forward(model, greedy)
    sampled = backend.generate(prompt_ids, SamplingParams(max_tokens=6, temperature=0.8, n=2, seed=5))
    _assert_logps_match_forward(model, sampled, temperature=0.8)
    TransformersBackend(model, tiny_tokenizer).generate(prompt_ids[:1], SamplingParams(max_tokens=2))  # another backend, same model
    assert probe_calls == [model]  # once per (class, config) per process, whatever the chunks, calls and backends
    other = build_model(tiny_tokenizer, arch=arch, dtype=torch.float64)  # another config object: probed on its own
    TransformersBackend(other, tiny_tokenizer).generate(prompt_ids[:1], SamplingParams(max_tokens=2))
    assert probe_calls == [model, other]


# ---------------------------------------------------------------------------- 3. a wrong lean loop is caught
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_probe_catches_a_lean_loop_with_wrong_positions(tiny_tokenizer, prompt_ids, probe_calls, arch):
    model = _wrong_model(tiny_tokenizer, arch)
    backend = TransformersBackend(model, tiny_tokenizer)
    backend.generate(prompt_ids, SamplingParams(max_tokens=4, temperature=0))
    assert backend.decode_choice.path == "generate"
    assert backend.decode_choice.reason.startswith("probe failed: lean-loop log-probs differ from a full forward pass"), backend.decode_choice.reason
    assert len(probe_calls) == 1


def test_probe_that_raises_falls_back_to_generate(tiny_tokenizer, prompt_ids, monkeypatch):
    model = build_model(tiny_tokenizer, dtype=torch.float64)
    backend = TransformersBackend(model, tiny_tokenizer)

    def broken(*args, **kwargs):
        raise RuntimeError("lean loop unsupported")

    monkeypatch.setattr(backend, "_decode_chunk", broken)
    batch = backend.generate(prompt_ids, SamplingParams(max_tokens=5, temperature=0))
    assert backend.decode_choice.path == "generate" and backend.decode_choice.reason == "probe raised RuntimeError: lean loop unsupported"
    _assert_logps_match_forward(model, batch)


# ---------------------------------------------------------------------------- 4. the probe leaves no trace
def test_probe_leaves_rng_mode_and_grad_untouched(tiny_tokenizer):
    model = build_model(tiny_tokenizer)
    model.train()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append((module.training, torch.is_grad_enabled())))
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    choice = _probe_lean_decode(TransformersBackend(model, tiny_tokenizer), model, model, "cache", torch.device("cpu"))
    assert choice.path == "lean"
    assert torch.equal(torch.random.get_rng_state(), before)
    assert seen and set(seen) == {(False, False)}  # every forward of the probe: eval mode, no grad
    assert model.training


def test_unseeded_sampling_draws_the_same_with_or_without_a_probe(tiny_tokenizer, prompt_ids, probe_calls):
    """``seed=None`` samples from the global RNG: a first call (which probes) must draw what a later one (no probe) draws."""
    model = build_model(tiny_tokenizer, dtype=torch.float64)
    backend = TransformersBackend(model, tiny_tokenizer)
    sampling = SamplingParams(max_tokens=6, temperature=1.0, n=2)
    torch.manual_seed(7)
    first = backend.generate(prompt_ids, sampling)
    after_first = torch.random.get_rng_state()
    torch.manual_seed(7)
    second = backend.generate(prompt_ids, sampling)
    assert len(probe_calls) == 1  # only the first call probed
    assert first.completion_ids == second.completion_ids and first.logprobs == second.logprobs
    assert torch.equal(torch.random.get_rng_state(), after_first)
