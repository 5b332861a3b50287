"""The method contract: what a method object gives :class:`posttrain.TrainingLoop` (*contract*, plugin API 1.1).

A plugin's trainer is (or holds) one object with the members below. The loop checks it once, when
the trainer calls ``loop.setup(model, method=self)`` (and again at ``train()`` if it did not), with
:func:`check_method`: a missing or mis-typed member is a :class:`MethodContractError` naming the
plugin, the member, what was found and the fix, before any step runs.

Light module: no torch import, so ``posttrain`` stays fast to import.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable, Protocol, runtime_checkable

__all__ = ["MethodProtocol", "OptionalMethodMembers", "MethodContractError", "check_method", "REQUIRED_MEMBERS", "OPTIONAL_MEMBERS"]


@runtime_checkable
class MethodProtocol(Protocol):
    """The members every method object must have (checked by :func:`check_method`).

    Attributes:
        train_dataset: The processed training examples: anything with ``len()`` and integer
            indexing (a list of dicts, a ``datasets.Dataset``, ...).
    """

    train_dataset: Any

    def collate(self, examples: list) -> dict:
        """Return a batch of CPU tensors (and plain values) for ``examples``; the loop moves tensors to the device."""
        ...

    def count_items(self, batch: dict) -> int:
        """Return the batch's number of loss items (tokens for a token-level loss, sequences for a sequence-level one).

        Computed on the CPU, before the batch moves: it is summed over the optimizer step and
        over processes to give ``num_items_in_batch``.
        """
        ...

    def compute_loss(self, model: Any, batch: dict, num_items_in_batch: Any) -> tuple[Any, dict]:
        """Return ``(loss, metrics)`` for one micro-batch.

        ``loss`` is the micro-batch's SUM of per-item losses divided by ``num_items_in_batch``
        (the items of the whole optimizer step: every micro-batch, every process); that is what
        makes per-device batch 8 x accumulation 1 equal 1 x 8, and 2 processes equal 1.
        ``metrics`` maps names to scalar tensors (means over the micro-batch); they are averaged
        over the logging window without a host sync per micro-batch.
        """
        ...


class OptionalMethodMembers(Protocol):
    """Members a method object may have; each is checked (callable, arity) when present.

    Attributes:
        eval_dataset: Processed evaluation examples, or a dict ``name -> examples`` (metrics
            ``eval_<name>_<metric>``); scored at ``eval_steps``, at the end and by ``evaluate()``.
        supports_encoder_decoder: True when the method trains encoder-decoder models
            (``model.config.is_encoder_decoder``, e.g. T5); without it ``TrainingLoop.setup``
            refuses such a model in one line naming its class (plugin API 1.4).
    """

    eval_dataset: Any
    supports_encoder_decoder: bool

    def prepare_step(self, micro_batches: list[dict], state: Any) -> list[dict]:
        """Turn one optimizer step's collated micro-batches into the loss micro-batches (online methods generate here)."""
        ...

    def on_step_end(self, model: Any, state: Any) -> None:
        """Run after each optimizer step (reference sync, rollout weight update)."""
        ...

    def state_dict(self) -> dict:
        """Return the method's own resumable state (tensors, numbers, strings, lists, dicts: loaded with ``weights_only=True``)."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...

    def evaluate_batches(self, model: Any, batches: Iterable[dict]) -> dict:
        """Replace the default evaluation (item-weighted mean of ``compute_loss``) for this process's batches.

        Return metric names without the ``eval_`` prefix (the loop adds it); reduce across
        processes yourself when the numbers are per process.
        """
        ...

    def eval_predictions(self, model: Any, batch: dict) -> tuple[Any, Any]:
        """Return ``(predictions, label_ids)`` tensors of one eval batch, for a user's ``compute_metrics`` (rows first)."""
        ...

    def process_dataset(self, dataset: Any, name: str) -> Any:
        """Return a raw dataset processed like the trainer's own (used by ``trainer.evaluate(eval_dataset=...)``)."""
        ...


#: member -> number of positional arguments after ``self``
REQUIRED_MEMBERS = {"collate": 1, "count_items": 1, "compute_loss": 3}
OPTIONAL_MEMBERS = {"prepare_step": 2, "on_step_end": 2, "state_dict": 0, "load_state_dict": 1, "evaluate_batches": 2, "eval_predictions": 2, "process_dataset": 2}


class MethodContractError(TypeError):
    """A method object does not satisfy :class:`MethodProtocol`; the message names the plugin, the member and the fix."""


def _accepts(func: Any, n: int) -> str | None:
    """Return None when ``func`` can be called with ``n`` positional arguments, else the signature found."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # builtins without a signature: trust them
        return None
    try:
        signature.bind(*range(n))
    except TypeError:
        return str(signature)
    return None


def check_method(method: Any, *, plugin: str = "?") -> None:
    """Raise :class:`MethodContractError` unless ``method`` satisfies :class:`MethodProtocol`.

    Args:
        method: The method object (usually the trainer itself).
        plugin: The method id, for the message.

    Raises:
        MethodContractError: a required member is missing, a member is not callable, or it
            cannot take the arguments the loop passes.
    """
    kind = type(method).__name__
    if not hasattr(method, "train_dataset"):
        raise MethodContractError(
            f"method {plugin!r} ({kind}) has no 'train_dataset': set self.train_dataset to the processed examples "
            "(a list or datasets.Dataset) before calling loop.setup(model, method=self). See posttrain.MethodProtocol."
        )
    for members, required in ((REQUIRED_MEMBERS, True), (OPTIONAL_MEMBERS, False)):
        for name, nargs in members.items():
            member = getattr(method, name, None)
            if member is None:
                if required:
                    raise MethodContractError(
                        f"method {plugin!r} ({kind}) has no '{name}': define {kind}.{name}(self, "
                        f"{', '.join(['examples'] if name == 'collate' else ['batch'] if name == 'count_items' else ['model', 'batch', 'num_items_in_batch'])}). "
                        "See posttrain.MethodProtocol."
                    )
                continue
            if not callable(member):
                raise MethodContractError(f"method {plugin!r} ({kind}).{name} is a {type(member).__name__}, not a method: define it as a method (see posttrain.MethodProtocol).")
            found = _accepts(member, nargs)
            if found is not None:
                raise MethodContractError(
                    f"method {plugin!r} ({kind}).{name}{found} cannot be called with the {nargs} argument(s) the loop passes: "
                    f"give it the signature of posttrain.{'MethodProtocol' if required else 'OptionalMethodMembers'}.{name}."
                )
