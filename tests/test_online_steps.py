"""The online scaffold's steps (posttrain._online_steps), each on its own, on the tiny model.

GRPO and RLOO run on these functions; their end-to-end equality with the pre-scaffold trainers is the
bit-identical 6-step run of the plugins (weights hashed), so here each step is checked against an
independent computation. Log-prob comparisons run in float64 where two code paths meet.
"""

from __future__ import annotations

import logging
import types
import warnings

import pytest
import torch

from posttrain import (
    CompletionLog,
    ConfigError,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    TrainingLoop,
    add_old_and_ref_logps,
    attach_rollout_metrics,
    build_rollout_engine,
    check_online_arguments,
    check_sync_ref_model,
    completion_logps,
    default_output_dir,
    evaluate_online,
    expand_prompts,
    generate_rollout,
    load_online_policy,
    nanstd,
    prepare_prompt_dataset,
    prompt_token_ids,
    reference_logps,
    resolve_online_rewards,
    reward_and_length_metrics,
    rollout_micro_batches,
    router_aux_loss_settings,
    sampler_is_old_policy,
    sampling_from_config,
    score_rollout,
    selective_log_softmax,
    slice_rollout,
)
from posttrain.testing._toy import TOY_SPEC, ToyConfig

SAMPLING = dict(max_tokens=4, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0)


def _args(**overrides):
    """A config with the TRL online fields these functions read (each function's docstring lists its own)."""
    fields = dict(
        max_completion_length=4, temperature=1.0, top_p=1.0, top_k=0, min_p=None, repetition_penalty=1.0, generation_kwargs=None,
        model_name_or_path=None, model_init_kwargs=None, trust_remote_code=False, disable_dropout=True, reward_funcs=None,
        reward_weights=None, sync_ref_model=False, beta=0.0, rollout_backend="transformers", generation_batch_size=None, seed=0,
    )
    return types.SimpleNamespace(**{**fields, **overrides})


@pytest.fixture
def loop(register_method, tmp_path):
    register_method(TOY_SPEC)
    return TrainingLoop(ToyConfig(output_dir=str(tmp_path / "run")), method="toy_lm")


def _rollout() -> RolloutBatch:
    """Five completions of uneven lengths (one empty, one truncated) with per-sample and shared extras."""
    return RolloutBatch(
        prompt_ids=[[5, 6], [5, 6], [7], [7], [8, 9, 10]],
        completion_ids=[[11, 12, 13], [14], [15, 16], [], [17, 18, 19]],
        logprobs=[[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6], [], [-0.7, -0.8, -0.9]],
        truncated=[True, False, False, False, True],
        policy_version=3,
        extras={"reward_kwargs": {"score": [0.0, 1.0, 2.0, 3.0, 4.0]}, "backend": "fixed"},
        policy_versions=[3, 3, 4, 4, 5],
    )


# ----------------------------------------------------------------------------- setup
def test_check_online_arguments_and_sync_ref_model_refuse_in_one_line():
    with pytest.raises(ConfigError, match="`train_dataset` is required"):
        check_online_arguments("GRPO", train_dataset=None, reward_funcs=[len])
    with pytest.raises(ConfigError, match="No reward source provided: PPO needs reward functions"):
        check_online_arguments("PPO", train_dataset=[{"prompt": "a"}], reward_funcs=None)
    with pytest.raises(ConfigError, match="optimizers=.* is not supported"):
        check_online_arguments("GRPO", train_dataset=[{"prompt": "a"}], reward_funcs=[len], optimizers=(object(), None))
    check_online_arguments("GRPO", train_dataset=[{"prompt": "a"}], reward_funcs=[len], optimizers=None)
    check_sync_ref_model(_args(sync_ref_model=False), None)
    with pytest.raises(ConfigError, match="sync_ref_model=True but beta=0.0"):
        check_sync_ref_model(_args(sync_ref_model=True, beta=0.0), object())
    with pytest.raises(ConfigError, match="not supported with PEFT"):
        check_sync_ref_model(_args(sync_ref_model=True, beta=0.1), None)


