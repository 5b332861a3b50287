"""XPO on the posttrain loop (heavy: imports torch).

Exploratory Preference Optimization (Xie et al. 2024) is online DPO where the second completion of
each pair comes from the frozen reference, plus an exploration term that lowers the policy's
log-probability of the reference's samples (so the policy moves away from what the reference already
does). Built on the core's online steps, with TRL 1.13.0's ``XPOTrainer`` API (the last TRL release
that shipped it). One optimizer step, in order (the producer's ``_produce``, then ``compute_loss``
per micro-batch)::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps per process)
      -> y  ~ pi(.|x)      the policy's completion    (the rollout engine on the policy)
      -> y' ~ pi_ref(.|x)  the reference's completion (a rollout engine on the frozen reference)
      -> scores s(y), s(y') (reward functions / a reward model, - missing_eos_penalty), or a pairwise judge
      -> chosen = y where s(y) >= s(y'), else y'
      -> reference log-probs of both completions (no grad)
      -> loss per pair = DPO (sigmoid) or IPO loss on (chosen, rejected)  +  alpha * sum_t log pi(y'_t)
      -> mean over the step's pairs

Log-probs in the loss are taken at temperature 1 (as TRL's XPO). With a PEFT policy and no
``ref_model``, the reference is the policy with its adapters disabled: it samples y' and scores both
completions that way (as TRL 1.13.0 did). Departures from TRL: docs/methods/xpo.md.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from posttrain import (  # the loop and the core's online steps
    ConfigError, RolloutBatch, RolloutEngine, SamplingParams, TrainerSurface, TrainingLoop, adapter_disabled, add_old_and_ref_logps, as_config, attach_rollout_metrics, build_reference_model,
    completion_logps, default_output_dir, evaluate_online, expand_prompts, generate_rollout, load_online_policy, prepare_prompt_dataset,
    prompt_token_ids, resolve_online_rewards, rollout_micro_batches, sampling_from_config, score_rollout,
)
from posttrain import ProduceRequest, RolloutProducer

from posttrain_xpo.config import XPOConfig

__all__ = ["AdapterDisabledBackend", "XPOTrainer", "compute_xpo_losses"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (a pure function)
def compute_xpo_losses(policy_logps_policy: torch.Tensor, policy_logps_ref: torch.Tensor, ref_logps_policy: torch.Tensor, ref_logps_ref: torch.Tensor,
                       chosen_mask: torch.Tensor, *, beta: float, alpha: float, loss_type: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(dpo_losses (B,), xpo_losses (B,), logits (B,))`` of B pairs (policy sample y, reference sample y').

    Args:
        policy_logps_policy: ``(B,)`` sum_t log pi(y_t) (differentiable).
        policy_logps_ref: ``(B,)`` sum_t log pi(y'_t) (differentiable).
        ref_logps_policy: ``(B,)`` sum_t log pi_ref(y_t).
        ref_logps_ref: ``(B,)`` sum_t log pi_ref(y'_t).
        chosen_mask: ``(B,)`` bool, True where the policy's sample y is preferred.
        beta: DPO's beta.
        alpha: The exploration weight.
        loss_type: ``"sigmoid"`` (-log sigmoid(beta h)) or ``"ipo"`` ((h - 1/(2 beta))^2).

    Returns:
        The per-pair preference loss, the per-pair exploration term ``alpha * log pi(y')`` and the
        margin ``h = log pi/pi_ref (chosen) - log pi/pi_ref (rejected)``.
    """
    policy_ratio = policy_logps_policy - ref_logps_policy  # (B,) log pi/pi_ref of y
    ref_ratio = policy_logps_ref - ref_logps_ref  # (B,) of y'
    chosen_ratio = torch.where(chosen_mask, policy_ratio, ref_ratio)
    rejected_ratio = torch.where(chosen_mask, ref_ratio, policy_ratio)
    logits = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        dpo_losses = -F.logsigmoid(beta * logits)
    elif loss_type == "ipo":
        dpo_losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ConfigError(f"loss_type={loss_type!r} is invalid: use 'sigmoid' or 'ipo'.")
    xpo_losses = alpha * policy_logps_ref  # (B,) exploration: push down the reference's samples
    return dpo_losses, xpo_losses, logits


def _scheduled(value, epoch: float) -> float:
    """TRL's per-epoch schedule: ``value[epoch]`` of a list (its last entry after it ends), or the float itself."""
    if isinstance(value, list):
        index = int(epoch)
        return float(value[index] if index < len(value) else value[-1])
    return float(value)


