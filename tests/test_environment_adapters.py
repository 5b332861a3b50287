"""posttrain.environments: OpenEnv and verifiers environments as ``environment_factory=`` classes.

Each library is exercised with a small environment written with its own API (OpenEnv's echo
environment in-process and behind its HTTP/WebSocket server, an OpenEnv MCP calculator, a
verifiers calculator taskset with a toolset, a state and a rubric): the adapter's reset / tool /
reward mapping is checked directly, then episodes run through ``posttrain.ToolCallingRollout``
(driven by a scripted policy, since a random tiny model never calls a tool) and the GRPO trainer
(the real tiny model) runs the docs' examples. Each library's tests skip when it is not installed.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- helpers
class ScriptedPolicy:
    """A rollout backend writing scripted turns (the stand-in for a trained policy): ``reply(context_text, turn)`` -> the turn's text."""

    name = "scripted"
    policy_version = 0
    samples_from_policy = False

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply = tokenizer, reply

    def generate(self, prompt_ids, sampling, **kwargs):
        from posttrain import RolloutBatch

        prompts, completions = [], []
        for ids in prompt_ids:
            context = self.tokenizer.decode(ids, skip_special_tokens=False)
            text = self.reply(context, context.count("<tool_response>"))
            tokens = self.tokenizer.encode(text, add_special_tokens=False) + [self.tokenizer.eos_token_id]
            for _ in range(sampling.n):
                prompts.append(list(ids))
                completions.append(tokens[: sampling.max_tokens])
        return RolloutBatch(prompts, completions, [[0.0] * len(c) for c in completions], [False] * len(completions))

    def update_weights(self, model):
        pass


def _call(name, **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def _engine(tokenizer, reply):
    from posttrain import RolloutEngine

    return RolloutEngine(ScriptedPolicy(tokenizer, reply))


def _sampling():
    from posttrain import SamplingParams

    return SamplingParams(n=1, max_tokens=64, temperature=1.0, seed=0)


def _docs_block(heading: str) -> str:
    """The python block under ``### heading`` of docs/agents.md (the test runs it as written)."""
    text = open(os.path.join(ROOT, "docs", "agents.md"), encoding="utf-8").read()
    section = text.split(f"### {heading}\n", 1)[1]
    return re.search(r"^```python\n(.*?)^```", section, re.M | re.S).group(1)


def _run_docs_block(heading, tmp_path, monkeypatch):
    """Run the block in ``tmp_path`` as a module of its own (as ``python -c`` runs it: pydantic resolves annotations in it)."""
    import types

    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_agents_{heading.lower()}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(_docs_block(heading), f"docs/agents.md ({heading})", "exec"), module.__dict__)
    return module.__dict__


# ---------------------------------------------------------------------------- OpenEnv
@functools.cache
def _echo_classes():
    """OpenEnv's echo environment (the `openenv init` template), with OpenEnv's API; the message 'bye' ends the episode."""
    from uuid import uuid4

    from openenv.core import Action, Environment, Observation, State
    from pydantic import Field

    class EchoAction(Action):
        """Echo a message back."""

        message: str = Field(..., description="Message to echo back")

    class EchoObservation(Observation):
        echoed_message: str = Field(default="", description="The echoed message")
        message_length: int = Field(default=0, description="Length of the echoed message")

    class EchoEnvironment(Environment):
        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self):
            super().__init__()
            self._state = State(episode_id=str(uuid4()), step_count=0)

        def reset(self, seed=None, episode_id=None, **kwargs) -> EchoObservation:
            self._state = State(episode_id=episode_id or str(uuid4()), step_count=0)
            return EchoObservation(echoed_message="Echo environment ready!", done=False, reward=0.0)

        def step(self, action: EchoAction, timeout_s=None, **kwargs) -> EchoObservation:
            self._state.step_count += 1
            return EchoObservation(echoed_message=action.message, message_length=len(action.message),
                                   done=action.message == "bye", reward=0.1 * len(action.message))

        @property
        def state(self) -> State:
            return self._state

    return EchoAction, EchoObservation, EchoEnvironment


