"""RLOO on the posttrain loop (heavy: imports torch).

An aligned copy of ``posttrain_grpo.trainer``: blocks marked ``# Copied from posttrain_grpo.trainer.<name>``
are word-for-word GRPO's (with GRPO -> RLOO names) and a test diffs them; the rest is where RLOO's
meaning differs. One optimizer step, in order (``prepare_step`` then ``compute_loss`` per micro-batch)::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps / num_generations)
      -> rollout: num_generations completions per prompt (RolloutEngine, seeded by the step)
      -> reward: every reward function on every completion            (N, F), N = P * G
      -> old / reference log-probs (no-grad forwards, only when needed)
      -> reward - beta * sum_t (log pi_old - log pi_ref)   (k1 KL penalty in the reward, per sequence)
      -> advantage: leave-one-out baseline A_i = r_i - mean_{j != i} r_j  (N,)
      -> gradient_accumulation_steps micro-batches of per_device_train_batch_size completions
      -> loss per micro-batch: sequence-level clipped ratio, normalized over the whole step

Features and their flags (field names follow TRL 1.16's RLOOConfig): ``num_generations`` (default
2), ``beta`` (KL penalty in the reward, default 0.05; reference = frozen copy of the initial policy
or the adapter-disabled PEFT model), ``epsilon`` / ``epsilon_high`` (clipping of the sequence
ratio exp(sum_t log pi - log pi_old)), ``num_iterations`` (rollout reuse with old log-probs from
generation time), ``normalize_advantages`` (REINFORCE++), ``reward_clip_range``,
``reward_weights``, ``mask_truncated_completions``. Departures from TRL: docs/methods/rloo.md.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch

from posttrain import ConfigError, RolloutBatch, RolloutEngine, SamplingParams, TrainingLoop, entropy_from_logits, selective_log_softmax
from posttrain.rewards import RewardModelFunction, compute_rewards, resolve_reward_functions

from posttrain_rloo.config import RLOOConfig

__all__ = ["RLOOTrainer", "compute_rloo_advantages", "nanstd"]


# ----------------------------------------------------------------------------- math (pure functions)
# Copied from posttrain_grpo.trainer.nanstd
def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Return the Bessel-corrected standard deviation of ``x`` ignoring NaNs (NaN where fewer than 2 values)."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def compute_rloo_advantages(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int, normalize_advantages: bool,
    reward_clip_range: tuple[float, float] | None = None, kl: torch.Tensor | None = None, beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(advantages (N,), is_std_zero (N/G,))`` with a leave-one-out baseline per group.

    Args:
        rewards_per_func: ``(N, F)`` rewards, NaN where a function returned None.
        reward_weights: ``(F,)`` weights.
        num_generations: Group size G (groups are consecutive rows).
        normalize_advantages: Standardize the advantages over the batch (REINFORCE++).
        reward_clip_range: ``(low, high)`` clamp of the weighted reward, or None.
        kl: ``(N,)`` per-sequence KL estimate sum_t (log pi_old - log pi_ref), or None.
        beta: KL penalty coefficient (reward -= beta * kl).

    Returns:
        Advantages (0 for unscorable completions and for groups with a single scorable one) and,
        per group, whether the rewards' std is zero (for ``frac_reward_zero_std``).
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
    rewards[unscorable] = torch.nan  # keep unscorable rows out of the baseline
    if reward_clip_range:
        rewards = rewards.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if kl is not None and beta != 0.0:
        rewards = rewards - beta * kl
    grouped = rewards.view(-1, num_generations)  # (N/G, G)
    std = nanstd(grouped, dim=1)  # (N/G,)
    scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)  # (N/G, 1)
    baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)  # (N/G, G): mean of the others
    advantages = rewards - baselines.view(-1)  # (N,)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


# Copied from posttrain_grpo.trainer.per_token_logps_and_entropies
def per_token_logps_and_entropies(model, batch: dict, temperature: float, compute_entropy: bool = True):
    """Return ``(logps (B, C), entropies (B, C) or None)`` of the completion tokens at ``temperature``."""
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)  # (B, P+C)
    attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)  # (B, P+C)
    num_completion = batch["completion_ids"].shape[1]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=num_completion + 1).logits  # (B, C+1, V)
    logits = logits[:, :-1] / temperature  # (B, C, V): position t predicts completion token t
    logps = selective_log_softmax(logits, batch["completion_ids"])  # (B, C)
    entropies = entropy_from_logits(logits.detach()) if compute_entropy else None  # (B, C), metric / mask only
    return logps, entropies


# Copied from posttrain_grpo.trainer.masked_mean
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; a ``(B, 1)`` per-sequence ``x`` is averaged over sequences."""
    if x.shape[1] == 1:
        return x.float().mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- trainer