def test_default_output_dir_is_trls_model_name_and_method(tiny_model):
    assert default_output_dir("Qwen/Qwen2.5-0.5B/", "GRPO") == "Qwen2.5-0.5B-GRPO"
    tiny_model.config._name_or_path = "/models/tiny"
    assert default_output_dir(tiny_model, "RLOO") == "tiny-RLOO"
    tiny_model.config._name_or_path = ""
    assert default_output_dir(tiny_model, "RLOO") is None


def test_sampling_from_config_applies_generation_kwargs_and_warns_about_the_rest():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampling_from_config(_args(min_p=None)) == {**SAMPLING, "min_p": 0.0}
    with pytest.warns(UserWarning, match=r"generation_kwargs \['num_beams'\] are ignored"):
        sampling = sampling_from_config(_args(generation_kwargs={"max_new_tokens": 7, "do_sample": False, "min_p": None, "top_k": 5, "num_beams": 2}))
    assert sampling == {**SAMPLING, "max_tokens": 7, "temperature": 0.0, "min_p": 0.0, "top_k": 5}


def test_sampler_is_old_policy_only_for_the_unfiltered_policy_at_the_trained_temperature():
    assert sampler_is_old_policy(SAMPLING, 1.0, True)
    assert not sampler_is_old_policy(SAMPLING, 1.0, False)  # another engine (vLLM) or a rollout_func sampled
    assert not sampler_is_old_policy(SAMPLING, 0.7, True)
    for key, value in (("top_k", 5), ("top_p", 0.9), ("min_p", 0.1), ("repetition_penalty", 1.1)):
        assert not sampler_is_old_policy({**SAMPLING, key: value}, 1.0, True), key


def test_build_rollout_engine_on_the_transformers_backend_samples_the_policy(loop, tiny_model, tiny_tokenizer):
    engine = build_rollout_engine(_args(generation_batch_size=2), model=tiny_model, tokenizer=tiny_tokenizer, accelerator=loop.accelerator)
    assert isinstance(engine, RolloutEngine) and engine.samples_from_policy
    batch = engine.generate([[5, 6, 7]], SamplingParams(n=2, seed=0, **SAMPLING))
    assert len(batch) == 2 and all(len(c) <= 4 for c in batch.completion_ids)


def test_load_online_policy_by_name_and_instance(loop, tiny_model, tiny_model_dir, caplog):
    model, tokenizer = load_online_policy(None, _args(model_name_or_path=tiny_model_dir), loop=loop, tags=["trl", "grpo"])
    assert tokenizer.pad_token_id is not None and "grpo" in (model.model_tags or [])
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    with caplog.at_level(logging.WARNING):
        same, _ = load_online_policy(tiny_model, _args(), loop=loop, processing_class=tokenizer, quantization_config=object())
    assert same is tiny_model and "quantization_config is ignored" in caplog.text
    # loaded by the loop (posttrain.load_pretrained): the trainer's config is the loop's, float32 unless model_init_kwargs name a dtype
    loop.args.trust_remote_code, loop.args.model_init_kwargs = True, {"dtype": "float64"}
    remote, _ = load_online_policy(tiny_model_dir, _args(trust_remote_code=True, model_init_kwargs={"dtype": "float64"}), loop=loop)
    assert next(remote.parameters()).dtype == torch.float64


def test_load_online_policy_refuses_an_existing_adapter_with_a_new_peft_config(loop, tiny_model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"])
    wrapped = peft.get_peft_model(tiny_model, config)
    with pytest.raises(ConfigError, match="already a PeftModel and peft_config was given"):
        load_online_policy(wrapped, _args(), loop=loop, peft_config=config)


def test_lm_head_fp32_gives_float32_logits_for_a_bfloat16_model(loop, tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    model, _ = load_online_policy(build_model(tiny_tokenizer, dtype=torch.bfloat16), _args(), loop=loop, processing_class=tiny_tokenizer, lm_head_fp32=True)
    assert model.get_output_embeddings().weight.dtype == torch.float32
    assert model(torch.tensor([[5, 6, 7]])).logits.dtype == torch.float32


def test_router_aux_loss_settings_reads_a_moe_config_and_refuses_a_dense_model(tiny_model):
    assert router_aux_loss_settings(tiny_model, None) == (0.0, False)
    with pytest.raises(ConfigError, match="router_aux_loss_coef=0.1 but Qwen2ForCausalLM is not a Mixture-of-Experts model"):
        router_aux_loss_settings(tiny_model, 0.1)
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    moe = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=16, moe_intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                                             shared_expert_intermediate_size=8, router_aux_loss_coef=0.25))
    assert router_aux_loss_settings(moe, None) == (0.25, True)
    assert router_aux_loss_settings(moe, 0.0) == (0.0, False)