def _openenv_echo():
    pytest.importorskip("openenv.core")
    return _echo_classes()


def test_openenv_echo_maps_reset_action_tool_and_reward():
    from posttrain._tools import tool_schema
    from posttrain.environments.openenv import environment_class

    EchoAction, EchoObservation, EchoEnvironment = _openenv_echo()
    Echo = environment_class(EchoEnvironment)
    env = Echo()
    public = sorted(n for n in dir(env) if not n.startswith("_"))
    assert public == ["done", "echo", "environment", "get_reward", "observation", "reset", "reward", "rewards"]
    assert tool_schema(env.echo)["function"] == {
        "name": "echo", "description": "Echo a message back.",
        "parameters": {"type": "object", "properties": {"message": {"type": "string", "description": "Message to echo back"}}, "required": ["message"]},
        "return": {"type": "string"}}
    # reset: the row's seed / episode_id reach OpenEnv's reset; the observation is appended to the opened prompt
    text = env.reset(prompt=[{"role": "user", "content": "Echo hi."}], episode_id="ep-7", other="ignored")
    assert text == '\n\n{"echoed_message": "Echo environment ready!", "message_length": 0}'
    assert env.environment.state.episode_id == "ep-7" and env.get_reward() == 0.0
    # a call builds the action, steps the environment, returns the observation; rewards add up
    assert json.loads(env.echo(message="hello")) == {"echoed_message": "hello", "message_length": 5}
    assert json.loads(env.echo("hey")) == {"echoed_message": "hey", "message_length": 3}
    assert env.get_reward() == pytest.approx(0.8) and env.environment.state.step_count == 2
    with pytest.raises(ValueError, match=r"^invalid arguments for EchoAction: 1 validation error for EchoAction message Input should be a valid string"):
        env.echo(message=123)  # one line for the model, not pydantic's several
    env.echo(message="bye")
    assert env.done and env.get_reward() == pytest.approx(1.1)
    with pytest.raises(RuntimeError, match="the episode is over"):
        env.echo(message="again")
    with pytest.raises(TypeError, match="echo: missing a required argument: 'message'"):
        env.echo()
    # options: the last reward, a custom text, no reset text, no get_reward, a tool name
    Last = environment_class(EchoEnvironment, reward="last", observation_to_text=lambda o: o.echoed_message, reset_observation=False,
                             tool_name="say", name="EchoLast")
    last = Last()
    assert Last.__name__ == "EchoLast" and last.reset(prompt=[{"role": "user", "content": "x"}]) is None
    assert last.say(message="abc") == "abc" and last.say(message="a") == "a" and last.get_reward() == pytest.approx(0.1)
    assert not hasattr(environment_class(EchoEnvironment, reward=None)(), "get_reward")
    # the probe instance serves the first episode; later instances build their own environment
    assert Echo().environment is not env.environment


def test_openenv_errors_are_one_line():
    from posttrain.environments.openenv import environment_class

    EchoAction, _, EchoEnvironment = _openenv_echo()
    with pytest.raises(TypeError, match=r"got an instance of EchoEnvironment; .* pass the class, or a zero-argument factory"):
        environment_class(EchoEnvironment())
    with pytest.raises(TypeError, match=r"could not be built without arguments .* pass a zero-argument factory"):
        environment_class(lambda url: EchoEnvironment())
    with pytest.raises(TypeError, match="not an OpenEnv Environment or EnvClient"):
        environment_class(lambda: object())
    with pytest.raises(ValueError, match=r"reward='mean'; use 'sum', 'last' or None"):
        environment_class(EchoEnvironment, reward="mean")
    with pytest.raises(ValueError, match=r"the row has no column 'seed' \(named in reset_columns\)"):
        environment_class(EchoEnvironment, reset_columns=["seed"])().reset(prompt=[])
    with pytest.raises(ValueError, match="tool name 'reset' cannot be an environment method"):
        environment_class(EchoEnvironment, tool_name="reset")

    class Untyped(EchoEnvironment):
        def step(self, action, timeout_s=None, **kwargs):
            return super().step(action)

    with pytest.raises(ValueError, match="cannot tell the action type .* pass action=TheActionClass"):
        environment_class(Untyped)
    assert environment_class(Untyped, action=EchoAction)().echo(message="ok")