class RLOOTrainer:
    """Train a causal LM with RLOO (REINFORCE Leave-One-Out) or REINFORCE++ (``normalize_advantages``).

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path), a
            ``PreTrainedModel`` reward model, or a list of these (default ``args.reward_funcs``).
        args: A :class:`RLOOConfig`.
        train_dataset: Prompt-only rows: a ``prompt`` column plus any columns for the rewards.
        eval_dataset: Same format; scored with the mean reward of sampled completions.
        processing_class: The tokenizer (default: loaded with the model).
        reward_processing_classes: Tokenizers for reward models given as objects (one per reward function, or None).
        peft_config: A ``peft.PeftConfig``; with ``beta > 0`` the reference is the adapter-disabled model.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Unused for a stable method; kept for a uniform signature.

    Raises:
        posttrain.ConfigError: no reward functions, mismatched ``reward_weights``, or a dataset without ``prompt``.
    """

    def __init__(self, model=None, reward_funcs=None, args: RLOOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, peft_config=None, rollout_engine=None, allow_experimental=False):
        self.args = args = args or RLOOConfig()
        self.loop = TrainingLoop(args, method="rloo", allow_experimental=allow_experimental)
        self.model, self.processing_class = self.loop.load_model(model, processing_class=processing_class, peft_config=peft_config)
        self.pad_token_id = self.processing_class.pad_token_id
        self.reward_funcs = self._setup_reward_funcs(reward_funcs, reward_processing_classes)  # [(name, fn)]
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ConfigError(f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions {[n for n, _ in self.reward_funcs]}; give one weight each.")
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)  # (F,)
        self.ref_model = self._setup_ref_model()
        self.train_dataset = self._prepare_dataset(train_dataset, "train_dataset") if train_dataset is not None else []
        self.eval_dataset = self._prepare_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.loop.setup(self.model)
        self.engine = rollout_engine or RolloutEngine(
            args.rollout_backend, model=self.model, tokenizer=self.processing_class, accelerator=self.loop.accelerator,
            generation_batch_size=args.generation_batch_size,
        )
        # the transformers backend samples from the trained model itself: old log-probs equal the current ones
        self.engine_is_policy = self.engine.samples_from_policy
        self._buffer: list[dict] = []  # prepared micro-batches of the current rollout (checkpointed)
        self._buffer_uses = 0  # optimizer steps already taken on it

    # -------------------------------------------------------------------------- setup helpers
    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_reward_funcs
    def _setup_reward_funcs(self, reward_funcs, reward_processing_classes) -> list[tuple[str, Any]]:
        specs = reward_funcs if reward_funcs is not None else self.args.reward_funcs
        if not specs:
            raise ConfigError("RLOO needs reward functions: pass reward_funcs=[...] to the trainer or set reward_funcs in the config (CLI: --reward_funcs accuracy my_module:my_fn).")
        specs = list(specs) if isinstance(specs, (list, tuple)) else [specs]
        tokenizers = list(reward_processing_classes) if isinstance(reward_processing_classes, (list, tuple)) else [reward_processing_classes] * len(specs)
        resolved = []
        for spec, tokenizer in zip(specs, tokenizers + [None] * (len(specs) - len(tokenizers))):
            if isinstance(spec, str) and (os.path.isdir(spec) or ("/" in spec and ":" not in spec)):
                from transformers import AutoModelForSequenceClassification, AutoTokenizer

                tokenizer = tokenizer or AutoTokenizer.from_pretrained(spec)
                spec = AutoModelForSequenceClassification.from_pretrained(spec, num_labels=1)
            if isinstance(spec, torch.nn.Module):
                if tokenizer is None:
                    from transformers import AutoTokenizer

                    tokenizer = AutoTokenizer.from_pretrained(spec.config._name_or_path)
                if tokenizer.pad_token is None:
                    tokenizer.pad_token = tokenizer.eos_token
                spec = RewardModelFunction(self.loop.prepare_frozen(spec), tokenizer)
            resolved.append(spec)
        return resolve_reward_functions(resolved)

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_ref_model
    def _setup_ref_model(self):
        """Return a frozen copy of the initial policy when ``beta > 0`` (None under PEFT: adapters are disabled instead)."""
        if self.args.beta == 0.0 or hasattr(self.model, "disable_adapter"):
            return None
        return self.loop.prepare_frozen(copy.deepcopy(self.model))

    # Copied from posttrain_grpo.trainer.GRPOTrainer._tokenize_prompt
    def _tokenize_prompt(self, prompt) -> list[int]:
        tok = self.processing_class
        if isinstance(prompt, list):  # conversational
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **(self.args.chat_template_kwargs or {}))
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(prompt)["input_ids"])

    # Copied from posttrain_grpo.trainer.GRPOTrainer._prepare_dataset
    def _prepare_dataset(self, dataset, name: str) -> list[dict]:
        rows = []
        for i, row in enumerate(dataset):
            if "prompt" not in row:
                raise ConfigError(f"{name} row {i} has no 'prompt' column (columns: {sorted(row)}); RLOO needs prompt-only data: a 'prompt' string or message list.")
            rows.append({"prompt_ids": self._tokenize_prompt(row["prompt"]), "row": dict(row)})
        return rows

    # -------------------------------------------------------------------------- loop protocol
    # Copied from posttrain_grpo.trainer.GRPOTrainer.collate
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": rows}  # prompts stay raw: prepare_step turns them into rollouts

    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]  # RLOO's loss is a mean over sequences

    # Copied from posttrain_grpo.trainer.GRPOTrainer.prepare_step
    def prepare_step(self, micro_batches: list[dict], state) -> list[dict]:
        """Generate, score and split one optimizer step's rollouts (reused for ``num_iterations`` steps)."""
        if not self._buffer or self._buffer_uses >= self.args.num_iterations:
            rows = [row for batch in micro_batches for row in batch["rows"]]  # (P,) prompts of this step
            seed = self.args.seed + state.global_step + 1_000_003 * self.loop.accelerator.process_index
            self._buffer = self._generate_and_score(rows, seed, trainer_state=state)
            self._buffer_uses = 0
        self._buffer_uses += 1
        return self._buffer

    def _generate_and_score(self, rows: list[dict], seed: int, trainer_state=None) -> list[dict]:
        args, num_generations = self.args, self.args.num_generations
        # 1. rollout: G completions per prompt, grouped prompt0 x G, prompt1 x G, ...
        sampling = SamplingParams(
            max_tokens=args.max_completion_length, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            min_p=args.min_p or 0.0, repetition_penalty=args.repetition_penalty, n=num_generations, seed=seed,
        )
        rollout = self.engine.generate([r["prompt_ids"] for r in rows], sampling)  # N = P * G completions

        # 2. reward: (N, F), NaN where a function returned None
        rewards_per_func = self._score(rows, rollout, trainer_state)  # (N, F)

        # 3. micro-batches of per_device_train_batch_size completions, with old / reference log-probs
        size = args.per_device_train_batch_size
        micro_batches = [self._to_batch(rollout, slice(start, start + size)) for start in range(0, len(rollout), size)]

        # 4. advantage: (N,) from the global batch, sliced into the micro-batches; the k1 KL penalty goes into the reward
        kl = None
        if args.beta != 0.0:  # sum_t (log pi_old - log pi_ref) per sequence; may be negative (k1, Ahmadian et al. 2024)
            kl = torch.cat([((b["old_per_token_logps"] - b["ref_per_token_logps"]) * b["completion_mask"]).sum(-1) for b in micro_batches])  # (N,)
        (all_rewards, all_kl), local = self._gather_across_processes(rewards_per_func, kl if kl is not None else torch.zeros(len(rollout)))
        advantages, is_std_zero = compute_rloo_advantages(
            all_rewards, self.reward_weights, num_generations, args.normalize_advantages, args.reward_clip_range,
            all_kl if kl is not None else None, args.beta,
        )
        advantages, is_std_zero = advantages[local], is_std_zero[local.start // num_generations : local.stop // num_generations]
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch["advantages"] = advantages[start : start + size]  # (b,)

        metrics = self._rollout_metrics(rollout, rewards_per_func, is_std_zero, micro_batches)
        names, values = list(metrics), torch.tensor(list(metrics.values()), dtype=torch.float32)
        for batch in micro_batches:
            batch["rollout_metric_names"], batch["rollout_metric_values"] = names, values
        return micro_batches

    # Copied from posttrain_grpo.trainer.GRPOTrainer._gather_across_processes
    def _gather_across_processes(self, *tensors: torch.Tensor) -> tuple[list[torch.Tensor], slice]:
        """Return every process's rows of ``tensors`` (concatenated in rank order) and this process's slice of them.

        Batch-level advantage statistics (``scale_rewards="batch"``, REINFORCE++ normalization) are
        taken over the global batch, as in TRL. Groups never straddle processes (num_generations
        divides each process's completions), so per-group statistics are unchanged.
        """
        accelerator = self.loop.accelerator
        n = tensors[0].shape[0]  # N completions on every process
        if accelerator.num_processes == 1:
            return list(tensors), slice(0, n)
        gathered = [accelerator.gather(t.to(accelerator.device)).cpu() for t in tensors]  # (world * N, ...)
        start = accelerator.process_index * n
        return gathered, slice(start, start + n)

    # Copied from posttrain_grpo.trainer.GRPOTrainer._score
    def _score(self, rows: list[dict], rollout: RolloutBatch, trainer_state) -> torch.Tensor:
        num_generations = self.args.num_generations
        texts = self.processing_class.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        conversational = isinstance(rows[0]["row"]["prompt"], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        expanded = [r["row"] for r in rows for _ in range(num_generations)]  # (N,) one row per completion
        columns = {key: [row[key] for row in expanded] for key in expanded[0] if key not in ("prompt", "completion")}
        result = compute_rewards(
            self.reward_funcs, prompts=[row["prompt"] for row in expanded], completions=completions,
            completion_ids=rollout.completion_ids, columns=columns, trainer_state=trainer_state,
        )
        return result.per_function  # (N, F)

    def _to_batch(self, rollout: RolloutBatch, part: slice) -> dict:
        """Pad one micro-batch of the rollout and add the no-grad log-probs it needs."""
        args, device = self.args, self.loop.device
        sub = RolloutBatch(rollout.prompt_ids[part], rollout.completion_ids[part], rollout.logprobs[part], rollout.truncated[part], rollout.policy_version)
        batch = sub.to_tensors(self.pad_token_id)  # CPU tensors, (b, P) / (b, C)
        sampling_logps = batch.pop("sampling_logprobs")  # (b, C); RLOO (like TRL's) has no importance-sampling correction
        if args.mask_truncated_completions:
            kept = ~torch.tensor(sub.truncated, dtype=torch.bool)  # (b,)
            batch["completion_mask"] = batch["completion_mask"] * kept.unsqueeze(1).long()
        batch["num_completion_tokens"] = int(batch["completion_mask"].sum())
        batch["num_tokens"] = int(batch["prompt_mask"].sum()) + batch["num_completion_tokens"]
        batch["truncated"] = torch.tensor(sub.truncated, dtype=torch.bool)
        need_old = args.num_iterations > 1 or not self.engine_is_policy or args.beta != 0.0  # the KL penalty needs pi_old
        # When the sampler is the policy itself and samples unfiltered (no top-k/top-p/min-p/repetition
        # penalty), its sampling log-probs ARE pi_old at generation time (equal to a forward pass to
        # ~1e-6, tests/test_rollout.py): take them instead of running another no-grad forward.
        sampler_is_old_policy = (
            self.engine_is_policy and not args.top_k and args.top_p == 1.0 and not args.min_p and args.repetition_penalty == 1.0
        )
        on_device = {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            if need_old and sampler_is_old_policy:
                batch["old_per_token_logps"] = sampling_logps.float()  # (b, C)
            elif need_old:  # policy log-probs at generation time (ratio denominator)
                old, _ = per_token_logps_and_entropies(self.model, on_device, args.temperature, compute_entropy=False)
                batch["old_per_token_logps"] = old.float().cpu()
            if args.beta != 0.0:
                batch["ref_per_token_logps"] = self._ref_logps(on_device).float().cpu()
        return batch

    # Copied from posttrain_grpo.trainer.GRPOTrainer._ref_logps
    def _ref_logps(self, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return per_token_logps_and_entropies(self.ref_model, batch, self.args.temperature, compute_entropy=False)[0]
        unwrapped = self.loop.accelerator.unwrap_model(self.model)
        with unwrapped.disable_adapter():  # PEFT: the base model is the reference
            return per_token_logps_and_entropies(self.model, batch, self.args.temperature, compute_entropy=False)[0]

    def _rollout_metrics(self, rollout: RolloutBatch, rewards_per_func: torch.Tensor, is_std_zero: torch.Tensor, micro_batches: list[dict]) -> dict:
        num_generations = self.args.num_generations
        rewards = (rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[torch.isnan(rewards_per_func).all(dim=1)] = torch.nan  # unscorable rows are not logged
        lengths = torch.tensor([len(c) for c in rollout.completion_ids], dtype=torch.float32)  # (N,)
        metrics = {
            "reward": torch.nanmean(rewards).item(),
            "reward_std": torch.nanmean(nanstd(rewards.view(-1, num_generations), dim=1)).item(),  # within groups
            "frac_reward_zero_std": is_std_zero.float().mean().item(),
            "completions/mean_length": lengths.mean().item(),
            "completions/min_length": lengths.min().item(),
            "completions/max_length": lengths.max().item(),
            "completions/clipped_ratio": sum(rollout.truncated) / len(rollout),
        }
        for j, (name, _) in enumerate(self.reward_funcs):
            metrics[f"reward/{name}/mean"] = torch.nanmean(rewards_per_func[:, j]).item()
            metrics[f"reward/{name}/std"] = nanstd(rewards_per_func[:, j]).item()
        if self.args.beta != 0.0:  # mean per-token k1 KL of the rollout (the penalty's estimate)
            kl_sum = sum(((b["old_per_token_logps"] - b["ref_per_token_logps"]) * b["completion_mask"]).sum() for b in micro_batches)
            metrics["kl"] = float(kl_sum) / max(1, sum(b["num_completion_tokens"] for b in micro_batches))
        return {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        args = self.args
        mask = batch["completion_mask"].float()  # (B, C)
        per_token_logps, entropies = per_token_logps_and_entropies(model, batch, args.temperature)  # (B, C), (B, C)
        advantages = batch["advantages"]  # (B,)
        # with one iteration on the trained model's own samples, old == current (detached): no extra forward
        old_per_token_logps = batch.get("old_per_token_logps", per_token_logps.detach())  # (B, C)

        logps = (per_token_logps * mask).sum(-1)  # (B,) sequence log-prob
        old_logps = (old_per_token_logps * mask).sum(-1)  # (B,)
        coef_1 = torch.exp(logps - old_logps)  # (B,) sequence-level ratio
        eps_low, eps_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)  # (B,)

        # aggregate: the micro-batch's SUM of per-sequence losses / sequences in the whole step
        loss = per_sequence_loss.sum() / num_items_in_batch

        is_low = (coef_1 < 1 - eps_low) & (advantages < 0)
        is_high = (coef_1 > 1 + eps_high) & (advantages > 0)
        metrics = {
            "entropy": masked_mean(entropies, mask),
            "clip_ratio/low_mean": is_low.float().mean(),
            "clip_ratio/high_mean": is_high.float().mean(),
            "clip_ratio/region_mean": (is_low | is_high).float().mean(),
        }
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    # Copied from posttrain_grpo.trainer.GRPOTrainer.on_step_end
    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy

    # Copied from posttrain_grpo.trainer.GRPOTrainer.evaluate_batches
    @torch.no_grad()
    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the mean rewards of ``num_generations`` sampled completions per eval prompt (seeded by ``seed``)."""
        totals: dict[str, list[float]] = {}
        for i, batch in enumerate(batches):
            rollout = self.engine.generate([r["prompt_ids"] for r in batch["rows"]], SamplingParams(
                max_tokens=self.args.max_completion_length, temperature=self.args.temperature, top_p=self.args.top_p,
                top_k=self.args.top_k, min_p=self.args.min_p or 0.0, repetition_penalty=self.args.repetition_penalty,
                n=self.args.num_generations, seed=self.args.seed + i,
            ))
            rewards_per_func = self._score(batch["rows"], rollout, None)  # (N, F)
            rewards = (rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)
            totals.setdefault("reward", []).extend(rewards[~torch.isnan(rewards_per_func).all(dim=1)].tolist())
            for j, (name, _) in enumerate(self.reward_funcs):
                col = rewards_per_func[:, j]
                totals.setdefault(f"reward/{name}/mean", []).extend(col[~torch.isnan(col)].tolist())
        return {k: sum(v) / len(v) for k, v in totals.items() if v}

    # Copied from posttrain_grpo.trainer.GRPOTrainer.state_dict
    def state_dict(self) -> dict:
        return {"buffer": self._buffer, "buffer_uses": self._buffer_uses, "policy_version": self.engine.policy_version}

    # Copied from posttrain_grpo.trainer.GRPOTrainer.load_state_dict
    def load_state_dict(self, state: dict) -> None:
        self._buffer, self._buffer_uses = list(state["buffer"]), int(state["buffer_uses"])
        self.engine.set_policy_version(int(state.get("policy_version", 0)))

    # -------------------------------------------------------------------------- entry point
    # Copied from posttrain_grpo.trainer.GRPOTrainer.train
    def train(self):
        """Run the loop: each optimizer step draws P prompts and trains on their P * G completions."""
        args = self.args
        prompts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations
        return self.loop.train(self, batch_size=prompts_per_step, micro_batches_per_step=1)