def test_resolve_online_rewards_names_weights_and_processing_classes(loop, tiny_tokenizer):
    def score(completions, **kwargs):
        return [1.0] * len(completions)

    rewards = resolve_online_rewards([score, score, "accuracy"], _args(reward_weights=[1.0, 0.5, 2.0]), loop=loop)
    assert rewards.names == ["score", "score_2", "accuracy"]
    torch.testing.assert_close(rewards.weights, torch.tensor([1.0, 0.5, 2.0]))
    assert rewards.processing_classes == [None, None, None] and rewards.funcs[0] is score
    assert resolve_online_rewards(None, _args(reward_funcs=score), loop=loop).names == ["score"]  # the config's, when none is given
    with pytest.raises(ConfigError, match=r"reward_weights has 1 entries for 2 reward functions \['score', 'score_2'\]"):
        resolve_online_rewards([score, score], _args(reward_weights=[1.0]), loop=loop)
    with pytest.raises(ConfigError, match=r"number of reward processing classes \(2\) must match the number of reward functions \(1\)"):
        resolve_online_rewards(score, _args(), loop=loop, reward_processing_classes=[tiny_tokenizer, None])


def test_prepare_prompt_dataset_and_prompt_token_ids(tiny_tokenizer):
    from datasets import Dataset, IterableDataset

    rows = [{"prompt": f"prompt {i}", "answer": str(i)} for i in range(5)]
    data = prepare_prompt_dataset(rows, "train_dataset", method="GRPO", prompt_ids=lambda row: prompt_token_ids(row, tiny_tokenizer))
    assert isinstance(data, Dataset) and len(data) == 5
    stream = IterableDataset.from_generator(lambda: iter(rows))
    assert len(prepare_prompt_dataset(stream, "train_dataset", method="GRPO", limit=3)) == 3
    with pytest.raises(ConfigError, match="train_dataset row 0 has no 'prompt' column .*RLOO needs prompt-only data"):
        prepare_prompt_dataset([{"text": "x"}], "train_dataset", method="RLOO")
    with pytest.raises(ConfigError, match="eval_dataset is a dict of datasets"):
        prepare_prompt_dataset({"a": rows}, "eval_dataset", method="GRPO")
    assert prompt_token_ids({"prompt_ids": [3, "4"]}, tiny_tokenizer) == [3, 4]
    assert prompt_token_ids({"prompt": "hello"}, tiny_tokenizer) == tiny_tokenizer("hello", add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "hi"}]
    text = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert prompt_token_ids({"prompt": messages}, tiny_tokenizer) == tiny_tokenizer(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- one step: rollout and rewards
def test_expand_prompts_repeats_each_row_and_decodes_pre_tokenized_ones(tiny_tokenizer):
    ids = tiny_tokenizer("abc", add_special_tokens=False)["input_ids"]
    prompts, prompt_ids = expand_prompts([{"prompt": "x y"}, {"prompt_ids": ids}], 2, lambda row: prompt_token_ids(row, tiny_tokenizer), tiny_tokenizer)
    assert prompts == ["x y", "x y", "abc", "abc"]
    assert prompt_ids[2] == prompt_ids[3] == ids and prompt_ids[0] == prompt_token_ids({"prompt": "x y"}, tiny_tokenizer)


def test_generate_rollout_from_the_engine_and_from_a_rollout_func(tiny_model, tiny_tokenizer):
    engine = RolloutEngine("transformers", model=tiny_model, tokenizer=tiny_tokenizer)
    prompt_ids = [[5, 6], [5, 6], [7, 8, 9], [7, 8, 9]]
    rollout = generate_rollout(["a", "a", "b", "b"], prompt_ids, engine=engine, sampling=SAMPLING, num_generations=2, seed=1)
    assert rollout.prompt_ids == prompt_ids and len(rollout) == 4
    again = generate_rollout(["a", "a", "b", "b"], prompt_ids, engine=engine, sampling=SAMPLING, num_generations=2, seed=1)
    assert again.completion_ids == rollout.completion_ids  # seeded

    def rollout_func(prompts, trainer):
        return {"prompt_ids": [[1]] * len(prompts), "completion_ids": [[2, 3, 4], [2, 0], [5, 6, 7], [8]], "logprobs": [[-1.0] * 3, [-1.0] * 2, [-1.0] * 3, [-1.0]],
                "env_score": [0.1, 0.2, 0.3, 0.4]}

    out = generate_rollout(["a", "a", "b", "b"], None, engine=engine, sampling=SAMPLING, rollout_func=rollout_func, trainer=None,
                           max_completion_length=3, stop_token_ids=(0, 7, None))
    assert out.truncated == [True, False, False, False]  # 3 tokens not ending in a stop token; [2, 0] stopped; [5, 6, 7] ends in 7
    assert out.extras == {"reward_kwargs": {"env_score": [0.1, 0.2, 0.3, 0.4]}} and out.policy_version == engine.policy_version
    with pytest.raises(ValueError, match=r"rollout_func must return keys \['logprobs'\]"):
        generate_rollout(["a"], None, engine=engine, sampling=SAMPLING, rollout_func=lambda p, t: {"prompt_ids": [[1]], "completion_ids": [[2]]})


def test_score_rollout_gives_nan_for_none_and_warns_when_every_function_gave_none(tiny_tokenizer, caplog):
    rows = [{"prompt": "p0", "kind": "a"}, {"prompt": "p1", "kind": "b"}]  # G = 3 completions each
    prompts = ["p0"] * 3 + ["p1"] * 3
    rollout = RolloutBatch([[1]] * 6, [[2, 3]] * 6, [[-1.0, -1.0]] * 6, [False] * 6, extras={"reward_kwargs": {"score": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]}})

    def by_kind(completions, kind, score, log_extra, log_metric, **kwargs):
        log_extra("kind_seen", list(kind))
        log_metric("calls", 1.0)
        return [None if i == 3 else float(s) for i, s in enumerate(score)]

    def only_b(completions, kind, **kwargs):
        return [1.0 if k == "b" and i != 3 else None for i, k in enumerate(kind)]

    log = CompletionLog(8)
    with caplog.at_level(logging.WARNING):
        rewards = score_rollout(rows, prompts, rollout, 3, reward_funcs=[by_kind, only_b], reward_func_names=["by_kind", "only_b"],
                                tokenizer=tiny_tokenizer, log=log)
    nan = float("nan")
    assert rewards.shape == (6, 2)
    torch.testing.assert_close(rewards[:, 0], torch.tensor([0.0, 1.0, 2.0, nan, 4.0, 5.0]), equal_nan=True)
    torch.testing.assert_close(rewards[:, 1], torch.tensor([nan, nan, nan, nan, 1.0, 1.0]), equal_nan=True)
    assert "All reward functions returned None for the following kwargs:" in caplog.text and "'kind': 'b'" in caplog.text
    assert "(1 of 6 completions are unscorable" in caplog.text
    assert log.pending_extra["kind_seen"] == ["a", "a", "a", "b", "b", "b"] and log.pop_metrics() == {"calls": 1.0} and log.pop_metrics() == {}


