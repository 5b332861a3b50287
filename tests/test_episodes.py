"""Episodes (rollout contract v2): segments and masks, the multi-turn driver, EpisodeBatch, submit/collect."""

import threading

import pytest
import torch

from posttrain import Episode, EpisodeBatch, Environment, RolloutBatch, RolloutEngine, SamplingParams, Segment, rollout_episodes
from posttrain._ops import selective_log_softmax

PROMPTS = ["the cat sat", "hello world please think step by step", "what is 3 + 4"]

#: As in tests/test_rollout.py: with a float64 model the forward reference agrees with the rollout's logits to ~1e-16,
#: so what is left is the rollout's own float32 rounding of logits of magnitude <= ~10 and a float32 log-softmax over
#: 512 entries: 16 * 10 * eps32 = 1.9e-5 absolute.
LOGP_ATOL = 16 * 10 * torch.finfo(torch.float32).eps


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """The tiny model in float64 (see LOGP_ATOL)."""
    from posttrain.testing.tiny_model import build_model

    return build_model(tiny_tokenizer, dtype=torch.float64)


@pytest.fixture
def prompt_ids(tiny_tokenizer):
    return [tiny_tokenizer(p)["input_ids"] for p in PROMPTS]


@pytest.fixture
def engine(tiny_model, tiny_tokenizer):
    return RolloutEngine("transformers", model=tiny_model, tokenizer=tiny_tokenizer)


class ScriptedTool:
    """Inserts fixed tokens after the first model turn (episode k gets 2 + k % 3 of them), then ends the episode."""

    def __init__(self):
        self.calls = 0

    def step(self, episode):
        self.calls += 1
        models = [s for s in episode.segments if s.source == "model"]
        if len(models) == 1:
            return Segment([7, 8, 9, 10][: 2 + episode.extras["k"] % 3], "inserted", role="tool", name="calc"), None
        return None, "environment"


