"""Pairwise judges (posttrain.judges): reward-function, reward-model and OpenAI-compatible HTTP judges, the hook, get_judge."""

from __future__ import annotations

import http.server
import json
import re
import socket
import subprocess
import sys
import threading

import pytest
import torch

import posttrain
import posttrain._plugins
from posttrain import ConfigError, hookimpl
from posttrain.judges import (
    DEFAULT_PAIRWISE_PROMPT,
    JudgeError,
    OpenAICompatibleJudge,
    PairwiseJudge,
    RewardFunctionJudge,
    RewardModelJudge,
    get_judge,
)
from posttrain.rewards import RewardModelFunction, SoftOverlongPunishment


def length_reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def contains_reward(completions, keyword, **kwargs):
    """1.0 when the completion contains the row's ``keyword`` column, None when the keyword is empty."""
    return [None if not k else float(k in c) for c, k in zip(completions, keyword)]


# ----------------------------------------------------------------------------- reward-function judge


def test_reward_function_judge_prefers_the_higher_weighted_reward_and_reads_columns():
    judge = RewardFunctionJudge([length_reward, contains_reward], weights=[0.1, 1.0])
    prompts = ["p0", "p1", "p2", "p3"]
    pairs = [["cat", "a cat!"], ["dog here", "dog"], ["xyz", "zyx"], ["aa", "bb"]]
    keyword = ["!", "here", "q", ""]  # pair 2: neither contains "q" -> equal totals; pair 3: contains_reward is None for both
    scores = judge.score_pairs(prompts, pairs, keyword=keyword)
    # first/second totals: 0.1 * len + 1.0 * contains
    assert scores[0] == pytest.approx((0.3, 0.6 + 1.0)) and scores[1] == pytest.approx((0.8 + 1.0, 0.3))
    assert judge.judge(prompts, pairs, keyword=keyword) == [1, 0, -1, -1]  # equal rewards -> tie=-1
    assert RewardFunctionJudge([length_reward, contains_reward], weights=[0.1, 1.0], tie=0).judge(prompts, pairs, keyword=keyword) == [1, 0, 0, 0]
    assert isinstance(judge, PairwiseJudge)


def test_reward_function_judge_gives_minus_one_when_a_completion_is_unscorable():
    judge = RewardFunctionJudge([contains_reward], tie=0)
    # pair 0: both None (empty keyword) -> -1 even with tie=0; pair 1: decided
    assert judge.judge(["a", "b"], [["x", "y"], ["kk", "k"]], keyword=["", "kk"]) == [-1, 0]
    first, second = judge.score_pairs(["a"], [["x", "y"]], keyword=[""])[0]
    assert first != first and second != second  # NaN marks unscorable


def test_reward_function_judge_completion_ids_from_the_caller_or_the_tokenizer(tiny_tokenizer):
    overlong = SoftOverlongPunishment(max_completion_len=4, soft_punish_cache=2)
    # explicit ids: 2 tokens (no penalty) vs 5 tokens (-1)
    judge = RewardFunctionJudge([overlong])
    assert judge.judge(["p"], [["a", "b"]], completion_ids=[[[1, 2], [1, 2, 3, 4, 5]]]) == [0]
    # no ids and no tokenizer: a function that reads completion_ids is refused in one line
    with pytest.raises(ValueError, match=r"reward function 'overlong_penalty' reads completion_ids; pass completion_ids=\.\.\. to judge\(\)"):
        judge.judge(["p"], [["a", "b"]])
    # with a tokenizer the judge tokenizes the completions itself
    short, long = "hi", "hi " * 10
    assert len(tiny_tokenizer(long, add_special_tokens=False)["input_ids"]) > 4 >= len(tiny_tokenizer(short, add_special_tokens=False)["input_ids"])
    assert RewardFunctionJudge([overlong], tokenizer=tiny_tokenizer).judge(["p", "q"], [[short, long], [long, short]]) == [0, 1]


