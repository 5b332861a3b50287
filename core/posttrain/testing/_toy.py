"""A minimal real method for testing the core loop: next-token NLL on pre-tokenized sequences.

It is deliberately tiny (no chat templates, no packing): the core's tests use it to check the loop
shell (gradient accumulation, resume, checkpoints, multi-process) independently of any plugin.
Register it in a test with ``register_method(TOY_SPEC)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posttrain._spec import MethodSpec
from posttrain.config import TrainingConfig

__all__ = ["TOY_SPEC", "TOY_CRITIC_SPEC", "TOY_VALUE_HEAD_SPEC", "ToyConfig", "ToyCriticConfig", "ToyLMTrainer", "ToyCriticTrainer",
           "ToyValueHeadTrainer", "toy_sequences"]

TOY_SPEC = MethodSpec(
    name="toy_lm",
    maturity="stable",
    plugin_api="1.1",
    summary="Next-token NLL on token-id sequences (core test method).",
    family="sft",
    trainer="posttrain.testing._toy:ToyLMTrainer",
    config="posttrain.testing._toy:ToyConfig",
)

TOY_CRITIC_SPEC = MethodSpec(
    name="toy_critic",
    maturity="stable",
    plugin_api="1.5",
    summary="The toy LM plus a critic trained beside it with its own optimizer (core test method).",
    family="sft",
    trainer="posttrain.testing._toy:ToyCriticTrainer",
    config="posttrain.testing._toy:ToyCriticConfig",
)

TOY_VALUE_HEAD_SPEC = MethodSpec(
    name="toy_value_head",
    maturity="stable",
    plugin_api="1.7",
    summary="The toy LM plus a value head on its hidden states, trained with the policy (core test method).",
    family="sft",
    trainer="posttrain.testing._toy:ToyValueHeadTrainer",
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


from posttrain._surface import TrainerSurface  # noqa: E402  (light: no torch)


class ToyLMTrainer(TrainerSurface):
    """Train a causal LM with token-level NLL on ``{"input_ids"}`` rows through the core loop."""

    _method = "toy_lm"

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None,
                 callbacks=None, compute_metrics=None, allow_experimental=False):
        from posttrain._loop import TrainingLoop
        from posttrain.config import as_config

        self.args = as_config(args, self._config_class())
        self.loop = TrainingLoop(self.args, method=self._method, allow_experimental=allow_experimental, callbacks=callbacks, compute_metrics=compute_metrics)
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        self.train_dataset = self.process_dataset(train_dataset or [], "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {k: self.process_dataset(v, k) for k, v in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.pad_id = self.processing_class.pad_token_id
        self.loop.setup(self.model, method=self)

    @staticmethod
    def _config_class():
        return ToyConfig

    def process_dataset(self, rows, name: str) -> list[dict]:
        return [{"input_ids": list(r["input_ids"])} for r in rows]

    def eval_predictions(self, model, batch: dict):
        """Greedy next-token predictions and their labels (-100 where padded), for compute_metrics."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)  # (B, T-1)
        return logits[:, :-1].argmax(-1), labels

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
        import torch
        import torch.nn.functional as F

        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)  # (B, T-1)
        logits = logits[:, :-1].flatten(0, 1)
        logits = logits if logits.dtype == torch.float64 else logits.float()  # float32 at least; a float64 model stays float64
        nll = F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum")
        return nll / num_items_in_batch, {}


@dataclass(kw_only=True)
class ToyCriticConfig(ToyConfig):
    """Config of the toy critic method."""

    critic_learning_rate: float = field(default=1e-2, metadata={"help": "The critic's own learning rate."})


class ToyCriticTrainer(ToyLMTrainer):
    """The toy LM plus a critic: a sequence-classification model (one output) regressing each row's length / 16.

    The critic is trained beside the policy with its own optimizer (``TrainingLoop.add_trainable_model``):
    the shape of a PPO value model. Its loss is the token-weighted squared error, normalized over the step
    like the policy's NLL.
    """

    _method = "toy_critic"

    def __init__(self, model=None, critic=None, args=None, train_dataset=None, **kwargs):
        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        if critic is None:
            from posttrain.testing.tiny_model import build_reward_model

            critic = build_reward_model(self.processing_class, seed=1)
        self.critic = critic
        self.loop.add_trainable_model("critic", critic, learning_rate=self.args.critic_learning_rate)

    @staticmethod
    def _config_class():
        return ToyCriticConfig

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        policy_loss, _ = super().compute_loss(model, batch, num_items_in_batch)
        critic = self.loop.trainable_model("critic")
        values = critic(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)  # (B,)
        lengths = batch["attention_mask"][:, 1:].sum(-1).to(values.dtype)  # (B,) the tokens each row contributes
        target = batch["attention_mask"].sum(-1).to(values.dtype) / 16.0  # (B,)
        critic_loss = (lengths * (values - target) ** 2).sum() / num_items_in_batch
        return {"model": policy_loss, "critic": critic_loss}, {"critic_value": values.detach().mean()}


class ToyValueHeadTrainer(ToyLMTrainer):
    """The toy LM plus a value head (a ``Linear(hidden, 1)`` on the last hidden states) regressing, at every token,
    the number of tokens left in the row / 16: the shape of a PPO value head on the policy.

    The head is part of the policy (``TrainingLoop.add_policy_module``): one optimizer, and its loss reaches the trunk.
    """

    _method = "toy_value_head"

    def __init__(self, model=None, args=None, train_dataset=None, **kwargs):
        import torch

        super().__init__(model=model, args=args, train_dataset=train_dataset, **kwargs)
        config = self.loop.unwrapped_model().config
        generator = torch.Generator().manual_seed(5)
        head = torch.nn.Linear(config.hidden_size, 1, dtype=self.loop.unwrapped_model().dtype)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=torch.float64) * 0.02)
            head.bias.zero_()
        self.loop.add_policy_module("value_head", head.to(self.loop.unwrapped_model().device))

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        import torch
        import torch.nn.functional as F

        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        mask = batch["attention_mask"][:, 1:]  # (B, T-1)
        labels = batch["input_ids"][:, 1:].masked_fill(mask == 0, -100)
        logits = out.logits[:, :-1].flatten(0, 1)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        nll = F.cross_entropy(logits, labels.flatten(), ignore_index=-100, reduction="sum")
        values = self.loop.policy_module("value_head")(out.hidden_states[-1][:, :-1]).squeeze(-1)  # (B, T-1)
        left = (mask.flip(-1).cumsum(-1).flip(-1) - 1).to(values.dtype) / 16.0  # tokens after this one, / 16
        value_loss = (((values - left) ** 2) * mask).sum()
        return (nll + value_loss) / num_items_in_batch, {"value_loss": value_loss.detach() / mask.sum(), "value_mean": values.detach().mean()}