def test_openenv_mcp_environment_tools():
    _openenv_echo()  # skips without openenv-core
    pytest.importorskip("fastmcp")
    from fastmcp import FastMCP
    from openenv.core import MCPEnvironment, Observation, State

    from posttrain._tools import run_tool_call, tool_schema
    from posttrain.environments.openenv import environment_class

    class CalculatorEnvironment(MCPEnvironment):
        def __init__(self):
            mcp = FastMCP("calculator")

            @mcp.tool()
            def add(a: int, b: int) -> int:
                """Add two integers."""
                return a + b

            @mcp.tool()
            def divide(a: float, b: float) -> float:
                """Divide a by b."""
                return a / b

            super().__init__(mcp)
            self._state = State()

        def reset(self, seed=None, episode_id=None, **kwargs):
            return Observation(done=False, reward=0.0)

        def _step_impl(self, action, timeout_s=None, **kwargs):
            return Observation(done=False)

        @property
        def state(self):
            return self._state

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # openenv reads fastmcp's deprecated Tool.inputSchema
        Calculator = environment_class(CalculatorEnvironment)
    env = Calculator()
    assert {n for n in dir(env) if not n.startswith("_")} >= {"add", "divide", "reset", "get_reward"}
    schema = tool_schema(env.add)["function"]
    assert schema["description"] == "Add two integers." and schema["parameters"]["required"] == ["a", "b"]
    assert schema["parameters"]["properties"]["a"]["type"] == "integer"
    assert env.reset() is None  # an observation without fields of its own: nothing to append
    assert env.add(a=2, b=40) == "42"
    failed = run_tool_call({"type": "function", "function": {"name": "divide", "arguments": {"a": 1, "b": 0}}}, {"divide": env.divide})
    assert failed.error is not None and "division by zero" in failed.error


def test_openenv_rollout_runs_the_echo_tool():
    """Episodes through ToolCallingRollout: the scripted policy calls echo with the prompt's word, then stops."""
    from posttrain import ToolCallingRollout
    from posttrain.environments.openenv import environment_class
    from posttrain.testing.tiny_model import build_tokenizer

    _, _, EchoEnvironment = _openenv_echo()
    tokenizer = build_tokenizer(tools=True)
    Echo = environment_class(EchoEnvironment, observation_to_text=lambda o: o.echoed_message)
    words = ["hello", "openenv", "hi", "posttrain"]
    rows = [{"prompt": [{"role": "user", "content": f"Echo {w}."}]} for w in words]

    def reply(context, turn):
        word = re.findall(r"Echo (\w+)\.", context)[-1]
        return _call("echo", message=word) if turn == 0 else "done"

    rollout = ToolCallingRollout(tokenizer, environment_factory=Echo, max_tool_calling_iterations=2, max_completion_length=128)
    result = rollout.rollout(_engine(tokenizer, reply), rows, _sampling())
    assert result.rollout.extras["tool_call_count"] == [1, 1, 1, 1] and result.rollout.extras["tool_failure_count"] == [0] * 4
    for word, messages, prompt in zip(words, result.completions, result.prompts):
        assert prompt[-1]["content"] == f"Echo {word}.\n\nEcho environment ready!"  # the reset observation
        assert messages[1] == {"role": "tool", "name": "echo", "content": word} and messages[2]["content"] == "done"
    for mask, ids in zip(result.rollout.extras["tool_mask"], result.rollout.completion_ids):
        assert 0 < sum(mask) < len(ids) == len(mask)  # model-written and inserted tool tokens
    (name, get_reward), = rollout.reward_functions()
    assert name == "EchoEnvironment"
    assert get_reward(environments=result.environments) == pytest.approx([0.1 * len(w) for w in words])