def test_reward_function_judge_bad_input_is_one_line():
    with pytest.raises(ConfigError, match="weights has 2 entries but there are 1 reward functions"):
        RewardFunctionJudge([length_reward], weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="tie=2 must be -1"):
        RewardFunctionJudge([length_reward], tie=2)
    judge = RewardFunctionJudge([length_reward])
    with pytest.raises(ValueError, match=r"completions\[1\] must be a pair \[first, second\].*got a list of length 3"):
        judge.judge(["a", "b"], [["x", "y"], ["x", "y", "z"]])
    with pytest.raises(ValueError, match="got 2 prompts but 1 completion pairs"):
        judge.judge(["a", "b"], [["x", "y"]])
    with pytest.raises(ValueError, match="column 'keyword' has 1 values for 2 prompts"):
        judge.judge(["a", "b"], [["x", "y"], ["x", "y"]], keyword=["k"])


# ----------------------------------------------------------------------------- reward-model judge


def test_reward_model_judge_agrees_with_reward_model_function(tiny_tokenizer):
    from posttrain.testing.tiny_model import build_reward_model

    model = build_reward_model(tiny_tokenizer, dtype=torch.float64)
    judge = RewardModelJudge(model, tiny_tokenizer, batch_size=3)
    prompts = ["what is 1 + 1", "hello", "the cat"]
    pairs = [[" 2", " three or four"], [" world", " there friend"], [" sat", " ran away fast"]]
    prompts, pairs = prompts + prompts, pairs + [[b, a] for a, b in pairs]  # each pair twice, swapped: both answers occur
    flat_prompts = [p for p in prompts for _ in range(2)]
    flat_completions = [c for pair in pairs for c in pair]
    # the same texts through RewardModelFunction with the same batching: the same forward passes, so the same numbers
    scores = RewardModelFunction(model, tiny_tokenizer, batch_size=3)(prompts=flat_prompts, completions=flat_completions)
    assert judge.score_pairs(prompts, pairs) == [(scores[2 * i], scores[2 * i + 1]) for i in range(len(pairs))]
    expected = [0 if scores[2 * i] > scores[2 * i + 1] else 1 for i in range(len(pairs))]
    assert judge.judge(prompts, pairs) == expected
    assert expected[3:] == [1 - e for e in expected[:3]] and isinstance(judge, PairwiseJudge)


# ----------------------------------------------------------------------------- the HTTP judge against a local server

_OUTPUT = re.compile(r'"model_identifier": "(\d)",\s*"output": """(.*?)"""', re.S)
_INSTRUCTION = re.compile(r'"instruction": """(.*?)"""', re.S)


class _StubJudgeServer:
    """A real OpenAI-style chat-completions server on 127.0.0.1 (http.server in a thread).

    ``mode``: ``"longer"`` answers the identifier of the longer output, ``"position0"`` always "0",
    ``"garbage"`` answers "maybe", ``"error"`` answers HTTP 500, ``"not_json"`` a non-JSON page.
    Every request body and its headers are recorded.
    """

    def __init__(self):
        self.mode = "longer"
        self.requests: list[tuple[str, dict, dict]] = []
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, dict(self.headers), body))
                if stub.mode == "error":
                    self._send(500, b"internal boom\nsecond line", "text/plain")
                    return
                if stub.mode == "not_json":
                    self._send(200, b"<html>hello</html>", "text/html")
                    return
                outputs = dict(_OUTPUT.findall(body["messages"][0]["content"]))
                answer = {"longer": "1" if len(outputs["1"]) > len(outputs["0"]) else "0", "position0": "0", "garbage": "maybe"}[stub.mode]
                reply = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
                self._send(200, json.dumps(reply).encode(), "application/json")

            def _send(self, code, payload, content_type):
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def shown(self) -> dict[str, tuple[str, str]]:
        """Instruction -> the (output 0, output 1) its request showed."""
        out = {}
        for _, _, body in self.requests:
            content = body["messages"][0]["content"]
            outputs = dict(_OUTPUT.findall(content))
            out[_INSTRUCTION.search(content).group(1)] = (outputs["0"], outputs["1"])
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_server():
    server = _StubJudgeServer()
    yield server
    server.close()


