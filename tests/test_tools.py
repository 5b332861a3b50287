"""Tool calling and environments during rollouts (posttrain.ToolCallingRollout, plugin API 1.8).

The token accounting is checked position by position against the chat template's own rendering of
the whole conversation; the rollouts here come from a scripted backend that writes fixed turns (what
a trained model would write), because a random tiny model never calls a tool. The tools, the chat
template, the parsing, the execution and the episode loop are the real ones.
"""

import asyncio
import time

import pytest
import torch

import posttrain
from posttrain import RolloutBatch, SamplingParams, ToolCallingRollout, parse_tool_calls, rollout_micro_batches, run_tool_call, tool_schema
from posttrain.testing.scripted import ScriptedToolTurns
from posttrain.testing.tiny_model import build_tokenizer


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tools=True)


def _call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _assistant_ids(tok, message):
    """The ids the template writes for an assistant turn, up to and including its <|im_end|> (what a model samples)."""
    base = [{"role": "user", "content": "x"}]
    head = tok.apply_chat_template(base, add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(base + [message], tokenize=True, return_dict=False)
    ids = list(full[len(head):])
    assert ids[-1] != tok.eos_token_id  # the template's trailing "\n"
    return ids[: ids.index(tok.eos_token_id, len(ids) - 3) + 1]


def _backend(tok, turns):
    return ScriptedToolTurns(tok, turns)


def test_three_turn_episode_is_the_chat_templates_rendering_token_for_token(tok):
    prompt = [{"role": "user", "content": "what is 3 + 4 + 5"}]
    m1 = {"role": "assistant", "content": "", "tool_calls": [_call("add", a=3, b=4)]}
    m2 = {"role": "assistant", "content": "", "tool_calls": [_call("add", a=7, b=5)]}
    m3 = {"role": "assistant", "content": "12"}
    turns = [_assistant_ids(tok, m) for m in (m1, m2, m3)]
    backend = _backend(tok, turns)
    runner = ToolCallingRollout(tok, tools=[add], max_completion_length=400)
    result = runner.rollout(backend, [{"prompt": prompt}], SamplingParams(max_tokens=200, stop_token_ids=(tok.eos_token_id,)))

    conversation = prompt + [m1, {"role": "tool", "name": "add", "content": "7"}, m2, {"role": "tool", "name": "add", "content": "12"}, m3]
    rendered = list(tok.apply_chat_template(conversation, tools=[tool_schema(add)], tokenize=True, return_dict=False))
    prompt_ids = list(tok.apply_chat_template(prompt, tools=[tool_schema(add)], add_generation_prompt=True, tokenize=True, return_dict=False))
    rollout = result.rollout
    assert rollout.prompt_ids[0] == prompt_ids
    expected = rendered[len(prompt_ids):]
    assert expected[-1] != tok.eos_token_id  # the template ends the last turn with "<|im_end|>\n"; a sampled turn stops at <|im_end|>
    assert rollout.completion_ids[0] == expected[:-1]

    # the mask, position by position: 1 exactly where a scripted (model) turn wrote
    mask = rollout.extras["tool_mask"][0]
    completion = rollout.completion_ids[0]
    runs, current = [], []
    for token, m in zip(completion, mask):
        if m:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    assert runs == turns and mask[0] == 1 and mask[-1] == 1  # each model turn, whole, and nothing else
    assert all(lp == 0.0 for lp, m in zip(rollout.logprobs[0], mask) if not m)
    assert all(lp == -0.5 for lp, m in zip(rollout.logprobs[0], mask) if m)
    inserted = tok.decode([t for t, m in zip(completion, mask) if not m])
    assert inserted.count("<tool_response>") == 2 and "\n7\n" in inserted and "\n12\n" in inserted
    assert rollout.extras["tool_call_count"] == [2] and rollout.extras["tool_failure_count"] == [0] and rollout.extras["turns"] == [3]
    assert rollout.extras["stop_reason"] == ["stop"] and rollout.truncated == [False]
    # what reward functions receive: the parsed turns and the tool messages
    assert [m["role"] for m in result.completions[0]] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert result.completions[0][0]["tool_calls"] == [_call("add", a=3, b=4)] and result.completions[0][-1]["content"] == "12"

    # the training tensors: tool_mask (b, C), and the token count of the loss is the model-written one
    (batch,) = rollout_micro_batches(rollout, 4, tok.pad_token_id, pad_to_multiple_of=8)
    assert batch["tool_mask"].shape == batch["completion_ids"].shape and batch["completion_ids"].shape[1] % 8 == 0
    assert batch["tool_mask"][0, : len(mask)].tolist() == mask and batch["tool_mask"][0, len(mask):].sum() == 0
    assert batch["num_completion_tokens"] == sum(mask) < int(batch["completion_mask"].sum())


def test_turn_budget_stops_without_running_the_last_turns_tools(tok):
    prompt = [{"role": "user", "content": "add forever"}]
    calls = []

    def counted_add(a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        calls.append((a, b))
        return a + b

    turn = _assistant_ids(tok, {"role": "assistant", "content": "", "tool_calls": [_call("counted_add", a=1, b=1)]})
    backend = _backend(tok, [turn])
    runner = ToolCallingRollout(tok, tools=[counted_add], max_tool_calling_iterations=2, max_completion_length=1000)
    result = runner.rollout(backend, [{"prompt": prompt}], SamplingParams(max_tokens=200))
    assert result.rollout.extras["stop_reason"] == ["max_turns"] and result.rollout.extras["turns"] == [3]
    assert len(calls) == 2 == result.rollout.extras["tool_call_count"][0]  # the third turn's call is not run: no turn would read it

    # a token budget: the episode ends with "length" and keeps only what fits
    runner = ToolCallingRollout(tok, tools=[counted_add], max_completion_length=len(turn) + 5)
    result = runner.rollout(backend, [{"prompt": prompt}], SamplingParams(max_tokens=200))
    assert len(result.rollout.completion_ids[0]) == len(turn) + 5 and result.rollout.truncated == [True]


def test_tool_failures_are_reported_to_the_model_and_counted():
    def boom(x: int) -> int:
        """Fail.

        Args:
            x: Anything.
        """
        raise ValueError(f"no good: {x}")

    def hang(x: int) -> int:
        """Hang.

        Args:
            x: Anything.
        """
        time.sleep(30)
        return x

    def structured(x: int) -> dict:
        """Return a dict.

        Args:
            x: Anything.
        """
        return {"x": x, "ok": True}

    async def slow_double(x: int) -> int:
        """Double, asynchronously.

        Args:
            x: The number.
        """
        await asyncio.sleep(0.01)
        return 2 * x

    tools = {f.__name__: f for f in (boom, hang, structured, slow_double)}
    assert run_tool_call(_call("boom", x=3), tools) == ("boom", {"error": "ValueError: no good: 3"}, "ValueError: no good: 3", False)
    timed = run_tool_call(_call("hang", x=1), tools, timeout=0.2)  # the tool sleeps 30 s: a result now means it was abandoned
    assert timed.timed_out and timed.error == "tool 'hang' timed out after 0.2s"
    assert run_tool_call(_call("structured", x=2), tools).result == "{'x': 2, 'ok': True}"  # str(result), as TRL
    assert run_tool_call(_call("slow_double", x=21), tools).result == "42"
    missing = run_tool_call(_call("nope"), tools)
    assert missing.error.startswith("tool 'nope' not found") and not missing.timed_out
    bad_args = run_tool_call(_call("boom", y=1), tools)
    assert bad_args.error.startswith("TypeError:")


def test_parse_tool_calls_reads_hermes_blocks_and_reports_malformed_ones(tok):
    ids = tok('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 5, \\"b\\": 6}"}\n</tool_call><|im_end|>',
              add_special_tokens=False)["input_ids"]
    assert parse_tool_calls(tok, ids) == {"role": "assistant", "content": "", "tool_calls": [_call("add", a=1, b=2), _call("add", a=5, b=6)]}
    plain = parse_tool_calls(tok, tok("the answer is 3<|im_end|>", add_special_tokens=False)["input_ids"])
    assert plain == {"role": "assistant", "content": "the answer is 3", "tool_calls": []}
    (bad,) = parse_tool_calls(tok, tok("<tool_call>{not json}</tool_call>", add_special_tokens=False)["input_ids"])["tool_calls"]
    assert bad["error"].startswith("invalid tool call '{not json}'")
    assert run_tool_call(bad, {"add": add}).error == bad["error"]


class Counter:
    """A TRL-style environment: reset(**row), public methods are tools, get_reward()."""

    instances = 0

    def __init__(self):
        Counter.instances += 1
        self.total = 0

    def reset(self, **row):
        self.total = row["start"]
        return f" Start at {row['start']}."

    def increment(self, by: int) -> str:
        """Increase the counter.

        Args:
            by: How much to add.
        """
        self.total += by
        return str(self.total)

    def get_reward(self):
        return float(self.total)


def test_environment_factory_resets_pools_and_rewards(tok):
    Counter.instances = 0
    turn = _assistant_ids(tok, {"role": "assistant", "content": "", "tool_calls": [_call("increment", by=2)]})
    final = _assistant_ids(tok, {"role": "assistant", "content": "done"})
    prompt = [{"role": "user", "content": "count"}]
    runner = ToolCallingRollout(tok, environment_factory=Counter, max_completion_length=400)
    assert Counter.instances == 1  # probed once at construction (and kept in the pool)
    rows = [{"prompt": prompt, "start": s} for s in (10, 10, 20, 20)]
    for _ in range(2):  # the pool grows to the batch's size once, then instances are reused
        result = runner.rollout(_backend(tok, [turn, final]), rows, SamplingParams(max_tokens=100))
        assert Counter.instances == 4
    assert [p[-1]["content"] for p in result.prompts] == ["count Start at 10."] * 2 + ["count Start at 20."] * 2
    assert "increment" in tok.decode(result.rollout.prompt_ids[0])  # the environment's methods are the prompt's tools
    assert [env.total for env in result.environments] == [12, 12, 22, 22]
    ((name, reward),) = runner.reward_functions()
    assert name == "Counter" and reward(environments=result.environments) == [12.0, 12.0, 22.0, 22.0]
    assert result.rollout.extras["tool_call_count"] == [1, 1, 1, 1]


def test_bad_configurations_are_one_line(tok):
    class NoReset:
        def step(self) -> str:
            """Step."""
            return ""

    with pytest.raises(ValueError, match=r"^environment_factory: NoReset has no reset\(\) method"):
        ToolCallingRollout(tok, environment_factory=NoReset)

    def undocumented(a):
        return a

    with pytest.raises(ValueError, match=r"^tool 'undocumented': its schema cannot be built .*; give every argument a type hint"):
        ToolCallingRollout(tok, tools=[undocumented])
    with pytest.raises(ValueError, match="give tools=\\[...\\] or environment_factory"):
        ToolCallingRollout(tok)
    runner = ToolCallingRollout(tok, tools=[add])
    with pytest.raises(ValueError, match=r"^row 1: tool calling needs a conversational 'prompt'"):
        runner.rollout(_backend(tok, [[1]]), [{"prompt": [{"role": "user", "content": "a"}]}, {"prompt": "text"}], SamplingParams(max_tokens=4))
    multi = ToolCallingRollout(tok, environment_factory={"counter": Counter})
    with pytest.raises(ValueError, match=r"^row 0: environment='other' is not among the environments"):
        multi.rollout(_backend(tok, [[1]]), [{"prompt": [{"role": "user", "content": "a"}], "environment": "other"}], SamplingParams(max_tokens=4))


def test_rollout_func_env_mask_becomes_the_tool_mask(tok):
    from posttrain import RolloutEngine, generate_rollout

    def rollout_func(prompts, trainer):
        return {"prompt_ids": [[5, 6]] * len(prompts), "completion_ids": [[7, 8, 9]] * len(prompts), "logprobs": [[-1.0] * 3] * len(prompts),
                "env_mask": [[1, 0, 1]] * len(prompts), "score": [1.0] * len(prompts)}

    engine = RolloutEngine(_backend(tok, [[1]]))
    rollout = generate_rollout(["a", "b"], [[5, 6], [5, 6]], engine=engine, sampling={}, rollout_func=rollout_func, max_completion_length=8,
                               stop_token_ids=(tok.eos_token_id,))
    assert rollout.extras == {"reward_kwargs": {"score": [1.0, 1.0]}, "tool_mask": [[1, 0, 1], [1, 0, 1]]}
    (batch,) = rollout_micro_batches(rollout, 2, tok.pad_token_id)
    assert torch.equal(batch["tool_mask"], torch.tensor([[1, 0, 1], [1, 0, 1]])) and batch["num_completion_tokens"] == 4
    with pytest.raises(ValueError, match=r"^tool_mask\[0\] has 2 entries but completion 0 has 3 tokens"):
        rollout_micro_batches(RolloutBatch([[1]], [[2, 3, 4]], [[0.0] * 3], [False], extras={"tool_mask": [[1, 1]]}), 1, 0)


def test_public_names():
    for name in ("ToolCallingRollout", "ToolRolloutResult", "ToolCallResult", "tool_schema", "parse_tool_calls", "tool_response_ids", "run_tool_call",
                 "EnvironmentInfo", "list_environments", "load_environment"):
        assert name in posttrain.__all__


def test_environment_entry_points_are_listed_with_their_status():
    from importlib.metadata import EntryPoint

    from posttrain import list_environments, load_environment

    eps = [EntryPoint("counter", "test_tools:Counter", "posttrain.environments"),
           EntryPoint("gone", "no_such_module_here:Env", "posttrain.environments"),
           EntryPoint("not_env", "json:dumps", "posttrain.environments"),
           EntryPoint("a_method", "x:y", "posttrain.methods")]
    infos = {i.name: i for i in list_environments(eps)}
    assert sorted(infos) == ["counter", "gone", "not_env"]
    assert infos["counter"].status == "ok" and infos["counter"].tools == ("increment",) and infos["counter"].has_reward
    assert infos["gone"].status == "broken" and infos["gone"].error.startswith("cannot import 'no_such_module_here:Env': ModuleNotFoundError")
    assert infos["not_env"].status == "ok"  # a plain callable may be a factory: what it builds is checked when training starts
    assert load_environment("counter", eps).__name__ == "Counter"
    with pytest.raises(ValueError, match=r"^environment 'gone' \(no_such_module_here:Env\) cannot be imported"):
        load_environment("gone", eps)


class Flaky:
    """An environment whose tools raise, hang, or return a non-string."""

    def reset(self, **row):
        return None

    def explode(self) -> str:
        """Raise."""
        raise RuntimeError("the environment broke")

    def stall(self) -> str:
        """Hang."""
        time.sleep(30)
        return "late"

    def numbers(self) -> list:
        """Return a non-string."""
        return {"n": [1, 2]}


def test_a_hanging_environment_ends_its_episode_and_the_rollout_goes_on(tok):
    calls = {k: _assistant_ids(tok, {"role": "assistant", "content": "", "tool_calls": [_call(k)]}) for k in ("explode", "stall", "numbers")}
    final = _assistant_ids(tok, {"role": "assistant", "content": "ok"})
    rows = [{"prompt": [{"role": "user", "content": k}]} for k in ("explode", "stall", "numbers")]

    class PerRow(ScriptedToolTurns):  # episode j calls tool j first, then answers
        def generate(self, prompt_ids, sampling, model_inputs=None):
            out = []
            for p in prompt_ids:
                k = self.turn_of(p)
                text = tok.decode(p)
                name = next(n for n in calls if f"user\n{n}<|im_end|>" in text)
                out.append((calls[name] if k == 0 else final)[: sampling.max_tokens])
            return RolloutBatch([list(x) for x in prompt_ids], out, [[-0.5] * len(c) for c in out], [False] * len(out))

    runner = ToolCallingRollout(tok, environment_factory=Flaky, tool_timeout=0.3, max_completion_length=400)
    result = runner.rollout(PerRow(tok, []), rows, SamplingParams(max_tokens=100))
    assert result.rollout.extras["stop_reason"] == ["stop", "tool_timeout", "stop"]
    assert result.rollout.extras["tool_failure_count"] == [1, 1, 0]
    tool_results = [[m["content"] for m in c if m["role"] == "tool"] for c in result.completions]
    assert tool_results == [["{'error': 'RuntimeError: the environment broke'}"], ["{'error': \"tool 'stall' timed out after 0.3s\"}"],
                            ["{'n': [1, 2]}"]]
