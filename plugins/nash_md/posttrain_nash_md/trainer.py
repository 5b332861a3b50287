"""Nash-MD on the posttrain loop (heavy: imports torch).

Nash-MD (Munos et al. 2023, "Nash Learning from Human Feedback") plays the policy against a regularized
opponent: the geometric mixture ``pi_mix ∝ pi_ref^c * pi^(1-c)`` of the policy and the frozen
reference (``c = mixture_coef``). Built on the core's online steps, with TRL 1.13.0's
``NashMDTrainer`` API (the last TRL release that shipped it). One optimizer step::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps per process)
      -> y  ~ pi(.|x)      the policy's completion  (the rollout engine on the policy)
      -> y' ~ pi_mix(.|x)  the mixture's completion (a rollout engine on GeometricMixtureBackend)
      -> P(y > y') = sigmoid(s(y) - s(y'))  (reward functions / a reward model), or 1 / 0 / 0.5 from a pairwise judge
      -> reference log-probs of y (no grad)
      -> loss per prompt = beta * sum_t sg(log pi/pi_ref)(y_t) * log pi(y_t)  -  (P(y > y') - 1/2) * sum_t log pi(y_t)
      -> mean over the step's prompts

The first term is a REINFORCE estimate of the KL's gradient, the second the preference's policy
gradient with 1/2 as its baseline. Log-probs are taken at temperature 1 (as TRL's). With a PEFT
policy and no ``ref_model``, the reference is the policy with its adapters disabled (in the mixture too).
Departures from TRL: docs/methods/nash_md.md.
"""

from __future__ import annotations

import logging

import torch

from posttrain import (  # the loop and the core's online steps
    ConfigError, RolloutEngine, TrainerSurface, TrainingLoop, add_old_and_ref_logps, as_config, attach_rollout_metrics, build_reference_model,
    completion_logps, default_output_dir, evaluate_online, expand_prompts, generate_rollout, load_online_policy, prepare_prompt_dataset,
    prompt_token_ids, resolve_online_rewards, rollout_micro_batches, sampling_from_config, score_rollout,
)
from posttrain import ProduceRequest, RolloutProducer

from posttrain_nash_md._mixture import GeometricMixtureBackend
from posttrain_nash_md.config import NashMDConfig

