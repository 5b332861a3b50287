"""SSD (Simple Self-Distillation) on the posttrain loop (heavy: imports torch).

Zhang et al. 2026 (arXiv:2604.01193): the model samples one completion per prompt at a training-time
temperature and truncation (T_train, rho_train: ``temperature``, ``top_k``, ``top_p``, ``min_p``), and is
fine-tuned on those raw, unverified samples with plain cross-entropy. No teacher, reward model, verifier
or RL. Built on the core's online scaffold (a :class:`posttrain.RolloutProducer` the loop consumes, the
rollout engine, chunked log-probs). One optimizer step, in order (``_produce``, then ``compute_loss``
per micro-batch)::

    P = per_device_train_batch_size * gradient_accumulation_steps prompts (left-truncated to max_prompt_length)
      -> rollout: one completion per prompt at T_train / top_k / top_p (RolloutEngine, seeded by the step)
      -> filter_empty: completions that are empty or a one-line stub (< 10 characters) leave the loss
      -> gradient_accumulation_steps micro-batches of per_device_train_batch_size completions
      -> loss per micro-batch: mean over its kept completion tokens of -log pi(y_t | x, y_<t) at temperature 1,
         divided by the step's micro-batches (TRL's per-micro-batch token mean / gradient_accumulation_steps)

The loss is TRL 1.15's ``SSDTrainer.compute_loss`` (parity: tests/test_ssd_parity.py, against values TRL
1.15 wrote, scripts/make_trl_reference.py). Departures from TRL: docs/methods/ssd.md.
"""

from __future__ import annotations

import logging

import torch

from posttrain import (
    ConfigError, ProduceRequest, RolloutBatch, RolloutProducer, TrainerSurface, TrainingLoop, as_config, attach_rollout_metrics,
    build_rollout_engine, completion_logps, default_output_dir, evaluate_online, expand_prompts, generate_rollout, load_online_policy,
    prepare_prompt_dataset, prompt_token_ids, rollout_micro_batches, sampling_from_config,
)

from posttrain_ssd.config import SSDConfig

__all__ = ["SSDTrainer", "is_stub_completion"]

logger = logging.getLogger(__name__)


def is_stub_completion(text: str) -> bool:
    """Whether ``filter_empty`` leaves a decoded completion out: empty after stripping, or one line shorter than 10 characters (TRL's rule)."""
    stripped = text.strip()
    return len(stripped) == 0 or ("\n" not in stripped and len(stripped) < 10)


