"""TRL 1.13's public replay API: ``ReplayBuffer.heap`` as ``(score, data)`` pairs (ties, copies, exact state round trip) and
``GRPOWithReplayBufferTrainer.update_with_replay_buffer`` on padded tensors, checked against values built here by hand."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from grpo_replay_helpers import low_token_fraction

import posttrain


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("grpo_replay", allow_experimental=True)
    yield


def test_heap_holds_score_data_pairs_orders_ties_and_round_trips():
    from posttrain_grpo_replay.trainer import ReplayBuffer

    buffer = ReplayBuffer(max_size=3, seed=5)
    buffer.add([0.5, 0.5, 0.2, 0.5, 0.9], [{"id": i} for i in range(5)])  # equal scores compare by insertion (TRL's tuples raised)
    assert all(len(entry) == 2 for entry in buffer.heap)
    assert sorted((entry[0], entry[1]["id"]) for entry in buffer.heap) == [(0.5, 1), (0.5, 3), (0.9, 4)]  # 0.2, then the oldest 0.5 evicted
    assert buffer.heap[0][0] == min(entry[0] for entry in buffer.heap)
    for other in (copy.deepcopy(buffer), pickle.loads(pickle.dumps(buffer))):
        assert [(e[0], e[1]) for e in other.heap] == [(e[0], e[1]) for e in buffer.heap]
        assert [e.order for e in other.heap] == [e.order for e in buffer.heap]
    restored = ReplayBuffer(max_size=3, seed=123)
    restored.load_state_dict(copy.deepcopy(buffer.state_dict()))
    assert [(e[0], e[1], e.order) for e in restored.heap] == [(e[0], e[1], e.order) for e in buffer.heap]
    assert [d["id"] for d in restored.sample(5)] == [d["id"] for d in buffer.sample(5)]  # same generator state: same draws
    restored.add([0.5], [{"id": 9}]), buffer.add([0.5], [{"id": 9}])
    assert [e.order for e in restored.heap] == [e.order for e in buffer.heap]


def _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, size=4):
    from posttrain_grpo_replay.config import GRPOWithReplayBufferConfig
    from posttrain_grpo_replay.trainer import GRPOWithReplayBufferTrainer

    args = GRPOWithReplayBufferConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=6, num_generations=2, max_completion_length=4,
                                      replay_buffer_size=size, report_to="none", save_strategy="no", gradient_checkpointing=False)
    return GRPOWithReplayBufferTrainer(model=tiny_model, reward_funcs=low_token_fraction, args=args, train_dataset=prompt_dataset,
                                       processing_class=tiny_tokenizer)


def _batch(pad):
    """3 groups of 2: left-padded prompts (group 0 shares one padding column), right-padded completions, old log-probs."""
    prompt_ids = torch.tensor([[pad, 11, 12], [pad, 13, 14], [21, 22, 23], [24, 25, 26], [pad, 31, 32], [33, 34, 35]])
    prompt_mask = (prompt_ids != pad).long()
    completion_ids = torch.tensor([[41, 42, pad], [43, pad, pad], [51, 52, 53], [54, 55, pad], [61, pad, pad], [62, 63, pad]])
    completion_mask = (completion_ids != pad).long()
    old = torch.arange(18, dtype=torch.float64).view(6, 3) * completion_mask
    return prompt_ids, prompt_mask, completion_ids, completion_mask, old


@pytest.mark.parametrize("layout", ["per_group", "trl_columns"])
def test_update_with_replay_buffer_buffers_replaces_and_pads(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path, layout):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path)
    pad = trainer.pad_token_id
    prompt_ids, prompt_mask, completion_ids, completion_mask, old = _batch(pad)
    inputs = [t.clone() for t in (prompt_ids, prompt_mask, completion_ids, completion_mask, old)]
    advantages = torch.tensor([[0.7, -0.7], [0.0, 0.0], [-0.3, 0.3]], dtype=torch.float64)
    stds = torch.tensor([0.5, 0.0, 0.2], dtype=torch.float64)
    std_arg = stds if layout == "per_group" else stds.unsqueeze(0).expand(2, -1)  # TRL's tests: group g's std in column g
    out = trainer.update_with_replay_buffer(advantages, std_arg, prompt_ids, prompt_mask, completion_ids, completion_mask, {}, 99,
                                            old_per_token_logps=old)
    for given, kept in zip((prompt_ids, prompt_mask, completion_ids, completion_mask, old), inputs):
        assert torch.equal(given, kept)  # inputs untouched
    heap = {entry[1]["prompt_ids"][0, -1].item(): entry for entry in trainer.replay_buffer.heap}
    assert sorted(heap) == [12, 32]  # groups 0 and 2 (std > 0); group 1 was not buffered
    g0, g2 = heap[12], heap[32]
    assert g0[0] == pytest.approx(1.4 * 0.5) and g2[0] == pytest.approx(0.6 * 0.2)  # sum_i |A_i| * std
    assert g0[1]["prompt_ids"].tolist() == [[11, 12], [13, 14]]  # the shared left padding column dropped
    assert g0[1]["completion_ids"].tolist() == [[41, 42], [43, pad]] and g0[1]["completion_mask"].tolist() == [[1, 1], [1, 0]]
    assert g0[1]["old_per_token_logps"].tolist() == old[0:2, :2].tolist()
    assert g2[1]["prompt_ids"].tolist() == [[pad, 31, 32], [33, 34, 35]] and g2[1]["advantages"] == [-0.3, 0.3]
    # group 1 now holds one of the buffered groups, padded back to the batch's widths; groups 0 and 2 are unchanged
    assert out["num_items_in_batch"] == 99 and out["advantages"].shape == (3, 2)
    source = 0 if out["prompt_ids"][2, -1].item() == 12 else 2
    item = (g0 if source == 0 else g2)[1]
    width = item["prompt_ids"].shape[1]
    assert out["prompt_ids"][2:4].tolist() == [[pad] * (3 - width) + r for r in item["prompt_ids"].tolist()]
    assert out["prompt_mask"][2:4, : 3 - width].sum() == 0
    assert out["completion_ids"][2:4].tolist() == [r + [pad] * (3 - len(r)) for r in item["completion_ids"].tolist()]
    assert out["old_per_token_logps"][2:4, : item["completion_ids"].shape[1]].tolist() == item["old_per_token_logps"].tolist()
    assert out["advantages"][1].tolist() == item["advantages"]
    for rows, group in ((slice(0, 2), 0), (slice(4, 6), 2)):
        assert torch.equal(out["prompt_ids"][rows], prompt_ids[rows]) and torch.equal(out["completion_ids"][rows], completion_ids[rows])
        assert torch.equal(out["advantages"][group], advantages[group])


def test_update_with_replay_buffer_widens_the_batch_and_returns_none_when_nothing_to_replace(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path):
    trainer = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path)
    pad = trainer.pad_token_id
    prompt_ids, prompt_mask, completion_ids, completion_mask, old = _batch(pad)
    long_item = {"prompt_ids": torch.tensor([[7, 7, 7, 7], [8, 8, 8, 8]]), "prompt_mask": torch.ones(2, 4, dtype=torch.long),
                 "completion_ids": torch.tensor([[9] * 5, [10] * 5]), "completion_mask": torch.ones(2, 5, dtype=torch.long),
                 "advantages": [1.0, -1.0], "old_per_token_logps": torch.full((2, 5), -0.5, dtype=torch.float64)}
    trainer.replay_buffer.add([1.0], [long_item])
    zero = torch.zeros(3, 2, dtype=torch.float64)
    out = trainer.update_with_replay_buffer(zero, torch.zeros(3), prompt_ids, prompt_mask, completion_ids, completion_mask, {}, 7,
                                            old_per_token_logps=old)
    assert len(trainer.replay_buffer) == 1  # nothing buffered (no variance); all 3 groups drawn with replacement from 1 entry
    assert out["prompt_ids"].shape == (6, 4) and out["completion_ids"].shape == (6, 5) and out["old_per_token_logps"].shape == (6, 5)
    assert out["prompt_ids"].tolist() == [[7] * 4, [8] * 4] * 3 and out["completion_mask"].sum() == 30
    assert out["advantages"].tolist() == [[1.0, -1.0]] * 3

    # a batch narrower than the drawn group is padded: prompts on the left, completions (and log-probs) on the right
    trainer2 = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path / "2")
    trainer2.replay_buffer.add([1.0], [long_item])
    mixed = trainer2.update_with_replay_buffer(torch.tensor([[0.0, 0.0], [0.5, -0.5], [0.0, 0.0]]), torch.tensor([0.0, 0.4, 0.0]),
                                               prompt_ids, prompt_mask, completion_ids, completion_mask, {}, 7, old_per_token_logps=old)
    assert mixed["prompt_ids"][2:4].tolist() == [[pad] + r for r in prompt_ids[2:4].tolist()]
    assert mixed["completion_ids"][2:4].tolist() == [r + [pad, pad] for r in completion_ids[2:4].tolist()]
    assert mixed["completion_mask"][2:4].tolist() == [r + [0, 0] for r in completion_mask[2:4].tolist()]
    assert mixed["old_per_token_logps"][2:4, 3:].abs().sum() == 0

    every = torch.tensor([[0.5, -0.5]] * 3)
    assert trainer.update_with_replay_buffer(every, torch.ones(3), prompt_ids, prompt_mask, completion_ids, completion_mask, {}, 7) is None
    off = _trainer(tiny_model, tiny_tokenizer, prompt_dataset, tmp_path / "off", size=0)
    assert off.update_with_replay_buffer(zero, torch.zeros(3), prompt_ids, prompt_mask, completion_ids, completion_mask, {}, 7) is None
    with pytest.raises(posttrain.DataError, match="3 groups of num_generations=2 need 6 rows"):
        trainer.update_with_replay_buffer(zero, torch.zeros(3), prompt_ids[:4], prompt_mask[:4], completion_ids[:4], completion_mask[:4], {}, 7)
