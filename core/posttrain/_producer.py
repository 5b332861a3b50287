"""Prompt sources and rollout producers: online methods' data, generated outside the training loop's data drawing.

An online method (GRPO, RLOO, on-policy distillation, PPO, ...) does not train on dataset rows: it
trains on what its policy does with them. In plugin API 1.5 that work has its own owner:

* a :class:`PromptSource` decides which prompt rows each step uses (a seeded permutation per epoch,
  strided across processes, cut into steps) and remembers where it is;
* a :class:`RolloutProducer` turns the source's prompts into ready training steps (a list of loss
  micro-batches) by calling the method's ``produce`` function, reuses each production
  ``reuse`` times (GRPO's ``num_iterations``) and may run ``ahead`` steps in front of the trainer;
* the :class:`~posttrain.TrainingLoop` only consumes ready steps (``producer.next_step(state)``),
  when the method exposes a ``producer`` attribute.

The producer's whole state (the source's position and every produced step not yet consumed) is
checkpointed **per process** (``producer_state_<rank>.pt``): each rank draws other prompts and
generates other rollouts, so a resumed run trains every rank on exactly the samples the
uninterrupted run would have used.

Synchronous mode (``ahead=0``, the default) produces just in time, when the trainer asks for the
step, from the weights of that step. ``ahead=k`` keeps ``k`` more steps produced in front of the
trainer: the rollout consumed at step ``s`` then comes from policy version ``max(0, s - k)`` (with
``reuse=1``), and the method sees the version of each request in :attr:`ProduceRequest.policy_version`.
It is the mechanism asynchronous GRPO builds on (workers that produce while the trainer trains);
here production still runs on the trainer's thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["epoch_order", "PromptSource", "ProduceRequest", "RolloutProducer"]


def epoch_order(num_rows: int, epoch: int, *, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Return process ``rank``'s row indices for ``epoch``: a seeded permutation, padded and strided across processes.

    The training loop orders offline data the same way, so an online method's prompts follow the
    order its offline counterpart would use.

    Args:
        num_rows: Rows in the dataset (>= 1).
        epoch: The epoch (0-based); the permutation is seeded with ``seed + epoch``.
        seed: The data seed (``args.data_seed`` or ``args.seed``).
        rank: This process's index.
        world: The number of processes; every process gets ``ceil(num_rows / world)`` rows (the
            permutation's head repeats to fill the last stride).

    Returns:
        The indices, in order.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    perm = torch.randperm(num_rows, generator=generator).tolist()
    if world > 1:
        total = math.ceil(num_rows / world) * world
        perm = perm + perm[: total - num_rows]  # pad so every process gets the same number of rows
        perm = perm[rank::world]
    return perm


class PromptSource:
    """Which prompt rows each step uses: :func:`epoch_order` cut into steps of ``prompts_per_step``, with its position.

    Args:
        num_rows: Prompt rows in the training dataset (>= 1).
        prompts_per_step: Prompts per production on this process (>= 1).
        seed: The data seed.
        rank: This process's index.
        world: The number of processes.
        drop_last: Drop an epoch's last, shorter step (``dataloader_drop_last``).

    Raises:
        ValueError: A count is not a positive integer, or ``drop_last`` leaves no step.
    """

    def __init__(self, num_rows: int, prompts_per_step: int, *, seed: int, rank: int = 0, world: int = 1, drop_last: bool = False):
        for name, value in (("num_rows", num_rows), ("prompts_per_step", prompts_per_step), ("world", world)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PromptSource: {name}={value!r} must be a positive integer.")
        if not 0 <= rank < world:
            raise ValueError(f"PromptSource: rank={rank!r} must be in [0, world={world}).")
        self.num_rows, self.prompts_per_step = num_rows, prompts_per_step
        self.seed, self.rank, self.world, self.drop_last = int(seed), rank, world, drop_last
        per_rank = math.ceil(num_rows / world)
        self.steps_per_epoch = per_rank // prompts_per_step if drop_last else math.ceil(per_rank / prompts_per_step)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"PromptSource: {per_rank} prompt rows per process and dataloader_drop_last=True leave no full step of "
                f"{prompts_per_step} prompts; add rows or lower the batch size."
            )
        self.epoch = 0
        self.step_in_epoch = 0
        self._order: list[int] | None = None
        self._order_epoch = -1

    def _epoch_steps(self) -> list[list[int]]:
        if self._order is None or self._order_epoch != self.epoch:
            self._order = epoch_order(self.num_rows, self.epoch, seed=self.seed, rank=self.rank, world=self.world)
            self._order_epoch = self.epoch
        size = self.prompts_per_step
        return [self._order[i : i + size] for i in range(0, len(self._order), size)][: self.steps_per_epoch]

    def next_indices(self) -> tuple[int, list[int]]:
        """Return ``(epoch, indices)`` of the next step and advance (into the next epoch after its last step)."""
        epoch, indices = self.epoch, self._epoch_steps()[self.step_in_epoch]
        self.step_in_epoch += 1
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return epoch, indices

    def seek(self, epoch: int, step_in_epoch: int) -> None:
        """Place the source at step ``step_in_epoch`` of ``epoch`` (clamped into the epoch)."""
        self.epoch, self.step_in_epoch = int(epoch), max(0, int(step_in_epoch))
        if self.step_in_epoch >= self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """The position and what it depends on (checked by :meth:`load_state_dict`)."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "num_rows": self.num_rows,
                "prompts_per_step": self.prompts_per_step, "rank": self.rank, "world": self.world}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position saved by :meth:`state_dict`.

        Raises:
            ValueError: The state was saved for another dataset size, step size, rank or world size
                (the message names the field): resuming it would train on other prompts.
        """
        for key in ("num_rows", "prompts_per_step", "rank", "world"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"PromptSource: the checkpoint was saved with {key}={state[key]} but this run has {key}={getattr(self, key)}; "
                    "resume with the same dataset, batch size and number of processes, or start a new run."
                )
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])


@dataclass(frozen=True)
class ProduceRequest:
    """What a producer asks the method's ``produce`` function to make: one training step from these prompts.

    Attributes:
        rows: The prompt rows (dataset rows, in the source's order).
        indices: Their indices in the training dataset.
        step: The global step that will first consume the result (seeds derived from it make the
            production independent of when it runs).
        epoch: The source epoch of the prompts.
        rank: This process's index.
        policy_version: The number of optimizer steps the weights had taken when the request was made
            (``state.global_step`` at production): the version every sample of it is generated with.
    """

    rows: list
    indices: list[int]
    step: int
    epoch: int
    rank: int
    policy_version: int


class RolloutProducer:
    """Turns a :class:`PromptSource`'s prompts into ready training steps; the training loop consumes them.

    Args:
        source: The prompt source (its position is part of this producer's state).
        dataset: The processed training rows (indexable).
        produce: ``produce(request: ProduceRequest) -> list[dict]``: the loss micro-batches of one
            step (the method generates, scores and tensorizes here). Tensors, numbers, strings, lists
            and dicts only: they are checkpointed with ``weights_only=True``.
        reuse: Optimizer steps trained on each production (GRPO's ``num_iterations``; >= 1). An epoch is
            ``source.steps_per_epoch * reuse`` optimizer steps, as in TRL (its sampler repeats each
            batch of prompts ``num_iterations`` times).
        ahead: Productions kept ready in front of the trainer (0 = just in time; >= 0).

    Raises:
        ValueError: ``reuse`` < 1 or ``ahead`` < 0.
    """

    def __init__(self, source: PromptSource, dataset: Any, produce: Callable[[ProduceRequest], list[dict]], *, reuse: int = 1, ahead: int = 0):
        if not isinstance(reuse, int) or isinstance(reuse, bool) or reuse < 1:
            raise ValueError(f"RolloutProducer: reuse={reuse!r} must be an integer >= 1 (optimizer steps per production).")
        if not isinstance(ahead, int) or isinstance(ahead, bool) or ahead < 0:
            raise ValueError(f"RolloutProducer: ahead={ahead!r} must be an integer >= 0 (productions kept ready; 0 = just in time).")
        self.source, self.dataset, self.produce = source, dataset, produce
        self.reuse, self.ahead = reuse, ahead
        self._queue: list[dict] = []  # productions not yet used up: {"batches", "uses", "step", "policy_version", "epoch"}
        self._next_step = 0  # the global step the next production is for
        self.last_policy_version: int | None = None  # the version of the step last returned (for logging)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch of prompts (``source.steps_per_epoch * reuse``)."""
        return self.source.steps_per_epoch * self.reuse

    @property
    def prompts_per_step(self) -> int:
        """Prompts per production on this process."""
        return self.source.prompts_per_step

    def seek(self, global_step: int, epoch: int, step_in_epoch: int) -> None:
        """Drop what is queued and produce next for ``global_step``, from step ``step_in_epoch`` of ``epoch``.

        Used when a run resumes without this producer's saved state (a checkpoint of plugin API <= 1.4).
        A step in the middle of a production's reuse regenerates that production.
        """
        self._queue.clear()
        self.source.seek(epoch, step_in_epoch // self.reuse)
        self._next_step = int(global_step)

    def _fill(self, state: Any, want: int) -> None:
        while len(self._queue) < want:
            epoch, indices = self.source.next_indices()
            request = ProduceRequest(
                rows=_rows(self.dataset, indices), indices=list(indices), step=self._next_step, epoch=epoch,
                rank=self.source.rank, policy_version=int(getattr(state, "global_step", 0)),
            )
            batches = self.produce(request)
            if not isinstance(batches, list) or not batches or not all(isinstance(b, dict) for b in batches):
                raise TypeError(f"RolloutProducer: produce() must return a non-empty list of micro-batch dicts, got {type(batches).__name__}.")
            self._queue.append({"batches": batches, "uses": 0, "step": request.step, "policy_version": request.policy_version, "epoch": epoch})
            self._next_step += self.reuse

    def next_step(self, state: Any) -> list[dict]:
        """Return the micro-batches of the trainer's next optimizer step (producing as needed).

        Args:
            state: The loop's training state (``global_step`` is the version of the current weights).
        """
        self._fill(state, 1)
        head = self._queue[0]
        head["uses"] += 1
        self.last_policy_version = head["policy_version"]
        batches = head["batches"]
        if head["uses"] >= self.reuse:
            self._queue.pop(0)
        if self.ahead:  # keep `ahead` productions ready in front of the trainer, made with the current weights
            self._fill(state, self.ahead + (1 if self._queue and self._queue[0] is head else 0))
        return batches

    def queued_policy_versions(self) -> list[int]:
        """The policy version of every production queued, oldest first (what ``ahead`` holds)."""
        return [entry["policy_version"] for entry in self._queue]

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: the source's position and every queued production."""
        return {"source": self.source.state_dict(), "queue": list(self._queue), "next_step": self._next_step,
                "reuse": self.reuse, "ahead": self.ahead}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s result (of this process's rank).

        Raises:
            ValueError: The state was saved with another ``reuse`` (the productions would be trained on
                another number of times), or by another rank / world size (see :meth:`PromptSource.load_state_dict`).
        """
        if int(state.get("reuse", self.reuse)) != self.reuse:
            raise ValueError(f"RolloutProducer: the checkpoint was saved with reuse={state['reuse']} (num_iterations) but this run has {self.reuse}; resume with the same setting.")
        self.source.load_state_dict(state["source"])
        self._queue = [dict(entry) for entry in state["queue"]]
        self._next_step = int(state["next_step"])


def rows_at(dataset: Any, indices: list[int]) -> list:
    """The rows at ``indices``; a ``datasets.Dataset`` reads them in one call (~4x faster than one by one)."""
    getitems = getattr(dataset, "__getitems__", None)
    return list(getitems(list(indices))) if callable(getitems) else [dataset[i] for i in indices]


def _rows(dataset: Any, indices: list[int]) -> list:
    """Copies of the rows at ``indices``: a method may change the rows it is given without touching the dataset."""
    return [dict(row) if isinstance(row, dict) else row for row in rows_at(dataset, indices)]