def test_score_rollout_passes_messages_for_conversational_prompts(tiny_tokenizer):
    seen = {}

    def reward(prompts, completions, completion_ids, **kwargs):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids)
        return [0.0] * len(completions)

    prompt = [{"role": "user", "content": "hi"}]
    rollout = RolloutBatch([[1], [1]], [[40, 41], [42]], [[0.0, 0.0], [0.0]], [False, False])
    score_rollout([{"prompt": prompt}], [prompt, prompt], rollout, 2, reward_funcs=[reward], reward_func_names=["reward"], tokenizer=tiny_tokenizer)
    texts = tiny_tokenizer.batch_decode([[40, 41], [42]], skip_special_tokens=True)
    assert seen["completions"] == [[{"role": "assistant", "content": t}] for t in texts] and seen["ids"] == [[40, 41], [42]]


# ----------------------------------------------------------------------------- one step: tensors
def test_slice_rollout_keeps_per_sample_extras_and_versions():
    part = slice_rollout(_rollout(), slice(1, 4))
    assert part.completion_ids == [[14], [15, 16], []] and part.truncated == [False, False, False]
    assert part.policy_versions == [3, 4, 4] and part.policy_version == 3
    assert part.extras == {"reward_kwargs": {"score": [1.0, 2.0, 3.0]}, "backend": "fixed"}  # per-sample sliced, shared kept


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_rollout_micro_batches_keep_extras_and_build_masks_position_by_position(mask_truncated):
    rollout = _rollout()
    batches = rollout_micro_batches(rollout, 3, pad_token_id=0, pad_to_multiple_of=4, mask_truncated=mask_truncated)
    assert len(batches) == 2 and [b["completion_ids"].shape[0] for b in batches] == [3, 2]
    assert [b["extras"]["reward_kwargs"]["score"] for b in batches] == [[0.0, 1.0, 2.0], [3.0, 4.0]]
    assert all(b["extras"]["backend"] == "fixed" for b in batches)
    for b, rows in zip(batches, (range(0, 3), range(3, 5))):
        assert b["prompt_ids"].shape[1] % 4 == 0 and b["completion_ids"].shape[1] % 4 == 0
        for row, i in enumerate(rows):
            prompt, completion = rollout.prompt_ids[i], rollout.completion_ids[i]
            width_p, width_c = b["prompt_ids"].shape[1], b["completion_ids"].shape[1]
            # prompts left-padded, completions right-padded; masks from lengths only
            assert b["prompt_mask"][row].tolist() == [0] * (width_p - len(prompt)) + [1] * len(prompt)
            assert b["prompt_ids"][row, width_p - len(prompt):].tolist() == prompt
            kept = not (mask_truncated and rollout.truncated[i])
            assert b["completion_mask"][row].tolist() == [int(kept)] * len(completion) + [0] * (width_c - len(completion))
            assert b["completion_ids"][row, : len(completion)].tolist() == completion
            torch.testing.assert_close(b["sampling_logprobs"][row, : len(completion)], torch.tensor(rollout.logprobs[i]))
            assert (b["sampling_logprobs"][row, len(completion):] == 0).all()
            assert bool(b["truncated"][row]) == rollout.truncated[i]
        assert b["num_completion_tokens"] == int(b["completion_mask"].sum())
        assert b["num_tokens"] == int(b["prompt_mask"].sum()) + b["num_completion_tokens"]
    assert "extras" not in rollout_micro_batches(RolloutBatch([[1]], [[2]], [[0.0]], [False]), 4, 0)[0]
    with pytest.raises(ValueError, match="size=0 must be an integer >= 1"):
        rollout_micro_batches(rollout, 0, 0)


