"""Online DPO / OAIF on the posttrain loop (heavy: imports torch).

Built on the core's online steps (plain public functions of ``posttrain``); what remains is the
method's own logic. One optimizer step, in order (the producer's ``_produce``, then
``compute_loss`` per micro-batch)::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps per process)
      -> rollout: 2 completions per prompt from the current policy (RolloutEngine, seeded by the step)
         grouped as pairs: rows 2i and 2i + 1 are prompt i's two completions
      -> labels: a pairwise judge (0: first better, 1: second, -1: cannot tell), or the scores of
         reward functions / a reward model (first >= second chooses the first, as TRL 1.16), with
         missing_eos_penalty subtracted from the score of a completion without EOS
      -> reference log-probs (no-grad forward of the frozen reference, or the adapter-disabled policy)
      -> gradient_accumulation_steps micro-batches of per_device_train_batch_size pairs
      -> loss per pair, h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l)) (sums over tokens):
         sigmoid: -log sigmoid(beta * h);  ipo: (h - 1 / (2 beta))^2;  mean over the step's pairs

Log-probs for the loss are taken at temperature 1 (as TRL), whatever the sampling temperature.
Departures from TRL: docs/methods/online_dpo.md.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F

from posttrain import (  # the loop and the core's online steps
    ConfigError, ProduceRequest, RewardFunctionJudge, RolloutBatch, RolloutProducer, TrainerSurface, TrainingLoop, as_config, attach_rollout_metrics,
    build_reference_model, build_rollout_engine, completion_logps, default_output_dir, evaluate_online, expand_prompts, generate_rollout, get_judge,
    load_online_policy, pair_preferences_to_chosen_rejected, prepare_prompt_dataset, prompt_token_ids, reference_logps, resolve_online_rewards,
    rollout_micro_batches, sampling_from_config, score_rollout,
)

from posttrain_online_dpo.config import OnlineDPOConfig

__all__ = ["OnlineDPOTrainer", "online_dpo_losses"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (a pure function)
def online_dpo_losses(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                      beta: float, loss_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(losses (B,), logits (B,))`` of B pairs from sequence log-probs (sums over completion tokens).

    ``logits = (chosen - rejected) - (ref_chosen - ref_rejected)``; ``sigmoid``: ``-log sigmoid(beta * logits)``
    (DPO); ``ipo``: ``(logits - 1 / (2 beta))^2`` (IPO, beta = tau).
    """
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits), logits
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2, logits
    raise ConfigError(f"loss_type={loss_type!r} is invalid: use 'sigmoid' or 'ipo'.")


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (x * keep).sum() / keep.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- trainer
class OnlineDPOTrainer(TrainerSurface):
    """Train a causal LM with Online DPO / OAIF; TRL 1.16's ``trl.experimental.online_dpo.OnlineDPOTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        ref_model: The frozen reference (object or name); default a copy of the initial policy, or the
            adapter-disabled policy under PEFT.
        reward_funcs: A callable, a name ('module:function', a reward-model path), a reward-model object,
            or a list of these: each completion's weighted score labels its pair (TRL's argument).
        args: An :class:`OnlineDPOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        data_collator: Only None (the trainer collates raw prompt rows itself).
        train_dataset: Prompt-only rows: a ``prompt`` column (string or messages, or ``prompt_ids``) plus
            any columns for the reward functions.
        eval_dataset: Same format, or a dict of them.
        processing_class: The tokenizer (default: loaded with the model).
        reward_processing_classes: Tokenizers of the reward models (one per reward function).
        peft_config: A ``peft.PeftConfig``; the reference is then the adapter-disabled model.
        compute_metrics: Only None (the eval metrics are the training ones on eval prompts).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds them from ``args``.
        preprocess_logits_for_metrics: Only None.
        judge: posttrain: a pairwise judge (``posttrain.judges``: ``RewardFunctionJudge``,
            ``RewardModelJudge``, ``OpenAICompatibleJudge``, or any object with ``judge(prompts,
            completions)``) or a registered judge name; takes precedence over ``reward_funcs``.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Python opt-in for this experimental method.

    Raises:
        posttrain.ConfigError: no dataset, no judge / reward source, ``ref_model is model``, or an
            argument posttrain cannot honour.
    """

    _tag_names = ["trl", "online-dpo"]

    def __init__(self, model=None, ref_model=None, reward_funcs=None, args: OnlineDPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, peft_config=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), preprocess_logits_for_metrics=None, *, judge=None, quantization_config=None, rollout_engine=None,
                 allow_experimental=False):
        self.args = args = as_config(args, OnlineDPOConfig, default_output_dir=default_output_dir(model, "OnlineDPO"))
        self.loop = TrainingLoop(args, method="online_dpo", allow_experimental=allow_experimental, callbacks=callbacks)  # the maturity gate first
        if train_dataset is None:
            raise ConfigError("`train_dataset` is required: pass train_dataset=... (prompt-only rows with a 'prompt' column).")
        for name, value in (("data_collator", data_collator), ("compute_metrics", compute_metrics), ("preprocess_logits_for_metrics", preprocess_logits_for_metrics)):
            if value is not None:
                raise ConfigError(f"{name}= is not supported by posttrain's Online DPO: leave it None (prompts are collated raw and the eval metrics are the training ones).")
        if tuple(optimizers or (None, None)) != (None, None):
            raise ConfigError("optimizers=(optimizer, scheduler) is not supported: posttrain's loop builds them from the config; set optim, learning_rate, lr_scheduler_type instead.")
        if ref_model is not None and ref_model is model:
            raise ConfigError("model and ref_model are the same object: omit ref_model (a frozen copy of the policy is made) or pass a separate model.")
        if judge is None and reward_funcs is None and not (args.judge or args.reward_funcs or args.reward_model_path):
            raise ConfigError(
                "No preference source: Online DPO needs a judge or reward functions: pass judge=... (posttrain.judges) or "
                "reward_funcs=[...] to the trainer, or set judge / reward_funcs / reward_model_path in the config."
            )
        self.model, self.processing_class = load_online_policy(model, args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               quantization_config=quantization_config, tags=self._tag_names)
        self.pad_token_id = self.processing_class.pad_token_id
        self.eos_token_ids = self._eos_token_ids()
        self._setup_preferences(judge, reward_funcs, reward_processing_classes)
        self.ref_model = build_reference_model(self.model, ref_model, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout)
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model, method=self)
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self.processing_class, accelerator=self.loop.accelerator)
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset, self._produce)
        self._sampling = sampling_from_config(args)
        self.num_generations = 2  # TRL's attribute: two completions per prompt
        # TRL's generation attributes: the configured values and, in generation_config, what the rollout engine samples with
        self.use_vllm = args.rollout_backend == "vllm"
        self.vllm_mode = args.vllm_mode if self.use_vllm else None
        self.temperature, self.top_p, self.top_k, self.min_p = args.temperature, args.top_p, args.top_k, args.min_p
        self.repetition_penalty = args.repetition_penalty
        self.generation_config = self._generation_config()

    # -------------------------------------------------------------------------- setup
    def _eos_token_ids(self) -> list[int]:
        """The tokenizer's EOS plus every EOS the model's generation config declares (TRL's rule)."""
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
        eos = self.processing_class.eos_token_id
        if eos is not None and eos not in ids:
            ids = [eos, *ids]
        return ids

    def _generation_config(self):
        """The rollout engine's sampling settings (the config's, ``generation_kwargs`` applied) as TRL's ``generation_config``.

        A ``transformers.GenerationConfig`` (``do_sample=False`` when ``generation_kwargs`` asks for greedy decoding; the
        configured temperature is then kept and unused); with the vLLM backend a ``vllm.SamplingParams`` with ``n=2``.
        """
        sampling = dict(self._sampling)
        greedy = sampling["temperature"] == 0.0
        if self.use_vllm:
            from vllm import SamplingParams

            return SamplingParams(n=2, **sampling)
        from transformers import GenerationConfig

        values = dict(max_new_tokens=sampling["max_tokens"], do_sample=not greedy, temperature=self.args.temperature if greedy else sampling["temperature"],
                      top_p=sampling["top_p"], top_k=sampling["top_k"], repetition_penalty=sampling["repetition_penalty"],
                      min_p=sampling["min_p"] or None, pad_token_id=self.pad_token_id, bos_token_id=self.processing_class.bos_token_id,
                      eos_token_id=self.eos_token_ids)
        return GenerationConfig(**{key: value for key, value in values.items() if value is not None})

    def _setup_preferences(self, judge, reward_funcs, reward_processing_classes) -> None:
        """Resolve the preference source: a judge, else reward functions / a reward model (TRL's path)."""
        args = self.args
        if judge is None and reward_funcs is None and args.judge:
            judge = args.judge
        if isinstance(judge, str):
            judge = get_judge(judge, **(args.judge_kwargs or {}))
        if judge is not None and not callable(getattr(judge, "judge", None)):
            raise ConfigError(f"judge={judge!r} has no judge(prompts, completions) method: pass a posttrain.judges judge or a registered judge name.")
        self.judge = judge
        self.reward_funcs, self.reward_func_names, self.reward_weights, self.reward_processing_classes = [], [], torch.ones(0), []
        if judge is None:
            specs = reward_funcs if reward_funcs is not None else (args.reward_funcs or args.reward_model_path)
            rewards = resolve_online_rewards(specs, args, loop=self.loop, reward_processing_classes=reward_processing_classes)
            self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights
            self.reward_processing_classes = rewards.processing_classes
        elif args.missing_eos_penalty is not None and not callable(getattr(judge, "score_pairs", None)):
            warnings.warn("missing_eos_penalty is ignored: the judge gives preferences, not scores to penalize.", UserWarning, stacklevel=3)

    # -------------------------------------------------------------------------- data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``)."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        return prepare_prompt_dataset(dataset, name, method="Online DPO", prompt_ids=self._prompt_ids, limit=limit)

    def _prompt_ids(self, row: dict) -> list[int]:
        return prompt_token_ids(row, self.processing_class)

    def _prompts_per_step(self) -> int:
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps

    @property
    def beta(self) -> float:
        """The beta of the current epoch (a list gives one per epoch, its last one after; TRL's property)."""
        beta = self.args.beta
        if isinstance(beta, list):
            epoch = int(self.loop.state.epoch_index)
            return beta[epoch] if epoch < len(beta) else beta[-1]
        return beta

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}

    def count_items(self, batch: dict) -> int:
        return int(batch["keep"].sum())  # the loss is a mean over the step's labelled pairs

    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: sample, label and split one step's pairs."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_label(request.rows, seed)

    def _generate(self, prompts: list, prompt_ids: list[list[int]], seed: int | None) -> RolloutBatch:
        """Two completions per prompt from the rollout engine (grouped: prompt0 x 2, prompt1 x 2, ...)."""
        return generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=2, seed=seed,
                                max_completion_length=self.args.max_new_tokens, stop_token_ids=tuple(self.eos_token_ids))

    def _label(self, rows: list[dict], prompts: list, rollout: RolloutBatch) -> tuple[list[int], torch.Tensor | None]:
        """Return one preference per pair (0 first, 1 second, -1 cannot tell) and the ``(N,)`` scores (None for a pure judge)."""
        args = self.args
        contain_eos = torch.tensor([any(t in self.eos_token_ids for t in ids) for ids in rollout.completion_ids])  # (N,)
        if self.judge is None:  # TRL 1.16: weighted sum of the reward functions, first >= second chooses the first
            rewards_per_func = score_rollout(rows, prompts, rollout, 2, reward_funcs=self.reward_funcs, reward_func_names=self.reward_func_names,
                                             tokenizer=self.processing_class, trainer_state=self.loop.state)  # (N, F)
            scores = (rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
            if args.missing_eos_penalty is not None:
                scores[~contain_eos] -= args.missing_eos_penalty
            return [0 if a >= b else 1 for a, b in zip(scores[0::2].tolist(), scores[1::2].tolist())], scores
        texts = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if isinstance(prompts[0], list) else texts
        pair_prompts, pairs = prompts[0::2], [[completions[i], completions[i + 1]] for i in range(0, len(completions), 2)]
        if callable(getattr(self.judge, "score_pairs", None)):  # a reward judge: scores, so missing_eos_penalty applies
            if isinstance(self.judge, RewardFunctionJudge):
                columns = {key: [row.get(key) for row in rows] for key in rows[0] if key not in ("prompt", "completion")}
                ids = [[rollout.completion_ids[i], rollout.completion_ids[i + 1]] for i in range(0, len(rollout), 2)]
                pair_scores = self.judge.score_pairs(pair_prompts, pairs, completion_ids=ids, trainer_state=self.loop.state, **columns)
            else:
                pair_scores = self.judge.score_pairs(pair_prompts, pairs)
            scores = torch.tensor([s for pair in pair_scores for s in pair], dtype=torch.float32)  # (N,)
            if args.missing_eos_penalty is not None:
                scores[~contain_eos] -= args.missing_eos_penalty
            tie = getattr(self.judge, "tie", -1)
            preferences = []
            for a, b in zip(scores[0::2].tolist(), scores[1::2].tolist()):
                preferences.append(-1 if a != a or b != b else 0 if a > b else 1 if b > a else tie)  # NaN: unscorable
            return preferences, scores
        return [int(p) for p in self.judge.judge(pair_prompts, pairs)], None

    def _generate_and_label(self, rows: list[dict], seed: int, mode: str = "train") -> list[dict]:
        args = self.args
        prompts, prompt_ids = expand_prompts(rows, 2, self._prompt_ids, self.processing_class)  # (N,) each, N = 2P
        rollout = self._generate(prompts, prompt_ids, seed)
        preferences, scores = self._label(rows, prompts, rollout)  # (P,), (N,) or None
        chosen, rejected, keep = pair_preferences_to_chosen_rejected(preferences, layout="interleaved", undecided=args.judge_undecided)  # (P,) each

        pairs_per_batch = args.per_device_train_batch_size if mode == "train" else len(rows)
        micro_batches = rollout_micro_batches(rollout, 2 * pairs_per_batch, self.pad_token_id)
        for k, batch in enumerate(micro_batches):
            part = slice(k * pairs_per_batch, (k + 1) * pairs_per_batch)
            offset = 2 * k * pairs_per_batch
            batch["chosen_index"], batch["rejected_index"] = chosen[part] - offset, rejected[part] - offset  # (b,) rows of this micro-batch
            batch["keep"] = keep[part].float()  # (b,)
            batch.pop("sampling_logprobs")
            self._truncate_prompt(batch)
            self._add_ref_logps(batch)
            if scores is not None:
                batch["scores"] = scores[offset : offset + 2 * pairs_per_batch]  # (2b,)
            batch["contain_eos"] = torch.tensor([any(t in self.eos_token_ids for t in ids) for ids in rollout.completion_ids[offset : offset + 2 * pairs_per_batch]])

        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)
        metrics = {"completions/mean_length": float(lengths.mean()), "completions/min_length": float(lengths.min()),
                   "completions/max_length": float(lengths.max()), "completions/clipped_ratio": float(torch.tensor(rollout.truncated, dtype=torch.float32).mean()),
                   "frac_pairs_undecided": float(sum(p == -1 for p in preferences)) / max(1, len(preferences))}
        attach_rollout_metrics(micro_batches, metrics)
        return micro_batches

    def _truncate_prompt(self, batch: dict) -> None:
        """Cut the prompt on the left so that prompt + completion fit ``max_length`` (TRL's ``_forward`` rule)."""
        cut = max(batch["prompt_ids"].shape[1] + batch["completion_ids"].shape[1] - self.args.max_length, 0)
        if cut:
            batch["prompt_ids"], batch["prompt_mask"] = batch["prompt_ids"][:, cut:], batch["prompt_mask"][:, cut:]

    @torch.no_grad()
    def _add_ref_logps(self, batch: dict) -> None:
        """The reference's completion log-probs ``(2b, C)`` at temperature 1, in the model's dtype (no grad)."""
        device = self.loop.device
        on_device = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        ref = reference_logps(self.model, on_device, 1.0, ref_model=self.ref_model, accelerator=self.loop.accelerator, chunk_size=self.args.logprob_chunk_size)
        batch["ref_per_token_logps"] = ref.detach().cpu()

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss (sum of its pairs' losses / the step's pairs) and TRL's metrics."""
        beta = self.beta
        mask = batch["completion_mask"].to(batch["ref_per_token_logps"].dtype)  # (2b, C)
        logps, _, _ = completion_logps(model, batch, 1.0, compute_entropy=False, chunk_size=self.args.logprob_chunk_size)  # (2b, C)
        ref = batch["ref_per_token_logps"].to(logps.dtype)
        mask = mask.to(logps.dtype)
        seq, ref_seq = (logps * mask).sum(-1), (ref * mask).sum(-1)  # (2b,)
        c, r, keep = batch["chosen_index"], batch["rejected_index"], batch["keep"].to(logps.dtype)
        losses, logits = online_dpo_losses(seq[c], seq[r], ref_seq[c], ref_seq[r], beta, self.args.loss_type)  # (b,)
        denominator = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else torch.tensor(float(num_items_in_batch))
        loss = (losses * keep).sum() / denominator.to(losses.device, losses.dtype).clamp(min=1.0)

        with torch.no_grad():
            seq_d, ref_d = seq.detach(), ref_seq.detach()
            kl_tokens = (logps.detach() - ref) * mask  # (2b, C)
            chosen_rewards, rejected_rewards = beta * (seq_d[c] - ref_d[c]), beta * (seq_d[r] - ref_d[r])  # (b,)
            margins = chosen_rewards - rejected_rewards
            metrics = {
                "objective/kl": kl_tokens.sum(-1).mean(),
                "kl": kl_tokens.sum() / mask.sum().clamp(min=1.0),
                "objective/entropy": -seq_d.mean(),
                "objective/non_score_reward": (-beta * kl_tokens.sum(-1)).mean(),
                "rewards/chosen": _masked_mean(chosen_rewards, keep),
                "rewards/rejected": _masked_mean(rejected_rewards, keep),
                "rewards/margins": _masked_mean(margins, keep),
                "rewards/accuracies": _masked_mean((margins > 0).to(keep.dtype), keep),
                "logps/chosen": _masked_mean(seq_d[c], keep),
                "logps/rejected": _masked_mean(seq_d[r], keep),
                "val/contain_eos_token": batch["contain_eos"].float().mean(),
                "beta": torch.tensor(float(beta), dtype=torch.float64),
            }
            if "scores" in batch:
                scores = batch["scores"].to(logps.device)
                metrics["objective/scores"] = torch.nanmean(scores.float())
                metrics["objective/scores_margin"] = _masked_mean((scores[c] - scores[r]).to(keep.dtype), keep)
                metrics["objective/rlhf_reward"] = (scores.to(logps.dtype) - beta * kl_tokens.sum(-1)).mean()
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss and metrics of pairs sampled on the eval prompts (seeded by ``seed``)."""
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_label(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        return {"policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