class SSDTrainer(TrainerSurface):
    """Train a causal LM with SSD (Simple Self-Distillation); TRL 1.15's ``trl.experimental.ssd.SSDTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        args: An :class:`SSDConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows (``datasets.Dataset`` / ``IterableDataset`` / list of dicts): a
            ``prompt`` column (a string or a message list), or pre-tokenized ``prompt_ids``. Other columns are ignored.
        eval_dataset: Same format, or a dict of them (metrics ``eval_<name>_<metric>``): the eval loss is the
            cross-entropy of freshly sampled completions.
        processing_class: The tokenizer (default: loaded with the model).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        peft_config: A ``peft.PeftConfig``.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Python opt-in for this experimental method.

    Raises:
        posttrain.ConfigError: no ``train_dataset``, an ``optimizers`` pair, a dataset without ``prompt``, or a
            setting that cannot be honoured.
    """

    _tag_names = ["trl", "ssd"]

    def __init__(self, model=None, args: SSDConfig | None = None, train_dataset=None, eval_dataset=None, processing_class=None,
                 callbacks=None, optimizers=(None, None), peft_config=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, SSDConfig, default_output_dir=default_output_dir(model, "SSD"))
        # the maturity gate runs first: TrainingLoop checks the experimental opt-in
        self.loop = TrainingLoop(args, method="ssd", allow_experimental=allow_experimental, callbacks=callbacks)
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (prompt-only rows with a 'prompt' column).")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config; set optim, "
                              "optim_args, learning_rate, lr_scheduler_type and lr_scheduler_kwargs instead.")
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class,
                                                               peft_config=peft_config, tags=self._tag_names)
        tok = self.processing_class
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=tok, accelerator=self.loop.accelerator)
        self._sampling = sampling_from_config(args)  # T_train / rho_train (generation_kwargs applied)
        # the loop consumes the producer's steps; the producer's position is checkpointed per process
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset,
                                        self._produce, reuse=args.num_iterations)

    # -------------------------------------------------------------------------- data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``); a streamed ``train_dataset`` keeps the rows ``max_steps`` draw."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        return prepare_prompt_dataset(dataset, name, method="SSD", prompt_ids=self._prompt_ids, limit=limit)

    def _prompt_ids(self, row: dict) -> list[int]:
        """A row's prompt ids (messages via the chat template), keeping the last ``max_prompt_length`` tokens."""
        ids = prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs)
        limit = self.args.max_prompt_length
        return ids[-limit:] if limit is not None and len(ids) > limit else ids

    def _prompts_per_step(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps  # one completion per prompt

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's is the identity): :meth:`collate`."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (eval batches are rolled out by evaluate_batches)

    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]  # unused by the loss (a per-micro-batch token mean, as TRL's)

    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: sample and split one step's completions (reused ``num_iterations`` times)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        prompts, prompt_ids = expand_prompts(request.rows, 1, self._prompt_ids, self.processing_class)
        rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=1, seed=seed)
        return self.micro_batches(rollout, self.args.per_device_train_batch_size, world=self.loop.accelerator.num_processes)

    def micro_batches(self, rollout: RolloutBatch, size: int, world: int = 1) -> list[dict]:
        """Split a rollout into training micro-batches of ``size`` completions, ``filter_empty`` applied to the masks.

        Args:
            rollout: The sampled completions (one per prompt).
            size: Completions per micro-batch.
            world: Processes whose micro-batches make up the step (each micro-batch's loss is its share of the step).

        Returns:
            :func:`posttrain.rollout_micro_batches` dicts (without the sampler's log-probs, which SSD does not use),
            plus ``share_divisor`` and the rollout's metrics.
        """
        keep = torch.ones(len(rollout), dtype=torch.long)  # (N,)
        if self.args.filter_empty:
            texts = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            keep = torch.tensor([0 if is_stub_completion(t) else 1 for t in texts], dtype=torch.long)
        batches = rollout_micro_batches(rollout, size, self.pad_token_id)
        for start, batch in zip(range(0, len(rollout), size), batches):
            batch.pop("sampling_logprobs")  # SSD trains on the samples; how they were drawn does not enter the loss
            kept = keep[start : start + size]  # (b,)
            batch["completion_mask"] = batch["completion_mask"] * kept.unsqueeze(1)  # (b, C)
            batch["num_completion_tokens"] = int(batch["completion_mask"].sum())
            batch["num_tokens"] = int(batch["prompt_mask"].sum()) + batch["num_completion_tokens"]
            # a micro-batch's share of the step: its token mean / (micro-batches x processes); the loop sums the shares
            batch["share_divisor"] = torch.tensor(float(len(batches) * world))
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32) * keep  # (N,) 0 where filtered (TRL's)
        attach_rollout_metrics(batches, {
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": sum(rollout.truncated) / len(rollout),
            "ssd/active_sample_ratio": keep.float().mean().item(),
        })
        return batches

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        logps, entropies, _ = completion_logps(model, batch, 1.0, chunk_size=self.args.logprob_chunk_size)  # (B, C) at temperature 1
        mask = batch["completion_mask"].to(logps.dtype)  # (B, C)
        cross_entropy = (-logps * mask).sum() / mask.sum().clamp(min=1.0)  # token mean of the micro-batch
        share = batch.get("share_divisor")
        loss = cross_entropy / share.to(cross_entropy.device) if share is not None else cross_entropy
        metrics = {
            "ssd/cross_entropy_loss": cross_entropy.detach(),
            "entropy": ((entropies * mask).sum() / mask.sum().clamp(min=1.0)).detach(),
        }
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated model

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """The eval loss (cross-entropy of one fresh sample per eval prompt, seeded by ``seed``) and the rollout metrics."""
        def produce(rows, seed):
            prompts, prompt_ids = expand_prompts(rows, 1, self._prompt_ids, self.processing_class)
            rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=1, seed=seed)
            return self.micro_batches(rollout, len(rollout), world=1)

        return evaluate_online(model, batches, produce=produce, compute_loss=self.compute_loss, count_items=self.count_items,
                               loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