__all__ = ["NashMDTrainer", "compute_nash_md_losses"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (a pure function)
def compute_nash_md_losses(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, probability: torch.Tensor, *,
                           beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(losses (B,), score (B,), kl (B,))`` of B policy completions y played against mixture completions.

    Args:
        policy_logps: ``(B, C)`` log pi(y_t) (differentiable).
        ref_logps: ``(B, C)`` log pi_ref(y_t).
        mask: ``(B, C)`` 1 on completion tokens.
        probability: ``(B,)`` P(y preferred to the mixture's y').
        beta: The KL weight.

    Returns:
        The per-completion loss ``beta * sum_t sg(log pi/pi_ref) log pi - (P - 1/2) sum_t log pi``, the
        preference term ``(P - 1/2) sum_t log pi`` and the sequence log-ratio ``sum_t log pi/pi_ref`` (no grad).
    """
    mask = mask.to(policy_logps.dtype)
    logps = (policy_logps * mask).sum(1)  # (B,)
    score = (probability - 0.5) * logps  # REINFORCE with 1/2 as the control variate
    log_ratio = ((policy_logps - ref_logps) * mask).detach()  # (B, C)
    kl = log_ratio.sum(1)  # (B,)
    kl_loss = (log_ratio * policy_logps * mask).sum(1)  # REINFORCE estimate of the KL's gradient
    return beta * kl_loss - score, score, kl


# Copied from posttrain_xpo.trainer._scheduled
def _scheduled(value, epoch: float) -> float:
    """TRL's per-epoch schedule: ``value[epoch]`` of a list (its last entry after it ends), or the float itself."""
    if isinstance(value, list):
        index = int(epoch)
        return float(value[index] if index < len(value) else value[-1])
    return float(value)


# ----------------------------------------------------------------------------- trainer
class NashMDTrainer(TrainerSurface):
    """Train a causal LM with Nash-MD (Nash learning from human feedback, mirror descent); TRL 1.13.0's ``NashMDTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        ref_model: The frozen reference (object or name); default: a frozen copy of the initial policy, or
            the policy with its adapters disabled when it is a PEFT model (``peft_config`` or an already-PEFT model).
        reward_funcs: A reward model (``PreTrainedModel`` or path), a reward callable, a name
            ('module:function'), or a list of these (scores are their weighted sum); default
            ``args.reward_funcs`` or ``args.reward_model_path``.
        args: A :class:`NashMDConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        data_collator: Only None (prompts are tokenized by the trainer, as TRL's Nash-MD re-tokenized them).
        train_dataset: Prompt-only rows (a ``prompt`` column, text or messages, or ``prompt_ids``).
        eval_dataset: Same format, or a dict of them.
        processing_class: The tokenizer (default: loaded with the model).
        reward_processing_classes: Tokenizers of reward models (one per reward function).
        peft_config: A ``peft.PeftConfig``: train a LoRA adapter; without ``ref_model`` the adapter-disabled
            policy is the reference (the mixture's reference half and the KL's reference log-probs).
        compute_metrics: Only None.
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``.
        preprocess_logits_for_metrics: Only None.
        judge: posttrain addition: a pairwise judge (``posttrain.judges``) that picks the chosen completion
            instead of reward scores (as TRL's Nash-MD did before 1.0): P(y > y') is 1, 0, or 1/2 for a tie.
        rollout_engine: A ``posttrain.RolloutEngine`` sampling the policy (default: transformers on the policy).
        allow_experimental: Allow this experimental method without ``posttrain.activate(..., allow_experimental=True)``.

    Raises:
        posttrain.ConfigError: no reward source or dataset, or an argument that cannot be honoured.
    """

    _tag_names = ["trl", "nash-md"]
    _name = "Nash-MD"

    def __init__(self, model=None, ref_model=None, reward_funcs=None, args: NashMDConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, peft_config=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, judge=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, NashMDConfig, default_output_dir=default_output_dir(model, self._name))
        self.loop = TrainingLoop(args, method="nash_md", allow_experimental=allow_experimental, callbacks=callbacks)  # the experimental gate first
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
        # the opponent's samples: the geometric mixture of the policy and the frozen reference, through a core RolloutEngine
        self.mixture_backend = GeometricMixtureBackend(self.model, self.ref_model, self.processing_class, mixture_coef=self.mixture_coef,
                                                       accelerator=self.loop.accelerator)
        self.mixture_engine = RolloutEngine(self.mixture_backend)
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
    def mixture_coef(self) -> float:
        """The reference's weight in the mixture for the current epoch (TRL's ``mixture_coef`` property)."""
        return _scheduled(self.args.mixture_coef, self.loop.state.epoch_index)

    @property
    def beta(self) -> float:
        """The KL weight of the current epoch (TRL's ``beta`` property)."""
        return _scheduled(self.args.beta, self.loop.state.epoch_index)

    @property
    def data_collator(self):
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}

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
        self.mixture_backend.mixture_coef = self.mixture_coef  # this epoch's coefficient
        mixture = generate_rollout(prompts, prompt_ids, engine=self.mixture_engine, sampling=self._sampling, seed=seed + 500_009,
                                   max_completion_length=args.max_new_tokens, stop_token_ids=stop)
        metrics: dict[str, float] = {}
        if self.judge is not None:  # 0: the policy's completion is preferred (P = 1), 1: the mixture's (P = 0), -1: a tie (P = 1/2)
            texts_p = self.processing_class.batch_decode(policy.completion_ids, skip_special_tokens=True)
            texts_m = self.processing_class.batch_decode(mixture.completion_ids, skip_special_tokens=True)
            preferences = self.judge.judge(prompts, [[a, b] for a, b in zip(texts_p, texts_m)])
            probability = torch.tensor([{0: 1.0, 1: 0.0}.get(p, 0.5) for p in preferences], dtype=torch.float64)
        else:
            model_scores, mixture_scores = self._scores(rows, prompts, policy), self._scores(rows, prompts, mixture)  # (P,), (P,)
            probability = torch.sigmoid((model_scores - mixture_scores).double())  # P(y > y') under Bradley-Terry
            metrics.update({"objective/model_scores": float(model_scores.mean()), "objective/ref_scores": float(mixture_scores.mean()),
                            "rewards/chosen": float(model_scores.mean()), "rewards/rejected": float(mixture_scores.mean()),
                            "objective/scores_margin": float((model_scores - mixture_scores).mean())})
        metrics["rewards/probabilities"] = float(probability.mean())
        metrics["val/model_contain_eos_token"] = float(self._contains_eos(policy).float().mean())
        metrics["val/ref_contain_eos_token"] = float(self._contains_eos(mixture).float().mean())
        metrics["completions/mean_length"] = sum(map(len, policy.completion_ids)) / len(policy)
        metrics["completions/clipped_ratio"] = sum(policy.truncated) / len(policy)

        size = args.per_device_train_batch_size if mode == "train" else len(policy)
        micro_batches = []
        for start, batch in zip(range(0, len(policy), size), rollout_micro_batches(policy, size, self.pad_token_id)):
            batch = self._with_ref_logps(batch)
            batch["probability"] = probability[start : start + size]
            micro_batches.append(batch)
        attach_rollout_metrics(micro_batches, metrics)
        return micro_batches

    # Copied from posttrain_xpo.trainer.XPOTrainer._with_ref_logps
    def _with_ref_logps(self, batch: dict) -> dict:
        """The reference's no-grad log-probs of a micro-batch's completions (temperature 1)."""
        sampling_logps = batch.pop("sampling_logprobs")
        return add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=1.0, need_old=False, need_ref=True, ref_model=self.ref_model,
                                     device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=self.args.logprob_chunk_size)

    def count_items(self, batch: dict) -> int:
        return batch["probability"].shape[0]  # the loss is a mean over the policy's completions

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss (sum of its losses / completions in the step) and its metrics."""
        mask = batch["completion_mask"]
        logps = completion_logps(model, batch, 1.0, compute_entropy=False, chunk_size=self.args.logprob_chunk_size)[0]  # (B, C)
        ref_logps = batch["ref_per_token_logps"].to(logps.dtype)  # (B, C)
        probability = batch["probability"].to(logps.dtype)
        beta = self.beta
        losses, score, kl = compute_nash_md_losses(logps, ref_logps, mask, probability, beta=beta)
        loss = losses.sum() / num_items_in_batch
        with torch.no_grad():
            seq_logps = (logps * mask).sum(1)
            seq_ref = (ref_logps * mask).sum(1)
            margin = seq_logps - seq_ref
            metrics = {
                "loss/score": score.detach().mean(),
                "loss/kl": kl.mean(),
                "kl": kl.sum() / mask.sum().clamp(min=1),  # per-token k1 KL on the policy's samples (what the diagnostics read)
                "logps/chosen": seq_logps.mean(),
                "logps/rejected": seq_ref.mean(),
                "objective/entropy": -seq_logps.mean(),
                "rewards/margins": margin.mean(),
                "rewards/accuracies": (margin > 0).float().mean(),
                "beta": torch.tensor(beta),
                "mixture_coef": torch.tensor(self.mixture_coef),
            }
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollouts sample from the updated policy
        self.mixture_engine.update_weights(model)  # the mixture too (its reference half never changes)

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Eval loss and metrics of one policy and one mixture completion per eval prompt (seeded by ``seed``)."""
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_score(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version, "mixture_version": self.mixture_engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        self.mixture_engine.set_policy_version(int(state.get("mixture_version", 0)))