def _forward_logps(model, prompt, completion, temperature=1.0):
    """Reference: one unpadded forward of prompt + completion, full logits, log-probs at the completion positions."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[:, len(prompt) - 1 : -1] / temperature  # (1, C, V)
    return selective_log_softmax(logits, torch.tensor([completion]))[0]  # (C,)


def test_old_and_reference_logps_equal_a_float64_forward(tiny_tokenizer):
    import copy

    from posttrain.testing.tiny_model import build_model

    model = build_model(tiny_tokenizer, dtype=torch.float64).eval()
    ref = copy.deepcopy(model)
    with torch.no_grad():  # make the reference differ from the policy
        for p in ref.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0), dtype=p.dtype))
    rollout = _rollout()
    (batch,) = rollout_micro_batches(rollout, 8, pad_token_id=tiny_tokenizer.pad_token_id)
    sampling = batch.pop("sampling_logprobs")
    add_old_and_ref_logps(batch, sampling, model=model, temperature=0.7, need_old=True, need_ref=True, ref_model=ref)
    assert batch["old_per_token_logps"].dtype == batch["ref_per_token_logps"].dtype == torch.float32
    for i, (prompt, completion) in enumerate(zip(rollout.prompt_ids, rollout.completion_ids)):
        n = len(completion)
        if not n:  # the empty completion: one masked column, nothing to compare
            continue
        # both paths are float64 (agreeing to ~1e-15) before the stored float32 rounding: at most 1 ulp apart, eps32 = 1.2e-7 relative
        expected_old = _forward_logps(model, prompt, completion, 0.7).float()
        expected_ref = _forward_logps(ref, prompt, completion, 0.7).float()
        torch.testing.assert_close(batch["old_per_token_logps"][i, :n], expected_old, rtol=2.5e-7, atol=1e-30)
        torch.testing.assert_close(batch["ref_per_token_logps"][i, :n], expected_ref, rtol=2.5e-7, atol=1e-30)
    assert not torch.equal(batch["old_per_token_logps"], batch["ref_per_token_logps"])

    # from the sampler: the stored sampling log-probs themselves, no forward
    (again,) = rollout_micro_batches(rollout, 8, pad_token_id=tiny_tokenizer.pad_token_id)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(module))
    add_old_and_ref_logps(again, again.pop("sampling_logprobs"), model=model, temperature=1.0, need_old=True, old_from_sampler=True)
    assert calls == [] and torch.equal(again["old_per_token_logps"], sampling) and "ref_per_token_logps" not in again


def test_completion_logps_chunked_equals_full_logits_and_reference_logps_uses_the_disabled_adapter(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_model

    model = build_model(tiny_tokenizer, dtype=torch.float64).eval()
    (batch,) = rollout_micro_batches(_rollout(), 8, pad_token_id=tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        full, entropy, aux = completion_logps(model, batch, 1.0)
        chunked, chunked_entropy, _ = completion_logps(model, batch, 1.0, chunk_size=2)
    assert aux is None and full.shape == entropy.shape == batch["completion_ids"].shape
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(chunked[mask], full[mask], rtol=1e-12, atol=1e-12)  # float64, other summation order only
    torch.testing.assert_close(chunked_entropy[mask], entropy[mask], rtol=1e-12, atol=1e-12)
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        adapted = completion_logps(wrapped, batch, 1.0, compute_entropy=False)[0]
        base = reference_logps(wrapped, batch, 1.0)
    torch.testing.assert_close(base[mask], full[mask], rtol=1e-12, atol=1e-12)  # the adapter is off: the base model's log-probs
    assert not torch.allclose(adapted[mask], full[mask])


# ----------------------------------------------------------------------------- metrics, eval, log
def test_nanstd_is_the_unbiased_std_without_nans():
    x = torch.tensor([[1.0, 2.0, 4.0, float("nan")], [3.0, float("nan"), float("nan"), float("nan")]], dtype=torch.float64)
    torch.testing.assert_close(nanstd(x, dim=1), torch.tensor([torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64).std(), float("nan")], dtype=torch.float64), equal_nan=True)
    torch.testing.assert_close(nanstd(x), torch.tensor([1.0, 2.0, 4.0, 3.0], dtype=torch.float64).std())
    assert nanstd(x, dim=1, keepdim=True).shape == (2, 1)


def test_reward_and_length_metrics_and_attach():
    rollout = RolloutBatch([[1]] * 4, [[2, 3], [4], [5, 6, 7], [8]], [[0.0, 0.0], [0.0], [0.0] * 3, [0.0]], [False, True, True, False])
    per_func = torch.tensor([[1.0, float("nan")], [3.0, 1.0], [float("nan"), float("nan")], [0.0, 2.0]])
    metrics = reward_and_length_metrics(rollout, per_func, torch.tensor([1.0, 0.5]), ["a", "b"], torch.tensor([False, True]), 2)
    # weighted rewards: 1.0, 3.5, unscorable, 1.0 -> groups (1.0, 3.5) and (1.0)
    assert metrics["reward"] == pytest.approx((1.0 + 3.5 + 1.0) / 3)
    assert metrics["reward_std"] == pytest.approx(torch.tensor([1.0, 3.5]).std().item())  # the one-row group's std is NaN, left out
    assert metrics["frac_reward_zero_std"] == 0.5 and metrics["completions/clipped_ratio"] == 0.5
    assert (metrics["completions/mean_length"], metrics["completions/min_length"], metrics["completions/max_length"]) == (1.75, 1.0, 3.0)
    assert (metrics["completions/mean_terminated_length"], metrics["completions/min_terminated_length"], metrics["completions/max_terminated_length"]) == (1.5, 1.0, 2.0)
    assert metrics["rewards/a/mean"] == pytest.approx(4.0 / 3) and metrics["rewards/b/mean"] == pytest.approx(1.5)
    batches = [{}, {}]
    attach_rollout_metrics(batches, {**metrics, "bad": float("inf")})
    names, values = batches[0]["rollout_metric_names"], batches[0]["rollout_metric_values"]
    assert names[: len(metrics)] == list(metrics) and torch.isnan(values[names.index("bad")]) and batches[1]["rollout_metric_values"] is values


def test_evaluate_online_weights_by_completions(loop):
    sizes = {0: [2, 1], 1: [3]}  # eval batch i -> micro-batch sizes

    def produce(rows, seed):
        return [{"completion_ids": torch.zeros(n, 1, dtype=torch.long), "value": torch.tensor(float(seed * 10 + n))} for n in sizes[seed - 100]]

    def compute_loss(model, batch, items):
        return batch["value"], {"items": items, "nan_metric": torch.tensor(float("nan"))}

    out = evaluate_online(None, [{"rows": []}, {"rows": []}], produce=produce, compute_loss=compute_loss, count_items=lambda b: b["completion_ids"].shape[0],
                          loop=loop, seed=100)
    # losses 1002 (x2), 1001 (x1), 1013 (x3): completion-weighted mean; items likewise
    assert out["loss"] == pytest.approx((1002 * 2 + 1001 + 1013 * 3) / 6) and out["items"] == pytest.approx((2 * 2 + 1 + 3 * 3) / 6)
    assert "nan_metric" not in out


def test_completion_log_records_writes_the_parquet_and_its_callback_writes_on_training_logs(tmp_path, loop):
    import pandas as pd

    log = CompletionLog(4)
    log.log_extra("note", ["x", "y", "z"])
    log.record(["p", "p", "q"], ["c1", "c2", "c3"], torch.tensor([[1.0], [0.0], [0.5]]), ["r"], torch.tensor([0.5, -0.5, 0.0]))
    assert list(log.logs["prompt"]) == ["p", "p", "q"] and list(log.logs["rewards"]["r"]) == [1.0, 0.0, 0.5] and not log.pending_extra
    log.log_extra("dropped", [1])
    log.discard_extra()
    assert not log.pending_extra
    path = log.write(7, str(tmp_path), show=False)
    table = pd.read_parquet(path)
    assert path.endswith("completions/completions_00007.parquet")
    assert list(table.columns) == ["step", "prompt", "completion", "r", "note", "advantage"] and len(table) == 3
    assert table["note"].tolist() == ["x", "y", "z"] and table["advantage"].tolist() == [0.5, -0.5, 0.0]
    assert len(pd.read_parquet(log.write(8, str(tmp_path), unique_prompts=True, show=False))) == 2
    assert CompletionLog(2).write(1, str(tmp_path)) is None  # nothing recorded
    # the callback: only training logs, only with log_completions
    args = types.SimpleNamespace(log_completions=True, output_dir=str(tmp_path / "cb"), log_unique_prompts=False, num_completions_to_print=1)
    callback = log.callback(args, loop)
    state = types.SimpleNamespace(global_step=3)
    callback.on_log(args, state, None, logs={"eval_loss": 1.0})
    callback.on_log(args, state, None, logs={"loss": 1.0})
    assert sorted(p.name for p in (tmp_path / "cb" / "completions").iterdir()) == ["completions_00003.parquet"]


def test_build_rollout_engine_refuses_to_train_through_a_vllm_server(loop, tiny_model, tiny_tokenizer):
    """Server mode cannot receive the policy's updated weights yet: refused up front, not after the first step."""
    args = _args(rollout_backend="vllm", vllm_mode="server")
    with pytest.raises(ConfigError, match="vllm_mode='server' cannot train a policy yet"):
        build_rollout_engine(args, model=tiny_model, tokenizer=tiny_tokenizer, accelerator=loop.accelerator)