PROMPTS = [f"question {i}" for i in range(12)]
PAIRS = [["short", "a much longer answer"] if i % 3 else ["the longest answer of all", "tiny"] for i in range(12)]
LONGER = [1 if i % 3 else 0 for i in range(12)]


def test_openai_compatible_judge_round_trip(stub_server):
    judge = OpenAICompatibleJudge(stub_server.base_url, "judge-model", api_key="sk-test", max_workers=4)
    assert judge.judge(PROMPTS, PAIRS, shuffle_order=False) == LONGER
    assert judge.num_requests == 12 and judge.num_unparsable == 0
    path, headers, body = stub_server.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["max_tokens"] == 1 and len(body["messages"]) == 1
    # the prompt is TRL's default pairwise prompt, filled in
    assert sorted(b["messages"][0]["content"] for _, _, b in stub_server.requests) == sorted(
        DEFAULT_PAIRWISE_PROMPT.format(prompt=p, response0=a, response1=b) for p, (a, b) in zip(PROMPTS, PAIRS)
    )
    assert isinstance(judge, PairwiseJudge) and get_judge("openai", base_url=stub_server.base_url, model="m").url == judge.url


def test_shuffle_order_swaps_pairs_with_a_seeded_rng_and_maps_the_answer_back(stub_server):
    # a judge that is right about content: shuffling must not change the (mapped back) preferences
    judge = OpenAICompatibleJudge(stub_server.base_url, "m", seed=3)
    assert judge.judge(PROMPTS, PAIRS, shuffle_order=True) == LONGER
    shown = stub_server.shown()
    flips = [shown[prompt] == (b, a) for prompt, (a, b) in zip(PROMPTS, PAIRS)]
    assert all(shown[prompt] in ((a, b), (b, a)) for prompt, (a, b) in zip(PROMPTS, PAIRS))
    assert 0 < sum(flips) < len(flips)  # some pairs were shown swapped, some not
    # a judge biased to position 0: its answers, mapped back, are exactly the flips (1 where the pair was swapped)
    stub_server.mode, stub_server.requests = "position0", []
    again = OpenAICompatibleJudge(stub_server.base_url, "m", seed=3)  # same seed: same swaps
    assert again.judge(PROMPTS, PAIRS) == [1 if f else 0 for f in flips]
    assert OpenAICompatibleJudge(stub_server.base_url, "m").judge(PROMPTS, PAIRS, shuffle_order=False) == [0] * 12


def test_openai_compatible_judge_http_500_is_one_line(stub_server):
    stub_server.mode = "error"
    judge = OpenAICompatibleJudge(stub_server.base_url, "m")
    with pytest.raises(JudgeError, match=r"answered HTTP 500 .*internal boom second line; check base_url, model='m' and api_key") as info:
        judge.judge(["p"], [["a", "b"]])
    assert "\n" not in str(info.value) and stub_server.base_url in str(info.value)
    stub_server.mode = "not_json"
    with pytest.raises(JudgeError, match="not an OpenAI chat completion: <html>hello</html>"):
        judge.judge(["p"], [["a", "b"]])


def test_openai_compatible_judge_garbage_answer_is_minus_one_and_counted(stub_server):
    stub_server.mode = "garbage"
    judge = OpenAICompatibleJudge(stub_server.base_url, "m")
    assert judge.judge(PROMPTS[:5], PAIRS[:5]) == [-1] * 5  # -1 stays -1 whether or not the pair was swapped
    assert judge.num_unparsable == 5 and judge.num_requests == 5


def test_openai_compatible_judge_unreachable_server_and_bad_settings():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = OpenAICompatibleJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=5)
    with pytest.raises(JudgeError, match=rf"no answer from http://127.0.0.1:{port}/v1/chat/completions .*is the server running"):
        judge.judge(["p"], [["a", "b"]])
    with pytest.raises(ConfigError, match="base_url='localhost:8000' must be an http"):
        OpenAICompatibleJudge("localhost:8000", "m")
    with pytest.raises(ConfigError, match=r"exactly the placeholders .* it has \['prompt', 'response0'\]"):
        OpenAICompatibleJudge("http://x/v1", "m", system_prompt="{prompt} {response0}")
    with pytest.raises(ConfigError, match="timeout=0 must be a positive number"):
        OpenAICompatibleJudge("http://x/v1", "m", timeout=0)


