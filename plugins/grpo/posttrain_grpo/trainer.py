"""GRPO on the posttrain loop (heavy: imports torch).

One optimizer step, in order (``prepare_step`` then ``compute_loss`` per micro-batch)::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps / num_generations)
      -> rollout: num_generations completions per prompt (RolloutEngine, seeded by the step)
      -> reward: every reward function on every completion            (N, F), N = P * G
      -> advantage: group-normalized, NaN-aware                        (N,)
      -> old / reference log-probs (no-grad forwards, only when needed)
      -> gradient_accumulation_steps micro-batches of per_device_train_batch_size completions
      -> loss per micro-batch, normalized over the whole step (the loop's contract)

Features and their flags (field names follow TRL 1.16's GRPOConfig):

* losses ``loss_type``: grpo, dr_grpo, dapo (default), bnpo, cispo, sapo, luspo, vespo;
  ``importance_sampling_level`` token / sequence (GSPO); ``epsilon`` / ``epsilon_high`` /
  ``delta`` (two-sided clipping); ``beta`` k3 KL to a frozen reference (a copy of the initial
  policy, or the adapter-disabled policy under PEFT) with ``use_bias_correction_kl``;
  ``top_entropy_quantile``; ``mask_truncated_completions``.
* advantages: ``scale_rewards`` group / batch / none, ``multi_objective_aggregation``
  sum_then_normalize / normalize_then_sum (GDPO); completions for which every reward function
  returned None get advantage 0 and are excluded from the group baseline.
* ``num_iterations`` > 1 reuses a rollout for several optimizer steps; its old log-probs come from
  a no-grad forward at generation time. With one iteration and the transformers backend (the
  sampler IS the trained model) ``old = logps.detach()`` and no extra forward runs.
* importance-sampling correction against the engine's sampling log-probs
  (``vllm_importance_sampling_*``), applied only when the rollout engine is not the trained model.

Assumptions: prompt-only data (a ``prompt`` column, string or messages); every other column is
passed to the reward functions. Departures from TRL are listed in docs/methods/grpo.md.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import torch

from posttrain import ConfigError, RolloutBatch, RolloutEngine, SamplingParams, TrainingLoop, entropy_from_logits, selective_log_softmax
from posttrain.rewards import RewardModelFunction, compute_rewards, resolve_reward_functions

from posttrain_grpo.config import GRPOConfig

__all__ = ["GRPOTrainer", "compute_group_advantages", "nanstd", "gamma_weights", "importance_sampling_ratio"]

_TOKEN_LEVEL_LOSSES = ("dapo", "cispo", "vespo", "bnpo")  # normalized by completion tokens
_CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


# ----------------------------------------------------------------------------- math (pure functions)
def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Return the Bessel-corrected standard deviation of ``x`` ignoring NaNs (NaN where fewer than 2 values)."""
    dims = dim if dim is not None else tuple(range(x.dim()))
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    return std if keepdim else std.squeeze(dims) if dim is not None else std.reshape(())


def compute_group_advantages(
    rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int, scale_rewards: str, multi_objective_aggregation: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(advantages (N,), is_std_zero (N,))`` from rewards grouped ``num_generations`` at a time.

    Args:
        rewards_per_func: ``(N, F)`` rewards, NaN where a function returned None.
        reward_weights: ``(F,)`` weights.
        num_generations: Group size G (N is a multiple of G; groups are consecutive rows).
        scale_rewards: ``"group"``, ``"batch"`` or ``"none"``.
        multi_objective_aggregation: ``"sum_then_normalize"`` or ``"normalize_then_sum"`` (GDPO).

    Returns:
        Advantages (0 where every reward function returned None, or where a std is undefined) and
        whether the std used for each row is zero (for ``frac_reward_zero_std``).
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[unscorable] = torch.nan  # keep unscorable rows out of the group baseline
        grouped = rewards.view(-1, num_generations)  # (N/G, G)
        mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # (N,)
        if scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:  # "group", or "none" (then only logged)
            std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + 1e-4)
    else:  # GDPO: normalize each reward within its group, sum, then normalize over the batch
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])  # (N/G, G, F)
        normalized = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (nanstd(grouped, dim=1, keepdim=True) + 1e-4)
        rewards = (normalized.view_as(rewards_per_func) * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
        rewards[unscorable] = torch.nan
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + 1e-4)
    is_std_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def importance_sampling_ratio(
    old_per_token_logps: torch.Tensor, sampling_per_token_logps: torch.Tensor, mask: torch.Tensor, mode: str, clip_min: float | None, clip_max: float | None
) -> torch.Tensor:
    """Return the trainer/sampler IS weight: ``(B, C)`` for token modes, ``(B, 1)`` for sequence modes.

    ``*_truncate`` clamps the ratio to ``[clip_min, clip_max]``; ``*_mask`` zeroes it outside.
    """
    diff = torch.nan_to_num((old_per_token_logps - sampling_per_token_logps) * mask, nan=0.0)  # (B, C)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)  # (B, 1)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