def test_openenv_http_server_and_client():
    """The echo environment behind OpenEnv's own server (create_app + uvicorn on localhost), reached with an EnvClient."""
    _, _, EchoEnvironment = _openenv_echo()
    EchoAction, EchoObservation, _ = _openenv_echo()
    import socket
    import threading
    import time

    import uvicorn
    from openenv.core import EnvClient, State, create_app
    from openenv.core.client_types import StepResult

    from posttrain.environments.openenv import close, environment_class

    class EchoEnv(EnvClient[EchoAction, EchoObservation, State]):
        def _step_payload(self, action):
            return {"message": action.message}

        def _parse_result(self, payload):
            data = payload.get("observation", {})
            observation = EchoObservation(echoed_message=data.get("echoed_message", ""), message_length=data.get("message_length", 0),
                                          done=payload.get("done", False), reward=payload.get("reward"))
            return StepResult(observation=observation, reward=payload.get("reward"), done=payload.get("done", False))

        def _parse_state(self, payload):
            return State(**payload)

    app = create_app(EchoEnvironment, EchoAction, EchoObservation, env_name="echo", max_concurrent_envs=4)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(500):
            if server.started:
                break
            time.sleep(0.01)
        Echo = environment_class(lambda: EchoEnv(base_url=url), observation_to_text=lambda o: o.echoed_message)
        assert Echo.__name__ == "EchoEnv"  # the action type comes from EnvClient[EchoAction, ...]
        first, second = Echo(), Echo()  # two WebSocket sessions, two server-side environments
        assert first.reset(prompt=[{"role": "user", "content": "go"}]) == "\n\nEcho environment ready!"
        second.reset()
        assert first.echo(message="over http") == "over http" and second.echo(message="ws") == "ws"
        assert first.get_reward() == pytest.approx(0.9) and second.get_reward() == pytest.approx(0.2)
        first.echo(message="bye")
        assert first.done and not second.done
        close(Echo)
    finally:
        server.should_exit = True
        thread.join(10)


def test_docs_openenv_echo_example_trains(tmp_path, monkeypatch):
    """docs/agents.md's OpenEnv echo example (TRL's, for posttrain) runs as written: GRPO, 2 steps, the tiny model."""
    _openenv_echo()
    namespace = _run_docs_block("OpenEnv", tmp_path, monkeypatch)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2 and trainer.reward_func_names == ["EchoEnvironment"]
    assert any("rewards/EchoEnvironment/mean" in entry for entry in trainer.state.log_history)