class AdapterDisabledBackend:
    """A rollout backend that samples a PEFT policy with its adapters disabled: the frozen base model, XPO's reference under PEFT.

    It runs the core's transformers backend on the policy object inside ``posttrain.adapter_disabled``,
    so the reference needs no copy of the base weights. The base never changes, so ``update_weights``
    only counts versions.

    Args:
        model: The PEFT policy (possibly wrapped by the accelerator).
        tokenizer: Its tokenizer.
        accelerator: The loop's ``accelerate.Accelerator`` (unwraps the policy), or None.
    """

    name = "adapter_disabled"
    samples_from_policy = False  # the samples are the base model's, never the trained policy's

    def __init__(self, model, tokenizer, *, accelerator=None):
        self.model, self.accelerator = model, accelerator
        self.engine = RolloutEngine("transformers", model=model, tokenizer=tokenizer, accelerator=accelerator)
        self.policy_version = 0

    def update_weights(self, model) -> None:
        self.policy_version += 1

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams) -> RolloutBatch:
        with adapter_disabled(self.model, self.accelerator):
            return self.engine.generate(prompt_ids, sampling)


# ----------------------------------------------------------------------------- trainer
class XPOTrainer(TrainerSurface):
    """Train a causal LM with XPO (Exploratory Preference Optimization); TRL 1.13.0's ``XPOTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        ref_model: The frozen reference (object or name); default: a frozen copy of the initial policy, or
            the policy with its adapters disabled when it is a PEFT model (``peft_config`` or an already-PEFT model).
        reward_funcs: A reward model (``PreTrainedModel`` or path), a reward callable, a name
            ('module:function'), or a list of these (scores are their weighted sum); default
            ``args.reward_funcs`` or ``args.reward_model_path``.
        args: An :class:`XPOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        data_collator: Only None (prompts are tokenized by the trainer, as TRL's XPO re-tokenized them).
        train_dataset: Prompt-only rows (a ``prompt`` column, text or messages, or ``prompt_ids``).
        eval_dataset: Same format, or a dict of them.
        processing_class: The tokenizer (default: loaded with the model).
        reward_processing_classes: Tokenizers of reward models (one per reward function).
        peft_config: A ``peft.PeftConfig``: train a LoRA adapter; without ``ref_model`` the adapter-disabled
            policy is the reference (samples y' and scores the pairs).
        compute_metrics: Only None.
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``.
        preprocess_logits_for_metrics: Only None.
        judge: posttrain addition: a pairwise judge (``posttrain.judges``) that picks the chosen completion
            instead of reward scores (as TRL's XPO did before 1.0).
        rollout_engine: A ``posttrain.RolloutEngine`` sampling the policy (default: transformers on the policy).
        allow_experimental: Allow this experimental method without ``posttrain.activate(..., allow_experimental=True)``.

    Raises:
        posttrain.ConfigError: no reward source or dataset, or an argument that cannot be honoured.
    """

    _tag_names = ["trl", "xpo"]
    _name = "XPO"

    def __init__(self, model=None, ref_model=None, reward_funcs=None, args: XPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, peft_config=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, judge=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, XPOConfig, default_output_dir=default_output_dir(model, self._name))
        self.loop = TrainingLoop(args, method="xpo", allow_experimental=allow_experimental, callbacks=callbacks)  # the experimental gate first
        self._check_arguments(train_dataset, reward_funcs, judge, data_collator, compute_metrics, optimizers, preprocess_logits_for_metrics)
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               tags=self._tag_names)
        self.pad_token_id = self.processing_class.pad_token_id
        self.judge = judge
        self._setup_rewards(reward_funcs, reward_processing_classes)
        self.ref_model = build_reference_model(self.model, ref_model, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout, needed=True)
        self._setup_datasets(train_dataset, eval_dataset)
        self.loop.setup(self.model, method=self)
        self.engine = rollout_engine or RolloutEngine("transformers", model=self.model, tokenizer=self.processing_class, accelerator=self.loop.accelerator)
        # the reference's samples: the core's transformers backend on the frozen reference (never updated), or on the
        # adapter-disabled policy when the policy is a PEFT model without a separate ref_model
        if self.ref_model is None:
            self.ref_engine = RolloutEngine(AdapterDisabledBackend(self.model, self.processing_class, accelerator=self.loop.accelerator))
        else:
            self.ref_engine = RolloutEngine("transformers", model=self.ref_model, tokenizer=self.processing_class, accelerator=self.loop.accelerator)
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset, self._produce)
        self._sampling = sampling_from_config(args)

    # -------------------------------------------------------------------------- setup
    def _check_arguments(self, train_dataset, reward_funcs, judge, data_collator, compute_metrics, optimizers, preprocess_logits_for_metrics) -> None:
        args = self.args
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (prompt-only rows with a 'prompt' column).")
        if judge is None and not (reward_funcs or args.reward_funcs or args.reward_model_path):
            raise ConfigError(f"No reward source provided: {self._name} needs reward_funcs=[...] (a reward model or functions), a judge=..., "
                              "or reward_funcs / reward_model_path in the config.")
        if judge is not None and (reward_funcs or args.reward_funcs):
            raise ConfigError(f"{self._name}: give either a judge or reward_funcs, not both.")
        if judge is not None and not callable(getattr(judge, "judge", None)):
            raise ConfigError(f"judge={type(judge).__name__} is not a pairwise judge: it needs a judge(prompts, completions) method (see posttrain.judges).")
        for name, value in (("data_collator", data_collator), ("compute_metrics", compute_metrics), ("preprocess_logits_for_metrics", preprocess_logits_for_metrics)):
            if value is not None:
                raise ConfigError(f"{name} is not supported by {self._name}: the trainer tokenizes prompts and computes its own metrics; leave it None.")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config (optim, learning_rate, lr_scheduler_type).")

    def _setup_rewards(self, reward_funcs, reward_processing_classes) -> None:
        """Resolve the reward functions / reward model (none with a judge)."""
        if self.judge is not None:
            self.reward_funcs, self.reward_func_names, self.reward_weights = [], [], torch.ones(0)
            return
        if reward_funcs is None and not self.args.reward_funcs:
            reward_funcs = self.args.reward_model_path
        rewards = resolve_online_rewards(reward_funcs, self.args, loop=self.loop, reward_processing_classes=reward_processing_classes)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights  # weights (F,)

    def _setup_datasets(self, train_dataset, eval_dataset) -> None:
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None

    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``)."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        return prepare_prompt_dataset(dataset, name, method=self._name, prompt_ids=self._prompt_ids, limit=limit)

    def _prompt_ids(self, row: dict) -> list[int]:
        """A row's prompt ids, cut from the left to ``max_length - max_new_tokens`` tokens."""
        ids = prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs)
        keep = self.args.max_length - self.args.max_new_tokens
        return ids[-keep:] if len(ids) > keep else ids

    def _prompts_per_step(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    @property
    def alpha(self) -> float:
        """The exploration weight of the current epoch (TRL's ``alpha`` property)."""
        return _scheduled(self.args.alpha, self.loop.state.epoch_index)

    @property
    def beta(self) -> float:
        """DPO's beta of the current epoch (TRL's ``beta`` property)."""
        return _scheduled(self.args.beta, self.loop.state.epoch_index)

    @property
    def data_collator(self):
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}

    def count_items(self, batch: dict) -> int:
        return batch["chosen_mask"].shape[0]  # the loss is a mean over pairs

    def _produce(self, request: ProduceRequest) -> list[dict]:
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_score(request.rows, seed)

    def _scores(self, rows: list[dict], prompts: list, rollout) -> torch.Tensor:
        """``(N,)`` weighted reward of each completion, minus ``missing_eos_penalty`` where it has no EOS."""
        per_func = score_rollout(rows, prompts, rollout, 1, reward_funcs=self.reward_funcs, reward_func_names=self.reward_func_names,
                                 tokenizer=self.processing_class, trainer_state=self.loop.state)  # (N, F)
        scores = (per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        if self.args.missing_eos_penalty is not None:
            scores = scores - self.args.missing_eos_penalty * (~self._contains_eos(rollout)).float()
        return scores

    def _contains_eos(self, rollout) -> torch.Tensor:
        eos = self.processing_class.eos_token_id
        return torch.tensor([eos in c for c in rollout.completion_ids], dtype=torch.bool)

    def _generate_and_score(self, rows: list[dict], seed: int, mode: str = "train") -> list[dict]:
        args = self.args
        prompts, prompt_ids = expand_prompts(rows, 1, self._prompt_ids, self.processing_class)  # (P,) each
        stop = (self.processing_class.eos_token_id, self.pad_token_id)
        policy = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, seed=seed, max_completion_length=args.max_new_tokens, stop_token_ids=stop)
        reference = generate_rollout(prompts, prompt_ids, engine=self.ref_engine, sampling=self._sampling, seed=seed + 500_009,
                                     max_completion_length=args.max_new_tokens, stop_token_ids=stop)
        metrics: dict[str, float] = {}
        if self.judge is not None:  # 0: the policy's completion is preferred, 1: the reference's, -1: a tie (kept for the policy, as s(y) >= s(y'))
            texts_p = self.processing_class.batch_decode(policy.completion_ids, skip_special_tokens=True)
            texts_r = self.processing_class.batch_decode(reference.completion_ids, skip_special_tokens=True)
            preferences = self.judge.judge(prompts, [[a, b] for a, b in zip(texts_p, texts_r)])
            chosen_mask = torch.tensor([p != 1 for p in preferences], dtype=torch.bool)
        else:
            model_scores, ref_scores = self._scores(rows, prompts, policy), self._scores(rows, prompts, reference)  # (P,), (P,)
            chosen_mask = model_scores >= ref_scores
            metrics.update({"objective/model_scores": float(model_scores.mean()), "objective/ref_scores": float(ref_scores.mean()),
                            "objective/scores_margin": float((model_scores - ref_scores).mean())})
        metrics["val/model_contain_eos_token"] = float(self._contains_eos(policy).float().mean())
        metrics["val/ref_contain_eos_token"] = float(self._contains_eos(reference).float().mean())
        metrics["completions/mean_length"] = sum(map(len, policy.completion_ids)) / len(policy)
        metrics["completions/clipped_ratio"] = sum(policy.truncated) / len(policy)

        size = args.per_device_train_batch_size if mode == "train" else len(policy)
        pairs = zip(rollout_micro_batches(policy, size, self.pad_token_id), rollout_micro_batches(reference, size, self.pad_token_id))
        micro_batches = []
        for start, (pb, rb) in zip(range(0, len(policy), size), pairs):
            pb, rb = self._with_ref_logps(pb), self._with_ref_logps(rb)
            micro_batches.append({"policy": pb, "reference": rb, "chosen_mask": chosen_mask[start : start + size]})
        attach_rollout_metrics(micro_batches, metrics)
        return micro_batches

    def _with_ref_logps(self, batch: dict) -> dict:
        """The reference's no-grad log-probs of a micro-batch's completions (temperature 1)."""
        sampling_logps = batch.pop("sampling_logprobs")
        return add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=1.0, need_old=False, need_ref=True, ref_model=self.ref_model,
                                     device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=self.args.logprob_chunk_size)

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss (sum of its pairs' losses / pairs in the step) and its metrics."""
        pol, ref = batch["policy"], batch["reference"]
        mask_p, mask_r = pol["completion_mask"].float(), ref["completion_mask"].float()  # (B, Cp), (B, Cr)
        chunk = self.args.logprob_chunk_size
        logps_p = completion_logps(model, pol, 1.0, compute_entropy=False, chunk_size=chunk)[0]  # (B, Cp)
        logps_r = completion_logps(model, ref, 1.0, compute_entropy=False, chunk_size=chunk)[0]  # (B, Cr)
        policy_y, policy_yref = (logps_p * mask_p).sum(-1), (logps_r * mask_r).sum(-1)  # (B,)
        ref_y, ref_yref = (pol["ref_per_token_logps"] * mask_p).sum(-1), (ref["ref_per_token_logps"] * mask_r).sum(-1)  # (B,)
        chosen = batch["chosen_mask"]
        beta, alpha = self.beta, self.alpha
        dpo_losses, xpo_losses, logits = compute_xpo_losses(policy_y, policy_yref, ref_y, ref_yref, chosen, beta=beta, alpha=alpha, loss_type=self.args.loss_type)
        loss = (dpo_losses + xpo_losses).sum() / num_items_in_batch

        with torch.no_grad():
            chosen_rewards = beta * torch.where(chosen, policy_y - ref_y, policy_yref - ref_yref)
            rejected_rewards = beta * torch.where(chosen, policy_yref - ref_yref, policy_y - ref_y)
            margins = chosen_rewards - rejected_rewards
            metrics = {
                "loss/dpo": dpo_losses.detach().mean(),
                "loss/xpo": xpo_losses.detach().mean(),
                "objective/kl": ((policy_y - ref_y) + (policy_yref - ref_yref)).detach().mean() / 2,  # sequence-level, both samples
                "objective/entropy": -(policy_y + policy_yref).detach().mean() / 2,
                # per-token k1 KL on the policy's own samples (nats/token, what the diagnostics read as "kl")
                "kl": (policy_y - ref_y).detach().sum() / mask_p.sum().clamp(min=1.0),
                "rewards/chosen": chosen_rewards.mean(),
                "rewards/rejected": rejected_rewards.mean(),
                "rewards/margins": margins.mean(),
                "rewards/accuracies": (margins > 0).float().mean(),
                "logps/chosen": torch.where(chosen, policy_y, policy_yref).detach().mean(),
                "logps/rejected": torch.where(chosen, policy_yref, policy_y).detach().mean(),
                "alpha": torch.tensor(alpha),
                "beta": torch.tensor(beta),
            }
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy (the reference's engine never changes)

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Eval loss and metrics of one policy and one reference completion per eval prompt (seeded by ``seed``)."""
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_score(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
