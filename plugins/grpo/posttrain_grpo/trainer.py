"""GRPO on the posttrain loop (heavy: imports torch).

What is GRPO's is here (advantages, losses, their metrics, the entropy controller); the rest of the
pipeline is the core's online steps, plain public functions of ``posttrain`` that RLOO calls too
(docs/methods/grpo.md, "How the trainer is built"). One optimizer step, in order (the producer's ``_produce`` then ``compute_loss`` per micro-batch)::

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
  policy, or the adapter-disabled policy under PEFT) with ``use_bias_correction_kl`` and
  ``sync_ref_model`` (TR-DPO); ``top_entropy_quantile``; ``mask_truncated_completions``;
  ``off_policy_mask_threshold`` (DeepSeek-V3.2); ``entropy_coef`` / ``use_adaptive_entropy``
  (Skywork-OR1); a MoE model's router load-balancing loss (``router_aux_loss_coef``).
* advantages: ``scale_rewards`` group / batch / none, ``multi_objective_aggregation``
  sum_then_normalize / normalize_then_sum (GDPO); completions for which every reward function
  returned None get advantage 0 and are excluded from the group baseline.
* ``num_iterations`` > 1 reuses a rollout for several optimizer steps; its old log-probs come from
  a no-grad forward at generation time. With one iteration and the transformers backend (the
  sampler IS the trained model) ``old = logps.detach()`` and no extra forward runs.
* importance-sampling correction against the engine's sampling log-probs
  (``vllm_importance_sampling_*``), applied only when the rollout engine is not the trained model.
* rollouts from the engine, or from a user ``rollout_func(prompts, trainer)`` (TRL's hook).
* tool calling and environments (TRL's ``tools=`` / ``environment_factory=``): multi-turn episodes
  from the core's ``ToolCallingRollout``; the loss, KL and importance ratios cover the
  model-written tokens only (``tool_mask``).
* vision-language models (TRL's ``image`` / ``images`` columns, the model's processor as
  ``processing_class``): each prompt goes through the processor with its images
  (``posttrain.vision_prompt_inputs``), the engine generates conditioned on them, and every forward
  (log-probs, pi_old, reference) gets the prompt's ``pixel_values`` & co. from the rollout's
  ``extras["model_inputs"]`` (``posttrain.rollout_micro_batches`` batches them). Reward functions
  get the images in the prompts and the column as a keyword, as in TRL.

Assumptions: prompt-only data (a ``prompt`` column, string or messages, or pre-tokenized
``prompt_ids``; optionally ``images`` / ``image``); every other column is passed to the reward functions. Departures from TRL are
listed in docs/methods/grpo.md.
"""

from __future__ import annotations

import logging
import math

import torch

from posttrain import (  # the loop and the core's online steps (the online scaffold, plugin API 1.5)
    CompletionLog, ConfigError, DataError, ProduceRequest, RolloutBatch, RolloutProducer, TrainerSurface, TrainingLoop, add_old_and_ref_logps, as_config,
    attach_rollout_metrics, build_reference_model, build_rollout_engine, check_online_arguments, check_sync_ref_model, completion_logps,
    default_output_dir, evaluate_online, gather_across_processes, generate_rollout, load_online_policy, nanstd,
    prepare_prompt_dataset, prompt_token_ids, resolve_online_rewards, reward_and_length_metrics, rollout_micro_batches, router_aux_loss_settings,
    sampler_is_old_policy, sampling_from_config, score_rollout, slice_rollout, sync_reference_model, SamplingParams, ToolCallingRollout,
)
from posttrain import (  # vision-language models (plugin API 1.9)
    check_vision_model, image_column, is_processor, prepare_multimodal_messages, processor_tokenizer, row_images, vision_prompt_inputs,
)

from posttrain_grpo.config import GRPOConfig

__all__ = ["GRPOTrainer", "compute_group_advantages", "nanstd", "gamma_weights", "importance_sampling_ratio", "informative_groups",
           "concat_rollouts", "covariance_token_mask", "standardize_advantages"]

logger = logging.getLogger(__name__)

_TOKEN_LEVEL_LOSSES = ("dapo", "cispo", "vespo", "bnpo")  # normalized by completion tokens
_CLIPPED_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


# ----------------------------------------------------------------------------- math (pure functions; nanstd is the core's)
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


def standardize_advantages(advantages: torch.Tensor, rewards_per_func: torch.Tensor) -> torch.Tensor:
    """Return REINFORCE++'s global normalization ``(A - mean A) / (std A + 1e-4)`` over the rows some reward function scored (others stay 0)."""
    scorable = ~torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    if int(scorable.sum()) < 2:
        return advantages
    values = advantages[scorable]
    out = torch.zeros_like(advantages)
    out[scorable] = (values - values.mean()) / (nanstd(values) + 1e-4)
    return out