def test_openai_compatible_judge_renders_conversations(stub_server):
    judge = OpenAICompatibleJudge(stub_server.base_url, "m", system_prompt='{prompt}|"model_identifier": "0", "output": """{response0}""" '
                                  '"model_identifier": "1", "output": """{response1}"""')
    prompt = [{"role": "user", "content": "hi"}]
    pair = [[{"role": "assistant", "content": "hello there"}], [{"role": "assistant", "content": "yo"}]]
    assert judge.judge([prompt], [pair], shuffle_order=False) == [0]
    content = stub_server.requests[0][2]["messages"][0]["content"]
    assert content.startswith("User: hi\n\n|") and '"""Assistant: hello there\n\n"""' in content


# ----------------------------------------------------------------------------- the hook and get_judge


class LabJudges:
    """A plugin shipping a judge through the register_judges hook."""

    @hookimpl
    def register_judges(self, register):
        register("shortest", lambda tie=-1: RewardFunctionJudge([lambda completions, **kw: [-float(len(c)) for c in completions]], tie=tie))


@pytest.fixture
def fresh_shared_manager():
    posttrain._plugins._reset_plugin_manager()
    yield
    posttrain._plugins._reset_plugin_manager()


def test_builtin_judges_are_registered_through_the_hook():
    from posttrain._plugins import collect_registrations

    judges = collect_registrations(posttrain.get_plugin_manager(load_entrypoints=False), "register_judges")
    assert {"reward_functions", "reward_model", "openai"} <= set(judges)
    judge = get_judge("reward_functions", reward_funcs=[length_reward], pm=posttrain.get_plugin_manager(load_entrypoints=False))
    assert isinstance(judge, RewardFunctionJudge) and judge.judge(["p"], [["a", "bb"]]) == [1]


def test_a_plugin_registered_judge_is_found_by_name(fresh_shared_manager, monkeypatch):
    pm = posttrain.get_plugin_manager(load_entrypoints=False)
    pm.register(LabJudges(), name="lab-judges")
    assert get_judge("shortest", pm=pm).judge(["p"], [["a", "bb"]]) == [0]
    # installed as an entry point of the posttrain.plugins group, it is found by the process's manager
    ep = type("EP", (), {"name": "lab", "group": "posttrain.plugins", "dist": None, "load": lambda self: LabJudges()})()
    monkeypatch.setattr(posttrain._plugins, "entry_points", lambda group: [ep])
    judge = posttrain.get_judge("shortest", tie=0)
    assert judge.tie == 0 and judge.judge(["p", "q"], [["a", "bb"], ["cc", "d"]]) == [0, 1]


def test_get_judge_unknown_name_lists_the_registered_ones_and_passes_objects_through():
    pm = posttrain.get_plugin_manager(load_entrypoints=False)
    with pytest.raises(ConfigError, match=r"Unknown judge 'gpt'\. Registered judges: openai, reward_functions, reward_model; or pass an object"):
        get_judge("gpt", pm=pm)
    judge = RewardFunctionJudge([length_reward])
    assert get_judge(judge) is judge
    with pytest.raises(TypeError, match="only apply when building a judge by name"):
        get_judge(judge, tie=0)
    with pytest.raises(TypeError, match="got int"):
        get_judge(3)


def test_a_judge_name_registered_twice_names_both_plugins():
    pm = posttrain.get_plugin_manager(load_entrypoints=False)
    pm.register(LabJudges(), name="first")
    pm.register(LabJudges(), name="second")
    with pytest.raises(ValueError, match="name 'shortest' is registered by both 'first' and 'second'"):
        get_judge("shortest", pm=pm)


def test_importing_the_judges_stays_light():
    code = "import sys, posttrain.judges, posttrain; posttrain.PairwiseJudge; posttrain.get_judge; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
