"""Tests for posttrain.rewards: built-ins, spec resolution, compute_rewards and reward models."""

import asyncio
import pickle
import sys
import textwrap

import pytest
import torch

from posttrain.rewards import (
    BUILTIN_REWARDS,
    RewardFunctionError,
    RewardModelFunction,
    SoftOverlongPunishment,
    accuracy_reward,
    compute_rewards,
    extract_final_answer,
    format_reward,
    resolve_reward_functions,
)


def _call(funcs, completions, weights=None, **columns):
    n = len(completions)
    return compute_rewards(
        funcs, prompts=["p"] * n, completions=completions, completion_ids=[[1] * (i + 1) for i in range(n)], columns=columns, reward_weights=weights
    )


# ----------------------------------------------------------------------------- built-ins


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{\\frac{1}{2}}", "0.5"),
        ("x \\boxed{3} then \\boxed{{4}}", "{4}"),
        ("we get 1,000 apples.", "1000.0"),
        ("steps... #### 72", "72.0"),
        ("first line\nParis.", "paris"),
        ("", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_accuracy_reward_strings_conversational_and_none():
    completions = ["<think>2+2</think> The answer is \\boxed{4}", [{"role": "assistant", "content": "it is 5"}], "4.0", "anything"]
    assert accuracy_reward(completions, solution=["4", "4", "$4$", None]) == [1.0, 0.0, 1.0, None]
    assert accuracy_reward(["7"], answer=["#### 7"]) == [1.0]
    assert accuracy_reward(["7"], solution=["   "]) == [None]  # unparseable gold
    with pytest.raises(ValueError, match="solution"):
        accuracy_reward(["7"])


def test_format_reward():
    good = "<think>\nreason\n</think>\nanswer"
    assert format_reward([good, "no think", [{"role": "assistant", "content": good}], "<think>open"]) == [1.0, 0.0, 1.0, 0.0]
    assert BUILTIN_REWARDS["think_format"] is BUILTIN_REWARDS["format"]


def test_soft_overlong_punishment():
    f = SoftOverlongPunishment(max_completion_len=10, soft_punish_cache=4)
    assert f(completion_ids=[[0] * k for k in (3, 6, 8, 10, 12)]) == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert pickle.loads(pickle.dumps(f))(completion_ids=[[0] * 8]) == [-0.5]
    hard = SoftOverlongPunishment(max_completion_len=5, soft_punish_cache=0)
    assert hard(completion_ids=[[0] * 5, [0] * 6]) == [0.0, -1.0]
    default = BUILTIN_REWARDS["overlong_penalty"]
    assert (default.max_completion_len, default.soft_punish_cache) == (256, 64)
    with pytest.raises(ValueError, match="soft_punish_cache"):
        SoftOverlongPunishment(max_completion_len=5, soft_punish_cache=6)


# ----------------------------------------------------------------------------- resolution


def test_resolve_names_callables_and_import_paths(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent("""
        def length_reward(completions, **kwargs):
            return [float(len(c)) for c in completions]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])

    def mine(completions, **kwargs):
        return [0.0] * len(completions)

    resolved = resolve_reward_functions(["accuracy", mine, "my_rewards_mod:length_reward", "my_rewards_mod.length_reward"])
    assert [n for n, _ in resolved] == ["accuracy", "mine", "length_reward", "length_reward_2"]
    assert resolved[0][1] is accuracy_reward and resolved[2][1](completions=["abc"]) == [3.0]
    assert resolve_reward_functions("format")[0][0] == "format"


def test_resolve_errors():
    with pytest.raises(ValueError, match=r"Unknown reward function 'acuracy'.*accuracy.*format.*overlong_penalty"):
        resolve_reward_functions(["acuracy"])
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        resolve_reward_functions(["no_such_module_xyz:f"])
    with pytest.raises(TypeError, match=r"reward_funcs\[0\]"):
        resolve_reward_functions([3])


def test_plugin_registered_reward_is_resolvable():
    from posttrain._plugins import get_plugin_manager
    from posttrain.hookspecs import hookimpl

    def shout(completions, **kwargs):
        return [1.0 if c.isupper() else 0.0 for c in completions]

    class Plugin:
        @hookimpl
        def register_reward_functions(self, register):
            register("shout", shout)

    pm = get_plugin_manager(load_entrypoints=False)
    pm.register(Plugin(), name="shout-plugin")
    assert resolve_reward_functions(["shout"], pm=pm) == [("shout", shout)]


# ----------------------------------------------------------------------------- compute_rewards


def test_compute_rewards_weights_none_and_all_none():
    def sometimes(completions, **kwargs):
        return [1.0, None, None]

    def always(completions, **kwargs):
        return [0.5, 2.0, None]

    res = _call([("sometimes", sometimes), ("always", always)], ["a", "b", "c"], weights=[2.0, 1.0])
    assert res.names == ["sometimes", "always"] and res.per_function.shape == (3, 2)
    assert res.per_function.dtype == torch.float32 and torch.isnan(res.per_function[1, 0])
    torch.testing.assert_close(res.total, torch.tensor([2.5, 2.0, 0.0]))
    assert res.all_none.tolist() == [False, False, True]
    m = res.metrics()
    assert m["rewards/sometimes/mean"] == 1.0 and m["reward"] == pytest.approx(1.5)  # weighted total is logged


def test_compute_rewards_passes_columns_state_and_filters_kwargs():
    seen = {}

    def full(prompts, completions, completion_ids, solution, trainer_state, **kwargs):
        seen.update(kwargs, prompts=prompts, trainer_state=trainer_state, solution=solution)
        return [float(len(ids)) for ids in completion_ids]

    def narrow(completions, solution):  # no **kwargs: receives only what it names
        return [float(c == s) for c, s in zip(completions, solution)]

    res = compute_rewards(
        [full, narrow],
        prompts=["p1", "p2"],
        completions=["x", "y"],
        completion_ids=[[1], [1, 2]],
        columns={"solution": ["x", "z"], "prompt": ["P1", "P2"], "difficulty": [1, 2]},
        trainer_state="STATE",
    )
    assert res.per_function.tolist() == [[1.0, 1.0], [2.0, 0.0]]
    assert seen["trainer_state"] == "STATE" and seen["difficulty"] == [1, 2] and "prompt" not in seen
    with pytest.raises(RewardFunctionError, match=r"'narrow' needs argument\(s\) \['solution'\]"):
        compute_rewards([narrow], prompts=["p"], completions=["x"], completion_ids=[[1]])


def test_compute_rewards_async_runs_concurrently():
    """Each async function waits until the other has started, so they can only finish if they run concurrently:
    run one after the other, the first would wait for ever (the timeout turns that into a failure, not a hang)."""
    started = {"slow": asyncio.Event(), "slow2": asyncio.Event()}

    async def meet(me, other):
        started[me].set()
        await asyncio.wait_for(started[other].wait(), timeout=30)

    async def slow(completions, **kwargs):
        await meet("slow", "slow2")
        return [1.0] * len(completions)

    async def slow2(completions, **kwargs):
        await meet("slow2", "slow")
        return [2.0] * len(completions)

    res = _call([slow, slow2, format_reward], ["a", "b"])
    assert res.per_function.tolist() == [[1.0, 2.0, 0.0], [1.0, 2.0, 0.0]]

    async def alone(completions, **kwargs):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    async def inside_loop():  # also works when called from a running event loop
        return _call([alone], ["a"])

    assert asyncio.run(inside_loop()).total.tolist() == [1.0]


def test_compute_rewards_errors():
    def boom(completions, **kwargs):
        raise KeyError("nope")

    async def aboom(completions, **kwargs):
        raise ValueError("async nope")

    def short(completions, **kwargs):
        return [1.0]

    def text(completions, **kwargs):
        return [1.0, "high"]

    with pytest.raises(RewardFunctionError, match=r"'boom' raised KeyError") as info:
        _call([boom], ["a", "b"])
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(RewardFunctionError, match=r"'aboom' raised ValueError: async nope"):
        _call([aboom], ["a", "b"])
    with pytest.raises(RewardFunctionError, match=r"'short' returned 1 rewards for 2 completions \(expected 2, got 1\)"):
        _call([short], ["a", "b"])
    with pytest.raises(RewardFunctionError, match=r"'text' returned a non-numeric reward for sample 1: 'high'"):
        _call([text], ["a", "b"])
    with pytest.raises(ValueError, match="reward_weights has 2 entries"):
        _call([short], ["a"], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="column 'solution' has 1 values"):
        _call([short], ["a", "b"], solution=["x"])


def test_compute_rewards_with_builtins_end_to_end():
    funcs = resolve_reward_functions(["accuracy", "format", SoftOverlongPunishment(max_completion_len=2, soft_punish_cache=1)])
    res = _call(funcs, ["<think>t</think>\\boxed{3}", "4"], solution=["3", "x y"])
    assert res.per_function[:, :2].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert res.per_function[:, 2].tolist() == [0.0, -1.0]  # lengths 1 and 2


# ----------------------------------------------------------------------------- reward models


def test_reward_model_function(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_reward_model

    # float64: the padded batch and the unpadded reference agree to ~1e-16, and the function returns its scores rounded to
    # float32 (``logits.float()``), i.e. within half a float32 ulp of the reference (in float32 the two forwards' last bits
    # differ by an amount that depends on the CPU's kernels)
    model = build_reward_model(tiny_tokenizer, dtype=torch.float64)
    one_ulp = torch.finfo(torch.float32).eps
    model.train()
    rm = RewardModelFunction(model, tiny_tokenizer, batch_size=2)
    prompts = ["what is 1 + 1", "hello", "the cat"]
    completions = [" 2", " world and more words", " sat"]
    scores = rm(prompts=prompts, completions=completions)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert model.training  # restored
    with torch.no_grad():  # matches an unpadded single forward pass (padding handled)
        ref = model(**tiny_tokenizer(prompts[1] + completions[1], return_tensors="pt")).logits[0, 0].item()
    assert scores[1] == pytest.approx(ref, rel=one_ulp, abs=0)
    conv = rm(prompts=[[{"role": "user", "content": "hi"}]], completions=[[{"role": "assistant", "content": "yo"}]])
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], tokenize=False)
    with torch.no_grad():
        ref = model(**tiny_tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
    assert conv[0] == pytest.approx(ref, rel=one_ulp, abs=0)
    res = compute_rewards(resolve_reward_functions([rm]), prompts=prompts, completions=completions, completion_ids=[[1]] * 3)
    assert res.names == ["reward_model"]
    with pytest.raises(TypeError, match="RewardModelFunction"):
        resolve_reward_functions([model])