# ---------------------------------------------------------------------------- verifiers
def _calc_taskset(n: int = 4):
    """A verifiers (v1) calculator taskset: a toolset with two tools and a state, a rubric of two weighted rewards and a metric."""
    vf = pytest.importorskip("verifiers.v1")

    class CalcState(vf.State):
        calls: int = 0

    class CalcToolset(vf.Toolset[vf.ToolsetConfig, CalcState]):
        TOOL_PREFIX = "calc"

        @vf.tool
        def add(self, a: int, b: int) -> int:
            """Add two integers."""
            self.state.calls += 1
            return a + b

        @vf.tool(name="times")
        async def multiply(self, a: int, b: int) -> int:
            """Multiply two integers.

            Args:
                a: The first factor.
                b: The second factor.
            """
            self.state.calls += 1
            return a * b

    class CalcData(vf.TaskData):
        answer: int

    class CalcTaskConfig(vf.TaskConfig):
        tools: vf.ToolsetConfig = vf.ToolsetConfig()

    class CalcTask(vf.Task[CalcData, CalcState, CalcTaskConfig]):
        @classmethod
        def toolsets(cls, config):
            return [CalcToolset(config.tools)]

        @vf.reward(weight=1.0)
        async def correct(self, trace: vf.Trace) -> float:
            return float(trace.last_reply == str(self.data.answer))

        @vf.reward(weight=0.5)
        async def used_tool(self, trace: vf.Trace) -> float:
            return float(trace.state.calls > 0)

        @vf.metric
        async def turns(self, trace: vf.Trace) -> float:
            return float(trace.num_turns)

    class CalcConfig(vf.TasksetConfig):
        task: CalcTaskConfig = CalcTaskConfig()
        num: int = n

    class CalcTaskset(vf.Taskset[CalcTask, CalcConfig]):
        def load(self):
            for i in range(self.config.num):
                a, b = 10 + 7 * i, 20 + 3 * i
                yield CalcTask(CalcData(prompt=f"What is {a} + {b}?", system_prompt="Use the calculator.", answer=a + b), self.config.task)

    return CalcTaskset(CalcConfig())