def informative_groups(rewards_per_func: torch.Tensor, reward_weights: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Return DAPO's filter ``(N/G,)``: True for a group whose weighted rewards are not all equal (it carries a learning signal).

    The weighted reward of a completion is ``sum_f w_f r_f`` over the functions that scored it; a
    completion no function scored is left out, and a group with fewer than two scored completions
    carries no signal.
    """
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # (N,)
    rewards[unscorable] = torch.nan
    std = nanstd(rewards.view(-1, num_generations), dim=1)  # (N/G,), NaN with < 2 scored
    return ~(torch.isnan(std) | torch.isclose(std, torch.zeros_like(std)))


def _concat_extras(values: list, sizes: list[int]):
    """Join the ``extras`` values of several rollouts: per-completion lists are concatenated, dicts key by key, anything else is the first's."""
    first = values[0]
    if isinstance(first, dict) and all(isinstance(v, dict) for v in values):
        return {k: _concat_extras([v.get(k) for v in values], sizes) for k in first}
    if all(isinstance(v, (list, tuple)) and len(v) == n for v, n in zip(values, sizes)):
        return [x for v in values for x in v]
    return first


def concat_rollouts(parts: list[RolloutBatch]) -> RolloutBatch:
    """Return the completions of ``parts`` one after the other (the inverse of ``posttrain.slice_rollout``).

    Per-completion ``extras`` lists are concatenated; the batch's ``policy_version`` is the oldest part's.
    """
    sizes = [len(p) for p in parts]
    return RolloutBatch([x for p in parts for x in p.prompt_ids], [x for p in parts for x in p.completion_ids],
                        [x for p in parts for x in p.logprobs], [x for p in parts for x in p.truncated],
                        min(p.policy_version for p in parts), extras=_concat_extras([p.extras for p in parts], sizes),
                        policy_versions=[v for p in parts for v in p.policy_versions])


def covariance_token_mask(per_token_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, mode: str, ratio: float,
                          lower: float = -math.inf, upper: float = math.inf, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return the ``(B, C)`` bool selection of Cui et al. 2025 (Clip-Cov / KL-Cov) among the completion tokens.

    The covariance of a token is ``(log pi - mean log pi) * (A - mean A)``, both means over the
    completion tokens of the batch given (detached). ``"kl_cov"`` selects the
    ``max(1, floor(ratio * T))`` tokens of highest covariance (T = completion tokens); ``"clip_cov"``
    selects that many tokens uniformly at random (``generator``) among those with
    ``lower <= covariance <= upper`` (all of them when fewer qualify).
    """
    valid = mask.bool()
    count = int(valid.sum())
    if count == 0:
        return torch.zeros_like(valid)
    logps = per_token_logps.detach().double()
    adv = advantages.detach().double().expand_as(logps)
    cov = (logps - logps[valid].mean()) * (adv - adv[valid].mean())  # (B, C)
    k = max(1, int(ratio * count))
    flat_valid = valid.flatten()
    if mode == "kl_cov":
        scores = cov.flatten().masked_fill(~flat_valid, -math.inf)
        chosen = torch.topk(scores, min(k, count)).indices
    else:  # clip_cov
        candidates = torch.nonzero(flat_valid & (cov.flatten() >= lower) & (cov.flatten() <= upper)).flatten()
        order = torch.randperm(candidates.numel(), generator=generator).to(candidates.device)
        chosen = candidates[order[:k]]
    selected = torch.zeros_like(flat_valid)
    selected[chosen] = True
    return selected.view_as(valid)


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


def off_policy_mask(advantages: torch.Tensor, per_token_logps: torch.Tensor, sampling_per_token_logps: torch.Tensor,
                    mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """Return DeepSeek-V3.2's off-policy sequence mask ``(B, 1)``: 0 where A < 0 and the mean sampler-to-policy KL > threshold.

    The KL of a sequence is the mean over its completion tokens of ``log pi_sampler - log pi`` (NaN
    log-probs, which an engine could not score, count as 0).
    """
    kl = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)  # (B, C)
    mean_kl = (kl * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, 1)
    return ((advantages >= 0) | (mean_kl <= threshold)).to(mask.dtype)


def per_token_logps_and_entropies(model, batch: dict, temperature: float, compute_entropy: bool = True, chunk_size: int | None = None):
    """Return ``(logps (B, C), entropies (B, C) or None)`` of the completion tokens at ``temperature`` (``posttrain.completion_logps``)."""
    logps, entropies, _ = completion_logps(model, batch, temperature, compute_entropy=compute_entropy, chunk_size=chunk_size)
    return logps, entropies


def prompt_with_images(prompt, images: list, *, where: str = "the row"):
    """Return a conversational ``prompt`` with its images in its image parts (``{"type": "image", "image": <PIL.Image>}``), as TRL's reward functions see it.

    String contents become text parts and the images go before the first user text when the
    conversation has no image part (``posttrain.prepare_multimodal_messages``); a string prompt is
    returned as is (its placeholders are the model's own image tokens).

    Raises:
        DataError: The number of image parts differs from the number of images (names ``where``).
    """
    if isinstance(prompt, str):
        return prompt
    remaining = iter(images)
    filled = []
    for message in prepare_multimodal_messages(prompt, len(images), where=where):
        if message.get("role") != "tool" and isinstance(message.get("content"), list):
            message = {**message, "content": [{**part, "image": next(remaining)} if isinstance(part, dict) and part.get("type") == "image" else part
                                              for part in message["content"]]}
        filled.append(message)
    return filled


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; a ``(B, 1)`` per-sequence ``x`` is averaged over sequences."""
    if x.shape[1] == 1:
        return x.float().mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- trainer
class GRPOTrainer(TrainerSurface):
    """Train a causal LM with GRPO (and the variants selected by ``loss_type`` / presets); TRL 1.16's ``GRPOTrainer`` API.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path), a
            ``PreTrainedModel`` reward model, or a list of these (default ``args.reward_funcs``).
        args: A :class:`GRPOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows (``datasets.Dataset`` / ``IterableDataset`` / list of dicts): a
            ``prompt`` column (or pre-tokenized ``prompt_ids``) plus any columns for the rewards. An
            ``IterableDataset`` is materialized once (``max_steps`` steps' worth when ``max_steps > 0``).
            With a vision-language model, an ``images`` (list) or ``image`` column (PIL images, paths,
            bytes) conditions each prompt (TRL's format).
        eval_dataset: Same format, or a dict of them (metrics ``eval_<name>_<metric>``).
        processing_class: The tokenizer, or a vision-language model's processor (``AutoProcessor``; its
            tokenizer pads, decodes and stops generation) (default: loaded with the model).
        reward_processing_classes: Tokenizers of the reward models (one per reward function, None for
            plain functions; a single one for a single reward function).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name.
        peft_config: A ``peft.PeftConfig``; with ``beta > 0`` the reference is the adapter-disabled model.
        tools: Tool functions (sync or ``async def``, with type hints and a Google-style docstring): the
            policy may call them; their results are inserted as tokens and it writes on, up to
            ``max_tool_calling_iterations`` rounds (``posttrain.ToolCallingRollout``). Needs
            conversational prompts and a chat template that renders tools.
        rollout_func: ``rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", ...}``
            generating the completions instead of the engine (one entry per completion; an
            ``env_mask`` marks the model-written tokens; extra keys are passed to the reward
            functions), as in TRL.
        environment_factory: An environment class (instantiated without arguments, pooled), or a dict
            of them selected per row by an ``environment`` column: ``reset(**row)`` starts each
            episode (a returned string is appended to the prompt), its other public methods are
            tools, an optional ``get_reward()`` is a reward; reward functions receive ``environments=``.
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Unused for a stable method; kept for a uniform signature.

    Raises:
        posttrain.ConfigError: no reward functions or dataset, mismatched ``reward_weights`` /
            ``reward_processing_classes``, a dataset without ``prompt``, images with ``tools=`` /
            ``environment_factory=``, or an argument that cannot be honoured.
        posttrain.DataError: an image column for a text-only model; a missing or unreadable image, or
            images that do not match the prompt's placeholders (the message names the row).
    """

    _tag_names = ["trl", "grpo"]

    def __init__(self, model=None, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None, tools=None, rollout_func=None, environment_factory=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, GRPOConfig, default_output_dir=default_output_dir(model, "GRPO"))
        if (tools or environment_factory is not None) and rollout_func is not None:
            raise ConfigError("tools= / environment_factory= and rollout_func= both generate the completions: pass one of them.")
        if train_dataset is None and environment_factory is not None:
            train_dataset = self._placeholder_prompts(args, environment_factory)
        elif environment_factory is not None:
            train_dataset = self._with_default_prompts(train_dataset)
        check_online_arguments("GRPO", train_dataset=train_dataset, optimizers=optimizers,
                               reward_funcs=(reward_funcs or args.reward_funcs) if environment_factory is None else True)  # an environment's get_reward is checked later
        self.loop = TrainingLoop(args, method="grpo", allow_experimental=allow_experimental, callbacks=callbacks)
        self._setup_model(model, processing_class, peft_config, quantization_config, lm_head_fp32=args.cast_lm_head_to_fp32)  # before the reference copy
        self.tool_rollout = self._setup_tools(tools, environment_factory)
        self.tools = self.tool_rollout.all_tools() if self.tool_rollout is not None else []  # TRL's: tools= plus the environments' methods
        if reward_funcs or args.reward_funcs or environment_factory is None:
            self._setup_rewards(reward_funcs, reward_processing_classes)
        else:  # an environment's get_reward() is the only reward
            self.reward_funcs, self.reward_func_names, self.reward_weights, self.reward_processing_classes = [], [], torch.zeros(0), []
        self._add_environment_rewards()
        self.ref_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout, needed=args.beta != 0.0)
        check_sync_ref_model(args, self.ref_model)
        self._setup_datasets(train_dataset, eval_dataset)
        self.loop.setup(self.model, method=self)
        self.rollout_func = rollout_func
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self._tokenizer, accelerator=self.loop.accelerator)
        # the transformers backend samples from the trained model itself: no sampler/trainer mismatch to correct
        self.engine_is_policy = self.engine.samples_from_policy and rollout_func is None
        # the prompts and rollouts of every step: the loop consumes the producer's steps; its state is checkpointed per process
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset,
                                        self._produce, reuse=self.args.num_iterations)
        self._sampling = sampling_from_config(args)  # SamplingParams keywords (generation_kwargs applied; unknown keys warn)
        self._setup_logging()
        # entropy bonus (TRL's attribute names); the coefficient moves per step under use_adaptive_entropy
        self.entropy_coef = args.entropy_coef
        self.use_adaptive_entropy = args.use_adaptive_entropy
        self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        self._last_world_entropy = float("inf")  # no bonus until a first step has measured the entropy
        self._entropy_window_stats: torch.Tensor | None = None  # [entropy sum, token count] of the current step
        self._warn_about_loss_settings()

    # -------------------------------------------------------------------------- setup (the core's online steps)
    def _setup_model(self, model, processing_class, peft_config, quantization_config, lm_head_fp32: bool = False) -> None:
        """Load the policy (``posttrain.load_online_policy``) and read its MoE router-loss settings.

        ``processing_class`` may be a processor: ``self._tokenizer`` (TRL's attribute) is its tokenizer,
        which pads, decodes and stops generation (for a tokenizer, the tokenizer itself).
        """
        self.model, self.processing_class = load_online_policy(model, self.args, loop=self.loop, processing_class=processing_class, peft_config=peft_config,
                                                               quantization_config=quantization_config, tags=self._tag_names, lm_head_fp32=lm_head_fp32)
        self._tokenizer = processor_tokenizer(self.processing_class)
        self.pad_token_id = self._tokenizer.pad_token_id
        self.router_aux_loss_coef, self.aux_loss_enabled = router_aux_loss_settings(self.model, self.args.router_aux_loss_coef)

    @staticmethod
    def _placeholder_prompts(args, environment_factory) -> list[dict]:
        """Without a ``train_dataset`` the environment writes the task in ``reset()`` (TRL 1.16): one step's rows of empty user prompts, cycled ``max_steps`` steps."""
        if isinstance(environment_factory, dict):
            raise ConfigError("A dict environment_factory (several environments) requires a `train_dataset` with an 'environment' column "
                              "routing each row; pass one, or a single environment class.")
        if args.max_steps <= 0:
            raise ConfigError("Without a train_dataset (the environment writes each prompt in reset()), set max_steps > 0: it is the training length.")
        rows = args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations
        return [{"prompt": [{"role": "user", "content": ""}]} for _ in range(max(1, rows))]

    @staticmethod
    def _with_default_prompts(dataset):
        """With an environment, rows may omit ``prompt`` (TRL 1.16): ``reset()`` then writes it into an empty user message."""
        empty = [{"role": "user", "content": ""}]
        names = getattr(dataset, "column_names", None)
        if isinstance(names, list):  # a datasets.Dataset
            return dataset if "prompt" in names else dataset.add_column("prompt", [empty] * len(dataset))
        if isinstance(dataset, (list, tuple)):
            return [row if "prompt" in row else {**row, "prompt": empty} for row in dataset]
        return dataset

    def _setup_tools(self, tools, environment_factory) -> ToolCallingRollout | None:
        """The core's tool-calling rollout for ``tools=`` / ``environment_factory=`` (None without them)."""
        if not tools and environment_factory is None:
            return None
        args = self.args
        try:
            return ToolCallingRollout(self.processing_class, tools=tools, environment_factory=environment_factory,
                                      max_tool_calling_iterations=args.max_tool_calling_iterations, max_completion_length=args.max_completion_length,
                                      tool_timeout=args.tool_call_timeout, chat_template_kwargs=args.chat_template_kwargs)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _setup_rewards(self, reward_funcs, reward_processing_classes) -> None:
        """Resolve the reward functions (TRL's ``reward_funcs`` / ``reward_func_names`` / ``reward_weights`` / ``reward_processing_classes``)."""
        rewards = resolve_online_rewards(reward_funcs, self.args, loop=self.loop, reward_processing_classes=reward_processing_classes)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights  # weights (F,)
        self.reward_processing_classes = rewards.processing_classes

    def _add_environment_rewards(self) -> None:
        """Append one reward function per environment class with ``get_reward()``, named after the class, weight 1 (TRL's rule:
        ``reward_weights`` covers ``reward_funcs``); refuse a run with no reward source at all."""
        for name, func in self.tool_rollout.reward_functions() if self.tool_rollout is not None else []:
            self.reward_funcs = [*self.reward_funcs, func]
            self.reward_func_names = [*self.reward_func_names, name]
            self.reward_processing_classes = [*self.reward_processing_classes, None]
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(1)])
        if not self.reward_funcs:
            raise ConfigError("No reward source provided: pass reward_funcs=[...], or an environment_factory whose environment defines get_reward().")

    def _setup_datasets(self, train_dataset, eval_dataset) -> None:
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None

    def _setup_logging(self) -> None:
        """TRL's completion log (``_logs``; written at each training log with ``log_completions``)."""
        args = self.args
        self._completion_log = CompletionLog(args.per_device_train_batch_size * args.gradient_accumulation_steps)  # one rollout
        self._logs = self._completion_log.logs
        self.add_callback(self._completion_log.callback(args, self.loop))

    def _warn_about_loss_settings(self) -> None:
        args = self.args
        if args.loss_type == "luspo" and args.importance_sampling_level != "sequence":
            logger.warning("loss_type='luspo' is meant for importance_sampling_level='sequence' (the paper's setup).")
        if args.loss_type == "vespo" and args.importance_sampling_level != "token":
            logger.warning("VESPO computes its sequence-level weight itself: set importance_sampling_level='token' (the default).")
        if args.importance_sampling_level == "sequence" and args.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
            logger.warning(
                f"importance_sampling_level='sequence' with loss_type={args.loss_type!r}: the loss sums per-token contributions, which "
                "weights each sequence by its completion length instead of optimizing the per-sequence objective; use loss_type='grpo' "
                "for the GSPO paper's setup."
            )
        if (args.loss_type == "vespo" and not self.engine_is_policy and args.vllm_importance_sampling_correction
                and args.vllm_importance_sampling_mode not in ("token_truncate", "token_mask")):
            raise ConfigError(f"loss_type='vespo' with an external sampler needs vllm_importance_sampling_mode 'token_truncate' or 'token_mask' (got {args.vllm_importance_sampling_mode!r}).")

    # -------------------------------------------------------------------------- data
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``); a streamed ``train_dataset`` keeps the rows ``max_steps`` draw."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        dataset = prepare_prompt_dataset(dataset, name, method="GRPO", prompt_ids=lambda row: self._prompt_ids(row, where=f"{name} row 0"), limit=limit)
        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0]) if len(dataset) else []
        if image_column(columns) is not None and self.tool_rollout is not None:
            raise ConfigError(f"{name} has an image column {image_column(columns)!r} and tools= / environment_factory= are set: tool-calling "
                              "episodes do not carry images yet; train on the images without tools, or drop the image column.")
        return dataset

    def _prompt_ids(self, row: dict, where: str = "the row") -> list[int]:
        """Token ids of a row's prompt: its ``prompt_ids`` as given, or the tokenized ``prompt`` (messages via the chat template)."""
        return self._encode_prompt(row, where)[0]

    def _encode_prompt(self, row: dict, where: str = "the row") -> tuple[list[int], dict | None, list | None]:
        """Return ``(ids, model_inputs, images)`` of a row's prompt; the last two are None for a text row.

        A tokenizer tokenizes as ever (``posttrain.prompt_token_ids``). A processor renders the prompt
        with its chat template and, for a row with an ``images`` / ``image`` column, its images
        (``posttrain.vision_prompt_inputs``: ids with the image tokens expanded, and ``pixel_values`` &
        co.); an empty image list is a text row (TRL). ``where`` is named in errors.

        Raises:
            DataError: an image column for a text-only model, a missing or unreadable image, images
                that do not match the prompt's image placeholders, or pre-tokenized ``prompt_ids`` with images.
            ConfigError: images with a ``processing_class`` that is not a processor.
        """
        images = None
        if image_column(row) is not None:
            check_vision_model(self.model, row, dataset_name=where)
            images = row_images(row, where=where) or None
        if images is None and (row.get("prompt_ids") is not None or not is_processor(self.processing_class)):
            return prompt_token_ids(row, self.processing_class, chat_template_kwargs=self.args.chat_template_kwargs), None, None
        if row.get("prompt_ids") is not None:
            raise DataError(f"{where}: pre-tokenized 'prompt_ids' cannot carry images (the processor expands the image tokens); give the 'prompt' instead.")
        if not is_processor(self.processing_class):
            raise ConfigError(f"{where} has images but processing_class is a {type(self.processing_class).__name__}, not a processor: "
                              "pass the model's processor (AutoProcessor.from_pretrained(...)) as processing_class.")
        ids, model_inputs = vision_prompt_inputs(self.processing_class, row["prompt"], images, where=where,
                                                 chat_template_kwargs=self.args.chat_template_kwargs, tools=row.get("tools"))
        return ids, model_inputs or None, images

    def _prompts_per_step(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's attribute; TRL's is the identity): :meth:`collate`, which keeps them raw."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    def count_items(self, batch: dict) -> int:
        return batch["num_completion_tokens"] if self.args.loss_type in _TOKEN_LEVEL_LOSSES else batch["completion_ids"].shape[0]

    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: generate, score and split one step's rollouts (the producer reuses them ``num_iterations`` times)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_score(request.rows, seed, indices=request.indices)

    def _generate(self, prompts: list, prompt_ids: list[list[int]] | None = None, num_generations: int = 1, seed: int | None = None,
                  model_inputs: list[dict] | None = None) -> RolloutBatch:
        """Return the rollout of ``prompts`` (``posttrain.generate_rollout``): the engine's, or ``self.rollout_func``'s (TRL's hook).

        ``model_inputs`` (images: one dict per distinct prompt) condition the engine's sampling, and
        the rollout carries them per completion in ``extras["model_inputs"]`` for the forwards.
        """
        if prompt_ids is None and self.rollout_func is None:
            prompt_ids = [self._prompt_ids({"prompt": p}) for p in prompts]
        if model_inputs is not None and self.rollout_func is None:
            rollout = self.engine.generate(prompt_ids[::num_generations], SamplingParams(n=num_generations, seed=seed, **self._sampling),
                                           model_inputs=model_inputs)
        else:
            rollout = generate_rollout(prompts, prompt_ids, engine=self.engine, sampling=self._sampling, num_generations=num_generations, seed=seed,
                                       rollout_func=self.rollout_func, trainer=self, max_completion_length=self.args.max_completion_length,
                                       stop_token_ids=(self._tokenizer.eos_token_id, self.pad_token_id))
        if model_inputs is not None:  # the group members share their prompt's inputs
            rollout.extras = {**rollout.extras, "model_inputs": [inputs for inputs in model_inputs for _ in range(num_generations)]}
        return rollout

    def _generate_and_score(self, rows: list[dict], seed: int, mode: str = "train", indices: list[int] | None = None) -> list[dict]:
        args = self.args
        num_generations = args.num_generations if mode == "train" else (args.num_generations_eval or args.num_generations)
        # 1. rollout: G completions per prompt, grouped prompt0 x G, prompt1 x G, ...
        # 2. reward: (N, F), NaN where a function returned None
        if mode == "train" and args.dynamic_sampling:  # DAPO: only groups with a learning signal, more prompts from the source
            rows, prompts, rollout, rewards_per_func, sampling_metrics = self._dynamic_sampling(rows, seed, num_generations, indices)
        else:
            prompts, rollout, rewards_per_func = self._rollout_and_rewards(rows, seed, num_generations, self._row_names(rows, indices, mode))
            sampling_metrics = {}

        # 3. micro-batches of per_device_train_batch_size completions (one in eval), with old / reference log-probs
        size = args.per_device_train_batch_size if mode == "train" else len(rollout)
        micro_batches = [self._with_logps(batch, mode) for batch in rollout_micro_batches(
            rollout, size, self.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of, mask_truncated=args.mask_truncated_completions)]

        # 4. advantage: (N,) from the global batch's rewards (this process's in eval), sliced into the micro-batches
        if mode == "train":
            (all_rewards,), local = gather_across_processes(self.loop.accelerator, rewards_per_func)  # (world * N, F)
        else:
            all_rewards, local = rewards_per_func, slice(0, len(rollout))
        advantages, is_std_zero = compute_group_advantages(
            all_rewards, self.reward_weights, num_generations, args.scale_rewards, args.multi_objective_aggregation
        )
        if args.normalize_advantages:  # REINFORCE++-baseline: then standardize over the global batch
            advantages = standardize_advantages(advantages, all_rewards)
        advantages, is_std_zero = advantages[local], is_std_zero[local]  # both per row (N,)
        world = self.loop.accelerator.num_processes if mode == "train" else 1
        step_tokens = max(1, sum(b["num_completion_tokens"] for b in micro_batches))
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch["advantages"] = advantages[start : start + size]  # (b,)
            # a micro-batch's share of a per-step mean is its mean / (micro-batches x processes): the loop sums the shares
            batch["share_divisor"] = torch.tensor(float(len(micro_batches) * world))
            if args.loss_type == "bnpo":  # BNPO normalizes by this process's step tokens, then averages over processes
                batch["bnpo_normalizer"] = torch.tensor(float(step_tokens * world))
            if args.cov_regularization == "clip_cov":  # Clip-Cov's random draw, fixed with the rollout (exact resume)
                batch["cov_seed"] = int(seed) * 1_000 + start // size

        # 5. metrics of the rollout (the loss returns them with its own); the completion log keeps training rollouts only
        metrics = reward_and_length_metrics(rollout, rewards_per_func, self.reward_weights, self.reward_func_names, is_std_zero, num_generations)
        attach_rollout_metrics(micro_batches, {**metrics, **self._completion_log.pop_metrics(), **self._importance_sampling_metrics(micro_batches),
                                               **sampling_metrics})
        if mode == "train":
            completions = self._tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            self._completion_log.record(prompts, completions, rewards_per_func, self.reward_func_names, advantages)
        else:
            self._completion_log.discard_extra()
        return micro_batches

    @staticmethod
    def _row_names(rows: list[dict], indices: list[int] | None, mode: str = "train") -> list[str]:
        """What an error names for each row: ``train_dataset row <index>`` (or the row's place in an eval batch)."""
        if indices is None:
            return [f"{mode} batch row {i}" for i in range(len(rows))]
        return [f"train_dataset row {i}" for i in indices]

    def _rollout_and_rewards(self, rows: list[dict], seed: int, num_generations: int, names: list[str] | None = None) -> tuple[list, RolloutBatch, torch.Tensor]:
        """Return ``(prompts (N,), rollout, rewards_per_func (N, F))`` of ``num_generations`` completions of each row.

        Rows with images: the processor's ids and model inputs condition the rollout; the reward
        functions get the prompts with their images (TRL's), the returned prompts (for the completion
        log) keep only the image placeholders. ``names`` (one per row) are what errors name.
        """
        if self.tool_rollout is not None:  # multi-turn episodes with tools / environments (one per completion)
            expanded = [row for row in rows for _ in range(num_generations)]  # (N,)
            result = self.tool_rollout.rollout(self.engine, expanded, SamplingParams(n=1, seed=seed, **self._sampling))
            rewards_per_func = score_rollout(rows, result.prompts, result.rollout, num_generations, reward_funcs=self.reward_funcs,
                                             reward_func_names=self.reward_func_names, tokenizer=self._tokenizer, trainer_state=self.loop.state,
                                             log=self._completion_log, completions=result.completions,
                                             reward_kwargs={"environments": result.environments} if result.environments is not None else None)
            return result.prompts, result.rollout, rewards_per_func
        names = names or [f"row {i}" for i in range(len(rows))]
        encoded = [self._encode_prompt(row, where) for row, where in zip(rows, names)]  # (ids, model inputs or None, images or None) per row
        prompt_ids = [ids for ids, _, _ in encoded for _ in range(num_generations)]  # (N,) grouped: prompt0 x G, prompt1 x G, ...
        prompts = [row["prompt"] if "prompt" in row else self._tokenizer.decode(ids, skip_special_tokens=True)
                   for row, (ids, _, _) in zip(rows, encoded) for _ in range(num_generations)]  # (N,) as posttrain.expand_prompts
        model_inputs, reward_prompts = None, prompts
        if any(inputs for _, inputs, _ in encoded):  # a vision-language batch: every row conditions on its images
            model_inputs = [inputs for _, inputs, _ in encoded]  # one dict per distinct prompt
            reward_prompts = [prompt_with_images(prompt, images, where=where) if images else prompt for prompt, (_, _, images), where in
                              zip(prompts[::num_generations], encoded, names) for _ in range(num_generations)]  # (N,)
        rollout = self._generate(reward_prompts, prompt_ids, num_generations, seed, model_inputs)  # N = P * G completions
        rewards_per_func = score_rollout(rows, reward_prompts, rollout, num_generations, reward_funcs=self.reward_funcs, reward_func_names=self.reward_func_names,
                                         tokenizer=self._tokenizer, trainer_state=self.loop.state, log=self._completion_log)  # (N, F)
        return prompts, rollout, rewards_per_func

    def _dynamic_sampling(self, rows: list[dict], seed: int, num_generations: int, indices: list[int] | None = None) -> tuple[list, list, RolloutBatch, torch.Tensor, dict]:
        """DAPO's dynamic sampling: keep the groups with a learning signal, drawing more prompts until ``len(rows)`` groups are kept.

        Round 0 generates ``rows`` (with the step's seed, as without the option); every further
        round takes the prompt source's next prompts (so the source's checkpointed position makes a
        resumed run draw the same ones) with a seed derived from the step's and the round. Every
        process runs the same number of rounds (until all are full, or ``max_num_gen_batches``
        rounds; 0 = one epoch of prompts); a process still short then fills its step with its first
        dropped groups, whose advantages are zero.

        Returns:
            ``(rows, prompts, rollout, rewards_per_func, metrics)`` of the kept groups, in generation order.
        """
        args, accelerator = self.args, self.loop.accelerator
        source = self.producer.source
        want = len(rows)
        cap = args.max_num_gen_batches or max(1, source.steps_per_epoch)
        kept, dropped, generated, rounds = [], [], 0, 0
        batch_rows = rows
        while True:
            round_seed = seed if rounds == 0 else seed + 1_000_000_007 * rounds
            prompts, rollout, rewards_per_func = self._rollout_and_rewards(batch_rows, round_seed, num_generations, self._row_names(batch_rows, indices))
            signal = informative_groups(rewards_per_func, self.reward_weights, num_generations).tolist()  # (P,)
            for g, row in enumerate(batch_rows):
                part = slice(g * num_generations, (g + 1) * num_generations)
                (kept if signal[g] else dropped).append((row, prompts[part], slice_rollout(rollout, part), rewards_per_func[part]))
            rounds, generated = rounds + 1, generated + len(batch_rows)
            full = torch.tensor([float(len(kept) >= want)])
            if accelerator.num_processes > 1:  # collective generation and gathers need the same rounds everywhere
                (full,), _ = gather_across_processes(accelerator, full)
            if bool(full.min() > 0) or rounds >= cap:
                break
            _, indices = source.next_indices()
            batch_rows = [dict(self.train_dataset[i]) for i in indices]
        chosen = kept[:want]
        filled = want - len(chosen)
        chosen += dropped[:filled]
        metrics = {"dynamic_sampling/num_gen_batches": float(rounds), "dynamic_sampling/kept_fraction": len(kept) / generated,
                   "dynamic_sampling/filled_groups": float(filled)}
        return ([c[0] for c in chosen], [p for c in chosen for p in c[1]], concat_rollouts([c[2] for c in chosen]),
                torch.cat([c[3] for c in chosen]), metrics)

    def _with_logps(self, batch: dict, mode: str) -> dict:
        """Add a micro-batch's no-grad log-probs: pi_old and the reference's when needed, and the sampler correction when another engine sampled."""
        args = self.args
        sampling_logps = batch.pop("sampling_logprobs")  # (b, C)
        apply_is = not self.engine_is_policy and args.vllm_importance_sampling_correction
        need_old = (mode == "train" and args.num_iterations > 1) or not self.engine_is_policy
        add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=args.temperature, need_old=need_old, need_ref=args.beta != 0.0,
                              ref_model=self.ref_model, old_from_sampler=sampler_is_old_policy(self._sampling, args.temperature, self.engine_is_policy),
                              device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=args.logprob_chunk_size)
        if apply_is:
            mask = batch["completion_mask"].float() * batch["tool_mask"] if "tool_mask" in batch else batch["completion_mask"].float()
            batch["importance_sampling_ratio"] = importance_sampling_ratio(
                batch["old_per_token_logps"], sampling_logps, mask, args.vllm_importance_sampling_mode,
                args.vllm_importance_sampling_clip_min, args.vllm_importance_sampling_clip_max,
            )
        if args.off_policy_mask_threshold is not None and not self.engine_is_policy:
            batch["sampling_per_token_logps"] = sampling_logps.float()  # the sampler's own view of the rollout
        return batch

    @staticmethod
    def _importance_sampling_metrics(micro_batches: list[dict]) -> dict:
        """``sampling/importance_sampling_ratio/{mean,min,max}`` over the rollout's completion tokens (when a correction applies)."""
        if "importance_sampling_ratio" not in micro_batches[0]:
            return {}
        ratios = []
        for b in micro_batches:
            r = b["importance_sampling_ratio"]
            trained = b["completion_mask"] * b["tool_mask"] if "tool_mask" in b else b["completion_mask"]  # tool tokens have no ratio
            ratios.append(r.flatten() if r.shape[1] == 1 else r[trained.bool()])
        flat = torch.cat(ratios)
        return {f"sampling/importance_sampling_ratio/{k}": getattr(flat, k)().item() for k in ("mean", "min", "max")} if flat.numel() else {}

    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Return the tokens whose entropy is at or above the ``threshold`` quantile of the unmasked entropies (TRL's signature).

        The quantile is taken over this micro-batch's completion tokens (TRL gathers them across
        processes); padding is never selected, and nothing is when every token is masked.
        """
        valid = entropies[mask.bool()].float()
        if valid.numel() == 0:
            return torch.zeros_like(entropies, dtype=torch.bool)
        return ((entropies * mask) >= torch.quantile(valid, threshold)) & mask.bool()

    @staticmethod
    def get_off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold) -> torch.Tensor:
        """TRL's name for :func:`off_policy_mask`: ``(B, 1)`` 1.0 = keep, 0.0 = drop."""
        return off_policy_mask(advantages, per_token_logps, sampling_per_token_logps, mask, off_policy_threshold)

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        args = self.args
        training = model.training
        mask = batch["completion_mask"].float()  # (B, C)
        if "tool_mask" in batch:  # tool / environment tokens: attended to, never trained on (TRL's tool_mask)
            mask = mask * batch["tool_mask"]
        per_token_logps, entropies, aux_loss = completion_logps(model, batch, args.temperature, entropy_grad=self._entropy_bonus_enabled,
                                                        router_aux_loss=self.aux_loss_enabled, chunk_size=args.logprob_chunk_size)  # (B, C), (B, C)
        advantages = batch["advantages"].unsqueeze(1)  # (B, 1)
        # with one iteration on the trained model's own samples, old == current (detached): no extra forward
        old_per_token_logps = batch.get("old_per_token_logps", per_token_logps.detach())  # (B, C)
        is_ratio = batch.get("importance_sampling_ratio")  # (B, C) / (B, 1) / None

        entropy_mask = None
        if args.top_entropy_quantile < 1.0:  # keep the top-rho tokens by entropy (this micro-batch's quantile)
            entropy_mask = self.get_high_entropy_mask(entropies.detach(), mask, 1 - args.top_entropy_quantile)  # (B, C)
        keep = None
        if args.off_policy_mask_threshold is not None:  # sampler log-probs when another engine sampled, else pi_old
            sampling = batch.get("sampling_per_token_logps", old_per_token_logps)
            keep = off_policy_mask(advantages, per_token_logps, sampling, mask, args.off_policy_mask_threshold)  # (B, 1)

        log_ratio = per_token_logps - old_per_token_logps  # (B, C)
        if args.importance_sampling_level == "token":
            log_importance_weights = log_ratio  # (B, C)
        else:  # GSPO: length-normalized sequence log-ratio
            log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # (B, 1)
        coef_1 = torch.exp(log_importance_weights)  # (B, C) or (B, 1)

        if args.beta != 0.0:  # k3 (or k2) estimate of KL(pi || pi_ref), per token
            ref = batch["ref_per_token_logps"]
            if args.kl_estimator == "k2":
                per_token_kl = 0.5 * (per_token_logps - ref) ** 2  # (B, C)
            else:
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
        if keep is not None:
            per_token_loss = per_token_loss * keep
        if entropy_mask is not None:
            per_token_loss = per_token_loss * entropy_mask
        if is_ratio is not None and args.loss_type != "vespo":
            per_token_loss = per_token_loss * is_ratio
        cov_selected = None
        if args.cov_regularization is not None:  # Cui et al. 2025: act on the high-covariance tokens of this micro-batch
            per_token_loss = per_token_loss.expand_as(mask)
            if args.cov_regularization == "clip_cov":  # detach the gradient of a random few in [lb, ub]
                generator = torch.Generator().manual_seed(batch.get("cov_seed", args.seed))
                cov_selected = covariance_token_mask(per_token_logps, advantages, mask, "clip_cov", args.clip_cov_ratio,
                                                     args.clip_cov_lb, args.clip_cov_ub, generator)
                per_token_loss = torch.where(cov_selected, per_token_loss.detach(), per_token_loss)
            else:  # kl_cov: |log pi - log pi_old| on the top-k
                cov_selected = covariance_token_mask(per_token_logps, advantages, mask, "kl_cov", args.kl_cov_ratio)
                per_token_loss = per_token_loss + args.kl_cov_coef * cov_selected.to(per_token_logps.dtype) * (per_token_logps - old_per_token_logps).abs()
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

        metrics = {"entropy": masked_mean(entropies.detach(), mask)}
        share = batch.get("share_divisor", torch.ones(()))
        if self._entropy_bonus_enabled:
            # the bonus is the mean per-token entropy H over the trained tokens (L = L_policy - coef * H), the
            # same for every loss_type; each micro-batch contributes its mean divided by its share
            trained = mask if entropy_mask is None else mask * entropy_mask
            mean_entropy = (entropies * trained).sum() / trained.sum().clamp(min=1.0)
            applied = self.entropy_coef
            if self.use_adaptive_entropy and self._last_world_entropy > args.entropy_target:
                applied = 0.0  # adaptive control applies the bonus only at or below the target entropy
            metrics["policy_loss"] = loss.detach() * share
            loss = loss - applied * mean_entropy / share
            if training:
                metrics["entropy_coef"] = torch.tensor(float(self.entropy_coef), device=mask.device)
                if self.use_adaptive_entropy:
                    stats = torch.stack([(entropies.detach() * trained).sum(), trained.sum()]).float()
                    self._entropy_window_stats = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
        if self.aux_loss_enabled and aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / share.to(aux_loss.device)
            metrics["aux_loss"] = aux_loss.detach().float()
        if args.beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl.detach(), mask)
        if cov_selected is not None:
            metrics[f"{args.cov_regularization}/selected_fraction"] = masked_mean(cov_selected.float(), mask)
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
        self._sync_ref_model(model, state)
        if self.use_adaptive_entropy:
            self._update_entropy_coef()

    def _update_entropy_coef(self) -> None:
        """Skywork-OR1's controller: raise the coefficient when the step's entropy is at or below the target, else lower it."""
        args, accelerator = self.args, self.loop.accelerator
        stats = self._entropy_window_stats if self._entropy_window_stats is not None else torch.zeros(2)
        if accelerator.num_processes > 1:
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu()
        entropy = float(stats[0] / stats[1].clamp(min=1.0))
        if entropy <= args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + args.entropy_coef_delta, args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - args.entropy_coef_delta, args.entropy_coef_min)
        self._last_world_entropy = entropy
        self._entropy_window_stats = None

    @torch.no_grad()
    def _sync_ref_model(self, model, state) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` steps, ref = alpha * policy + (1 - alpha) * ref."""
        args = self.args
        if not args.sync_ref_model or self.ref_model is None or state.global_step % args.ref_model_sync_steps != 0:
            return
        sync_reference_model(self.ref_model, model, args.ref_model_mixup_alpha, accelerator=self.loop.accelerator)

    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss and the rollout metrics of ``num_generations_eval`` samples per eval prompt (seeded by ``seed``).

        Each eval batch is rolled out, scored and given advantages within its groups (no
        cross-process statistics), then its loss is computed as in training (``posttrain.evaluate_online``).
        """
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_score(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        state = {"policy_version": self.engine.policy_version,
                 "entropy_coef": float(self.entropy_coef), "last_world_entropy": float(self._last_world_entropy)}
        if self.args.sync_ref_model and self.ref_model is not None:  # the reference moves: resume needs it
            state["ref_model"] = {k: v.detach().cpu() for k, v in self.ref_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        self.entropy_coef = float(state.get("entropy_coef", self.args.entropy_coef))
        self._last_world_entropy = float(state.get("last_world_entropy", float("inf")))
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])
