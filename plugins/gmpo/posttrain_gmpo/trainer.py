"""GMPO on the posttrain loop (heavy: imports torch).

Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv:2507.20673) is GRPO with another
policy objective: each sequence is weighted by the GEOMETRIC mean of its token importance ratios,
clipped token by token in log space, instead of GRPO's arithmetic mean of clipped ratios. TRL 1.16's
``trl.experimental.gmpo.GMPOTrainer`` changes only GRPO's loss; so does this plugin. Everything else is the
core's online scaffold, as GRPO and RLOO use it; the blocks shared with ``posttrain_grpo.trainer`` are
marked ``# Copied from posttrain_grpo.trainer.<name>`` (word for word, GRPO -> GMPO) and
tests/test_copied_blocks.py diffs them. One optimizer step, in order::

    prompts (P = per_device_train_batch_size * gradient_accumulation_steps / num_generations)
      -> rollout: num_generations completions per prompt (RolloutEngine, seeded by the step)
      -> reward: every reward function on every completion            (N, F), N = P * G
      -> advantage: group-normalized, NaN-aware (GRPO's)               (N,)
      -> old / reference log-probs (no-grad forwards, only when needed)
      -> gradient_accumulation_steps micro-batches of per_device_train_batch_size completions
      -> loss per micro-batch: -exp(mean_t clip(log pi - log pi_old)) * A  (+ beta * sequence-mean k3 KL),
         a mean over the step's sequences

The clip is sign-aware (PPO's min written in log space): for A > 0 the log-ratio is capped at
``epsilon_high``, for A < 0 floored at ``-epsilon``. Options that act: ``epsilon`` / ``epsilon_high``
(log space, default 0.4), ``beta`` (k3 KL to a frozen reference, averaged per sequence),
``top_entropy_quantile`` (drop low-entropy tokens from the geometric mean), ``num_iterations``,
``scale_rewards``, ``multi_objective_aggregation``, ``mask_truncated_completions``, ``sync_ref_model``,
the MoE router loss. GRPO's loss variants are accepted and ignored, as in TRL (see the config).
Vision-language models as GRPO's (``image`` / ``images`` columns, the processor as ``processing_class``):
GRPO's copied blocks encode each prompt with its images, generation is conditioned on them and every
forward gets them (``extras["model_inputs"]`` -> ``batch["model_inputs"]``).
Departures from TRL: docs/methods/gmpo.md.
"""

from __future__ import annotations

import logging

import torch

from posttrain import (  # the loop and the core's online steps (the online scaffold)
    CompletionLog, ConfigError, DataError, ProduceRequest, RolloutBatch, RolloutProducer, TrainerSurface, TrainingLoop, add_old_and_ref_logps, as_config,
    attach_rollout_metrics, build_reference_model, build_rollout_engine, check_online_arguments, check_sync_ref_model, completion_logps,
    default_output_dir, evaluate_online, gather_across_processes, generate_rollout, load_online_policy, nanstd,
    prepare_prompt_dataset, prompt_token_ids, resolve_online_rewards, reward_and_length_metrics, rollout_micro_batches, router_aux_loss_settings,
    sampler_is_old_policy, sampling_from_config, score_rollout, sync_reference_model, SamplingParams,
)
from posttrain import (  # vision-language models (plugin API 1.9)
    check_vision_model, image_column, is_processor, prepare_multimodal_messages, processor_tokenizer, row_images, vision_prompt_inputs,
)

from posttrain_gmpo.config import GMPOConfig