def test_verifiers_taskset_maps_rows_tools_state_and_rubric():
    from posttrain._tools import run_tool_call, tool_schema
    from posttrain.environments.verifiers import environment_class

    Calc = environment_class(_calc_taskset())
    assert Calc.__name__ == "CalcTaskset" and len(Calc.dataset) == len(Calc.tasks) == 4
    assert Calc.dataset[1] == {"prompt": [{"role": "system", "content": "Use the calculator."}, {"role": "user", "content": "What is 17 + 23?"}],
                               "task_index": 1}
    env = Calc()
    assert sorted(n for n in dir(env) if not n.startswith("_")) == [
        "calc_add", "calc_times", "dataset", "reset", "reward_funcs", "state", "task", "tasks", "taskset", "trace"]
    add = tool_schema(env.calc_add)["function"]
    assert add["description"] == "Add two integers." and add["parameters"]["properties"]["a"] == {"type": "integer", "description": "The a argument."}
    assert tool_schema(env.calc_times)["function"]["parameters"]["properties"]["b"]["description"] == "The second factor."
    assert env.reset(**Calc.dataset[1]) is None and env.task is Calc.tasks[1]
    tools = {"calc_add": env.calc_add, "calc_times": env.calc_times}
    assert run_tool_call({"type": "function", "function": {"name": "calc_add", "arguments": {"a": 17, "b": 23}}}, tools).result == "40"
    assert run_tool_call({"type": "function", "function": {"name": "calc_times", "arguments": {"a": 6, "b": 7}}}, tools).result == "42"
    assert env.state.calls == 2  # the tools wrote the episode's state
    # the rubric on a Trace of the episode's messages: weighted sum, per-reward scores and metrics on env.trace
    (reward,) = Calc.reward_funcs
    assert reward.__name__ == "CalcTaskset"
    call = {"type": "function", "function": {"name": "calc_add", "arguments": {"a": 17, "b": 23}}}
    episode = [{"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "name": "calc_add", "content": "40"},
               {"role": "assistant", "content": "40"}]
    assert reward(prompts=[Calc.dataset[1]["prompt"]], completions=[episode], environments=[env], task_index=[1]) == [1.5]
    assert {k: v.score for k, v in env.trace.rewards.items()} == {"correct": 1.0, "used_tool": 1.0} and env.trace.metrics == {"turns": 2.0}
    assert env.trace.tool_messages[0].tool_call_id == env.trace.assistant_messages[0].tool_calls[0].id
    # a new episode starts from fresh toolsets and a fresh state
    env.reset(**Calc.dataset[0])
    assert env.state.calls == 0
    assert reward(prompts=[Calc.dataset[0]["prompt"]], completions=[[{"role": "assistant", "content": "7"}]], environments=[env]) == [0.0]
    with pytest.raises(ValueError, match=r"the row's task_index is 9, not a task of this taskset \(0..3\); train on CalcTaskset.dataset"):
        env.reset(prompt=[], task_index=9)
    with pytest.raises(ValueError, match="needs prompts=, completions= and environments="):
        reward(completions=[episode])


def test_verifiers_errors_are_one_line():
    vf = pytest.importorskip("verifiers.v1")
    from posttrain.environments.verifiers import environment_class

    taskset = _calc_taskset(n=0)
    with pytest.raises(ValueError, match="the taskset yielded no tasks"):
        environment_class(taskset)
    with pytest.raises(TypeError, match="is not a verifiers taskset; pass a vf.Taskset"):
        environment_class(object())
    with pytest.raises(ValueError, match=r"environment_class\('no-such-env'\): the taskset cannot be loaded .* install the environment's package"):
        environment_class("no-such-env")

    class Forever(type(_calc_taskset())):
        INFINITE = True

    with pytest.raises(ValueError, match="the taskset is infinite; pass num_tasks=N"):
        environment_class(Forever(_calc_taskset().config))
    assert len(environment_class(Forever(_calc_taskset().config), num_tasks=2).dataset) == 2
    assert vf  # the library is present for these checks


_REVERSE_PACKAGE = '''
import verifiers.v1 as vf


class ReverseData(vf.TaskData):
    text: str


class ReverseTask(vf.Task[ReverseData]):
    @vf.reward
    async def reversed_text(self, trace: vf.Trace) -> float:
        return float(trace.last_reply == self.data.text[::-1])


class ReverseConfig(vf.TasksetConfig):
    words: list[str] = ["abc", "posttrain", "tools"]


class ReverseTaskset(vf.Taskset[ReverseTask, ReverseConfig]):
    def load(self):
        for word in self.config.words:
            yield ReverseTask(ReverseData(prompt=f"Reverse {word}.", text=word), self.config.task)


__all__ = ["ReverseTaskset"]
'''


def test_verifiers_loads_an_installed_environment_by_id(tmp_path, monkeypatch):
    """A verifiers environment package (a module exporting its Taskset in __all__) loads by id, with config; one without tools is single-turn."""
    pytest.importorskip("verifiers.v1")
    from posttrain.environments.verifiers import environment_class

    (tmp_path / "pt_reverse_env.py").write_text(_REVERSE_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    Reverse = environment_class("pt-reverse-env", config={"words": ["abc", "tool"]})
    assert Reverse.__name__ == "ReverseTaskset" and [row["prompt"] for row in Reverse.dataset] == [
        [{"role": "user", "content": "Reverse abc."}], [{"role": "user", "content": "Reverse tool."}]]
    env = Reverse()
    assert sorted(n for n in dir(env) if not n.startswith("_") and callable(getattr(env, n))) == ["reset"]  # no tools
    env.reset(**Reverse.dataset[1])
    (reward,) = Reverse.reward_funcs
    prompts = [Reverse.dataset[1]["prompt"]] * 2
    answers = [[{"role": "assistant", "content": "loot"}], [{"role": "assistant", "content": "tool"}]]
    assert reward(prompts=prompts, completions=answers, environments=[env, env]) == [1.0, 0.0]
    assert reward(prompts=prompts[:1], completions=answers[:1], environments=[object()]) == [None]  # another environment's episode


def test_verifiers_rollout_scores_the_rubric():
    """Episodes through ToolCallingRollout: the scripted policy calls calc_add, then answers (right on even rows, wrong on odd)."""
    from posttrain import ToolCallingRollout
    from posttrain.environments.verifiers import environment_class
    from posttrain.testing.tiny_model import build_tokenizer

    Calc = environment_class(_calc_taskset())
    tokenizer = build_tokenizer(tools=True)

    def reply(context, turn):
        a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)\?", context)[-1])
        if turn == 0:
            return _call("calc_add", a=a, b=b)
        result = int(re.findall(r"<tool_response>\s*(\d+)\s*</tool_response>", context)[-1])
        return str(result if a % 2 == 0 else result + 1)

    rollout = ToolCallingRollout(tokenizer, environment_factory=Calc, max_tool_calling_iterations=2, max_completion_length=128)
    assert rollout.reward_functions() == []  # the rubric reads the messages: it is Calc.reward_funcs, not a get_reward()
    result = rollout.rollout(_engine(tokenizer, reply), Calc.dataset, _sampling())
    assert result.rollout.extras["tool_call_count"] == [1, 1, 1, 1]
    (reward,) = Calc.reward_funcs
    scores = reward(prompts=result.prompts, completions=result.completions, environments=result.environments)
    assert scores == [1.5, 0.5, 1.5, 0.5]  # a = 10, 17, 24, 31: right answers on even a
    assert [env.trace.metrics["turns"] for env in result.environments] == [2.0] * 4


def test_verifiers_rubric_is_the_grpo_reward(tmp_path):
    """One GRPO step whose episodes call the verifiers tool (the scripted policy as the rollout engine): the logged reward is the rubric's."""
    from posttrain.environments.verifiers import environment_class
    from posttrain.methods.grpo import GRPOConfig, GRPOTrainer
    from posttrain.testing.tiny_model import build_model, build_tokenizer

    Calc = environment_class(_calc_taskset())
    tokenizer = build_tokenizer(tools=True)

    def reply(context, turn):
        a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)\?", context)[-1])
        if turn == 0:
            return _call("calc_add", a=a, b=b)
        return str(a + b if a % 2 == 0 else a + b + 1)

    args = GRPOConfig(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4, num_generations=2, max_completion_length=160,
                      max_tool_calling_iterations=2, logging_steps=1, report_to=[], use_cpu=True)
    trainer = GRPOTrainer(model=build_model(tokenizer), processing_class=tokenizer, args=args, train_dataset=Calc.dataset,
                          reward_funcs=Calc.reward_funcs, environment_factory=Calc, rollout_engine=_engine(tokenizer, reply))
    trainer.train()
    logged = trainer.state.log_history[0]
    # two prompts (a = 10 right, a = 17 wrong) x two episodes: (1.5 + 1.5 + 0.5 + 0.5) / 4
    assert logged["rewards/CalcTaskset/mean"] == pytest.approx(1.0) and logged["tools/call_frequency"] == 1.0 and logged["tools/mean_turns"] == 2.0


