"""The loop's data order: which rows each process reads, in which micro-batches, and how they reach the device.

:class:`_DataOrder` is a mixin of :class:`posttrain.TrainingLoop`: the seeded, per-process epoch
order (``data_seed``, ``_epoch_indices``), its micro-batches, the :class:`posttrain.PromptSource` an
online method draws prompts from, and ``to_device``. The module functions read rows
(``_rows``, ``_CollatedMicroBatches`` for DataLoader workers) and find an online method's producer.
"""

from __future__ import annotations

import torch

from posttrain._producer import PromptSource, RolloutProducer, epoch_order, rows_at as _rows  # one reader of dataset rows


class _DataOrder:
    """The data order of a :class:`posttrain.TrainingLoop` (reads ``self.args``, ``self.accelerator``)."""

    # ------------------------------------------------------------------ data order
    @property
    def data_seed(self) -> int:
        """The seed of the data order (``args.data_seed``, else ``args.seed``)."""
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _epoch_indices(self, n: int, epoch: int) -> list[int]:
        """Return this process's example indices for ``epoch``: a seeded permutation, strided across processes."""
        return epoch_order(n, epoch, seed=self.data_seed, rank=self.accelerator.process_index, world=self.accelerator.num_processes)

    def prompt_source(self, num_rows: int, prompts_per_step: int) -> PromptSource:
        """A :class:`posttrain.PromptSource` for this process: the loop's data order (seed, rank, world, ``dataloader_drop_last``).

        Args:
            num_rows: Prompt rows in the training dataset.
            prompts_per_step: Prompts per production on this process.
        """
        return PromptSource(num_rows, prompts_per_step, seed=self.data_seed, rank=self.accelerator.process_index,
                            world=self.accelerator.num_processes, drop_last=bool(self.args.dataloader_drop_last))

    def _micro_batches(self, indices: list[int], batch_size: int) -> list[list[int]]:
        batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        if self.args.dataloader_drop_last and batches and len(batches[-1]) < batch_size:
            batches.pop()
        return batches

    def to_device(self, batch: dict) -> dict:
        """Return ``batch`` with its tensors moved to the training device, in nested dicts, lists and tuples too (other values unchanged)."""
        return {k: _to_device(v, self.device) for k, v in batch.items()}


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and any(isinstance(v, (torch.Tensor, dict, list, tuple)) for v in value):
        return type(value)(_to_device(v, device) for v in value) if isinstance(value, list) or type(value) is tuple else value
    return value


class _CollatedMicroBatches:
    """A map-style dataset of collated micro-batches (for DataLoader workers): item ``i`` is ``collate(rows of batches[i])``."""

    def __init__(self, dataset, batches: list[list[int]], collate) -> None:
        self.dataset, self.batches, self.collate = dataset, batches, collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.collate(_rows(self.dataset, self.batches[i]))


def _producer_of(method) -> RolloutProducer | None:
    """The method's ``producer`` attribute (plugin API 1.5), checked; None for a method without one."""
    producer = getattr(method, "producer", None)
    if producer is None:
        return None
    missing = [name for name in ("next_step", "state_dict", "load_state_dict", "steps_per_epoch", "prompts_per_step") if not hasattr(producer, name)]
    if missing:
        raise TypeError(f"{type(method).__name__}.producer is a {type(producer).__name__}, which lacks {missing}: use a posttrain.RolloutProducer.")
    return producer


