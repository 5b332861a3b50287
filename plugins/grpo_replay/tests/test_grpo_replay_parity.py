"""GRPO-with-replay-buffer parity with TRL 1.13.0's ``trl.experimental.grpo_with_replay_buffer``, from recorded values.

``tests/data/trl_1_13_0_reference.json`` is written by ``plugins/grpo_replay/scripts/make_trl_reference.py``
(TRL 1.13 in a throwaway venv); no TRL 1.13 is needed here. Recorded and compared:

* TRL's ``ReplayBuffer``: which entries survive a sequence of adds (the heap, in heap order) and which
  are drawn after ``torch.manual_seed(s)``: ours draws with its own generator seeded ``s`` (the same CPU
  generator), so the draws are identical, bit for bit (exact equality is by construction here).
* The loss replayed groups are trained with (TRL's GRPO ``_compute_loss``, inherited by the replay
  trainer) on a fixed batch: loss, clip fractions and gradients of every parameter, float64 on both
  sides, to :data:`REL` = 1e-9 relative (measured: ~1e-15; the tolerance of gspo_token's parity test,
  whose docstring gives the argument).

TRL's ``update_with_replay_buffer`` is not compared: TRL 1.13 calls it with per-completion tensors where
it indexes groups (see the script's docstring); ``test_grpo_replay_trainer.py`` checks posttrain's
per-group selection, scores and replacement against an independent computation.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import pathlib

import pytest
import torch

import posttrain

HERE = pathlib.Path(__file__).resolve().parent
REFERENCE = json.loads((HERE / "data" / "trl_1_13_0_reference.json").read_text())
_spec = importlib.util.spec_from_file_location("grpo_replay_make_trl_reference", HERE.parent / "scripts" / "make_trl_reference.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)  # the generator's batch, configs and portable models (imports no trl)

REL = 1e-9


@pytest.fixture(autouse=True)
def _opt_in(clean_gate):
    posttrain.activate("grpo_replay", allow_experimental=True)
    yield


def test_reference_file_is_current():
    assert REFERENCE["versions"]["trl"] == "1.13.0" and REFERENCE["dtype"] == "float64"
    assert sorted(REFERENCE["configs"]) == sorted(gen.CONFIGS)
    for name, record in REFERENCE["configs"].items():
        assert record["overrides"] == gen.CONFIGS[name], f"{name}: regenerate with plugins/grpo_replay/scripts/make_trl_reference.py"
    assert REFERENCE["batch"] == {k: v.tolist() for k, v in gen.fixed_batch().items()}
    assert sorted(REFERENCE["buffer"]) == sorted(str(s) for s in gen.SAMPLE_SEEDS)


@pytest.mark.parametrize("seed", gen.SAMPLE_SEEDS)
def test_replay_buffer_keeps_and_draws_like_trl(seed):
    from posttrain_grpo_replay.trainer import ReplayBuffer

    record = REFERENCE["buffer"][str(seed)]
    buffer = ReplayBuffer(max_size=5, seed=seed)
    buffer.add(gen.BUFFER_ADDS, [{"id": i} for i in range(len(gen.BUFFER_ADDS))])
    assert [entry[0] for entry in buffer.heap] == record["heap_scores"]
    assert [entry[1]["id"] for entry in buffer.heap] == record["heap_ids"]  # (score, data) pairs, as TRL's heap
    assert [d["id"] for d in buffer.sample(3)] == record["sample_3"]
    assert [d["id"] for d in buffer.sample(7)] == record["sample_7"]  # more than it holds: with replacement


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets import Dataset

    from posttrain.testing.tiny_model import build_tokenizer

    posttrain.activate("grpo_replay", allow_experimental=True)
    from posttrain_grpo_replay.config import GRPOWithReplayBufferConfig
    from posttrain_grpo_replay.trainer import GRPOWithReplayBufferTrainer

    tokenizer = build_tokenizer()
    policy = gen.portable_model(tokenizer, gen.SEED_POLICY)
    out = str(tmp_path_factory.mktemp("grpo_replay_parity"))
    args = GRPOWithReplayBufferConfig(output_dir=out, per_device_train_batch_size=gen.B, num_generations=2, max_completion_length=gen.MAX_LEN,
                                      report_to="none", save_strategy="no", gradient_checkpointing=False)
    prompts = Dataset.from_dict({"prompt": ["what is 1 + 2", "hello", "the cat sat on the mat"]})
    trainer = GRPOWithReplayBufferTrainer(model=copy.deepcopy(policy), reward_funcs=gen.low_token_fraction, args=args, train_dataset=prompts,
                                          processing_class=tokenizer)
    return dict(trainer=trainer, policy=policy, out=out, config_cls=GRPOWithReplayBufferConfig)


@pytest.mark.parametrize("case", sorted(gen.CONFIGS))
def test_loss_and_gradients_match_trl_1_13(setup, case):
    record = REFERENCE["configs"][case]
    trainer = setup["trainer"]
    args = setup["config_cls"](output_dir=setup["out"], per_device_train_batch_size=gen.B, num_generations=2, max_completion_length=gen.MAX_LEN,
                               report_to="none", save_strategy="no", gradient_checkpointing=False, **record["overrides"])
    trainer.args = args
    batch = {k: torch.tensor(v) for k, v in REFERENCE["batch"].items()}
    mask = batch["completion_mask"]
    batch["advantages"] = torch.tensor(REFERENCE["advantages"], dtype=torch.float64)
    batch["old_per_token_logps"] = torch.tensor(record["old_per_token_logps"], dtype=torch.float64)
    if record["ref_per_token_logps"] is not None:
        batch["ref_per_token_logps"] = torch.tensor(record["ref_per_token_logps"], dtype=torch.float64)
    tokens = int(mask.sum())
    batch["num_completion_tokens"] = tokens
    n_items = torch.tensor(float(tokens if args.loss_type == "dapo" else gen.B))
    model = trainer.model
    with torch.no_grad():
        for p, q in zip(model.parameters(), setup["policy"].parameters()):
            p.copy_(q)
    model.train()
    model.zero_grad(set_to_none=True)
    loss, metrics = trainer.compute_loss(model, batch, n_items)
    loss.backward()
    print(f"{case}: ours={loss.item():.12f} trl={record['loss']:.12f}")
    assert abs(loss.item() - record["loss"]) <= REL * abs(record["loss"])
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "kl"):
        if name in record["metrics"]:
            assert abs(float(metrics[name]) - record["metrics"][name]) <= REL * max(1.0, abs(record["metrics"][name])), name
    for index, (name, p) in enumerate(model.named_parameters()):
        grad = p.grad.detach().double()
        probe = torch.tensor(gen.portable_values(p.numel(), 7000 + index), dtype=torch.float64).view_as(grad)
        ours = [grad.norm().item(), grad.sum().item(), (grad * probe).sum().item()]
        theirs = record["grads"][name]
        assert theirs[0] > 0, name
        for o, t in zip(ours, theirs):
            assert abs(o - t) / theirs[0] * math.sqrt(p.numel()) < REL, f"{name}: ours {ours} trl {theirs}"