def _full_forward_logps(model, prompt, completion):
    """Log-probs of ``completion`` in one unpadded forward pass over prompt + completion (temperature 1, no filtering)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[:, len(prompt) - 1 : -1]  # (1, C, V)
    return selective_log_softmax(logits, torch.tensor([completion]))[0]  # (C,)


# ---------------------------------------------------------------------------- a 3-turn episode through the engine
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "seeded-t1"])
def test_three_turn_episode_masks_and_logprobs_match_a_float64_forward_of_the_full_sequence(engine, tiny_model, prompt_ids, greedy):
    base = SamplingParams(max_tokens=8, temperature=0 if greedy else 1.0, seed=None if greedy else 3, n=2, stop_token_ids=(0,))
    # stop tokens: each sample's second free-running token, so every first model turn ends on a stop within 2 tokens
    # (same seed, same stream: the stopped run is a prefix of the free one)
    free = engine.generate(prompt_ids, base)
    stops = tuple(sorted({c[1] for c in free.completion_ids}))
    sampling = SamplingParams(max_tokens=8, temperature=base.temperature, seed=base.seed, n=2, stop_token_ids=stops)
    tool = ScriptedTool()
    batch = rollout_episodes(engine, prompt_ids, sampling, environment=tool, max_turns=2, extras=[{"k": k} for k in range(3)])

    assert len(batch) == 6 and batch.policy_versions == [0] * 6
    assert [ep.prompt_ids for ep in batch] == [p for p in prompt_ids for _ in range(2)]  # grouped prompt0 x n, ...
    assert [ep.extras["k"] for ep in batch] == [0, 0, 1, 1, 2, 2]
    for i, ep in enumerate(batch):
        assert [s.source for s in ep.segments] == ["model", "inserted", "model"], i
        first, tool_seg, second = ep.segments
        assert first.token_ids[-1] in stops and len(first.token_ids) <= 2
        assert tool_seg.token_ids == [7, 8, 9, 10][: 2 + i // 2 % 3] and tool_seg.role == "tool" and tool_seg.logprobs is None
        # the second turn ended on a stop token (the tool was asked again and ended it) or on max_tokens
        assert ep.stop_reason == ("environment" if second.token_ids[-1] in stops else "length")
        assert ep.truncated == (ep.stop_reason == "length")
        # position by position
        ids = ep.completion_ids
        assert ids == first.token_ids + tool_seg.token_ids + second.token_ids
        a, b = len(first.token_ids), len(first.token_ids) + len(tool_seg.token_ids)
        assert ep.model_mask == [1] * a + [0] * (b - a) + [1] * (len(ids) - b)
        assert ep.num_model_tokens == len(ids) - (b - a)
        lps = torch.tensor(ep.sampling_logprobs, dtype=torch.float64)
        assert (lps[a:b] == 0).all()
        ref = _full_forward_logps(tiny_model, ep.prompt_ids, ids)
        model_positions = torch.tensor(ep.model_mask, dtype=torch.bool)
        torch.testing.assert_close(lps[model_positions], ref[model_positions], atol=LOGP_ATOL, rtol=0)
    assert tool.calls == 6 + sum(ep.stop_reason == "environment" for ep in batch)

    # to_tensors: episodes of different lengths, right-padded completions, masks from lengths and sources
    t = batch.to_tensors(pad_token_id=0)
    lengths = [len(ep.completion_ids) for ep in batch]
    assert len(set(lengths)) > 1
    assert t["completion_ids"].shape == t["model_mask"].shape == t["sampling_logprobs"].shape == (6, max(lengths))
    assert t["model_mask"].dtype == t["completion_mask"].dtype == torch.long
    for i, ep in enumerate(batch):
        n = lengths[i]
        assert t["completion_ids"][i, :n].tolist() == ep.completion_ids and (t["completion_ids"][i, n:] == 0).all()
        assert t["completion_mask"][i].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert t["model_mask"][i].tolist() == ep.model_mask + [0] * (max(lengths) - n)
        assert t["sampling_logprobs"][i, :n].tolist() == torch.tensor(ep.sampling_logprobs, dtype=torch.float32).tolist()
        assert t["prompt_mask"][i].sum() == len(ep.prompt_ids) and t["prompt_mask"][i, -1] == 1  # left-padded


def test_single_turn_rollout_episodes_is_generate_to_episodes(engine, prompt_ids):
    sampling = SamplingParams(max_tokens=6, seed=11, n=2)
    episodes = rollout_episodes(engine, prompt_ids, sampling)
    expected = engine.generate(prompt_ids, sampling).to_episodes()
    for ep, ex in zip(episodes, expected, strict=True):
        assert ep.prompt_ids == ex.prompt_ids and ep.stop_reason == ex.stop_reason
        assert ep.completion_ids == ex.completion_ids and ep.sampling_logprobs == ex.sampling_logprobs  # same process, same ops
        assert ep.model_mask == [1] * len(ep.completion_ids)


def test_policy_version_is_recorded_per_sample(engine, tiny_model, prompt_ids):
    sampling = SamplingParams(max_tokens=3, seed=0)
    old = rollout_episodes(engine, prompt_ids[:2], sampling)
    engine.update_weights(tiny_model)
    new = rollout_episodes(engine, prompt_ids[2:], sampling)
    mixed = EpisodeBatch([*old, *new])
    assert mixed.policy_versions == [0, 0, 1]
    assert mixed.to_rollout().policy_versions == [0, 0, 1] and mixed.to_rollout().policy_version == 0
    assert mixed[1:].policy_versions == [0, 1]


# ---------------------------------------------------------------------------- the driver's rules, on a scripted backend
class ScriptedBackend:
    """Every completion is [200, 201, STOP] (cut to max_tokens, then truncated); log-prob -0.5 a token. Records each call."""

    STOP = 1
    policy_version = 0

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, sampling, model_inputs=None):
        self.calls.append(([list(p) for p in prompt_ids], sampling, model_inputs))
        rows = [p for p in prompt_ids for _ in range(sampling.n)]
        full = [200, 201, self.STOP]
        ids = [full[: sampling.max_tokens] for _ in rows]
        return RolloutBatch(rows, ids, [[-0.5] * len(c) for c in ids], [len(full) > sampling.max_tokens] * len(rows), policy_version=self.policy_version)

    def update_weights(self, model):
        self.policy_version += 1


def test_later_turns_continue_the_full_context_and_skip_ended_episodes():
    backend = ScriptedBackend()

    def env(episode):  # episode 0's prompt: always continue; the other prompt: end after the first turn
        return ([50, 51], None) if episode.prompt_ids == [5] else (None, "solved")

    batch = rollout_episodes(backend, [[5], [6, 6]], SamplingParams(max_tokens=4, n=2, seed=9), environment=env, max_turns=3)
    assert [ep.stop_reason for ep in batch] == ["max_turns", "max_turns", "solved", "solved"]
    assert batch[0].completion_ids == [200, 201, 1, 50, 51, 200, 201, 1, 50, 51, 200, 201, 1]
    assert batch[0].completion_ids[-1] == 1  # the tokens the env returned after the last turn are dropped
    assert [s.source for s in batch[0].segments] == ["model", "inserted", "model", "inserted", "model"]
    first, second, third = backend.calls
    assert first[0] == [[5], [6, 6]] and first[1].n == 2 and first[1].seed == 9  # turn 1: the backend groups n, seed as given
    assert second[0] == [[5, 200, 201, 1, 50, 51]] * 2 and second[1].n == 1 and second[1].seed != 9  # only running episodes
    assert third[0] == [[5] + [200, 201, 1, 50, 51] * 2] * 2


def test_token_budgets_end_episodes_with_length():
    backend = ScriptedBackend()
    env = lambda episode: ([60, 61, 62], None)  # noqa: E731
    batch = rollout_episodes(backend, [[5]], SamplingParams(max_tokens=2), environment=env, max_turns=3)
    assert batch[0].stop_reason == "length" and batch[0].completion_ids == [200, 201] and batch[0].truncated
    # max_episode_tokens: 3 model + 3 inserted = 6, so the next turn may write 1 token (asked for max_tokens=1)
    batch = rollout_episodes(backend, [[5]], SamplingParams(max_tokens=3), environment=env, max_turns=3, max_episode_tokens=7)
    assert batch[0].completion_ids == [200, 201, 1, 60, 61, 62, 200] and batch[0].stop_reason == "length"
    assert backend.calls[-1][1].max_tokens == 1
    # inserted tokens past the budget are dropped and end the episode
    batch = rollout_episodes(backend, [[5]], SamplingParams(max_tokens=3), environment=env, max_turns=3, max_episode_tokens=4)
    assert batch[0].completion_ids == [200, 201, 1, 60] and batch[0].model_mask == [1, 1, 1, 0] and batch[0].stop_reason == "length"


def test_an_environment_may_keep_state_in_extras_and_a_weight_update_mid_episode_keeps_the_oldest_version():
    backend = ScriptedBackend()

    class Counter:
        def step(self, episode):
            episode.extras["turns"] = episode.extras.get("turns", 0) + 1
            backend.update_weights(None)  # new weights between turns
            return [70], ("done" if episode.extras["turns"] == 2 else None)

    assert isinstance(Counter(), Environment)
    batch = rollout_episodes(backend, [[5]], SamplingParams(max_tokens=3, n=2), environment=Counter(), max_turns=4, extras=[{"row": 1}])
    assert [ep.extras for ep in batch] == [{"row": 1, "turns": 2}] * 2 and batch[0].extras is not batch[1].extras
    assert batch[0].stop_reason == "done" and batch[0].completion_ids == [200, 201, 1, 70] * 2
    assert batch.policy_versions == [0, 0]  # sampled by versions 0 and 1: staleness counts from the oldest


def test_model_inputs_reach_a_backend_that_takes_them_and_are_refused_by_one_that_does_not():
    pixels = torch.ones(2, 3)
    backend = ScriptedBackend()
    batch = rollout_episodes(backend, [[5], [6]], SamplingParams(max_tokens=3), model_inputs=[{"pixel_values": pixels}, None])
    assert backend.calls[0][2] == [{"pixel_values": pixels}, {}]
    assert batch[0].model_inputs["pixel_values"] is pixels and batch[1].model_inputs == {}

    class TextOnly(ScriptedBackend):
        name = "text-only"

        def generate(self, prompt_ids, sampling):
            return super().generate(prompt_ids, sampling)

    _one_line(
        ValueError,
        r"^generate: the rollout backend 'text-only' takes no model_inputs",
        lambda: rollout_episodes(TextOnly(), [[5]], SamplingParams(max_tokens=2), model_inputs=[{"pixel_values": pixels}]),
    )
    assert len(rollout_episodes(TextOnly(), [[5]], SamplingParams(max_tokens=2), model_inputs=[{}])) == 1  # empty inputs: nothing to refuse


# ---------------------------------------------------------------------------- EpisodeBatch: slices, round trip, validation
def _episode(k, n_model=2, inserted=(), **kw):
    segs = [Segment([10 + k] * n_model, "model", [-0.25] * n_model)]
    if inserted:
        segs.append(Segment(list(inserted), "inserted"))
    return Episode([1, 2, 3][: 1 + k % 3], segs, stop_reason="stop", **kw)


def test_slicing_keeps_extras_and_model_inputs():
    pix = [torch.full((2,), float(k)) for k in range(4)]
    batch = EpisodeBatch([_episode(k, extras={"answer": str(k)}, model_inputs={"pixel_values": pix[k]}, policy_version=k) for k in range(4)])
    for part in (batch[1:3], batch[[3, 0]], batch[torch.tensor([2])], batch[::2]):
        assert isinstance(part, EpisodeBatch)
        for ep in part:
            k = int(ep.extras["answer"])
            assert ep is batch[k] and ep.model_inputs["pixel_values"] is pix[k] and ep.policy_version == k
    assert [ep.extras["answer"] for ep in batch[1:3]] == ["1", "2"] and isinstance(batch[-1], Episode)
    with pytest.raises(TypeError, match="indices must be"):
        batch["a"]


def test_rollout_batch_round_trip():
    rollout = RolloutBatch(
        prompt_ids=[[1, 2], [1, 2], [3]],
        completion_ids=[[5, 6, 2], [7], []],
        logprobs=[[-0.1, -0.2, -0.3], [-1.5], []],
        truncated=[False, True, False],
        policy_version=4,
        extras={"reward_kwargs": {"answer": ["a", "b", "c"]}, "id": [10, 11, 12]},
    )
    assert rollout.policy_versions == [4, 4, 4]  # the 1.x constructor still works; per-sample versions default
    episodes = rollout.to_episodes()
    assert [ep.stop_reason for ep in episodes] == ["stop", "length", "stop"] and [ep.truncated for ep in episodes] == [False, True, False]
    assert [len(ep.segments) for ep in episodes] == [1, 1, 0]
    assert episodes[1].extras == {"reward_kwargs": {"answer": "b"}, "id": 11}
    assert episodes[1:].to_rollout().extras == {"reward_kwargs": {"answer": ["b", "c"]}, "id": [11, 12]}  # micro-batches keep extras
    back = EpisodeBatch.from_rollout(rollout).to_rollout()
    for name in ("prompt_ids", "completion_ids", "logprobs", "truncated", "policy_version", "policy_versions", "extras"):
        assert getattr(back, name) == getattr(rollout, name), name
    # to_tensors: the RolloutBatch's keys and values, plus model_mask
    want, got = rollout.to_tensors(pad_token_id=0), episodes.to_tensors(pad_token_id=0)
    assert set(got) == set(want) | {"model_mask"}
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert torch.equal(got["model_mask"], want["completion_mask"])  # one model segment: every real token is the model's


def test_to_tensors_pads_episodes_of_different_lengths_with_model_mask():
    batch = EpisodeBatch([_episode(0, 1, inserted=(4, 4, 4)), _episode(1, 3)])
    t = batch.to_tensors(pad_token_id=9, device="cpu")
    assert t["completion_ids"].tolist() == [[10, 4, 4, 4], [11, 11, 11, 9]]
    assert t["completion_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert t["model_mask"].tolist() == [[1, 0, 0, 0], [1, 1, 1, 0]]
    assert t["sampling_logprobs"].tolist() == [[-0.25, 0, 0, 0], [-0.25, -0.25, -0.25, 0]]
    assert t["prompt_ids"].tolist() == [[9, 1], [1, 2]] and t["prompt_mask"].tolist() == [[0, 1], [1, 1]]
    with pytest.raises(ValueError, match="the batch is empty"):
        EpisodeBatch().to_tensors(0)


def _one_line(exc_type, match, build):
    with pytest.raises(exc_type, match=match) as err:
        build()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "match, build",
    [
        (r"^Segment: source='tool' is not one of", lambda: Segment([1], "tool")),
        (r"^Segment: token_ids must be a non-empty list", lambda: Segment([], "inserted")),
        (r"^Segment: a 'model' segment has 2 token_ids but 1 logprobs", lambda: Segment([1, 2], "model", [-0.1])),
        (r"^Segment: a 'model' segment needs logprobs", lambda: Segment([1, 2], "model")),
        (r"^Segment: an 'inserted' segment has no sampling log-probs", lambda: Segment([1], "inserted", [0.0])),
        (r"^Segment: logprobs\[1\] is nan", lambda: Segment([1, 2], "model", [-0.1, float("nan")])),
        (r"^Episode.prompt_ids must be a non-empty list", lambda: Episode([])),
        (r"^Episode.segments\[1\] is a dict, not a posttrain.Segment", lambda: Episode([1], [Segment([1], "inserted"), {"token_ids": [2]}])),
        (r"^Episode.stop_reason must be None", lambda: Episode([1], stop_reason=""),),
        (r"^Episode.policy_version must be an integer >= 0", lambda: Episode([1], policy_version=-1)),
        (r"^Episode.extras must be a dict", lambda: Episode([1], extras=[1])),
        (r"^EpisodeBatch: entry 1 is a list", lambda: EpisodeBatch([Episode([1]), [1]])),
        (r"^RolloutBatch: policy_versions has 1 entries but prompt_ids has 2", lambda: RolloutBatch([[1], [1]], [[2], [2]], [[0.0], [0.0]], [False, False], policy_versions=[0])),
        (r"^EpisodeBatch.to_rollout: episode 1 has 2 segments", lambda: EpisodeBatch([_episode(0), _episode(1, inserted=(3,))]).to_rollout()),
        (r"^rollout_episodes: max_turns=2 needs an environment", lambda: rollout_episodes(ScriptedBackend(), [[1]], SamplingParams(max_tokens=2), max_turns=2)),
        (r"^rollout_episodes: max_episode_tokens=0 is invalid", lambda: rollout_episodes(ScriptedBackend(), [[1]], SamplingParams(max_tokens=2), max_episode_tokens=0)),
        (r"^rollout_episodes: extras must be a list of one dict per prompt \(1\)", lambda: rollout_episodes(ScriptedBackend(), [[1]], SamplingParams(max_tokens=2), extras={"a": 1})),
        (r"^rollout_episodes: prompt_ids\[0\] must be a non-empty list", lambda: rollout_episodes(ScriptedBackend(), [[]], SamplingParams(max_tokens=2))),
        (
            r"^rollout_episodes: environment.step returned .* for episode 0 after model turn 1; return a pair",
            lambda: rollout_episodes(ScriptedBackend(), [[1]], SamplingParams(max_tokens=3), environment=lambda ep: [5], max_turns=2),
        ),
        (
            r"^rollout_episodes: environment.step returned .* must have source='inserted'",
            lambda: rollout_episodes(ScriptedBackend(), [[1]], SamplingParams(max_tokens=3), environment=lambda ep: (Segment([1], "model", [0.0]), None), max_turns=2),
        ),
    ],
)
def test_validation_errors_are_one_line_naming_the_field(match, build):
    _one_line(ValueError, match, build)


def test_a_segment_mutated_after_construction_is_named_by_its_index():
    seg = Segment([1, 2], "model", [-0.1, -0.2])
    object.__setattr__(seg, "logprobs", [-0.1])
    _one_line(ValueError, r"^Episode.segments\[1\]: a 'model' segment has 2 token_ids but 1 logprobs", lambda: Episode([1], [Segment([3], "inserted"), seg]))


# ---------------------------------------------------------------------------- submit / collect
def test_submit_three_requests_in_flight_gives_exactly_the_synchronous_results(engine, prompt_ids):
    requests = [(prompt_ids, SamplingParams(max_tokens=5, seed=s, n=2)) for s in (1, 2, 3)]
    expected = [engine.generate(p, s) for p, s in requests]
    with engine:
        futures = [engine.submit(p, s) for p, s in requests]
        got = engine.collect(futures)
        assert engine._executor is not None
    assert engine._executor is None  # the with block shut the worker down
    for a, b in zip(got, expected, strict=True):
        assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs and a.truncated == b.truncated
    assert engine.collect([engine.submit(*requests[0])])[0].completion_ids == expected[0].completion_ids  # a new worker after close
    engine.close()


def test_a_request_that_raises_surfaces_its_exception_from_collect():
    class Flaky(ScriptedBackend):
        def generate(self, prompt_ids, sampling, model_inputs=None):
            if prompt_ids == [[13]]:
                raise RuntimeError("backend exploded on prompt 13")
            return super().generate(prompt_ids, sampling)

    with RolloutEngine(Flaky()) as eng:
        ok, bad, later = (eng.submit(p, SamplingParams(max_tokens=2)) for p in ([[1]], [[13]], [[2]]))
        with pytest.raises(RuntimeError, match="backend exploded on prompt 13"):
            eng.collect([ok, bad, later])
        assert eng.collect([later])[0].prompt_ids == [[2]]  # the worker survives a failed request


def test_a_backend_with_its_own_submit_runs_the_requests():
    from concurrent.futures import Future

    class OwnQueue(ScriptedBackend):
        def __init__(self):
            super().__init__()
            self.threads = []

        def submit(self, prompt_ids, sampling):
            future = Future()

            def run():
                self.threads.append(threading.current_thread().name)
                future.set_result(self.generate(prompt_ids, sampling) if prompt_ids != [[0]] else "not a batch")

            threading.Thread(target=run, name="own-worker").start()
            return future

    backend = OwnQueue()
    engine = RolloutEngine(backend)
    assert engine.collect([engine.submit([[4]], SamplingParams(max_tokens=3))], timeout=30)[0].completion_ids == [[200, 201, 1]]
    assert backend.threads == ["own-worker"] and engine._executor is None
    with pytest.raises(TypeError, match="returned str, expected a posttrain.RolloutBatch"):
        engine.collect([engine.submit([[0]], SamplingParams(max_tokens=3))], timeout=30)
