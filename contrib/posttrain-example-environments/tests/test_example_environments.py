"""The example environments as an installed distribution: listed by entry point, loaded by name, played through the
core's tool-calling rollout (scripted turns: a random tiny model never calls a tool) and trained with GRPO."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import posttrain
from posttrain import SamplingParams, ToolCallingRollout
from posttrain.testing.scripted import ScriptedToolTurns
from posttrain.testing.tiny_model import build_model, build_tokenizer
from posttrain_example_environments import CalculatorEnv, GuessNumberEnv

pytestmark = pytest.mark.skipif(not any(i.name == "guess_number" for i in posttrain.list_environments()),
                                reason="posttrain-example-environments is not pip-installed (its entry points are not registered)")


def _call(tok, name, **arguments):
    return tok('<tool_call>\n' + json.dumps({"name": name, "arguments": arguments}) + '\n</tool_call><|im_end|>', add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(tools=True)


def test_listed_and_loaded_by_name():
    infos = {i.name: i for i in posttrain.list_environments()}
    assert infos["calculator"].status == "ok" and infos["calculator"].tools == ("add",) and infos["calculator"].has_reward
    assert infos["guess_number"].distribution == "posttrain-example-environments" and infos["guess_number"].tools == ("guess",)
    assert posttrain.load_environment("guess_number") is GuessNumberEnv
    assert posttrain.load_environment("posttrain_example_environments:CalculatorEnv") is CalculatorEnv
    with pytest.raises(ValueError, match=r"^environment 'chess' is not installed \(installed: \[.*'guess_number'"):
        posttrain.load_environment("chess")
    out = subprocess.run([sys.executable, "-m", "posttrain", "list", "--environments"], capture_output=True, text=True, check=True).stdout
    assert "guess_number" in out and "guess (+ get_reward)" in out and "posttrain-example-environments" in out
    listed = json.loads(subprocess.run([sys.executable, "-m", "posttrain", "list", "--environments", "--format", "json"],
                                       capture_output=True, text=True, check=True).stdout)
    assert {"calculator", "guess_number"} <= {e["name"] for e in listed["environments"]}


def test_a_multi_turn_guessing_game_with_feedback(tok):
    turns = [_call(tok, "guess", n=10), _call(tok, "guess", n=15), _call(tok, "guess", n=13), tok("got it<|im_end|>", add_special_tokens=False)["input_ids"]]
    runner = ToolCallingRollout(tok, environment_factory="guess_number", max_tool_calling_iterations=5, max_completion_length=1000)
    rows = [{"prompt": [{"role": "user", "content": "Play."}], "target": 13}, {"prompt": [{"role": "user", "content": "Play."}], "target": 3}]
    result = runner.rollout(ScriptedToolTurns(tok, turns), rows, SamplingParams(max_tokens=100))
    feedback = [[m["content"] for m in c if m["role"] == "tool"] for c in result.completions]
    assert feedback == [["higher", "lower", "correct"], ["lower", "lower", "lower"]]
    assert result.prompts[0][-1]["content"] == "Play. Guess my number between 1 and 20."
    ((name, reward),) = runner.reward_functions()
    assert name == "GuessNumberEnv" and reward(environments=result.environments) == [pytest.approx(0.8), 0.0]
    assert result.rollout.extras["turns"] == [4, 4] and result.rollout.extras["tool_call_count"] == [3, 3]


def test_grpo_trains_with_an_installed_environment_by_name(tok, tmp_path):
    from posttrain.methods.grpo import GRPOConfig, GRPOTrainer

    rows = [{"prompt": [{"role": "user", "content": f"what is {a} + {a + 1}"}], "a": a, "b": a + 1} for a in range(8)]
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=16, max_steps=2,
                      logging_steps=1, save_strategy="no", disable_tqdm=True, report_to="none", max_tool_calling_iterations=2)
    trainer = GRPOTrainer(model=build_model(tok), args=args, train_dataset=rows, processing_class=tok, environment_factory="calculator")
    assert trainer.reward_func_names == ["CalculatorEnv"]
    trainer.train()
    with open(tmp_path / "metrics.jsonl") as fh:
        logged = [json.loads(line) for line in fh if line.strip()]
    assert "rewards/CalculatorEnv/mean" in logged[0] and "tools/call_frequency" in logged[0]
