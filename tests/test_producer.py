"""The producer the loop does not own (plugin API 1.5): prompt sources, reuse, look-ahead, per-rank state.

* ``PromptSource`` cuts the loop's data order into steps and resumes from its position;
* ``RolloutProducer`` reuses a production ``reuse`` times and keeps ``ahead`` productions ready, each
  made from the weights of the step that requested it;
* GRPO run two policy versions ahead trains on rollouts of versions ``max(0, s - 2)`` and resumes
  exactly from a checkpoint (the queued rollouts are in it);
* a 2-process GRPO run resumed mid-reuse (``num_iterations=2``) reproduces the uninterrupted run: every rank gets
  its own rollouts back (before 1.5, every rank got rank 0's).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from posttrain import ProduceRequest, PromptSource, RolloutProducer, epoch_order


# ----------------------------------------------------------------------------------------- prompt source
def test_prompt_source_covers_every_row_once_per_epoch_across_ranks_and_resumes():
    n, per_step, world = 10, 2, 2
    sources = [PromptSource(n, per_step, seed=3, rank=r, world=world) for r in range(world)]
    assert all(s.steps_per_epoch == 3 for s in sources)  # ceil(10 / 2) = 5 rows per rank -> steps of 2, 2, 1
    seen = []
    for source in sources:
        steps = [source.next_indices() for _ in range(3)]
        assert [epoch for epoch, _ in steps] == [0, 0, 0] and [len(i) for _, i in steps] == [2, 2, 1]
        seen += [i for _, idx in steps for i in idx]
        assert source.epoch == 1 and source.step_in_epoch == 0  # wrapped into the next epoch
    assert sorted(seen) == list(range(n))  # n divisible by world: no padding row repeats
    assert [i for _, idx in [PromptSource(n, per_step, seed=3, rank=1, world=world).next_indices()] for i in idx] == epoch_order(n, 0, seed=3, rank=1, world=world)[:2]
    a = PromptSource(n, per_step, seed=3, rank=1, world=world)
    a.next_indices()
    b = PromptSource(n, per_step, seed=3, rank=1, world=world)
    b.load_state_dict(a.state_dict())
    assert [a.next_indices() for _ in range(5)] == [b.next_indices() for _ in range(5)]  # across the epoch boundary too
    with pytest.raises(ValueError, match="saved with rank=1 but this run has rank=0"):
        PromptSource(n, per_step, seed=3, rank=0, world=world).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="leave no full step"):
        PromptSource(3, 4, seed=0, drop_last=True)


# ----------------------------------------------------------------------------------------- producer
def _counting_producer(reuse=1, ahead=0, n=12, per_step=2):
    made = []

    def produce(request: ProduceRequest):
        made.append(request)
        return [{"indices": torch.tensor(request.indices), "version": torch.tensor(request.policy_version)}]

    producer = RolloutProducer(PromptSource(n, per_step, seed=0), list(range(n)), produce, reuse=reuse, ahead=ahead)
    return producer, made


def test_producer_reuses_each_production_and_counts_an_epoch_as_steps_times_reuse():
    producer, made = _counting_producer(reuse=2)
    assert producer.steps_per_epoch == 6 * 2
    state = SimpleNamespace(global_step=0)
    got = []
    for step in range(4):
        state.global_step = step
        got.append(producer.next_step(state)[0]["indices"].tolist())
    assert got[0] == got[1] and got[2] == got[3] and got[0] != got[2]  # each production trained on twice, no prompts skipped
    assert [r.step for r in made] == [0, 2] and [r.policy_version for r in made] == [0, 2]
    assert made[1].indices == epoch_order(12, 0, seed=0)[2:4]


def test_producer_two_versions_ahead_and_its_state_resumes_exactly():
    producer, made = _counting_producer(ahead=2)
    state = SimpleNamespace(global_step=0)
    versions, saved = [], None
    for step in range(7):
        state.global_step = step
        batch = producer.next_step(state)[0]
        versions.append(int(batch["version"]))
        assert producer.last_policy_version == versions[-1]
        assert len(producer.queued_policy_versions()) == 2  # two productions ready in front of the trainer
        if step == 3:
            saved = producer.state_dict()
            rest = [producer.next_step(SimpleNamespace(global_step=s))[0]["indices"].tolist() for s in range(4, 7)]
            break
    assert versions == [0, 0, 0, 1]  # step s trains on a rollout of version max(0, s - 2)
    again, _ = _counting_producer(ahead=2)
    again.load_state_dict(saved)
    assert [again.next_step(SimpleNamespace(global_step=s))[0]["indices"].tolist() for s in range(4, 7)] == rest
    with pytest.raises(ValueError, match="reuse=1"):
        _counting_producer(reuse=2)[0].load_state_dict(saved)
    with pytest.raises(ValueError, match="ahead=-1"):
        RolloutProducer(PromptSource(4, 2, seed=0), [0] * 4, lambda r: [{}], ahead=-1)


# ----------------------------------------------------------------------------------------- GRPO ahead, in process
def _grpo(tiny_model_dir, out, **kw):
    pytest.importorskip("posttrain_grpo")
    from posttrain.methods.grpo import GRPOConfig, GRPOTrainer
    from posttrain.testing.rewards import digit_fraction_reward

    rows = [{"prompt": f"what is {a} + {a % 7}"} for a in range(16)]
    args = GRPOConfig(output_dir=out, num_generations=4, per_device_train_batch_size=8, max_completion_length=6, learning_rate=5e-2,
                      logging_steps=1, disable_tqdm=True, report_to="none", use_cpu=True, seed=5, gradient_checkpointing=False,
                      model_init_kwargs={"dtype": "float64"}, **kw)
    return GRPOTrainer(model=tiny_model_dir, reward_funcs=digit_fraction_reward, args=args, train_dataset=rows)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return {row["step"]: row["loss"] for row in map(json.loads, filter(str.strip, fh)) if "loss" in row}


def test_grpo_two_policy_versions_ahead_trains_on_older_rollouts_and_resumes_exactly(tiny_model_dir, tmp_path):
    from transformers import TrainerCallback

    class Versions(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.seen = trainer, []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append(self.trainer.producer.last_policy_version)

    def run(out, **kw):
        trainer = _grpo(tiny_model_dir, out, max_steps=6, save_strategy="steps", save_steps=3, **kw)
        trainer.producer.ahead = 2
        sampled = []  # the version the engine sampled each production with
        generate = trainer.engine.generate
        trainer.engine.generate = lambda *a, **k: (lambda batch: sampled.append(batch.policy_version) or batch)(generate(*a, **k))
        versions = Versions(trainer)
        trainer.add_callback(versions)
        trainer.train(**kw.get("train", {}))
        return trainer, versions.seen, sampled

    full = str(tmp_path / "full")
    trainer, seen, sampled = run(full)
    assert seen == [0, 0, 0, 1, 2, 3]  # step s (1-based s+1) trains on version max(0, s - 2)
    assert sampled == [0, 0, 0, 1, 2, 3, 4, 5][: len(sampled)] and len(sampled) == 8  # two more were made ahead of the end
    assert sorted(os.listdir(os.path.join(full, "checkpoint-3"))).count("producer_state_0.pt") == 1

    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    trainer2 = _grpo(tiny_model_dir, resumed, max_steps=6, save_strategy="no")
    trainer2.producer.ahead = 2
    versions = Versions(trainer2)
    trainer2.add_callback(versions)
    trainer2.train(resume_from_checkpoint=True)
    assert versions.seen == [1, 2, 3]  # the queued rollouts of versions 1 and 2 came back from the checkpoint
    expected, got = _losses(full), _losses(resumed)
    assert {s: expected[s] for s in (4, 5, 6)} == got  # bit-identical: the same ops on the same samples in one process
    a, b = trainer.loop.unwrapped_model().state_dict(), trainer2.loop.unwrapped_model().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------- 2 processes, per-rank state
def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


@pytest.mark.distributed
def test_two_process_grpo_resumed_mid_reuse_gives_every_rank_its_own_rollouts(tiny_model_dir, tmp_path):
    """Before plugin API 1.5 the main process saved its rollout buffer and every rank loaded it: resumed at step 1 of a
    num_iterations=2 rollout, rank 1 trained step 2 on rank 0's completions and the run diverged (a -0.0496 vs -0.0455 loss)."""
    pytest.importorskip("posttrain_grpo")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

    def run(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
               "-m", "posttrain", "train", "grpo", "--config", os.path.join(root, "examples", "grpo.yaml"),
               "--model_name_or_path", tiny_model_dir, "--dataset_name", os.path.join(root, "examples", "data", "prompts_arith.jsonl"),
               "--output_dir", out, "--max_steps", "4", "--num_iterations", "2", "--per_device_train_batch_size", "8",
               "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "10", "--logging_steps", "1",
               "--model_init_kwargs", '{"dtype": "float64"}', *extra]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    run(full)
    names = set(os.listdir(os.path.join(full, "checkpoint-1")))
    assert {"producer_state_0.pt", "producer_state_1.pt"} <= names
    queues = [torch.load(os.path.join(full, "checkpoint-1", f"producer_state_{r}.pt"), weights_only=True)["queue"] for r in (0, 1)]
    assert len(queues[0]) == len(queues[1]) == 1  # mid-reuse: each rank holds one production, used once
    assert not torch.equal(queues[0][0]["batches"][0]["completion_ids"], queues[1][0]["batches"][0]["completion_ids"])  # and they differ
    os.makedirs(resumed)
    shutil.copytree(os.path.join(full, "checkpoint-1"), os.path.join(resumed, "checkpoint-1"))
    run(resumed, "--resume_from_checkpoint", "true")
    expected, got = _losses(full), _losses(resumed)
    assert sorted(got) == [2, 3, 4]
    # two processes reduce in one fixed order: the resumed run repeats the same float64 ops on the same samples
    assert got == pytest.approx({s: expected[s] for s in (2, 3, 4)}, rel=1e-12, abs=1e-15)