def test_docs_verifiers_example_trains(tmp_path, monkeypatch):
    """docs/agents.md's verifiers example runs as written: GRPO, 2 steps, the tiny model, the rubric as the reward."""
    pytest.importorskip("verifiers.v1")
    namespace = _run_docs_block("verifiers", tmp_path, monkeypatch)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 2 and trainer.reward_func_names == ["CalcTaskset"]
    assert any("rewards/CalcTaskset/mean" in entry for entry in trainer.state.log_history)


# ---------------------------------------------------------------------------- both
def test_import_posttrain_imports_neither_library():
    code = ("import sys, posttrain, posttrain.environments, posttrain.environments.openenv, posttrain.environments.verifiers; "
            "sys.exit(sorted(m for m in ('openenv', 'verifiers') if m in sys.modules) != [])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.parametrize(("module", "hidden", "pip"), [("openenv", "openenv.core", "pip install openenv-core"), ("verifiers", "verifiers.v1", "pip install verifiers")])
def test_a_missing_library_is_one_line_naming_pip(module, hidden, pip, monkeypatch):
    import importlib

    adapter = importlib.import_module(f"posttrain.environments.{module}")
    monkeypatch.setitem(sys.modules, hidden, None)  # as if the library were not installed
    with pytest.raises(ImportError) as caught:
        adapter.environment_class(object)
    message = str(caught.value)
    assert "\n" not in message and message.endswith(pip) and f"posttrain.environments.{module}" in message