__all__ = ["GMPOTrainer", "compute_group_advantages", "gmpo_sequence_loss", "nanstd"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- math (pure functions; nanstd is the core's)
# GRPO's group advantages, which TRL's GMPOTrainer inherits (TRL 1.16). Originally copied from posttrain_grpo.trainer, unmarked
# because posttrain's GRPO version takes options (REINFORCE++-style renormalization) that TRL's GMPO does not have.
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


def gmpo_sequence_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       epsilon_low: float, epsilon_high: float, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Return GMPO's per-sequence policy loss ``(B,)`` and its clip indicators.

    ``loss_i = -A_i * exp(sum_t m_it * c_it / max(1, sum_t m_it))`` with ``c_it`` the log-ratio
    ``log pi - log pi_old`` clipped sign-aware: ``min(c, epsilon_high)`` where ``A_i > 0``,
    ``max(c, -epsilon_low)`` where ``A_i <= 0``. ``m`` is ``mask`` times ``token_mask`` (the
    high-entropy selection) when given.

    Args:
        per_token_logps, old_per_token_logps, mask: ``(B, C)``.
        advantages: ``(B,)``.
        epsilon_low, epsilon_high: the log-space clipping range.
        token_mask: ``(B, C)`` tokens kept in the geometric mean, or None (all of ``mask``).

    Returns:
        ``(loss (B,), {"is_low": (B, C) bool, "is_high": (B, C) bool})``.
    """
    log_ratio = per_token_logps - old_per_token_logps  # (B, C)
    adv = advantages.unsqueeze(1)  # (B, 1)
    clamped = torch.clamp(log_ratio, min=-epsilon_low, max=epsilon_high)
    clipped = torch.where(adv > 0, torch.minimum(log_ratio, clamped), torch.maximum(log_ratio, clamped))  # (B, C)
    kept = mask if token_mask is None else mask * token_mask
    log_weight = (clipped * kept).sum(-1) / kept.sum(-1).clamp(min=1.0)  # (B,) log of the geometric mean
    loss = -torch.exp(log_weight) * advantages  # (B,)
    return loss, {"is_low": (log_ratio < -epsilon_low) & (adv < 0), "is_high": (log_ratio > epsilon_high) & (adv > 0)}

# Copied from posttrain_grpo.trainer.per_token_logps_and_entropies
def per_token_logps_and_entropies(model, batch: dict, temperature: float, compute_entropy: bool = True, chunk_size: int | None = None):
    """Return ``(logps (B, C), entropies (B, C) or None)`` of the completion tokens at ``temperature`` (``posttrain.completion_logps``)."""
    logps, entropies, _ = completion_logps(model, batch, temperature, compute_entropy=compute_entropy, chunk_size=chunk_size)
    return logps, entropies


# Copied from posttrain_grpo.trainer.prompt_with_images
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


# Copied from posttrain_grpo.trainer.masked_mean
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ``mask``; a ``(B, 1)`` per-sequence ``x`` is averaged over sequences."""
    if x.shape[1] == 1:
        return x.float().mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- trainer
class GMPOTrainer(TrainerSurface):
    """Train a causal LM with GMPO (Geometric-Mean Policy Optimization); TRL 1.16's ``trl.experimental.gmpo.GMPOTrainer`` API.

    ``GMPOTrainer(model, reward_funcs, args=None, **kwargs)`` in TRL takes GRPOTrainer's keywords;
    they are spelled out here.

    Args:
        model: A model object or Hub id / local directory (default ``args.model_name_or_path``).
        reward_funcs: A callable, a name ('accuracy', 'module:function', a reward-model path), a
            ``PreTrainedModel`` reward model, or a list of these (default ``args.reward_funcs``).
        args: A :class:`GMPOConfig`, a ``transformers.TrainingArguments`` or a dict of fields.
        train_dataset: Prompt-only rows (``datasets.Dataset`` / ``IterableDataset`` / list of dicts): a
            ``prompt`` column (or pre-tokenized ``prompt_ids``) plus any columns for the rewards. With a
            vision-language model, an ``images`` (list) or ``image`` column conditions each prompt (TRL's format).
        eval_dataset: Same format, or a dict of them (metrics ``eval_<name>_<metric>``).
        processing_class: The tokenizer, or a vision-language model's processor (``AutoProcessor``) (default: loaded with the model).
        reward_processing_classes: Tokenizers of the reward models (one per reward function, None for plain functions).
        callbacks: ``transformers.TrainerCallback`` objects (or classes).
        optimizers: Only ``(None, None)``: the loop builds the optimizer and schedule from ``args``.
        quantization_config: A ``BitsAndBytesConfig`` for a model given by name.
        peft_config: A ``peft.PeftConfig``; with ``beta > 0`` the reference is the adapter-disabled model.
        tools: Only None: multi-turn tool calling during rollouts is not offered.
        rollout_func: ``rollout_func(prompts, trainer) -> {"prompt_ids", "completion_ids", "logprobs", ...}`` (TRL's hook).
        environment_factory: Only None (environments are not offered).
        rollout_engine: A ``posttrain.RolloutEngine`` (default: one on ``args.rollout_backend``).
        allow_experimental: Opt in to this experimental method (or ``posttrain.activate('gmpo', allow_experimental=True)``).

    Raises:
        posttrain.ConfigError: no reward functions or dataset, mismatched ``reward_weights``, a dataset
            without ``prompt``, images with a tokenizer (not a processor), or an argument that cannot be honoured.
        posttrain.DataError: an image column for a text-only model; a missing or unreadable image, or
            images that do not match the prompt's placeholders (the message names the row).
    """

    _tag_names = ["trl", "gmpo"]

    def __init__(self, model=None, reward_funcs=None, args: GMPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, reward_processing_classes=None, callbacks=None, optimizers=(None, None), quantization_config=None,
                 peft_config=None, tools=None, rollout_func=None, environment_factory=None, rollout_engine=None, allow_experimental=False):
        self.args = args = as_config(args, GMPOConfig, default_output_dir=default_output_dir(model, "GMPO"))
        # the maturity gate first: an experimental method without an opt-in is refused before any other check
        self.loop = TrainingLoop(args, method="gmpo", allow_experimental=allow_experimental, callbacks=callbacks)
        if tools:
            raise ConfigError("tools= (multi-turn tool calling during rollouts) is not offered by posttrain's GMPO: score tool calls with a reward function, or use TRL.")
        if environment_factory is not None:
            raise ConfigError("environment_factory= is not offered by posttrain's GMPO: keep the data in train_dataset and score completions with reward_funcs (or generate with rollout_func).")
        check_online_arguments("GMPO", train_dataset=train_dataset, reward_funcs=reward_funcs or args.reward_funcs, optimizers=optimizers)
        self._setup_model(model, processing_class, peft_config, quantization_config, lm_head_fp32=args.cast_lm_head_to_fp32)  # before the reference copy
        self._setup_rewards(reward_funcs, reward_processing_classes)
        self.tool_rollout = None  # GRPO's shared blocks read it: GMPO has no tool-calling episodes
        self.ref_model = build_reference_model(self.model, None, loop=self.loop, model_init_kwargs=args.model_init_kwargs,
                                               disable_dropout_in_ref=args.disable_dropout, needed=args.beta != 0.0)
        check_sync_ref_model(args, self.ref_model)
        self._setup_datasets(train_dataset, eval_dataset)
        self.loop.setup(self.model, method=self)
        self.rollout_func = rollout_func
        self.engine = rollout_engine or build_rollout_engine(args, model=self.model, tokenizer=self._tokenizer, accelerator=self.loop.accelerator)
        # the transformers backend samples from the trained model itself: old log-probs equal the current ones
        self.engine_is_policy = self.engine.samples_from_policy and rollout_func is None
        # the prompts and rollouts of every step: the loop consumes the producer's steps; its state is checkpointed per process
        self.producer = RolloutProducer(self.loop.prompt_source(len(self.train_dataset), self._prompts_per_step()), self.train_dataset,
                                        self._produce, reuse=self.args.num_iterations)
        self._sampling = sampling_from_config(args)  # SamplingParams keywords (generation_kwargs applied; unknown keys warn)
        self._setup_logging()

    # -------------------------------------------------------------------------- setup (the core's online steps)
    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_model
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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_rewards
    def _setup_rewards(self, reward_funcs, reward_processing_classes) -> None:
        """Resolve the reward functions (TRL's ``reward_funcs`` / ``reward_func_names`` / ``reward_weights`` / ``reward_processing_classes``)."""
        rewards = resolve_online_rewards(reward_funcs, self.args, loop=self.loop, reward_processing_classes=reward_processing_classes)
        self.reward_funcs, self.reward_func_names, self.reward_weights = rewards.funcs, rewards.names, rewards.weights  # weights (F,)
        self.reward_processing_classes = rewards.processing_classes

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_datasets
    def _setup_datasets(self, train_dataset, eval_dataset) -> None:
        self.train_dataset = self.process_dataset(train_dataset, "train_dataset")
        if isinstance(eval_dataset, dict):
            self.eval_dataset = {key: self.process_dataset(part, f"eval_dataset[{key!r}]") for key, part in eval_dataset.items()}
        else:
            self.eval_dataset = self.process_dataset(eval_dataset, "eval_dataset") if eval_dataset is not None else None

    # Copied from posttrain_grpo.trainer.GRPOTrainer._setup_logging
    def _setup_logging(self) -> None:
        """TRL's completion log (``_logs``; written at each training log with ``log_completions``)."""
        args = self.args
        self._completion_log = CompletionLog(args.per_device_train_batch_size * args.gradient_accumulation_steps)  # one rollout
        self._logs = self._completion_log.logs
        self.add_callback(self._completion_log.callback(args, self.loop))

    # -------------------------------------------------------------------------- data
    # Copied from posttrain_grpo.trainer.GRPOTrainer.process_dataset
    def process_dataset(self, dataset, name: str):
        """Return ``dataset`` as prompt rows (``posttrain.prepare_prompt_dataset``); a streamed ``train_dataset`` keeps the rows ``max_steps`` draw."""
        limit = None
        if name == "train_dataset" and self.args.max_steps > 0:
            limit = self.args.max_steps * self._prompts_per_step() * self.loop.accelerator.num_processes
        dataset = prepare_prompt_dataset(dataset, name, method="GMPO", prompt_ids=lambda row: self._prompt_ids(row, where=f"{name} row 0"), limit=limit)
        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset[0]) if len(dataset) else []
        if image_column(columns) is not None and self.tool_rollout is not None:
            raise ConfigError(f"{name} has an image column {image_column(columns)!r} and tools= / environment_factory= are set: tool-calling "
                              "episodes do not carry images yet; train on the images without tools, or drop the image column.")
        return dataset

    # Copied from posttrain_grpo.trainer.GRPOTrainer._prompt_ids
    def _prompt_ids(self, row: dict, where: str = "the row") -> list[int]:
        """Token ids of a row's prompt: its ``prompt_ids`` as given, or the tokenized ``prompt`` (messages via the chat template)."""
        return self._encode_prompt(row, where)[0]

    # Copied from posttrain_grpo.trainer.GRPOTrainer._encode_prompt
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

    # Copied from posttrain_grpo.trainer.GRPOTrainer._prompts_per_step
    def _prompts_per_step(self) -> int:
        args = self.args
        return args.per_device_train_batch_size * args.gradient_accumulation_steps // args.num_generations

    @property
    def data_collator(self):
        """The collator of raw prompt rows (TRL's attribute; TRL's is the identity): :meth:`collate`, which keeps them raw."""
        return self.collate

    # -------------------------------------------------------------------------- loop protocol
    # Copied from posttrain_grpo.trainer.GRPOTrainer.collate
    def collate(self, rows: list[dict]) -> dict:
        return {"rows": [dict(row) for row in rows]}  # prompts stay raw (the producer reads the dataset's rows itself)

    def count_items(self, batch: dict) -> int:
        return batch["completion_ids"].shape[0]  # GMPO's loss is a mean over sequences

    # Copied from posttrain_grpo.trainer.GRPOTrainer._produce
    def _produce(self, request: ProduceRequest) -> list[dict]:
        """The producer's callback: generate, score and split one step's rollouts (the producer reuses them ``num_iterations`` times)."""
        seed = self.args.seed + request.step + 1_000_003 * request.rank
        return self._generate_and_score(request.rows, seed, indices=request.indices)

    # Copied from posttrain_grpo.trainer.GRPOTrainer._generate
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
        # 1. rollout: G completions per prompt, grouped prompt0 x G, prompt1 x G, ... (conditioned on the rows' images, if any)
        # 2. reward: (N, F), NaN where a function returned None
        prompts, rollout, rewards_per_func = self._rollout_and_rewards(rows, seed, num_generations, self._row_names(rows, indices, mode))

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
        advantages, is_std_zero = advantages[local], is_std_zero[local]  # both per row (N,)
        world = self.loop.accelerator.num_processes if mode == "train" else 1
        for start, batch in zip(range(0, len(rollout), size), micro_batches):
            batch["advantages"] = advantages[start : start + size]  # (b,)
            # a micro-batch's share of a per-step mean is its mean / (micro-batches x processes): the loop sums the shares
            batch["share_divisor"] = torch.tensor(float(len(micro_batches) * world))

        # 5. metrics of the rollout (the loss returns them with its own); the completion log keeps training rollouts only
        metrics = reward_and_length_metrics(rollout, rewards_per_func, self.reward_weights, self.reward_func_names, is_std_zero, num_generations)
        attach_rollout_metrics(micro_batches, {**metrics, **self._completion_log.pop_metrics()})
        if mode == "train":
            completions = self._tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
            self._completion_log.record(prompts, completions, rewards_per_func, self.reward_func_names, advantages)
        else:
            self._completion_log.discard_extra()
        return micro_batches

    # Copied from posttrain_grpo.trainer.GRPOTrainer._row_names
    @staticmethod
    def _row_names(rows: list[dict], indices: list[int] | None, mode: str = "train") -> list[str]:
        """What an error names for each row: ``train_dataset row <index>`` (or the row's place in an eval batch)."""
        if indices is None:
            return [f"{mode} batch row {i}" for i in range(len(rows))]
        return [f"train_dataset row {i}" for i in indices]

    # Copied from posttrain_grpo.trainer.GRPOTrainer._rollout_and_rewards
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

    def _with_logps(self, batch: dict, mode: str) -> dict:
        """Add a micro-batch's no-grad log-probs: pi_old (when it differs from the current policy) and the reference's (beta > 0).

        GMPO, like TRL's, applies no sampler importance-sampling correction: the ratio's denominator
        is pi_old scored by the trained model (or the sampler's own log-probs when they are exactly it).
        """
        args = self.args
        sampling_logps = batch.pop("sampling_logprobs")  # (b, C)
        need_old = (mode == "train" and args.num_iterations > 1) or not self.engine_is_policy
        return add_old_and_ref_logps(batch, sampling_logps, model=self.model, temperature=args.temperature, need_old=need_old, need_ref=args.beta != 0.0,
                                     ref_model=self.ref_model, old_from_sampler=sampler_is_old_policy(self._sampling, args.temperature, self.engine_is_policy),
                                     device=self.loop.device, accelerator=self.loop.accelerator, chunk_size=args.logprob_chunk_size)

    # Copied from posttrain_grpo.trainer.GRPOTrainer.get_high_entropy_mask
    def get_high_entropy_mask(self, entropies: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
        """Return the tokens whose entropy is at or above the ``threshold`` quantile of the unmasked entropies (TRL's signature).

        The quantile is taken over this micro-batch's completion tokens (TRL gathers them across
        processes); padding is never selected, and nothing is when every token is masked.
        """
        valid = entropies[mask.bool()].float()
        if valid.numel() == 0:
            return torch.zeros_like(entropies, dtype=torch.bool)
        return ((entropies * mask) >= torch.quantile(valid, threshold)) & mask.bool()

    def compute_loss(self, model, batch: dict, num_items_in_batch):
        """Return the micro-batch's share of the step loss and its metrics (no host syncs)."""
        args = self.args
        mask = batch["completion_mask"].float()  # (B, C)
        per_token_logps, entropies, aux_loss = completion_logps(model, batch, args.temperature, router_aux_loss=self.aux_loss_enabled,
                                                                chunk_size=args.logprob_chunk_size)  # (B, C), (B, C)
        advantages = batch["advantages"]  # (B,)
        # with one iteration on the trained model's own samples, old == current (detached): no extra forward
        old_per_token_logps = batch.get("old_per_token_logps", per_token_logps.detach())  # (B, C)

        entropy_mask = None
        if args.top_entropy_quantile < 1.0:  # keep the top-rho tokens by entropy (this micro-batch's quantile)
            entropy_mask = self.get_high_entropy_mask(entropies.detach(), mask, 1 - args.top_entropy_quantile).to(mask.dtype)  # (B, C)
        eps_low, eps_high = args.epsilon, args.epsilon_high if args.epsilon_high is not None else args.epsilon
        per_sequence_loss, clip = gmpo_sequence_loss(per_token_logps, old_per_token_logps, advantages, mask, eps_low, eps_high, entropy_mask)  # (B,)

        if args.beta != 0.0:  # k3 estimate of KL(pi || pi_ref) per token, averaged over each sequence's completion tokens
            ref = batch["ref_per_token_logps"]
            per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1  # (B, C)
            per_sequence_loss = per_sequence_loss + args.beta * (per_token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)

        # aggregate: the micro-batch's SUM of per-sequence losses / sequences in the whole step (see count_items)
        loss = per_sequence_loss.sum() / num_items_in_batch

        metrics = {
            "entropy": masked_mean(entropies.detach(), mask),
            "clip_ratio/low_mean": masked_mean(clip["is_low"].float(), mask),
            "clip_ratio/high_mean": masked_mean(clip["is_high"].float(), mask),
            "clip_ratio/region_mean": masked_mean((clip["is_low"] | clip["is_high"]).float(), mask),
        }
        if args.beta != 0.0:
            metrics["kl"] = masked_mean(per_token_kl.detach(), mask)
        if self.aux_loss_enabled and aux_loss is not None:
            share = batch.get("share_divisor", torch.ones(()))
            loss = loss + self.router_aux_loss_coef * aux_loss / share.to(aux_loss.device)
            metrics["aux_loss"] = aux_loss.detach().float()
        if "rollout_metric_values" in batch:
            metrics.update(zip(batch["rollout_metric_names"], batch["rollout_metric_values"]))
        return loss, metrics

    def on_step_end(self, model, state) -> None:
        self.engine.update_weights(model)  # the next rollout samples from the updated policy
        self._sync_ref_model(model, state)

    # Copied from posttrain_grpo.trainer.GRPOTrainer._sync_ref_model
    @torch.no_grad()
    def _sync_ref_model(self, model, state) -> None:
        """TR-DPO: every ``ref_model_sync_steps`` steps, ref = alpha * policy + (1 - alpha) * ref."""
        args = self.args
        if not args.sync_ref_model or self.ref_model is None or state.global_step % args.ref_model_sync_steps != 0:
            return
        sync_reference_model(self.ref_model, model, args.ref_model_mixup_alpha, accelerator=self.loop.accelerator)

    # Copied from posttrain_grpo.trainer.GRPOTrainer.evaluate_batches
    def evaluate_batches(self, model, batches) -> dict[str, float]:
        """Return the eval loss and the rollout metrics of ``num_generations_eval`` samples per eval prompt (seeded by ``seed``).

        Each eval batch is rolled out, scored and given advantages within its groups (no
        cross-process statistics), then its loss is computed as in training (``posttrain.evaluate_online``).
        """
        return evaluate_online(model, batches, produce=lambda rows, seed: self._generate_and_score(rows, seed, mode="eval"),
                               compute_loss=self.compute_loss, count_items=self.count_items, loop=self.loop, seed=self.args.seed)

    def state_dict(self) -> dict:
        state = {"policy_version": self.engine.policy_version}
        if self.args.sync_ref_model and self.ref_model is not None:  # the reference moves: resume needs it
            state["ref_model"] = {k: v.detach().cpu() for k, v in self.ref_model.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.set_policy_version(int(state.get("policy_version", 0)))
        if "ref_model" in state and self.ref_model is not None:
            self.ref_model.load_state_dict(state["ref_model"])
