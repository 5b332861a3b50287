"""SFT with input token dropout on the core training loop (heavy: imports torch).

Each input token is replaced, with probability ``token_dropout``, by the tokenizer's unknown (or
pad) token before the forward pass; the labels keep the original tokens. This is the "word
dropout" regulariser of Bowman et al. (2016) applied to causal-LM fine-tuning. The dropout mask
is drawn from a generator seeded by ``seed`` and the batch's content, so a resumed run draws the
same masks as an uninterrupted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain import TrainerSurface, TrainingLoop, as_config

from posttrain_example_method.config import TokenDropoutSFTConfig

__all__ = ["TokenDropoutSFTTrainer", "apply_token_dropout"]


def apply_token_dropout(input_ids: torch.Tensor, p: float, replacement_id: int, generator: torch.Generator) -> torch.Tensor:
    """Return a copy of ``input_ids`` (B, T) with each token replaced by ``replacement_id`` with probability ``p``."""
    if p <= 0.0:
        return input_ids.clone()
    drop = torch.rand(input_ids.shape, generator=generator) < p  # (B, T)
    drop[:, 0] = False  # keep the first token: the model needs some context to start from
    return input_ids.masked_fill(drop, replacement_id)


class TokenDropoutSFTTrainer(TrainerSurface):
    """Fine-tune a causal LM on a ``text`` column with input token dropout.

    Args:
        model: A model or a Hub id / local directory.
        args: A :class:`TokenDropoutSFTConfig`.
        train_dataset: Rows with ``args.dataset_text_field``.
        eval_dataset: Optional rows of the same shape.
        processing_class: The tokenizer (loaded with the model when omitted).
        peft_config: Optional PEFT config.
        allow_experimental: Python opt-in for this experimental method.

    Raises:
        posttrain.MethodNotAllowedError: constructed without an opt-in (the gate runs in TrainingLoop).
    """

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None,
                 callbacks=None, allow_experimental=False):
        self.args = as_config(args, TokenDropoutSFTConfig)
        # The maturity gate: TrainingLoop calls posttrain.ensure_activated("example_method", ...).
        self.loop = TrainingLoop(self.args, method="example_method", allow_experimental=allow_experimental, callbacks=callbacks)
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        tok = self.processing_class
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.replacement_id = tok.unk_token_id if tok.unk_token_id is not None else self.pad_id
        self.train_dataset = self.process_dataset(train_dataset or [], "train_dataset")
        self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)  # checks this object against posttrain.MethodProtocol

    # train(), evaluate(), save_model(), state, callbacks: posttrain.TrainerSurface, delegated to self.loop.

    def process_dataset(self, rows, name: str) -> list[dict]:
        """Tokenize ``rows`` (also used by ``evaluate(eval_dataset=...)``)."""
        field = self.args.dataset_text_field
        out = []
        for row in rows:
            ids = self.processing_class(row[field], truncation=True, max_length=self.args.max_length)["input_ids"]
            if len(ids) >= 2:
                out.append({"input_ids": list(ids)})
        return out

    def collate(self, rows: list[dict]) -> dict:
        longest = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (B, T)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, : len(r["input_ids"])] = 1
        generator = torch.Generator().manual_seed(self.args.seed + int(ids.sum()))
        inputs = apply_token_dropout(ids, self.args.token_dropout, self.replacement_id, generator)  # (B, T)
        return {"input_ids": inputs, "labels": ids, "attention_mask": mask, "num_tokens": int(mask.sum())}

    def count_items(self, batch: dict) -> int:
        return int(batch["attention_mask"][:, 1:].sum())

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)  # (B, T-1)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
        dropped = ((batch["input_ids"] != batch["labels"]) & (batch["attention_mask"] == 1)).float().mean()
        targets = labels != -100  # (B, T-1)
        accuracy = ((logits[:, :-1].argmax(-1) == labels) & targets).sum() / targets.sum().clamp(min=1)  # the spec's token_accuracy signal
        return nll / num_items_in_batch, {"token_dropout_rate": dropped.detach(), "token_accuracy": accuracy.detach().float()}

