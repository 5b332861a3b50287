"""A minimal real method for testing the core loop: next-token NLL on pre-tokenized sequences.

It is deliberately tiny (no chat templates, no packing): the core's tests use it to check the loop
shell (gradient accumulation, resume, checkpoints, multi-process) independently of any plugin.
Register it in a test with ``register_method(TOY_SPEC)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain._spec import MethodSpec
from posttrain.config import TrainingConfig

__all__ = ["TOY_SPEC", "ToyConfig", "ToyLMTrainer", "toy_sequences"]

TOY_SPEC = MethodSpec(
    name="toy_lm",
    maturity="stable",
    plugin_api="1.0",
    summary="Next-token NLL on token-id sequences (core test method).",
    family="sft",
    trainer="posttrain.testing._toy:ToyLMTrainer",
    config="posttrain.testing._toy:ToyConfig",
)


@dataclass(kw_only=True)
class ToyConfig(TrainingConfig):
    """Config of the toy method."""

    logging_steps: int = field(default=1, metadata={"help": "Log every step."})
    report_to: list[str] | str = field(default="none", metadata={"help": "Trackers."})


def toy_sequences(n: int = 32, vocab: int = 500, seed: int = 0, min_len: int = 3, max_len: int = 17) -> list[dict]:
    """Return ``n`` rows ``{"input_ids": [...]}`` of uneven lengths (seeded)."""
    import random

    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))]} for _ in range(n)]


class ToyLMTrainer:
    """Train a causal LM with token-level NLL on ``{"input_ids"}`` rows through the core loop."""

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None, allow_experimental=False):
        from posttrain._loop import TrainingLoop

        self.args = args or ToyConfig()
        self.loop = TrainingLoop(self.args, method="toy_lm", allow_experimental=allow_experimental)
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        self.train_dataset = list(train_dataset or [])
        self.eval_dataset = list(eval_dataset) if eval_dataset is not None else None
        self.pad_id = self.processing_class.pad_token_id
        self.loop.setup(self.model)

    def collate(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask, "num_tokens": int(mask.sum())}

    def count_items(self, batch: dict) -> int:
        return int(batch["attention_mask"][:, 1:].sum())

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        import torch.nn.functional as F

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)  # (B, T-1)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        return nll / num_items_in_batch, {}

    def train(self):
        return self.loop.train(self)