@torch.no_grad()
def gamma_weights(advantages, log_ratio, mask, is_ratio, k_pos, lambda_pos, k_neg, lambda_neg) -> torch.Tensor:
    """Return VESPO's detached sequence weight ``phi(w) = e^lambda * w^k * e^(-lambda w)`` (B, 1), computed in log space."""
    lower = math.log(1e-8)
    seq_log_ratio = (torch.clamp(log_ratio, -20.0, 20.0) * mask).sum(dim=-1, keepdim=True)  # (B, 1) sum, not mean
    if is_ratio is not None:
        seq_log_ratio = seq_log_ratio + torch.clamp(torch.log(is_ratio), lower, 20.0).sum(dim=-1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    nonneg = advantages >= 0
    k = torch.where(nonneg, k_pos, k_neg)
    lam = torch.where(nonneg, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


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


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; a ``(B, 1)`` per-sequence ``x`` is averaged over sequences."""
    if x.shape[1] == 1:
        return x.float().mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- trainer
class GRPOTrainer:
    """Train a causal LM with GRPO (and the variants selected by ``loss_type`` / presets).

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path), a
            ``PreTrainedModel`` reward model, or a list of these (default ``args.reward_funcs``).
        args: A :class:`GRPOConfig`.
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

    def __init__(self, model=None, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, peft_config=None, rollout_engine=None, allow_experimental=False):
        self.args = args = args or GRPOConfig()
        self.loop = TrainingLoop(args, method="grpo", allow_experimental=allow_experimental)
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
        # the transformers backend samples from the trained model itself: no sampler/trainer mismatch to correct
        self.engine_is_policy = self.engine.samples_from_policy
        self._buffer: list[dict] = []  # prepared micro-batches of the current rollout (checkpointed)
        self._buffer_uses = 0  # optimizer steps already taken on it

    # -------------------------------------------------------------------------- setup helpers
    def _setup_reward_funcs(self, reward_funcs, reward_processing_classes) -> list[tuple[str, Any]]:
        specs = reward_funcs if reward_funcs is not None else self.args.reward_funcs
        if not specs:
            raise ConfigError("GRPO needs reward functions: pass reward_funcs=[...] to the trainer or set reward_funcs in the config (CLI: --reward_funcs accuracy my_module:my_fn).")
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

    def _setup_ref_model(self):
        """Return a frozen copy of the initial policy when ``beta > 0`` (None under PEFT: adapters are disabled instead)."""
        if self.args.beta == 0.0 or hasattr(self.model, "disable_adapter"):
            return None
        return self.loop.prepare_frozen(copy.deepcopy(self.model))

    def _tokenize_prompt(self, prompt) -> list[int]:
        tok = self.processing_class
        if isinstance(prompt, list):  # conversational
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **(self.args.chat_template_kwargs or {}))
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(prompt)["input_ids"])

    def _prepare_dataset(self, dataset, name: str) -> list[dict]:
        rows = []
        for i, row in enumerate(dataset):
            if "prompt" not in row:
                raise ConfigError(f"{name} row {i} has no 'prompt' column (columns: {sorted(row)}); GRPO needs prompt-only data: a 'prompt' string or message list.")
            rows.append({"prompt_ids": self._tokenize_prompt(row["prompt"]), "row": dict(row)})
        return rows

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": rows}  # prompts stay raw: prepare_step turns them into rollouts

    def count_items(self, batch: dict) -> int:
        return batch["num_completion_tokens"] if self.args.loss_type in _TOKEN_LEVEL_LOSSES else batch["completion_ids"].shape[0]

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

        # 4. advantage: (N,) from the global batch's rewards, sliced into the micro-batches
        (all_rewards,), local = self._gather_across_processes(rewards_per_func)  # (world * N, F)
        advantages, is_std_zero = compute_group_advantages(
            all_rewards, self.reward_weights, num_generations, args.scale_rewards, args.multi_objective_aggregation
        )
        advantages, is_std_zero = advantages[local], is_std_zero[local]  # both per row (N,)
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch["advantages"] = advantages[start : start + size]  # (b,)
        if args.loss_type == "bnpo":  # BNPO normalizes by this process's step tokens, then averages over processes
            step_tokens = max(1, sum(b["num_completion_tokens"] for b in micro_batches))
            for batch in micro_batches:
                batch["bnpo_normalizer"] = torch.tensor(float(step_tokens * self.loop.accelerator.num_processes))

        metrics = self._rollout_metrics(rollout, rewards_per_func, is_std_zero, micro_batches)
        names, values = list(metrics), torch.tensor(list(metrics.values()), dtype=torch.float32)
        for batch in micro_batches:
            batch["rollout_metric_names"], batch["rollout_metric_values"] = names, values
        return micro_batches

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
        sampling_logps = batch.pop("sampling_logprobs")  # (b, C)
        if args.mask_truncated_completions:
            kept = ~torch.tensor(sub.truncated, dtype=torch.bool)  # (b,)
            batch["completion_mask"] = batch["completion_mask"] * kept.unsqueeze(1).long()
        batch["num_completion_tokens"] = int(batch["completion_mask"].sum())
        batch["num_tokens"] = int(batch["prompt_mask"].sum()) + batch["num_completion_tokens"]
        batch["truncated"] = torch.tensor(sub.truncated, dtype=torch.bool)
        apply_is = not self.engine_is_policy and args.vllm_importance_sampling_correction
        need_old = args.num_iterations > 1 or not self.engine_is_policy
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
        if apply_is:
            mask = batch["completion_mask"].float()
            batch["importance_sampling_ratio"] = importance_sampling_ratio(
                batch["old_per_token_logps"], sampling_logps, mask, args.vllm_importance_sampling_mode,
                args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max,
            )
        return batch

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
        if "importance_sampling_ratio" in micro_batches[0]:
            ratios = []
            for b in micro_batches:
                r = b["importance_sampling_ratio"]
                ratios.append(r.flatten() if r.shape[1] == 1 else r[b["completion_mask"].bool()])
            flat = torch.cat(ratios)
            if flat.numel():
                metrics.update({f"sampling/importance_sampling_ratio/{k}": getattr(flat, k)().item() for k in ("mean", "min", "max")})
        return {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        args = self.args
        mask = batch["completion_mask"].float()  # (B, C)
        per_token_logps, entropies = per_token_logps_and_entropies(model, batch, args.temperature)  # (B, C), (B, C)
        advantages = batch["advantages"].unsqueeze(1)  # (B, 1)
        # with one iteration on the trained model's own samples, old == current (detached): no extra forward
        old_per_token_logps = batch.get("old_per_token_logps", per_token_logps.detach())  # (B, C)
        is_ratio = batch.get("importance_sampling_ratio")  # (B, C) / (B, 1) / None

        entropy_mask = None
        if args.top_entropy_quantile < 1.0:  # keep the top-rho tokens by entropy (this micro-batch's quantile)
            threshold = torch.quantile(entropies[mask.bool()].float(), 1 - args.top_entropy_quantile) if mask.any() else entropies.new_tensor(float("inf"))
            entropy_mask = ((entropies * mask) >= threshold) & mask.bool()  # (B, C)

        log_ratio = per_token_logps - old_per_token_logps  # (B, C)
        if args.importance_sampling_level == "token":
            log_importance_weights = log_ratio  # (B, C)
        else:  # GSPO: length-normalized sequence log-ratio
            log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
        coef_1 = torch.exp(log_importance_weights)  # (B, C) or (B, 1)

        if args.beta != 0.0:  # k3 estimate of KL(pi || pi_ref), per token
            ref = batch["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1  # (B, C)
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * coef_1

        eps_low, eps_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
        if args.loss_type == "cispo":
            per_token_loss = -torch.clamp(coef_1, max=eps_high).detach() * advantages * per_token_logps
        elif args.loss_type in _CLIPPED_LOSSES:
            coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
            if args.delta is not None:  # two-sided clipping
                coef_1 = torch.clamp(coef_1, max=args.delta)
            per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
        elif args.loss_type == "sapo":
            tau = torch.where(advantages > 0, args.sapo_temperature_pos, args.sapo_temperature_neg)
            per_token_loss = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * advantages
        else:  # vespo
            phi_seq = gamma_weights(advantages, log_ratio, mask, is_ratio, args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg)
            per_token_loss = -phi_seq * advantages * per_token_logps
        if entropy_mask is not None:
            per_token_loss = per_token_loss * entropy_mask
        if is_ratio is not None and args.loss_type != "vespo":
            per_token_loss = per_token_loss * is_ratio
        if args.beta != 0.0:
            per_token_loss = per_token_loss + args.beta * per_token_kl
        per_token_loss = per_token_loss.expand_as(mask)  # (B, C) also for sequence-level ratios

        # aggregate: the micro-batch's SUM of per-item losses / items in the whole step (see count_items)
        if args.loss_type in ("grpo", "sapo"):  # items = sequences, each a token mean
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_items_in_batch
        elif args.loss_type == "dr_grpo":  # items = sequences, each a sum / max_completion_length
            loss = (per_token_loss * mask).sum() / args.max_completion_length / num_items_in_batch
        elif args.loss_type == "luspo":  # items = sequences, each a token sum
            loss = (per_token_loss * mask).sum() / num_items_in_batch
        elif args.loss_type == "bnpo":  # this process's step tokens (local batch), averaged over processes
            loss = (per_token_loss * mask).sum() / batch["bnpo_normalizer"]
        else:  # dapo, cispo, vespo: items = completion tokens of the whole step, every process
            loss = (per_token_loss * mask).sum() / num_items_in_batch

        metrics = {"entropy": masked_mean(entropies, mask)}
        if args.beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl.detach(), mask)
        if args.loss_type in _CLIPPED_LOSSES:
            is_low = (coef_1 < 1 - eps_low) & (advantages < 0)
            is_high = (coef_1 > 1 + eps_high) & (advantages > 0)
            metrics["clip_ratio/low_mean"] = masked_mean(is_low.float(), mask)
            metrics["clip_ratio/high_mean"] = masked_mean(is_high.float(), mask)
            metrics["clip_ratio/region_mean"] = masked_mean((is_low | is_high).float(), mask)
        elif args.loss_type == "cispo":
            metrics["cispo_clip_ratio"] = masked_mean(((coef_1 > eps_high) & (advantages > 0)).float(), mask)
        elif args.loss_type == "vespo":
            metrics["vespo/phi_seq_mean"] = phi_seq.mean()
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy

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

    def state_dict(self) -> dict:
        return {"buffer": self._buffer, "buffer_uses": self._buffer_uses, "policy_version": self.engine.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self._buffer, self._buffer_uses = list(state["buffer"]), int(state["buffer_uses"])
        self.engine.set_policy_version(int(state.get("policy_version", 0)))

    # -------------------------------------------------------------------------- entry point
    def train(self):
        """Run the loop: each optimizer step draws P prompts and trains on their P * G completions."""
        args = self.args
        prompts_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations
        return self.loop.train(self, batch_size=prompts_per_step, micro_batches_per_step=1)
